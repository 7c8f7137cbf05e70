"""Resume after reconnect, cancel from elsewhere, rooms and broadcast, in one process
(the in-memory stream store and backplane)."""

from __future__ import annotations

import json
from typing import Any

import anyio
import httpx
import pytest

from config import Settings
from gateway.backends.synthetic import synthetic_tokens
from tests import plugin_backends
from tests.support import (
    RawClient,
    Serve,
    connected,
    make_settings,
    mint,
    recv_until,
    stream_text,
    terminal_for,
)

pytestmark = pytest.mark.anyio

TICKING = "tests.plugin_backends:TickingBackend"


def paced(**overrides: Any) -> Settings:
    values: dict[str, Any] = {"backend": "synthetic", "synthetic_tokens_per_s": 200, "resume_grace_s": 5}
    values.update(overrides)
    return make_settings(**values)


def last_seq(frames: list[dict[str, Any]], stream_id: str) -> int:
    seqs = [f["seq"] for f in frames if f.get("type") == "token" and f.get("id") == stream_id]
    return seqs[-1] if seqs else -1


async def test_drop_mid_stream_and_resume_loses_and_duplicates_nothing(serve: Serve) -> None:
    server = serve(paced())
    async with connected(server, mint("ann")) as ws:
        await ws.send(json.dumps({"type": "generate", "id": "long", "prompt": "p", "max_tokens": 150}))
        first = await recv_until(ws, lambda f: f["type"] == "token" and f["seq"] >= 20)
    start = first[0]
    after = last_seq(first, "long")
    async with connected(server, mint("ann")) as ws:
        assert {"id": "long", "epoch": start["epoch"]} in ws.hello["resumable"]
        await ws.send(json.dumps({"type": "resume", "id": "long", "after": after}))
        rest = await recv_until(ws, terminal_for("long"))
    assert rest[0] == {"type": "start", "id": "long", "epoch": start["epoch"], "resumed": True}
    text = stream_text(first, "long") + stream_text(rest, "long")
    assert text == "".join(synthetic_tokens("p", 150))
    assert rest[-1]["type"] == "done" and rest[-1]["finish_reason"] == "length"
    seqs = [f["seq"] for f in rest if f["type"] == "token"]
    assert seqs and seqs[0] > after and seqs == sorted(set(seqs))


async def test_resume_a_finished_generation_replays_it_to_the_end(serve: Serve) -> None:
    server = serve(paced(synthetic_tokens_per_s=0))
    async with connected(server, mint("bo")) as ws:
        await ws.send(json.dumps({"type": "generate", "id": "fin", "prompt": "q", "max_tokens": 40}))
        original = await recv_until(ws, terminal_for("fin"))
    async with connected(server, mint("bo")) as ws:
        await ws.send(json.dumps({"type": "resume", "id": "fin", "after": 9}))
        replay = await recv_until(ws, terminal_for("fin"))
    assert replay[0]["resumed"] is True
    assert stream_text(replay, "fin") == "".join(synthetic_tokens("q", 40)[10:])
    assert replay[-1] == original[-1]


async def test_unknown_expired_and_other_users_ids_are_not_found(serve: Serve) -> None:
    server = serve(paced(synthetic_tokens_per_s=0, resume_ttl_s=0.3))
    async with connected(server, mint("cy")) as ws:
        await ws.send(json.dumps({"type": "generate", "id": "mine", "prompt": "q", "max_tokens": 5}))
        await recv_until(ws, terminal_for("mine"))
        async with connected(server, mint("mallory")) as other:
            for stream_id in ("mine", "nothing"):
                await other.send(json.dumps({"type": "resume", "id": stream_id, "after": -1}))
                error = (await recv_until(other, lambda f: f["type"] == "error"))[-1]
                assert error == {"type": "error", "id": stream_id, "code": "not_found",
                                 "message": "no generation with this id"}
            await other.send(json.dumps({"type": "cancel", "id": "mine"}))
            error = (await recv_until(other, lambda f: f["type"] == "error"))[-1]
            assert error["code"] == "not_found"
        await anyio.sleep(0.4)  # the TTL is the behaviour under test
        await ws.send(json.dumps({"type": "resume", "id": "mine", "after": -1}))
        error = (await recv_until(ws, lambda f: f["type"] == "error"))[-1]
        assert error["code"] == "not_found"
        # Expired, so the id can be used again.
        await ws.send(json.dumps({"type": "generate", "id": "mine", "prompt": "q", "max_tokens": 5}))
        assert (await recv_until(ws, terminal_for("mine")))[-1]["type"] == "done"


