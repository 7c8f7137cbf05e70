"""gateway.client: the bookkeeping without a network, then the client against real servers,
through a TCP proxy that a test can cut."""

from __future__ import annotations

import json
import random
import re
import textwrap
from typing import Any

import anyio
import pytest

from gateway.backends.synthetic import synthetic_tokens
from gateway.client import (
    DISCONNECTED,
    STREAM_LOST,
    GatewayClient,
    GatewayError,
    StateChange,
    Streams,
    StreamState,
    backoff_delay,
    should_reconnect,
)
from tests.support import ROOT, ServerThread, make_settings, mint
from tests.tcp_proxy import CuttableProxy

# Streams: no I/O ---------------------------------------------------------------------------


def generate(stream_id: str = "a") -> StreamState:
    return StreamState(stream_id, {"type": "generate", "id": stream_id, "prompt": "p"})


def test_a_generate_waits_for_a_connection_then_goes_out() -> None:
    streams = Streams()
    assert streams.add(generate()) == []
    assert [json.loads(f) for f in streams.on_open()] == [{"type": "generate", "id": "a", "prompt": "p"}]
    assert streams.add(generate("b")) == ['{"type":"generate","id":"b","prompt":"p"}']


def test_reconnect_resumes_after_the_last_seq_and_drops_what_was_delivered() -> None:
    streams = Streams()
    streams.add(generate())
    streams.on_open()
    streams.on_frame({"type": "start", "id": "a", "epoch": "e1"})
    delivered = [d.text for f in ({"type": "token", "id": "a", "seq": 0, "text": "x"},
                                  {"type": "token", "id": "a", "seq": 2, "text": "yz"})
                 for d in streams.on_frame(f)[0]]
    assert delivered == ["x", "yz"]
    assert streams.on_close(final=False) == []
    assert [json.loads(f) for f in streams.on_open()] == [{"type": "resume", "id": "a", "after": 2}]
    assert streams.on_frame({"type": "start", "id": "a", "epoch": "e1", "resumed": True}) == ([], [])
    assert streams.on_frame({"type": "token", "id": "a", "seq": 2, "text": "yz"}) == ([], [])
    (delivery,), _ = streams.on_frame({"type": "token", "id": "a", "seq": 3, "text": "!"})
    assert delivery.text == "!"
    (end,), _ = streams.on_frame({"type": "done", "id": "a", "finish_reason": "stop", "usage": {}})
    assert end.terminal is not None and end.terminal["type"] == "done" and end.stream.texts == ["x", "yz", "!"]
    assert streams.streams == {}


def test_a_resumed_start_with_another_epoch_is_a_lost_stream() -> None:
    streams = Streams()
    streams.add(generate())
    streams.on_open()
    streams.on_frame({"type": "start", "id": "a", "epoch": "e1"})
    streams.on_close(final=False)
    streams.on_open()
    (delivery,), _ = streams.on_frame({"type": "start", "id": "a", "epoch": "e2", "resumed": True})
    assert delivery.terminal is not None and delivery.terminal["code"] == STREAM_LOST
    assert streams.on_frame({"type": "token", "id": "a", "seq": 0, "text": "other"}) == ([], [])


def test_a_generate_the_server_never_got_is_sent_again() -> None:
    streams = Streams()
    streams.add(generate())
    streams.on_open()  # sent, then the connection dropped before its start frame
    streams.on_close(final=False)
    assert [json.loads(f)["type"] for f in streams.on_open()] == ["resume"]
    deliveries, out = streams.on_frame({"type": "error", "id": "a", "code": "not_found", "message": "…"})
    assert deliveries == [] and [json.loads(f)["type"] for f in out] == ["generate"]
    # Once started, a not_found is the end of it.
    streams.on_frame({"type": "start", "id": "a", "epoch": "e1"})
    (end,), _ = streams.on_frame({"type": "error", "id": "a", "code": "rate_limited", "message": "…"})
    assert end.terminal is not None and end.terminal["code"] == "rate_limited"


def test_cancel_before_sending_ends_at_once_and_a_final_close_ends_the_rest() -> None:
    streams = Streams()
    streams.add(generate("a"))
    streams.add(generate("b"))
    (cancelled,), out = streams.cancel("a")
    assert out == [] and cancelled.terminal is not None and cancelled.terminal["finish_reason"] == "cancelled"
    assert [json.loads(f)["id"] for f in streams.on_open()] == ["b"]
    assert streams.cancel("b") == ([], ['{"type":"cancel","id":"b"}'])
    (ended,) = streams.on_close(final=True, reason="1008")
    assert ended.terminal is not None and ended.terminal["code"] == DISCONNECTED


