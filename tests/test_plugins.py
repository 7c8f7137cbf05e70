"""Third-party backends: the documented example, installed as a distribution with an entry
point, loads by name and streams through the gateway."""

from __future__ import annotations

import json
from importlib.metadata import entry_points

import pytest

from gateway.backends import ENTRY_POINT_GROUP, BackendLoadError, load_backend, resolve_backend_factory
from tests.support import (
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
