"""Soak and churn: what hours of service do to the gateway, in minutes.

    python -m benchmarks.soak                     # writes benchmarks/results/soak.md
    python -m benchmarks.soak --idle-minutes 1 --churn-minutes 1   # a quick look

- Soak: 5,000 authenticated idle connections (heartbeats on, answered) held for
  ``--idle-minutes`` (10): every connection must still be open at the end, and the memory
  per connection is reported, sampled over the whole hold.
- Churn: ``--rate`` (200) connections a second, each authenticating, asking for a short
  answer and closing (a third of them vanish without a close), for ``--churn-minutes``
  (5): afterwards the server's open file descriptors, event-loop tasks and RSS must be back
  within 5% of where they were before.

Server and load generator are pinned to separate cores, as in ``python -m benchmarks``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import (
    GATEWAY,
    JWT_SECRET,
    Pinning,
    ServerOptions,
    ServerProcess,
    choose_pinning,
    raise_nofile_limit,
    run_loadgen,
)
from benchmarks.scenarios import idle_steps
from benchmarks.scenarios import scrape_metrics as scrape

RESULTS = Path(__file__).resolve().parent / "results"


def soak(pinning: Pinning, workdir: Path, connections: int, minutes: float) -> dict[str, Any]:
    options = ServerOptions(heartbeat_interval_s=15.0, heartbeat_timeout_s=45.0, ws_ping_interval_s=20.0)
    spec = {"kind": "idle", "counts": [connections], "jwt_secret": JWT_SECRET, "settle_s": 5.0,
            "rest_s": minutes * 60, "open_concurrency": 200, "hello_timeout_s": 60.0}
    with ServerProcess(GATEWAY, options, pinning, workdir) as server:
        run = run_loadgen(spec, server, pinning, timeout=minutes * 60 + 600)
        closes = scrape(server.port)
    step = idle_steps(run)[0]
    return {
        "connections": connections, "minutes": minutes, "alive_after": step["alive_after_rest"],
        "kb_per_connection": step["kb_per_conn"], "rss_mb": step["rss_mb"],
        "server_closes": {key: value for key, value in closes.items()
                          if key.startswith("gateway_closes_total") and value > 0},
    }


async def churn_clients(port: int, rate: float, seconds: float) -> dict[str, int]:
    import jwt
    from websockets.asyncio.client import connect

    counts = {"opened": 0, "answered": 0, "vanished": 0, "failed": 0}
    url = f"ws://127.0.0.1:{port}/ws"

    async def one(index: int) -> None:
        token = jwt.encode({"sub": f"churn-{index % 500}", "exp": int(time.time()) + 3600}, JWT_SECRET,
                           algorithm="HS256")
        try:
            if index % 3 == 2:  # vanishes: no close frame
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                sock.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                             b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                             b"Authorization: Bearer " + token.encode() + b"\r\n\r\n")
                sock.recv(1024)
                sock.close()
                counts["vanished"] += 1
                return
            async with connect(url, additional_headers={"Authorization": f"Bearer {token}"}, open_timeout=10,
                               ping_interval=None) as ws:
                counts["opened"] += 1
                await ws.recv()  # hello
                await ws.send(json.dumps({"type": "generate", "id": "c", "prompt": "a short answer"}))
                while json.loads(await ws.recv()).get("type") not in ("done", "error"):
                    pass
                counts["answered"] += 1
        except Exception:
            counts["failed"] += 1

    tasks: set[asyncio.Task[None]] = set()
    started = time.monotonic()
    index = 0
    while time.monotonic() - started < seconds:
        due = started + index / rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.get_running_loop().create_task(one(index))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        index += 1
    if tasks:
        await asyncio.wait(tasks, timeout=60)
    return counts


def churn(pinning: Pinning, workdir: Path, rate: float, minutes: float, settle_s: float,
          server_env: dict[str, str], rounds: int = 2) -> dict[str, Any]:
    """``rounds`` rounds of churn on one server, each followed by ``settle_s`` of quiet.
    Memory that the first round leaves and later rounds reuse is the allocator's and the
    bounded stores'; growth from round to round would be a leak."""
    options = ServerOptions(extra_env=server_env)
    names = ("process_open_fds", "gateway_event_loop_tasks", "process_resident_memory_bytes")
    afters: list[dict[str, float]] = []
    totals: dict[str, int] = {}
    with ServerProcess(GATEWAY, options, pinning, workdir) as server:
        asyncio.run(churn_clients(server.port, 5, 2))  # warm up: first connections, pools
        time.sleep(2)
        before = {name: scrape(server.port).get(name, 0.0) for name in names}
        if pinning.client and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, {int(pinning.client[-1])})  # the load generator's core
        for _ in range(rounds):
            counts = asyncio.run(churn_clients(server.port, rate, minutes * 60))
            for key, value in counts.items():
                totals[key] = totals.get(key, 0) + value
            deadline = time.monotonic() + 60
            while True:  # until every connection and generation is gone
                now = scrape(server.port)
                if now.get("gateway_open_connections", 0) == 0 and now.get("gateway_active_generations", 0) == 0:
                    break
                if time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            # Cyclic garbage waits for the next scheduled full collection
            # (GATEWAY_GC_FULL_COLLECTION_INTERVAL_S, 60 s), finished streams for their TTL:
            # measure after both.
            time.sleep(settle_s)
            afters.append({name: scrape(server.port).get(name, 0.0) for name in names})
    after = afters[-1]
    within = {name: after[name] <= before[name] * 1.05 + (1 if name != "process_resident_memory_bytes" else 0)
              for name in names}
    # RSS: flat from the first round's end to the last's.
    flat = after["process_resident_memory_bytes"] <= afters[0]["process_resident_memory_bytes"] * 1.05
    return {"rate": rate, "minutes": minutes, "rounds": rounds, "settle_s": settle_s, "server_env": server_env,
            "clients": totals, "before": before, "after_rounds": afters, "after": after,
            "within_5_percent": within, "rss_flat_across_rounds": flat}