def test_backoff_grows_from_one_second_to_thirty_with_jitter() -> None:
    rng = random.Random(7)
    for attempt in range(12):
        delays = [backoff_delay(attempt, rng=rng) for _ in range(200)]
        ceiling = min(30.0, 2.0 ** (attempt + 1))
        assert all(1.0 <= d <= ceiling for d in delays)
        assert max(delays) - min(delays) > (ceiling - 1.0) / 2  # jittered, not a fixed step
    assert backoff_delay(100, rng=rng) <= 30.0


def test_which_closes_are_retried() -> None:
    assert not any(should_reconnect(code) for code in (1000, 1008, 1009))
    assert all(should_reconnect(code) for code in (None, 1001, 1006, 1011, 1013, 4000, 4003))


# Against a real gateway ---------------------------------------------------------------------

slow = pytest.mark.slow
anyio_mark = pytest.mark.anyio


def paced(**overrides: Any) -> Any:
    values: dict[str, Any] = {"backend": "synthetic", "synthetic_tokens_per_s": 150, "resume_grace_s": 10}
    values.update(overrides)
    return make_settings(**values)


@slow
@anyio_mark
@pytest.mark.parametrize("auth", ["subprotocol", "header", "query", "message"])
async def test_generate_streams_the_exact_text_with_each_auth_mode(auth: Any) -> None:
    prompt = "a few words, streamed back one by one"
    with ServerThread(make_settings()) as server:
        async with GatewayClient(server.url, mint("ann"), auth=auth) as client:
            answer = await client.generate(prompt)  # before the connection is open: queued
            with anyio.fail_after(10):
                pieces = [text async for text in answer]
                terminal = await answer.result()
            assert client.hello is not None and client.hello["user"] == "ann"
    assert "".join(pieces) == prompt
    assert terminal["type"] == "done" and terminal["finish_reason"] == "stop"
    assert answer.tokens == terminal["usage"]["completion_tokens"]


@slow
@anyio_mark
async def test_messages_and_options_reach_the_server() -> None:
    with ServerThread(make_settings(backend="synthetic", synthetic_tokens_per_s=0)) as server:
        async with GatewayClient(server.url, mint("bea")) as client:
            answer = await client.generate(messages=[{"role": "system", "content": "be brief"},
                                                     {"role": "user", "content": "hi"}], max_tokens=7)
            with anyio.fail_after(10):
                terminal = await answer.result()
    assert answer.text == "".join(synthetic_tokens("hi", 7))
    assert terminal["finish_reason"] == "length"


@slow
@anyio_mark
async def test_cancel_mid_answer() -> None:
    with ServerThread(paced(synthetic_tokens_per_s=50)) as server:
        async with GatewayClient(server.url, mint("cal")) as client:
            answer = await client.generate("long", max_tokens=2000)
            with anyio.fail_after(10):
                async for _ in answer:
                    if answer.tokens >= 3:
                        await answer.cancel()
                        break
                terminal = await answer.result()
    assert terminal["type"] == "done" and terminal["finish_reason"] == "cancelled"
    assert 3 <= answer.tokens < 2000
    assert "".join(synthetic_tokens("long", 2000)).startswith(answer.text)


@slow
@anyio_mark
async def test_a_dropped_connection_is_resumed_with_no_gap_and_no_duplicate() -> None:
    changes: list[StateChange] = []
    with ServerThread(paced()) as server, CuttableProxy(server.port) as proxy:
        async with GatewayClient(proxy.url, mint("dan"), on_state=changes.append) as client:
            answers = [await client.generate(f"prompt {i}", max_tokens=300) for i in range(2)]
            with anyio.fail_after(30):
                pieces: list[str] = []
                async for text in answers[0]:
                    pieces.append(text)
                    if answers[0].tokens >= 30 and proxy.cuts == 0:
                        assert proxy.cut() == 1
                pieces_other = [text async for text in answers[1]]
            terminals = [await a.result() for a in answers]
            assert client.opens == 2
    expected = ["".join(synthetic_tokens(f"prompt {i}", 300)) for i in range(2)]
    assert "".join(pieces) == expected[0] and "".join(pieces_other) == expected[1]
    assert [t["finish_reason"] for t in terminals] == ["length", "length"]
    drop = next(c for c in changes if c.state == "reconnecting")
    assert drop.opened and drop.code in (None, 1006) and drop.delay_s is not None and 1.0 <= drop.delay_s <= 2.0
    assert server.metric('gateway_generations_total{outcome="length",transport="ws"}') == 2