async def test_a_generation_nobody_resumes_is_cancelled_after_the_grace(serve: Serve) -> None:
    server = serve(backend=TICKING, resume_grace_s=0.5)
    async with connected(server, mint("di")) as ws:
        await ws.send(json.dumps({"type": "generate", "id": "orphan", "prompt": "x", "max_tokens": 4000}))
        await recv_until(ws, lambda f: f["type"] == "token")
    record = plugin_backends.record("orphan")
    assert not record.closed.wait(0.3), "a disconnect must not cancel at once"
    assert record.closed.wait(2.0), "not cancelled after the grace period"
    async with connected(server, mint("di")) as ws:
        await ws.send(json.dumps({"type": "resume", "id": "orphan", "after": -1}))
        frames = await recv_until(ws, terminal_for("orphan"))
    assert frames[-1]["type"] == "done" and frames[-1]["finish_reason"] == "cancelled"
    assert server.metric('gateway_generations_total{outcome="abandoned",transport="ws"}') == 1


async def test_cancel_from_a_connection_that_does_not_follow_gets_the_terminal_frame(serve: Serve) -> None:
    server = serve(backend=TICKING, resume_grace_s=5)
    async with connected(server, mint("ed")) as a, connected(server, mint("ed")) as b:
        await a.send(json.dumps({"type": "generate", "id": "g1", "prompt": "x", "max_tokens": 4000}))
        await recv_until(a, lambda f: f["type"] == "token")
        await b.send(json.dumps({"type": "cancel", "id": "g1"}))
        answer = (await recv_until(b, terminal_for("g1")))[-1]
        seen = (await recv_until(a, terminal_for("g1")))[-1]
    assert answer == seen
    assert seen["type"] == "done" and seen["finish_reason"] == "cancelled"


async def test_rooms_share_a_generation_and_announce_presence(serve: Serve) -> None:
    server = serve(backend="synthetic", synthetic_tokens_per_s=0)
    async with connected(server, mint("fay", rooms=["lobby"])) as a, \
            connected(server, mint("gus", rooms="*")) as b, \
            connected(server, mint("hal", rooms=["other"])) as c:
        await c.send(json.dumps({"type": "join", "room": "lobby"}))
        error = (await recv_until(c, lambda f: f["type"] == "error"))[-1]
        assert error["code"] == "forbidden"
        await a.send(json.dumps({"type": "join", "room": "lobby"}))
        assert (await recv_until(a, lambda f: f["type"] == "joined"))[-1] == {"type": "joined", "room": "lobby"}
        await b.send(json.dumps({"type": "join", "room": "lobby"}))
        presence = (await recv_until(a, lambda f: f["type"] == "presence" and f["user"] == "gus"))[-1]
        assert presence == {"type": "presence", "room": "lobby", "user": "gus", "event": "join"}
        await b.send(json.dumps({"type": "generate", "id": "ai", "room": "lobby", "prompt": "hi",
                                 "max_tokens": 300}))
        seen_a = await recv_until(a, terminal_for("ai"))
        seen_b = await recv_until(b, terminal_for("ai"))
        expected = "".join(synthetic_tokens("hi", 300))
        assert stream_text(seen_a, "ai") == stream_text(seen_b, "ai") == expected
        start = next(f for f in seen_a if f["type"] == "start")
        assert start["room"] == "lobby"
        await b.send(json.dumps({"type": "leave", "room": "lobby"}))
        left = (await recv_until(a, lambda f: f["type"] == "presence" and f["event"] == "leave"))[-1]
        assert left["user"] == "gus"
        await c.send(json.dumps({"type": "generate", "room": "lobby", "prompt": "x"}))
        assert (await recv_until(c, lambda f: f["type"] == "error"))[-1]["code"] == "forbidden"


