"""``python -m benchmarks`` (and ``gateway bench``): run the scenarios, write the results."""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.harness import choose_pinning, host_steal_s, raise_nofile_limit
from benchmarks.report import machine_info, write
from benchmarks.scenarios import SCENARIOS, Context, Plan, Section, variants_section

RESULTS = Path(__file__).resolve().parent / "results"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark the gateway against a bare FastAPI endpoint and a raw websockets server on loopback.",
    )
    parser.add_argument("--smoke", action="store_true",
                        help="a few seconds at tiny sizes: checks the harness and its output, not the numbers")
    parser.add_argument("--only", help="comma-separated scenarios to run: 1,2,3,4,5,6,peer (default: all)")
    parser.add_argument("--variants", action="store_true",
                        help="also run scenarios 1-2 for each uvicorn ws implementation, event loop and HTTP parser")
    parser.add_argument("--out", type=Path, help="output directory (default: benchmarks/results, smoke: "
                                                 "benchmarks/results/smoke)")
    parser.add_argument("--streams", help="comma-separated N for scenario 3 (default: 100,300,1000,3000)")
    parser.add_argument("--litellm", help="the LiteLLM proxy's `litellm` executable for the peer comparison "
                                          "(default: BENCH_LITELLM, /tmp/venv-litellm/bin/litellm, PATH)")
    parser.add_argument("--store-env", action="append", default=[], metavar="NAME=VALUE",
                        help="environment that turns the gateway's stream store on, for scenario 6")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    plan = Plan.smoke() if args.smoke else Plan()
    if args.streams:
        plan = dataclasses.replace(plan, s3_streams=tuple(int(n) for n in args.streams.split(",")))
    keys = [k.strip() for k in args.only.split(",")] if args.only else list(SCENARIOS)
    unknown = [k for k in keys if k not in SCENARIOS]
    if unknown:
        print(f"unknown scenario(s): {', '.join(unknown)}; known: {', '.join(SCENARIOS)}", file=sys.stderr)
        return 2
    store_env = dict(item.split("=", 1) for item in args.store_env if "=" in item)
    out = args.out or (RESULTS / "smoke" if args.smoke else RESULTS)
    raise_nofile_limit()
    pinning = choose_pinning()
    started = time.monotonic()
    load_before = os.getloadavg()
    steal_before = host_steal_s()
    sections: list[Section] = []
    with tempfile.TemporaryDirectory(prefix="bench-") as workdir:
        ctx = Context(plan, pinning, Path(workdir), store_env, args.litellm)
        ctx.log(f"pinning: {pinning.description}; output: {out}")
        for key in keys:
            sections.append(SCENARIOS[key](ctx))
        if args.variants:
            by_key = {s.key: s for s in sections}
            sections.append(variants_section(ctx, by_key.get("s1"), by_key.get("s2")))
    meta = {
        "smoke": args.smoke,
        "pinning": pinning.description,
        "command": "python -m benchmarks" + ("" if argv is None and len(sys.argv) <= 1 else " " + shlex.join(
            argv if argv is not None else sys.argv[1:])),
        "elapsed_s": time.monotonic() - started,
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "steal_pct": 100.0 * (host_steal_s() - steal_before) / ((time.monotonic() - started) * (os.cpu_count() or 1)),
    }
    files = write(out, sections, machine_info(), meta)
    for path in files:
        print(path)
    return 0
