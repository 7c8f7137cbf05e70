"""What the Redis stream store costs per token: Redis commands, bytes sent to Redis, and
the gateway's CPU per token relative to the memory-only store, measured in one run.

    python -m benchmarks.redis_cost            # writes benchmarks/results/redis_cost.md
    python -m benchmarks.redis_cost --cluster  # and on a Redis Cluster of three primaries

It starts a private redis-server (so other users of a shared Redis cannot pollute the
counters) and the gateway with the synthetic backend, once with the memory store and once
with Redis, and drives the same two loads through each: one stream at full speed, and
many streams paced like an LLM (30 tokens/s). With ``--cluster`` it also starts a private
Redis Cluster of three primaries and runs the loads on it, the counters summed over its
nodes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import redis
from websockets.asyncio.client import connect

ROOT = Path(__file__).resolve().parent.parent
SECRET = secrets.token_urlsafe(32)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_gateway(env: dict[str, str], port: int) -> subprocess.Popen[bytes]:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "GATEWAY_PORT": str(port), "GATEWAY_JWT_SECRET": SECRET,
                "GATEWAY_BACKEND": "synthetic", "GATEWAY_SYNTHETIC_TTFT_MS": "0", "GATEWAY_MAX_TOKENS": "100000",
                "GATEWAY_LOG_LEVEL": "warning", "GATEWAY_USER_GENERATE_RATE_PER_S": "1000",
                "GATEWAY_USER_GENERATE_BURST": "1000", "GATEWAY_MAX_STREAMS_PER_USER": "1000",
                "GATEWAY_MAX_CONNECTIONS_PER_USER": "1000", "GATEWAY_WS_PING_INTERVAL_S": "0", **env}
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve"], env=full_env, cwd=str(ROOT),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("gateway did not start")


async def run_streams(port: int, streams: int, tokens: int) -> int:
    token = jwt.encode({"sub": "bench", "exp": int(time.time()) + 3600}, SECRET, algorithm="HS256")
    received = 0

    async def one(index: int) -> None:
        nonlocal received
        async with connect(f"ws://127.0.0.1:{port}/ws", additional_headers={"Authorization": f"Bearer {token}"},
                           ping_interval=None, max_size=None, open_timeout=30) as ws:
            await ws.recv()
            await ws.send(json.dumps({"type": "generate", "id": f"s{index}-{secrets.token_hex(3)}",
                                      "prompt": f"p{index}", "max_tokens": tokens}))
            last = -1
            async for message in ws:
                frame = json.loads(message)
                if frame["type"] == "token":
                    last = frame["seq"]
                elif frame["type"] in ("done", "error"):
                    break
            received += last + 1

    await asyncio.gather(*(one(i) for i in range(streams)))
    return received


@contextlib.contextmanager
def private_redis() -> Iterator[str]:
    """A redis-server of its own on a free port, so that no other user of a shared Redis
    pollutes its command counters; yields its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed")
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        server = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                   "--appendonly", "no", "--dir", tmp],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            client = redis.Redis(port=port)
            for _ in range(100):
                try:
                    client.ping()
                    break
                except redis.RedisError:
                    time.sleep(0.05)
            client.close()
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            server.kill()
            server.wait(10)


def cluster_port() -> int:
    """A free port whose cluster bus port (10000 higher) is free too."""
    while True:
        port = free_port()
        if port > 55535:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