async def test_admin_broadcast(serve: Serve) -> None:
    server = serve()
    async with connected(server, mint("ivy")) as a, connected(server, mint("jo")) as b, \
            httpx.AsyncClient(base_url=server.http) as http:
        denied = await http.post("/admin/broadcast", json={"data": "x"},
                                 headers={"Authorization": f"Bearer {mint('ivy')}"})
        assert denied.status_code == 403
        assert (await http.post("/admin/broadcast", json={"data": "x"})).status_code == 401
        admin = {"Authorization": f"Bearer {mint('root', roles=['admin'])}"}
        assert (await http.post("/admin/broadcast", json={"nodata": 1}, headers=admin)).status_code == 400
        sent = await http.post("/admin/broadcast", json={"data": {"notice": "maintenance"}}, headers=admin)
        assert sent.status_code == 202
        for ws in (a, b):
            frame = (await recv_until(ws, lambda f: f["type"] == "broadcast"))[-1]
            assert frame == {"type": "broadcast", "data": {"notice": "maintenance"}}
        await http.post("/admin/broadcast", json={"data": "only jo", "user": "jo"}, headers=admin)
        assert (await recv_until(b, lambda f: f["type"] == "broadcast"))[-1]["data"] == "only jo"
        await a.send(json.dumps({"type": "ping"}))
        # ivy's next frame is the pong: the user-scoped broadcast did not reach her.
        assert (await recv_until(a, lambda f: True))[-1] == {"type": "pong"}


@pytest.mark.slow
async def test_slow_room_member_is_closed_without_slowing_the_room(serve: Serve) -> None:
    # Paced so that a healthy member keeps up even on a loaded machine, while the stuck
    # member fills its socket buffers, queue and overflow within a couple of seconds.
    server = serve(backend="synthetic", synthetic_tokens_per_s=1000, send_queue_size=32, max_tokens=200000,
                   socket_send_buffer_bytes=16384)
    stuck = RawClient(server.port, mint("kim", rooms="*"), recv_buffer=4096)
    try:
        stuck.send_json({"type": "join", "room": "r"})
        async with connected(server, mint("lee", rooms="*")) as ws:
            await ws.send(json.dumps({"type": "join", "room": "r"}))
            await recv_until(ws, lambda f: f["type"] == "joined")
            await ws.send(json.dumps({"type": "generate", "id": "big", "room": "r", "prompt": "z",
                                      "max_tokens": 5000}))
            frames = await recv_until(ws, terminal_for("big"), timeout=30)
            assert stream_text(frames, "big") == "".join(synthetic_tokens("z", 5000))
        assert server.metric('gateway_closes_total{reason="slow_consumer"}') == 1
    finally:
        stuck.close()


async def test_hello_and_resume_refuse_unknown_but_keep_the_connection(serve: Serve) -> None:
    async with connected(serve(paced()), mint("max")) as ws:
        assert ws.hello["resumable"] == []
        await ws.send(json.dumps({"type": "resume", "id": "x", "after": "3"}))
        assert (await recv_until(ws, lambda f: f["type"] == "error"))[-1]["code"] == "bad_request"
        await ws.send(json.dumps({"type": "ping"}))
        await recv_until(ws, lambda f: f["type"] == "pong")


async def test_a_client_that_vanishes_while_its_generation_waits_on_a_full_queue_can_resume(serve: Serve) -> None:
    server = serve(backend="synthetic", synthetic_tokens_per_s=0, max_tokens=30000, send_queue_size=8,
                   socket_send_buffer_bytes=16384, resume_grace_s=10)
    stuck = RawClient(server.port, mint("nia"), recv_buffer=4096)
    stuck.send_json({"type": "generate", "id": "blocked", "prompt": "b", "max_tokens": 30000})
    with anyio.fail_after(10):
        while server.metric("gateway_active_generations") != 1:
            await anyio.sleep(0.01)
    stuck.close()  # the producer is waiting on this client's full queue
    async with connected(server, mint("nia")) as ws:
        await ws.send(json.dumps({"type": "resume", "id": "blocked", "after": -1}))
        frames = await recv_until(ws, terminal_for("blocked"), timeout=30)
    assert frames[-1]["type"] == "done" and frames[-1]["finish_reason"] == "length"
    assert stream_text(frames, "blocked") == "".join(synthetic_tokens("b", 30000))


