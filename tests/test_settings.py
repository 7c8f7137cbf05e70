"""Settings: the environment, .env files, and .env.example kept complete and true."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from config import BackendSettings, Settings
from config.backends import BUILTIN_BACKENDS, BackendLoadError, flat_prefix, settings_model_for
from gateway.backends import load_backend
from gateway.backends.echo import EchoSettings
from gateway.backends.openai import OpenAISettings
from gateway.backends.synthetic import SyntheticSettings

ROOT = Path(__file__).resolve().parent.parent


def example_entries() -> dict[str, str]:
    entries = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            entries[key.strip()] = value.strip()
    return entries


def builtin_models() -> dict[str, type[BackendSettings]]:
    models = {name: settings_model_for(name) for name in BUILTIN_BACKENDS}
    return {name: model for name, model in models.items() if model is not None}


def test_env_example_lists_every_setting_with_a_comment() -> None:
    keys = set(example_entries())
    # backend_settings holds the chosen backend's model: its fields are the variables.
    fields = {f"GATEWAY_{name.upper()}" for name in Settings.model_fields if name != "backend_settings"}
    for model in builtin_models().values():
        fields |= {f"GATEWAY_{flat_prefix(model)}{name}".upper() for name in model.model_fields}
    assert keys == fields
    lines = (ROOT / ".env.example").read_text().splitlines()
    for index, line in enumerate(lines):
        if line.startswith("GATEWAY_"):
            # Each setting has a comment above it (or shares the one above its group's first line).
            above = lines[index - 1]
            assert above.startswith("#") or above.startswith("GATEWAY_"), line


@pytest.mark.parametrize("backend", sorted(BUILTIN_BACKENDS))
def test_env_example_values_are_the_defaults(tmp_path: Path, backend: str) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text((ROOT / ".env.example").read_text())
    from_example = Settings(_env_file=str(env_file), backend=backend)
    defaults = Settings(_env_file=None, backend=backend)
    assert from_example.model_dump() == defaults.model_dump()
    assert from_example.model_dump()["backend_settings"] == defaults.model_dump()["backend_settings"] != {}


def test_the_backend_model_reads_the_env_file_settings_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / ".env").write_text("GATEWAY_BACKEND=synthetic\nGATEWAY_SYNTHETIC_TOKENS_PER_S=7\n")
    other = tmp_path / "other.env"
    other.write_text("GATEWAY_BACKEND=synthetic\nGATEWAY_SYNTHETIC_TOKENS_PER_S=8\n")
    monkeypatch.chdir(tmp_path)
    assert Settings().backend_settings_as(SyntheticSettings).tokens_per_s == 7
    assert Settings(_env_file=str(other)).backend_settings_as(SyntheticSettings).tokens_per_s == 8
    unread = Settings(_env_file=None, backend="synthetic")
    assert unread.backend_settings_as(SyntheticSettings).tokens_per_s == 50


def test_environment_and_comma_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_ALLOWED_ORIGINS", "https://a.example, https://b.example")
    monkeypatch.setenv("GATEWAY_JWT_ALGORITHMS", "RS256,ES256")
    monkeypatch.setenv("GATEWAY_MAX_CONNECTIONS", "7")
    settings = Settings(_env_file=None)
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
    {"backend": "echo", "backend_settings": {"delay_ms": -1}},
    {"backend": "synthetic", "backend_settings": {"tokens_per_s": -1}},
    {"backend": "openai", "backend_settings": {"extra_headers": "X-Key"}},
    {"backend": "openai", "backend_settings": {"extra_headers": "bad name=1"}},
    {"backend": "openai", "backend_settings": {"base_url": "ftp://models.example"}},
    {"backend": "openai", "backend_settings": {"proxy": "proxy.example:3128"}},
    {"backend": "openai", "backend_settings": {"api": "responses"}},
    {"backend": "transformers", "backend_settings": {"max_concurrency": 0}},
])
def test_invalid_settings_are_refused(values: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        Settings(_env_file=None, **values)  # type: ignore[arg-type]


@pytest.mark.parametrize(("backend", "variable", "value", "message"), [
    ("echo", "GATEWAY_ECHO_DELAY_MS", "-1", "Input should be greater than or equal to 0"),
    ("synthetic", "GATEWAY_SYNTHETIC_TTFT_MS", "soon",
     "Input should be a valid number, unable to parse string as a number"),
    ("openai", "GATEWAY_OPENAI_BASE_URL", "ftp://models.example",
     "Value error, openai_base_url must start with http:// or https://"),
    ("transformers", "GATEWAY_LOCAL_QUEUE_SIZE", "-1", "Input should be greater than or equal to 0"),
])
def test_a_bad_backend_variable_is_reported_by_its_full_name(
        monkeypatch: pytest.MonkeyPatch, backend: str, variable: str, value: str, message: str) -> None:
    from gateway.cli import main

    monkeypatch.chdir(ROOT / "tests")  # no .env here
    monkeypatch.setenv("GATEWAY_BACKEND", backend)
    monkeypatch.setenv(variable, value)
    # Reported beside the gateway's own bad settings, as every invalid setting is.
    monkeypatch.setenv("GATEWAY_PORT", "eighty")
    with pytest.raises(SystemExit) as caught:
        main(["token", "--sub", "x"])
    lines = str(caught.value.code).splitlines()
    assert lines[0] == "invalid settings:"
    assert "  GATEWAY_PORT: Input should be a valid integer, unable to parse string as an integer" in lines
    assert f"  {variable}: {message}" in lines, lines
    assert value not in "\n".join(lines[1:]) and "eighty" not in "\n".join(lines)


def test_backend_settings_come_from_their_own_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_BACKEND", "synthetic")
    monkeypatch.setenv("GATEWAY_SYNTHETIC_TTFT_MS", "12")
    monkeypatch.setenv("GATEWAY_SYNTHETIC_TOKENS_PER_S", "34")
    monkeypatch.setenv("GATEWAY_ECHO_DELAY_MS", "56")  # another backend's: not read
    settings = Settings(_env_file=None)
    own = settings.backend_settings_as(SyntheticSettings)
    assert (own.ttft_ms, own.tokens_per_s) == (12, 34)
    refused = r"reads EchoSettings, but the settings \(GATEWAY_BACKEND=synthetic\) carry SyntheticSettings"
    with pytest.raises(TypeError, match=refused):
        settings.backend_settings_as(EchoSettings)


def test_given_backend_settings_are_used_or_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_SYNTHETIC_TTFT_MS", "12")
    # A dict: its fields, over the environment.
    settings = Settings(_env_file=None, backend="synthetic",
                        backend_settings={"tokens_per_s": 3})
    assert settings.backend_settings == SyntheticSettings(_env_file=None, ttft_ms=12, tokens_per_s=3)
    # A model instance: as it is.
    given = SyntheticSettings(_env_file=None, ttft_ms=1)
    assert Settings(_env_file=None, backend="synthetic", backend_settings=given).backend_settings is given
    # Another backend's model, or a value from the environment, is refused.
    with pytest.raises(ValidationError, match="backend 'echo' takes EchoSettings, or a dict of its fields, not Synth"):
        Settings(_env_file=None, backend="echo", backend_settings=given)
    monkeypatch.setenv("GATEWAY_BACKEND_SETTINGS", '{"delay_ms": 1}')
    with pytest.raises(ValidationError, match="GATEWAY_ECHO_\\* variables"):
        Settings(_env_file=None)


def test_a_backend_without_settings_has_none() -> None:
    settings = Settings(_env_file=None, backend="tests.plugin_backends:TickingBackend")
    assert settings.backend_settings is None
    with pytest.raises(TypeError, match="carry no backend settings"):
        settings.backend_settings_as(EchoSettings)
    with pytest.raises(ValidationError, match="has no settings model"):
        Settings(_env_file=None, backend="tests.plugin_backends:TickingBackend",
                 backend_settings={"delay_ms": 1})


def test_an_unknown_backend_is_reported_when_it_loads() -> None:
    # gateway token and gateway chat need no backend: the settings are built whatever it is.
    settings = Settings(_env_file=None, backend="no-such-backend")
    assert settings.backend_settings is None
    with pytest.raises(BackendLoadError, match="unknown backend 'no-such-backend'; known: echo, openai"):
        load_backend(settings)


def test_secret_is_not_shown_in_repr() -> None:
    settings = Settings(_env_file=None, jwt_secret="super-secret-value-0123456789abcdefghij")
    assert "super-secret-value-0123456789abcdefghij" not in repr(settings)
    assert "super-secret-value-0123456789abcdefghij" not in str(settings.model_dump())


def test_openai_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_BACKEND", "openai")
    monkeypatch.setenv("GATEWAY_OPENAI_BASE_URL", "http://127.0.0.1:8001/v1/")
    monkeypatch.setenv("GATEWAY_OPENAI_API_KEY", "sk-very-secret-key-value")
    monkeypatch.setenv("GATEWAY_OPENAI_MODELS", "small, large")
    monkeypatch.setenv("GATEWAY_OPENAI_EXTRA_HEADERS", "X-Org=acme, X-Token=a=b")
    settings = Settings(_env_file=None)
    openai = settings.backend_settings_as(OpenAISettings)
    assert openai.base_url == "http://127.0.0.1:8001/v1"
    assert openai.models == ["small", "large"]
    assert openai.headers == {"X-Org": "acme", "X-Token": "a=b"}
    assert "sk-very-secret-key-value" not in repr(settings)
    assert "sk-very-secret-key-value" not in str(settings.model_dump())


def test_a_refused_header_pair_does_not_show_its_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_OPENAI_EXTRA_HEADERS", "X-Ok=1,Bad Name=hunter2-secret")
    with pytest.raises(ValidationError) as caught:
        Settings(_env_file=None, backend="openai")
    assert [error["loc"] for error in caught.value.errors()] == [("openai_extra_headers",)]
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
        Settings(_env_file=None, backend="openai",
                 backend_settings={"proxy": "socks5://user:hunter2-secret@proxy"})
    assert "hunter2-secret" not in str(caught.value)
