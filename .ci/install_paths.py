#!/usr/bin/env python3
"""Every install path README shows, each in its own fresh virtual environment.

For each path: create a venv, install exactly what README says, start ``gateway serve``
from that venv and stream one answer over a real socket with the package's own client.
Optional dependencies that the path does not need are forbidden: ``forbid/sitecustomize.py``
records every attempt to import one (even an attempt that the code catches), and any
record fails the check.

Standard library only: it runs before any venv exists.

    python3 .ci/install_paths.py            # every path
    python3 .ci/install_paths.py bare redis # some of them
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FORBID_DIR = Path(__file__).resolve().parent / "forbid"
SECRET = "install-check-secret-0123456789abcdef"
REDIS_URL = os.environ.get("INSTALL_CHECK_REDIS_URL", "redis://127.0.0.1:6379/14")
# A node of a Redis Cluster, when one runs (.ci/run starts one): the redis path streams
# through it too.
REDIS_CLUSTER_URL = os.environ.get("GATEWAY_TEST_REDIS_CLUSTER_URL")

# Top-level modules of every optional dependency (extras test, local, bench, redis).
OPTIONAL = {
    "redis": {"redis"},
    "local": {"torch", "transformers", "tokenizers", "safetensors"},
    "bench": {"psutil", "matplotlib"},
    "test": {"pytest", "hypothesis", "playwright", "httpx", "mypy", "ruff"},
}

CLIENT = r"""
import sys, anyio
from gateway.client import GatewayClient

async def main(url, token, prompt, expected=None):
    async with GatewayClient(url, token) as client:
        answer = await client.generate(prompt, max_tokens=8)
        text = "".join([piece async for piece in answer])
        terminal = await answer.result()
    print(repr(text), terminal.get("type"), terminal.get("finish_reason"))
    ok = terminal.get("type") == "done" and (text == expected if expected is not None else bool(text))
    sys.exit(0 if ok else 1)

