"""The transformers backend through the gateway, with the tiny model built on the fly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

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


def settings_for(model: Path, **overrides: object) -> object:
    return make_settings(backend="transformers", local_model=str(model), **overrides)


async def test_streams_chat_through_the_gateway_without_blocking_the_loop(tiny_model_dir: Path) -> None:
    with ServerThread(settings_for(tiny_model_dir)) as server:  # type: ignore[arg-type]
        async with ws_connect(server.url, mint()) as ws:
            await recv_json(ws)
            await ws.send(json.dumps({"type": "generate", "id": "c", "max_tokens": 300,
                                      "messages": [{"role": "system", "content": "be brief"},
                                                   {"role": "user", "content": "hello there"}]}))
            await recv_until(ws, lambda f: f.get("type") == "token")
            await ws.send(json.dumps({"type": "ping"}))
            frames = await recv_until(ws, lambda f: f.get("type") == "pong" or terminal_for("c")(f), skip_pings=True)
            assert frames[-1]["type"] == "pong", "the event loop was blocked by generation"
            frames = await recv_until(ws, terminal_for("c"), timeout=60)
    done = frames[-1]
    assert done["type"] == "done" and done["finish_reason"] == "length"
    assert 1 < done["usage"]["completion_tokens"] <= 300


async def test_queue_waits_in_turn_and_refuses_when_full(tiny_model_dir: Path) -> None:
    settings = settings_for(tiny_model_dir, local_max_concurrency=1, local_queue_size=1)
    with ServerThread(settings) as server:  # type: ignore[arg-type]
        async with ws_connect(server.url, mint()) as ws:
            await recv_json(ws)
            await ws.send(json.dumps({"type": "generate", "id": "first", "prompt": "one", "max_tokens": 4000}))
            await recv_until(ws, lambda f: f.get("type") == "token" and f["id"] == "first")
            await ws.send(json.dumps({"type": "generate", "id": "second", "prompt": "two", "max_tokens": 3}))
            await ws.send(json.dumps({"type": "generate", "id": "third", "prompt": "three", "max_tokens": 3}))
            frames = await recv_until(ws, terminal_for("third"))
            assert frames[-1]["type"] == "error" and frames[-1]["code"] == "too_many_streams"
            assert not [f for f in frames if f.get("id") == "second" and f["type"] == "token"]
            await ws.send(json.dumps({"type": "cancel", "id": "first"}))
            frames = await recv_until(ws, terminal_for("second"), timeout=30)
    first_done = next(f for f in frames if f.get("id") == "first" and f["type"] == "done")
    assert first_done["finish_reason"] == "cancelled"
    assert frames.index(first_done) < next(i for i, f in enumerate(frames) if f.get("id") == "second")
    assert frames[-1]["type"] == "done" and stream_text(frames, "second")


def test_streamer_never_splits_a_character(tiny_model_dir: Path) -> None:
    import threading

    import torch
    from transformers import AutoTokenizer

    from gateway.backends.transformers import _LoopStreamer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "héllo wörld, 日本語 and more words than a few"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text.split())  # multi-byte characters span several byte-level tokens
    pieces: list[str] = []
    streamer = _LoopStreamer(tokenizer, None, None, threading.Event())
    streamer._emit = pieces.append  # type: ignore[method-assign,assignment]
    streamer.put(torch.tensor([[1, 2]]))  # generate() passes the prompt first
    for token_id in ids:
        streamer.put(torch.tensor([token_id]))
    streamer.end()
    assert "".join(pieces) == text
    assert len(pieces) > 5 and not any("\ufffd" in piece for piece in pieces)


async def test_the_prompt_is_tokenised_off_the_loop(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from gateway.backends import GenerationRequest, load_backend
    from gateway.backends.transformers import TransformersBackend

    encoded_in: list[threading.Thread] = []
    encode = TransformersBackend.encode

    def recording_encode(self: TransformersBackend, request: GenerationRequest) -> object:
        encoded_in.append(threading.current_thread())
        return encode(self, request)

    monkeypatch.setattr(TransformersBackend, "encode", recording_encode)
    backend = load_backend(settings_for(tiny_model_dir))  # type: ignore[arg-type]
    await backend.start()
    try:
        chunks = [chunk async for chunk in backend.stream(GenerationRequest(id="t", user="u", max_tokens=3,
                                                                            prompt="hello there"))]
    finally:
        await backend.aclose()
    assert chunks
    assert encoded_in and encoded_in[0] is not threading.current_thread()