@slow
@anyio_mark
async def test_the_client_answers_application_pings() -> None:
    # Heartbeat every 0.1 s and a 1 s timeout: only the client's pongs keep it open (its
    # protocol pings come every 20 s), for an answer that takes about 2 s.
    settings = paced(synthetic_tokens_per_s=100, heartbeat_interval_s=0.1, heartbeat_timeout_s=1.0)
    with ServerThread(settings) as server:
        async with GatewayClient(server.url, mint("eve")) as client:
            answer = await client.generate("slow", max_tokens=200)
            with anyio.fail_after(20):
                terminal = await answer.result()
            assert client.opens == 1
    assert terminal["finish_reason"] == "length" and answer.text == "".join(synthetic_tokens("slow", 200))
    assert server.metric('gateway_closes_total{reason="stale"}') == 0


@slow
@anyio_mark
@pytest.mark.parametrize("auth", ["subprotocol", "message"])
async def test_a_refused_token_is_never_retried(auth: Any) -> None:
    with ServerThread(make_settings()) as server, CuttableProxy(server.port) as proxy:
        async with GatewayClient(proxy.url, mint("fay", secret="not-the-server-secret-0123456789abcdef"),
                                 auth=auth) as client:
            answer = await client.generate("never")
            with anyio.fail_after(10):
                terminal = await answer.result()
                with pytest.raises(GatewayError, match="1008"):
                    await client.wait_open()
            assert client.state == "closed" and client.closed
    assert terminal["code"] == DISCONNECTED
    assert proxy.accepted == 1


@slow
@anyio_mark
async def test_with_a_fixed_token_expiry_ends_the_answer_and_does_not_reconnect() -> None:
    errors: list[dict[str, Any]] = []
    changes: list[StateChange] = []
    with ServerThread(paced(synthetic_tokens_per_s=20, jwt_leeway_s=0)) as server:
        async with GatewayClient(server.url, mint("gus", ttl=2), on_error=errors.append,
                                 on_state=changes.append) as client:
            answer = await client.generate("x", max_tokens=1000)
            with anyio.fail_after(10):
                terminal = await answer.result()
                while not client.closed:
                    await client.state_changed()
    # A string cannot be renewed: the answer ends here, though the server keeps it resumable.
    assert terminal["type"] == "error" and terminal["code"] == DISCONNECTED
    assert [e["code"] for e in errors] == ["token_expired"]
    assert changes[-1] == StateChange("closed", code=4001, reason="token expired", opened=True)
    assert [c.state for c in changes].count("open") == 1


@slow
@anyio_mark
async def test_an_answer_outlives_the_token_it_started_with() -> None:
    minted: list[str] = []

    def fresh_token() -> str:
        minted.append(mint("ida", ttl=1.5))
        return minted[-1]

    settings = paced(synthetic_tokens_per_s=40, jwt_leeway_s=0, resume_grace_s=10)
    with ServerThread(settings) as server:
        async with GatewayClient(server.url, fresh_token) as client:
            answer = await client.generate("outlive", max_tokens=160)  # 4 s: past two tokens
            with anyio.fail_after(20):
                text = "".join([piece async for piece in answer])
                terminal = await answer.result()
    assert terminal["type"] == "done" and terminal["finish_reason"] == "length"
    assert text == "".join(synthetic_tokens("outlive", 160))
    assert len(minted) >= 3  # it reconnected with a fresh token, twice or more
    assert server.metric('gateway_closes_total{reason="token_expired"}') >= 2


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "GatewayClient" in b)
    return textwrap.dedent(block)


@slow
@anyio_mark
async def test_the_readme_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    with ServerThread(make_settings()) as server:
        source = readme_example().replace("ws://127.0.0.1:8000/ws", server.url)
        code = "async def example(token):\n" + textwrap.indent(source, "    ")
        namespace: dict[str, Any] = {}
        exec(compile(code, "README.md", "exec"), namespace)
        with anyio.fail_after(10):
            await namespace["example"](mint("ivy"))
    assert capsys.readouterr().out == "Hello there\nstop\n"