anyio.run(main, *sys.argv[1:])
"""


@dataclass
class Run:
    """One ``gateway serve`` in a venv, and what it must stream."""

    label: str
    env: dict[str, str]
    forbid: set[str]
    prompt: str = "hello there gateway"
    expected: str | None = "hello there gateway"  # None: any non-empty text (a model's answer)
    workers: int = 1


@dataclass
class InstallPath:
    name: str
    installs: list[list[str]]  # pip argument lists, run in order, as README shows them
    runs: list[Run] = field(default_factory=list)
    editable: bool = False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def sh(args: list[str], **kwargs: object) -> None:
    print("  $", " ".join(args), flush=True)
    subprocess.run(args, check=True, **kwargs)  # type: ignore[call-overload]


def make_venv(where: Path, path: InstallPath) -> Path:
    sh([sys.executable, "-m", "venv", str(where)])
    pip = [str(where / "bin" / "python"), "-m", "pip", "install", "-q"]
    for args in path.installs:
        sh(pip + args, cwd=ROOT)
    return where / "bin"


@contextlib.contextmanager
def serving(bin_dir: Path, run: Run, workdir: Path) -> Iterator[tuple[int, Path, list[str]]]:
    port = free_port()
    import_log = workdir / f"imports-{run.label}.log"
    import_log.unlink(missing_ok=True)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "PYTHON"))},
        "GATEWAY_JWT_SECRET": SECRET,
        "GATEWAY_PORT": str(port),
        "GATEWAY_LOG_LEVEL": "info",
        **run.env,
        "PYTHONPATH": str(FORBID_DIR),
        "INSTALL_CHECK_FORBID": ",".join(sorted(run.forbid)),
        "INSTALL_CHECK_IMPORT_LOG": str(import_log),
    }
    args = [str(bin_dir / "gateway"), "serve"]
    if run.workers > 1:
        args += ["--workers", str(run.workers)]
    print("  $", " ".join(args), flush=True)
    log_path = workdir / f"serve-{run.label}.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(args, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    log_lines: list[str] = []
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"gateway serve exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"gateway serve was not ready in 120 s:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.2)
        yield port, import_log, log_lines
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log_lines[:] = log_path.read_text().splitlines()


def check_run(bin_dir: Path, run: Run, workdir: Path) -> None:
    print(f"- {run.label}", flush=True)
    with serving(bin_dir, run, workdir) as (port, import_log, log_lines):
        token = subprocess.run([str(bin_dir / "gateway"), "token", "--sub", "install-check"], cwd=workdir,
                               env={**os.environ, "GATEWAY_JWT_SECRET": SECRET}, check=True,
                               capture_output=True, text=True).stdout.strip()
        expected = [run.expected] if run.expected is not None else []
        result = subprocess.run(
            [str(bin_dir / "python"), "-c", CLIENT, f"ws://127.0.0.1:{port}/ws", token, run.prompt, *expected],
            cwd=workdir, capture_output=True, text=True, timeout=120, check=False,
            env={**{k: v for k, v in os.environ.items() if not k.startswith("PYTHON")},
                 "PYTHONPATH": str(FORBID_DIR), "INSTALL_CHECK_FORBID": ",".join(sorted(run.forbid)),
                 "INSTALL_CHECK_IMPORT_LOG": str(import_log)},
        )
        print("   ", result.stdout.strip() or result.stderr.strip()[-2000:], flush=True)
        if result.returncode != 0:
            raise RuntimeError(f"{run.label}: the answer did not stream as expected:\n{result.stderr[-3000:]}")
    if any("Traceback" in line for line in log_lines):
        raise RuntimeError(f"{run.label}: the server logged a traceback:\n" + "\n".join(log_lines[-60:]))
    if import_log.exists() and import_log.read_text().strip():
        raise RuntimeError(f"{run.label}: an optional dependency was imported on a path that does not need it:\n"
                           + import_log.read_text())
    print(f"    ok: streamed, and imported none of {sorted(run.forbid)}", flush=True)


def everything_but(*needed: str) -> set[str]:
    return set().union(*(modules for extra, modules in OPTIONAL.items() if extra not in needed))


def install_paths(workdir: Path) -> list[InstallPath]:
    model_dir = workdir / "tiny-model"
    return [
        # README "Run it": no extras.
        InstallPath("bare", [["."]], [Run("bare-echo", {}, everything_but())]),
        # README "Scale out and resume": the redis extra; Redis imported only when a URL is set.
        InstallPath("redis", [[".[redis]"]], [
            Run("redis-installed-unused", {}, everything_but()),
            Run("redis-url", {"GATEWAY_REDIS_URL": REDIS_URL}, everything_but("redis")),
            Run("redis-workers", {"GATEWAY_REDIS_URL": REDIS_URL}, everything_but("redis"), workers=2),
            *([Run("redis-cluster", {"GATEWAY_REDIS_URL": REDIS_CLUSTER_URL, "GATEWAY_REDIS_CLUSTER": "true"},
                   everything_but("redis"))] if REDIS_CLUSTER_URL else []),
        ]),
        # README "Backends": torch first, then the local extra, with a model built on the spot.
        InstallPath("local", [["torch==2.13.0"], [".[local]"]], [
            Run("local-transformers",
                {"GATEWAY_BACKEND": "transformers", "GATEWAY_LOCAL_MODEL": str(model_dir)},
                everything_but("local"), prompt="hello", expected=None),
        ]),
    ]


def check_bench(workdir: Path) -> None:
    """README "Benchmarks": ``pip install -e '.[bench]'`` then ``python -m benchmarks`` (its smoke run)."""
    bin_dir = make_venv(workdir / "venv-bench", InstallPath("bench", [["-e", ".[bench]"]]))
    out = workdir / "bench-out"
    sh([str(bin_dir / "python"), "-m", "benchmarks", "--smoke", "--out", str(out)], cwd=ROOT, timeout=600)
    if not (out / "bench.md").is_file():
        raise RuntimeError("bench: python -m benchmarks --smoke wrote no bench.md")
    print("    ok: the benchmark smoke run wrote its results", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", help="bare, redis, local, bench (default: all)")
    parser.add_argument("--keep", action="store_true", help="keep the venvs and logs")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="install-paths-"))
    wanted = set(args.paths) or {"bare", "redis", "local", "bench"}
    started = time.monotonic()
    try:
        for path in install_paths(workdir):
            if path.name not in wanted:
                continue
            print(f"== install path: {path.name}", flush=True)
            bin_dir = make_venv(workdir / f"venv-{path.name}", path)
            if path.name == "local":
                sh([str(bin_dir / "python"), str(ROOT / "tests" / "tiny_model.py"), str(workdir / "tiny-model")])
            for run in path.runs:
                check_run(bin_dir, run, workdir)
        if "bench" in wanted:
            print("== install path: bench", flush=True)
            check_bench(workdir)
    except (RuntimeError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        print(f"install paths: FAILED: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"install paths: {', '.join(sorted(wanted))} passed in {time.monotonic() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