async def test_repeated_cancels_are_answered_with_the_same_terminal_frame(serve: Serve) -> None:
    server = serve(backend=TICKING, resume_grace_s=5)
    async with connected(server, mint("oz")) as a, connected(server, mint("oz")) as b:
        await a.send(json.dumps({"type": "generate", "id": "once", "prompt": "x", "max_tokens": 4000}))
        await recv_until(a, lambda f: f["type"] == "token")
        for _ in range(5):
            await b.send(json.dumps({"type": "cancel", "id": "once"}))
        first = (await recv_until(b, terminal_for("once")))[-1]
        await b.send(json.dumps({"type": "ping"}))
        later = await recv_until(b, lambda f: f["type"] == "pong")
        seen = (await recv_until(a, terminal_for("once")))[-1]
    # While an answer is pending no second one is started; a cancel that arrives after
    # the end is answered with the same stored terminal frame. Never a token, never another.
    answers = [first] + [f for f in later if f.get("id") == "once"]
    assert 1 <= len(answers) <= 5
    assert all(answer == seen for answer in answers)
    assert seen["type"] == "done" and seen["finish_reason"] == "cancelled"


@pytest.mark.slow
async def test_a_broadcast_to_a_client_whose_queue_is_full_waits_instead_of_closing_it(serve: Serve) -> None:
    server = serve(backend="synthetic", synthetic_tokens_per_s=0, send_queue_size=4, max_tokens=100000)
    async with connected(server, mint("pia")) as ws, httpx.AsyncClient(base_url=server.http) as http:
        await ws.send(json.dumps({"type": "generate", "id": "busy", "prompt": "b", "max_tokens": 100000}))
        await recv_until(ws, lambda f: f["type"] == "token")
        admin = {"Authorization": f"Bearer {mint('root', roles=['admin'])}"}
        for index in range(3):
            response = await http.post("/admin/broadcast", json={"data": index}, headers=admin)
            assert response.status_code == 202
        frames = await recv_until(ws, terminal_for("busy"), timeout=60)
    assert [f["data"] for f in frames if f["type"] == "broadcast"] == [0, 1, 2]
    assert stream_text(frames, "busy").endswith("".join(synthetic_tokens("b", 100000))[-200:])
    assert frames[-1]["type"] == "done"
    assert server.metric('gateway_closes_total{reason="slow_consumer"}') == 0


async def test_a_dead_follower_does_not_stall_a_resumed_one(serve: Serve) -> None:
    """A resume while the server still believes the old socket alive: two followers."""
    server = serve(backend="synthetic", synthetic_tokens_per_s=0, max_tokens=20000, send_queue_size=8,
                   socket_send_buffer_bytes=16384, resume_grace_s=10, slow_consumer_timeout_s=60)
    dead = RawClient(server.port, mint("quin"), recv_buffer=4096)
    try:
        dead.send_json({"type": "generate", "id": "both", "prompt": "d", "max_tokens": 20000})
        with anyio.fail_after(10):
            while server.metric("gateway_active_generations") != 1:
                await anyio.sleep(0.01)
        async with connected(server, mint("quin")) as ws:
            await ws.send(json.dumps({"type": "resume", "id": "both", "after": -1}))
            # Far sooner than the 60 s it would take to close the dead one as slow.
            frames = await recv_until(ws, terminal_for("both"), timeout=30)
    finally:
        dead.close()
    assert frames[-1]["type"] == "done"
    assert stream_text(frames, "both") == "".join(synthetic_tokens("d", 20000))
