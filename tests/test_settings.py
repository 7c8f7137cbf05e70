"""Settings: the environment, .env files, and .env.example kept complete and true."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from config import Settings

ROOT = Path(__file__).resolve().parent.parent


def example_entries() -> dict[str, str]:
    entries = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            entries[key.strip()] = value.strip()
    return entries


def test_env_example_lists_every_setting_with_a_comment() -> None:
    keys = set(example_entries())
    fields = {f"GATEWAY_{name.upper()}" for name in Settings.model_fields}
    assert keys == fields
    lines = (ROOT / ".env.example").read_text().splitlines()
    for index, line in enumerate(lines):
        if line.startswith("GATEWAY_"):
            # Each setting has a comment above it (or shares the one above its group's first line).
            above = lines[index - 1]
            assert above.startswith("#") or above.startswith("GATEWAY_"), line


def test_env_example_values_are_the_defaults(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text((ROOT / ".env.example").read_text())
    from_example = Settings(_env_file=str(env_file))  # type: ignore[call-arg]
    defaults = Settings(_env_file=None)  # type: ignore[call-arg]
    assert from_example.model_dump() == defaults.model_dump()


def test_environment_and_comma_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_ALLOWED_ORIGINS", "https://a.example, https://b.example")
    monkeypatch.setenv("GATEWAY_JWT_ALGORITHMS", "RS256,ES256")
    monkeypatch.setenv("GATEWAY_MAX_CONNECTIONS", "7")
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.allowed_origins == ["https://a.example", "https://b.example"]
    assert settings.jwt_algorithms == ["RS256", "ES256"]
    assert settings.max_connections == 7


@pytest.mark.parametrize("values", [
    {"jwt_algorithms": ["none"]},
    {"jwt_algorithms": []},
    {"default_max_tokens": 10, "max_tokens": 5},
    {"heartbeat_interval_s": 30, "heartbeat_timeout_s": 20},
    {"send_queue_size": 0},
    {"env": "staging"},
    {"jwt_secret": "too-short"},
    {"openai_extra_headers": "X-Key"},
    {"openai_extra_headers": "bad name=1"},
    {"openai_base_url": "ftp://models.example"},
    {"openai_proxy": "proxy.example:3128"},
    {"openai_api": "responses"},
    {"local_max_concurrency": 0},
])
def test_invalid_settings_are_refused(values: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        Settings(_env_file=None, **values)  # type: ignore[arg-type]


def test_secret_is_not_shown_in_repr() -> None:
    settings = Settings(_env_file=None, jwt_secret="super-secret-value-0123456789abcdefghij")  # type: ignore[call-arg]
    assert "super-secret-value-0123456789abcdefghij" not in repr(settings)
    assert "super-secret-value-0123456789abcdefghij" not in str(settings.model_dump())


def test_openai_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_OPENAI_BASE_URL", "http://127.0.0.1:8001/v1/")
    monkeypatch.setenv("GATEWAY_OPENAI_API_KEY", "sk-very-secret-key-value")
    monkeypatch.setenv("GATEWAY_OPENAI_MODELS", "small, large")
    monkeypatch.setenv("GATEWAY_OPENAI_EXTRA_HEADERS", "X-Org=acme, X-Token=a=b")
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.openai_base_url == "http://127.0.0.1:8001/v1"
    assert settings.openai_models == ["small", "large"]
    assert settings.openai_headers == {"X-Org": "acme", "X-Token": "a=b"}
    assert "sk-very-secret-key-value" not in repr(settings)


def test_a_refused_header_pair_does_not_show_its_value() -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(_env_file=None, openai_extra_headers="X-Ok=1,Bad Name=hunter2-secret")  # type: ignore[call-arg]
    assert "hunter2-secret" not in str(caught.value)


def test_tracebacks_in_logs_are_redacted() -> None:
    import io
    import logging

    from gateway.logs import RedactingFilter

    jwt_like = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl"
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger("test.redaction")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        try:
            raise RuntimeError(f"upstream said: bad token {jwt_like} for /v1?token=abc123")
        except RuntimeError:
            logger.exception("failed with Bearer %s", jwt_like)
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert "RuntimeError" in text and "Traceback" in text
    assert jwt_like not in text and "abc123" not in text


def test_a_refused_proxy_url_does_not_show_its_credentials() -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(_env_file=None, openai_proxy="socks5://user:hunter2-secret@proxy")  # type: ignore[call-arg]
    assert "hunter2-secret" not in str(caught.value)
