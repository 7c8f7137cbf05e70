"""Profile a server under a scenario with py-spy:
``python -m benchmarks.profile --scenario 1|2|3 [--streams N] [--target gateway|fastapi|websockets] [--out DIR]``.

Scenarios 1 and 2 stream at full speed (1,000,000 tokens in all); scenario 3 runs
``--streams`` paced streams (default 1,000) at 30 tokens/s, 300 ms to first token.

The server runs pinned as in the benchmark; py-spy samples it (non-blocking, so the
process is not paused) while the load generator streams, and the collapsed stacks are
summarised by function (self and inclusive share of samples) and by library. A flame
graph is written beside the summary.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.harness import (
    FLOOR_FASTAPI,
    FLOOR_WEBSOCKETS,
    GATEWAY,
    JWT_SECRET,
    ServerOptions,
    ServerProcess,
    choose_pinning,
    raise_nofile_limit,
    run_loadgen,
)
from benchmarks.scenarios import LLM_TOKENS_PER_S, LLM_TTFT_MS

TARGETS = {"gateway": GATEWAY, "fastapi": FLOOR_FASTAPI, "websockets": FLOOR_WEBSOCKETS}
SIZES = {"1": (1, 1_000_000), "2": (100, 10_000), "3": (1_000, 150)}
LIBRARIES = ("uvicorn", "websockets", "starlette", "fastapi", "anyio", "gateway", "benchmarks", "asyncio", "orjson",
             "prometheus_client")


def library(frame: str) -> str:
    path = frame.rsplit("(", 1)[-1]
    for name in LIBRARIES:
        if f"/{name}/" in path or path.startswith(f"{name}/"):
            return name
    return "other (interpreter, event loop, idle)"


def summarise(collapsed: Path, top: int = 20) -> str:
    self_counts: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    by_library: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = [f.rsplit(":", 1)[0] + ")" if ":" in f else f for f in stack.split(";")]
        total += count
        self_counts[frames[-1]] += count
        by_library[library(frames[-1])] += count
        for frame in set(frames):
            inclusive[frame] += count
    lines = [f"{total} samples", "", "By library (self time of the innermost frame):", ""]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in by_library.most_common()]
    lines += ["", f"Top {top} functions by self time:", ""]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in self_counts.most_common(top)]
    lines += ["", f"Top {top} functions by inclusive time:", ""]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in inclusive.most_common(top)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile")
    parser.add_argument("--scenario", choices=sorted(SIZES), default="1")
    parser.add_argument("--target", choices=sorted(TARGETS), default="gateway")
    parser.add_argument("--rate", type=int, default=200, help="samples per second")
    parser.add_argument("--streams", type=int, help="paced streams for scenario 3 (default 1,000)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "profiles")
    args = parser.parse_args(argv)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        print("py-spy is not installed: pip install py-spy", file=sys.stderr)
        return 2
    raise_nofile_limit()
    pinning = choose_pinning()
    args.out.mkdir(parents=True, exist_ok=True)
    connections, tokens = SIZES[args.scenario]
    spec = {"kind": "stream", "connections": connections, "max_tokens": tokens, "jwt_secret": JWT_SECRET,
            "timeout_s": 120.0}
    options = ServerOptions()
    name = f"s{args.scenario}-{args.target}"
    if args.scenario == "3":
        connections = args.streams or connections
        name = f"s3-{connections}-{args.target}"
        options = ServerOptions(tokens_per_s=LLM_TOKENS_PER_S, ttft_ms=LLM_TTFT_MS)
        spec.update({"connections": connections, "record": True, "tokens_per_s": LLM_TOKENS_PER_S,
                     "ttft_s": LLM_TTFT_MS / 1000.0, "stagger_s": 2.0})
    with tempfile.TemporaryDirectory() as workdir:
        collapsed = Path(workdir) / "stacks.txt"
        with ServerProcess(TARGETS[args.target], options, pinning, Path(workdir)) as server:
            spy = subprocess.Popen(
                [*pinning.client, py_spy, "record", "--pid", str(server.popen.pid), "--rate", str(args.rate),
                 "--nonblocking", "--format", "raw", "--output", str(collapsed)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            try:
                run = run_loadgen(spec, server, pinning, timeout=180.0)
            finally:
                spy.send_signal(signal.SIGINT)
                spy.wait(timeout=30)
        window = run.window("sgo", "send")
        delay = (f", added delay p50 {run.result['delay_p50_ms']:.1f} ms p99 {run.result['delay_p99_ms']:.1f} ms"
                 if "delay_p99_ms" in run.result else "")
        header = (
            f"{name}: {run.result['tokens']:,} tokens in {run.result['frames']:,} frames, "
            f"{run.result['tokens_per_s']:,.0f} tokens/s, server CPU {window['server_cpu_pct']:.0f}%, "
            f"CPU µs/token {1e6 * window['server_cpu_s'] / max(run.result['tokens'], 1):.1f}, "
            f"load generator CPU {window['client_cpu_pct']:.0f}%{delay}\n\n"
        )
        summary = header + summarise(collapsed)
        (args.out / f"{name}.txt").write_text(summary, encoding="utf-8")
        shutil.copy(collapsed, args.out / f"{name}.collapsed")
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
