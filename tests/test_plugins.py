"""Third-party backends: the documented example, installed as a distribution with an entry
point, loads by name and streams through the gateway."""

from __future__ import annotations

import json
from importlib.metadata import entry_points

import pytest

from config import Settings
from gateway.backends import (
    ENTRY_POINT_GROUP,
    BackendLoadError,
    BackendSettings,
    load_backend,
    resolve_backend_factory,
)
from tests import plugin_backends
from tests.support import (
    ROOT,
    ServerThread,
    make_settings,
    mint,
    recv_json,
    recv_until,
    stream_text,
    terminal_for,
    ws_connect,
)

pytestmark = pytest.mark.anyio


def test_entry_point_is_found_and_loaded(example_plugin: str) -> None:
    names = [ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)]
    assert example_plugin in names
    factory = resolve_backend_factory(example_plugin)
    assert factory.__module__ == "shout_backend" and factory.__name__ == "ShoutBackend"
    backend = load_backend(make_settings(backend=example_plugin))
    assert backend.name == "shout"


def test_plugin_settings_come_from_its_own_variables(example_plugin: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = resolve_backend_factory(example_plugin).settings_model  # type: ignore[attr-defined]
    assert model.__name__ == "ShoutSettings"
    assert make_settings(backend=example_plugin).backend_settings_as(model).delay_ms == 10
    monkeypatch.setenv("GATEWAY_SHOUT_DELAY_MS", "250")
    settings = Settings(_env_file=None, backend=example_plugin)
    assert settings.backend_settings_as(model).delay_ms == 250
    backend = load_backend(settings)
    assert backend.delay_s == 0.25  # type: ignore[attr-defined]


def test_a_bad_plugin_setting_stops_the_gateway_with_its_name(
        example_plugin: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.cli import main

    monkeypatch.chdir(ROOT / "tests")  # no .env here
    monkeypatch.setenv("GATEWAY_BACKEND", example_plugin)
    monkeypatch.setenv("GATEWAY_SHOUT_DELAY_MS", "-1")
    with pytest.raises(SystemExit) as caught:
        main(["serve"])
    assert str(caught.value.code).splitlines() == [
        "invalid settings:", "  GATEWAY_SHOUT_DELAY_MS: Input should be greater than or equal to 0"]


def test_a_settings_model_without_a_prefix_of_its_own_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    class Unprefixed(BackendSettings):
        delay_ms: float = 1.0

    class Careless:
        name = "careless"
        settings_model = Unprefixed

    monkeypatch.setattr(plugin_backends, "Careless", Careless, raising=False)
    settings = Settings(_env_file=None, backend="tests.plugin_backends:Careless")
    assert settings.backend_settings is None
    with pytest.raises(BackendLoadError, match="Unprefixed must set an env_prefix of its own after GATEWAY_"):
        load_backend(settings)


def test_unknown_name_lists_the_installed_plugins(example_plugin: str) -> None:
    with pytest.raises(BackendLoadError, match=example_plugin):
        resolve_backend_factory("no-such-backend")


async def test_plugin_streams_through_the_gateway(example_plugin: str) -> None:
    with ServerThread(make_settings(backend=example_plugin)) as server:
        async with ws_connect(server.url, mint()) as ws:
            await recv_json(ws)
            await ws.send(json.dumps({"type": "generate", "id": "p", "prompt": "make  some noise", "max_tokens": 2}))
            frames = await recv_until(ws, terminal_for("p"))
    assert stream_text(frames, "p") == "MAKE SOME "
    assert frames[-1]["finish_reason"] == "length"
