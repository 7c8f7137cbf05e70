"""The gateway as operators run it: ``python -m gateway serve`` in its own process."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import anyio
import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from tests.support import (
    ROOT,
    SECRET,
    RawClient,
    ServerProcess,
    connected,
    metric_value,
    mint,
    recv_json,
    recv_until,
    stream_text,
    terminal_for,
    ws_connect,
)

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

BASE_ENV = {"GATEWAY_JWT_SECRET": SECRET, "GATEWAY_WS_PING_INTERVAL_S": "0", "GATEWAY_RESUME_GRACE_S": "0"}


async def metrics(server: ServerProcess) -> str:
    async with httpx.AsyncClient(base_url=server.http) as http:
        return (await http.get("/metrics")).text


async def wait_metric(server: ServerProcess, name: str, value: float, timeout: float = 10) -> None:
    with anyio.fail_after(timeout):
        while metric_value(await metrics(server), name) != value:
            await anyio.sleep(0.05)


async def test_dev_mode_logs_a_working_token_and_wscat_command() -> None:
    with ServerProcess({"GATEWAY_WS_PING_INTERVAL_S": "0"}) as server:
        token = next(line.split(": ", 1)[1].strip() for line in server.lines if "development token" in line)
        assert any("wscat -c ws://" in line for line in server.lines)
        async with connected(server, token) as ws:
            assert ws.hello["user"] == "dev"


def test_production_without_a_key_exits_with_a_reason() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--port", "0"],
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "GATEWAY_ENV": "production"},
        capture_output=True, text=True, timeout=30, cwd=str(ROOT),
    )
    assert result.returncode != 0
    assert "GATEWAY_JWT_SECRET" in result.stderr
    assert "Traceback" not in result.stderr


def test_invalid_settings_exit_with_a_message() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "serve"],
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "GATEWAY_MAX_CONNECTIONS": "many"},
        capture_output=True, text=True, timeout=30, cwd=str(ROOT),
    )
    assert result.returncode != 0
    assert "GATEWAY_MAX_CONNECTIONS" in result.stderr and "Traceback" not in result.stderr


def test_token_command_mints_a_verifiable_token() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "token", "--sub", "alice", "--ttl", "60"],
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "GATEWAY_JWT_SECRET": SECRET},
        capture_output=True, text=True, timeout=30, cwd=str(ROOT),
    )
    assert result.returncode == 0, result.stderr
    import jwt

    claims = jwt.decode(result.stdout.strip(), SECRET, algorithms=["HS256"])
    assert claims["sub"] == "alice" and 0 < claims["exp"] - time.time() <= 60


async def test_credentials_never_reach_the_log_even_at_debug() -> None:
    env = {**BASE_ENV, "GATEWAY_LOG_LEVEL": "debug", "GATEWAY_ACCESS_LOG": "true"}
    header_token, query_token, proto_token = mint("h"), mint("q"), mint("p")
    with ServerProcess(env) as server:
        async with connected(server, header_token) as ws:
            await ws.send(json.dumps({"type": "generate", "id": "r", "prompt": "my private prompt"}))
            await recv_until(ws, terminal_for("r"))
        async with ws_connect(f"{server.url}?token={query_token}") as ws:
            await recv_json(ws)
        async with connected(server, subprotocols=["gateway.v1", f"bearer.{proto_token}"]):
            pass
        async with httpx.AsyncClient(base_url=server.http) as http:
            await http.get(f"/healthz?token={query_token}")
        server.terminate()
        server.wait(20)
    log = server.output
    assert "/ws?token=[redacted]" in log  # the line is there, without the secret
    for secret in (header_token, query_token, proto_token, SECRET):
        assert secret not in log
    for part in (header_token.split(".")[2], query_token.split(".")[2]):
        assert part not in log
    assert "my private prompt" not in log


async def test_sigterm_drains_running_generations_then_closes_1001() -> None:
    env = {**BASE_ENV, "GATEWAY_BACKEND": "synthetic", "GATEWAY_SYNTHETIC_TTFT_MS": "0",
           "GATEWAY_SYNTHETIC_TOKENS_PER_S": "40", "GATEWAY_DRAIN_TIMEOUT_S": "20"}
    with ServerProcess(env) as server:
        async with connected(server, mint()) as ws, httpx.AsyncClient(base_url=server.http) as http:
            await ws.send(json.dumps({"type": "generate", "id": "long", "prompt": "p", "max_tokens": 60}))
            frames = await recv_until(ws, lambda f: f["type"] == "token")
            server.terminate()
            with anyio.fail_after(5):
                while (await http.get("/readyz")).status_code != 503:
                    await anyio.sleep(0.05)
            assert (await http.get("/readyz")).json() == {"status": "draining"}
            await ws.send(json.dumps({"type": "generate", "id": "late", "prompt": "p"}))
            with pytest.raises(ConnectionClosed) as info:
                while True:
                    frame = await recv_json(ws, timeout=10)
                    if frame["type"] != "ping":
                        frames.append(frame)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1001
        late = next(f for f in frames if f.get("id") == "late")
        assert late["type"] == "error" and late["code"] == "shutting_down"
        from gateway.backends.synthetic import synthetic_tokens

        assert stream_text(frames, "long") == "".join(synthetic_tokens("p", 60))
        assert next(f for f in frames if f["type"] == "done")["finish_reason"] == "length"
        assert server.wait(20) == 0


async def test_sigterm_ends_generations_that_outlast_the_drain_with_shutting_down() -> None:
    env = {**BASE_ENV, "GATEWAY_BACKEND": "synthetic", "GATEWAY_SYNTHETIC_TTFT_MS": "0",
           "GATEWAY_SYNTHETIC_TOKENS_PER_S": "20", "GATEWAY_DRAIN_TIMEOUT_S": "0.5"}
    with ServerProcess(env) as server:
        async with connected(server, mint()) as ws:
            await ws.send(json.dumps({"type": "generate", "id": "long", "prompt": "p", "max_tokens": 2000}))
            await recv_until(ws, lambda f: f["type"] == "token")
            started = time.monotonic()
            server.terminate()
            frames = await recv_until(ws, terminal_for("long"), timeout=10)
            with pytest.raises(ConnectionClosed) as info:
                await recv_until(ws, lambda f: False, timeout=10)
        assert frames[-1]["type"] == "error" and frames[-1]["code"] == "shutting_down"
        assert time.monotonic() - started < 5
        assert info.value.rcvd is not None and info.value.rcvd.code == 1001
        assert server.wait(20) == 0


async def test_a_client_that_never_reads_leaves_memory_bounded_while_others_stream() -> None:
    env = {**BASE_ENV, "GATEWAY_BACKEND": "synthetic", "GATEWAY_SYNTHETIC_TTFT_MS": "0",
           "GATEWAY_SYNTHETIC_TOKENS_PER_S": "0", "GATEWAY_MAX_TOKENS": "5000000",
           "GATEWAY_SLOW_CONSUMER_TIMEOUT_S": "4"}
    with ServerProcess(env) as server:
        async with connected(server, mint("reader")) as ws:
            baseline = server.rss_kb()
            stuck = RawClient(server.port, mint("stuck"), recv_buffer=4096)
            try:
                # Unbounded, this generation would queue hundreds of MB of frames within seconds.
                stuck.send_json({"type": "generate", "id": "flood", "prompt": "x", "max_tokens": 5000000})
                samples = []
                for round_ in range(3):
                    await ws.send(json.dumps({"type": "generate", "id": f"ok{round_}", "prompt": "q",
                                              "max_tokens": 3000}))
                    frames = await recv_until(ws, terminal_for(f"ok{round_}"), timeout=20)
                    assert frames[-1]["type"] == "done"
                    samples.append(server.rss_kb())
                # The flood is still running (blocked on the full queue), not yet a slow consumer.
                text = await metrics(server)
                assert metric_value(text, "gateway_active_generations") == 1
                growth_mb = (max(samples) - baseline) / 1024
                assert growth_mb < 10, f"server RSS grew {growth_mb:.1f} MB: {samples}"
                await wait_metric(server, 'gateway_closes_total{reason="slow_consumer"}', 1, timeout=15)
                await wait_metric(server, "gateway_active_generations", 0)
            finally:
                stuck.close()