@contextlib.contextmanager
def private_redis_cluster() -> Iterator[tuple[str, list[int]]]:
    """A Redis Cluster of three primaries of its own; yields a node's URL and every port."""
    binary, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if binary is None or cli is None:
        raise RuntimeError("redis-server and redis-cli are needed")
    ports: list[int] = []
    while len(ports) < 3:
        port = cluster_port()
        if port not in ports:
            ports.append(port)
    servers = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for port in ports:
                node_dir = Path(tmp) / str(port)
                node_dir.mkdir()
                servers.append(subprocess.Popen(
                    [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                     "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--dir", str(node_dir)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            for port in ports:
                client = redis.Redis(port=port)
                for _ in range(100):
                    try:
                        client.ping()
                        break
                    except redis.RedisError:
                        time.sleep(0.05)
                client.close()
            subprocess.run([cli, "--cluster", "create", *(f"127.0.0.1:{port}" for port in ports),
                            "--cluster-replicas", "0", "--cluster-yes"], check=True, stdout=subprocess.DEVNULL)
            for port in ports:
                client = redis.Redis(port=port, decode_responses=True)
                while "cluster_state:ok" not in str(client.execute_command("CLUSTER", "INFO")):
                    time.sleep(0.1)
                client.close()
            yield f"redis://127.0.0.1:{ports[0]}/0", ports
        finally:
            for server in servers:
                server.kill()
                server.wait(10)


def command_calls(client: redis.Redis) -> dict[str, int]:
    """Commands Redis ran since its last CONFIG RESETSTAT, by name (a Lua script's own
    calls included, as Redis counts them)."""
    stats: dict[str, Any] = client.info("commandstats")  # type: ignore[assignment]
    return {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()
            if name != "cmdstat_config|resetstat"}


def settle(port: int) -> None:
    """Until the gateway has no connection and no generation left: their releases and last
    writes reach Redis before the counters are read."""
    import urllib.request

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
        values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
                  if line.startswith(("gateway_open_connections ", "gateway_active_generations "))}
        if not any(values.values()):
            time.sleep(0.2)  # a release follows the count by a command's round trip
            return
        time.sleep(0.05)


def measure(label: str, store_env: dict[str, str], rate: int, streams: int, tokens: int,
            clients: list[redis.Redis]) -> dict[str, Any]:
    """One load through one gateway; the Redis counters summed over ``clients`` (every
    node of a cluster, or the one server; none for the memory store)."""
    port = free_port()
    proc = start_gateway({"GATEWAY_SYNTHETIC_TOKENS_PER_S": str(rate), **store_env}, port)
    try:
        before_cpu = cpu_seconds(proc.pid)
        for client in clients:
            client.config_resetstat()
        started = time.monotonic()
        received = asyncio.run(run_streams(port, streams, tokens))
        elapsed = time.monotonic() - started
        cpu = cpu_seconds(proc.pid) - before_cpu
        settle(port)
        result: dict[str, Any] = {"label": label, "tokens": received, "seconds": round(elapsed, 2),
                                  "cpu_us_per_token": round(cpu / max(received, 1) * 1e6, 2)}
        if clients:
            calls: dict[str, int] = {}
            input_bytes = 0
            for client in clients:
                for name, count in command_calls(client).items():
                    if name.startswith("cluster|"):
                        continue  # the cluster client's topology reads, not the store's work
                    calls[name] = calls.get(name, 0) + count
                input_bytes += int(client.info("stats")["total_net_input_bytes"])
            result["redis_commands_per_token"] = round(sum(calls.values()) / max(received, 1), 3)
            result["xadd_per_token"] = round(calls.get("xadd", 0) / max(received, 1), 3)
            result["bytes_to_redis_per_token"] = round(input_bytes / max(received, 1), 1)
            result["per_generation"] = {name: round(count / max(streams, 1), 1)
                                        for name, count in sorted(calls.items(), key=lambda item: -item[1])}
        return result
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "redis_cost.md"))
    parser.add_argument("--paced-streams", type=int, default=200)
    parser.add_argument("--cluster", action="store_true", help="also on a Redis Cluster of three primaries")
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server is not installed")
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(private_redis())
        stores: list[tuple[str, dict[str, str], list[redis.Redis]]] = [
            ("redis", {"GATEWAY_REDIS_URL": url}, [redis.Redis.from_url(url, decode_responses=True)])]
        if args.cluster:
            cluster_url, ports = stack.enter_context(private_redis_cluster())
            cluster_env = {"GATEWAY_REDIS_URL": cluster_url, "GATEWAY_REDIS_CLUSTER": "true"}
            stores.append(("redis cluster (3 primaries)", cluster_env,
                           [redis.Redis(port=port, decode_responses=True) for port in ports]))
        loads = [("one stream, full speed, 50,000 tokens", 0, 1, 50_000),
                 (f"{args.paced_streams} streams at 30 tokens/s, 150 tokens each", 30, args.paced_streams, 150)]
        rows = []
        for name, rate, streams, tokens in loads:
            memory = measure(f"{name}: memory", {}, rate, streams, tokens, [])
            rows.append(memory)
            for store, env, clients in stores:
                row = measure(f"{name}: {store}", env, rate, streams, tokens, clients)
                row["cpu_vs_memory"] = round(row["cpu_us_per_token"] / memory["cpu_us_per_token"], 2)
                rows.append(row)
    lines = [
        "# Redis stream store: cost per token",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, redis-py {redis.__version__}; "
        f"command: `python -m benchmarks.redis_cost --paced-streams {args.paced_streams}"
        f"{' --cluster' if args.cluster else ''}`.",
        "Gateway CPU is the server process's user+system time over the tokens delivered. On the cluster, "
        "commands and bytes are summed over its nodes (without the cluster client's CLUSTER topology reads).",
        "",
        "| load | store | tokens | gateway CPU µs/token | vs memory | Redis commands/token | XADD/token | "
        "bytes to Redis/token |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        load, store = row["label"].rsplit(": ", 1)
        lines.append(
            f"| {load} | {store} | {row['tokens']} | {row['cpu_us_per_token']} | {row.get('cpu_vs_memory', 1.0)} | "
            f"{row.get('redis_commands_per_token', '-')} | {row.get('xadd_per_token', '-')} | "
            f"{row.get('bytes_to_redis_per_token', '-')} |")
    lines += ["", "Redis commands per generation, by command (the Redis rows):", ""]
    for row in rows:
        if "per_generation" in row:
            breakdown = ", ".join(f"{name} {count:g}" for name, count in row["per_generation"].items())
            lines.append(f"- {row['label']}: {breakdown}")
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