def report(idle: dict[str, Any], churned: dict[str, Any], took_s: float) -> str:
    lines = [
        "# Soak and churn",
        "",
        f"- Date: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}; {os.cpu_count()} cores; "
        f"Python {sys.version.split()[0]}",
        f"- Command: `python -m benchmarks.soak --idle-minutes {idle['minutes']:g} "
        f"--churn-minutes {churned['minutes']:g} --rate {churned['rate']:g} --rounds {churned.get('rounds', 1)} "
        f"--settle-s {churned.get('settle_s', 0):g}"
        + "".join(f" --server-env {k}={v}" for k, v in churned.get("server_env", {}).items())
        + f"`; took {took_s:.0f} s",
        "",
        "## Soak: idle authenticated connections, heartbeats on",
        "",
        "| connections | held | still open at the end | KB/connection | RSS MB | server-side closes |",
        "|---|---|---|---|---|---|",
        f"| {idle['connections']:,} | {idle['minutes']:g} min | {idle['alive_after']}/{idle['connections']} | "
        f"{idle['kb_per_connection']:.1f} | {idle['rss_mb']:.1f} | {idle['server_closes'] or 'none'} |",
        "",
        "## Churn: connect, authenticate, ask, close (a third vanish without a close frame)",
        "",
        "| | before | after | within 5% |",
        "|---|---|---|---|",
    ]
    rounds = churned.get("after_rounds", [churned["after"]])
    lines[-2] = "| | before | " + " | ".join(f"after round {i + 1}" for i in range(len(rounds))) + " | back within 5% |"
    lines[-1] = "|---|---|" + "---|" * len(rounds) + "---|"
    for name, label in (("process_open_fds", "open file descriptors"),
                        ("gateway_event_loop_tasks", "event-loop tasks"),
                        ("process_resident_memory_bytes", "RSS MB")):
        scale = 1 / (1024 * 1024) if name.endswith("bytes") else 1
        cells = " | ".join(f"{after[name] * scale:,.1f}" for after in rounds)
        lines.append(f"| {label} | {churned['before'][name] * scale:,.1f} | {cells} | "
                     f"{'yes' if churned['within_5_percent'][name] else 'NO'} |")
    if len(rounds) > 1:
        lines += ["", f"RSS from the end of round 1 to the end of round {len(rounds)}: "
                  f"{'flat (within 5%)' if churned['rss_flat_across_rounds'] else 'GREW'}."]
    clients = churned["clients"]
    lines += ["", f"{churned['rate']:g} connections a second for {churned['minutes']:g} min: "
              f"{clients['answered']:,} answered, {clients['vanished']:,} vanished, "
              f"{clients['opened'] - clients['answered']:,} opened without an answer, {clients['failed']:,} failed."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=5000)
    parser.add_argument("--idle-minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--churn-minutes", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=2,
                        help="rounds of churn on one server (RSS must stay flat from the first to the last)")
    parser.add_argument("--settle-s", type=float, default=65.0,
                        help="wait after the churn before measuring (past the next full collection)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                        help="a GATEWAY_* setting for the churn's server")
    args = parser.parse_args(argv)
    server_env = dict(item.split("=", 1) for item in args.server_env if "=" in item)
    raise_nofile_limit()
    pinning = choose_pinning()
    random.seed(0)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="soak-") as workdir:
        idle = soak(pinning, Path(workdir), args.connections, args.idle_minutes)
        churned = churn(pinning, Path(workdir), args.rate, args.churn_minutes, args.settle_s, server_env,
                        args.rounds)
    args.out.mkdir(parents=True, exist_ok=True)
    text = report(idle, churned, time.monotonic() - started)
    (args.out / "soak.md").write_text(text, encoding="utf-8")
    (args.out / "soak.json").write_text(json.dumps({"idle": idle, "churn": churned}, indent=2), encoding="utf-8")
    print(text)
    ok = idle["alive_after"] == idle["connections"] and all(churned["within_5_percent"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
