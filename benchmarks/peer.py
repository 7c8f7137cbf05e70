"""The peer comparison: the gateway (``openai`` backend, over its WebSocket and over its
OpenAI-compatible HTTP API) and the LiteLLM proxy (over SSE) in front of the same local
OpenAI-compatible upstream (``upstream.py``).

LiteLLM lives in its own virtualenv, since its dependencies are not the gateway's:
``python3 -m venv /tmp/venv-litellm && /tmp/venv-litellm/bin/pip install 'litellm[proxy]'``
(or ``--litellm PATH`` / ``BENCH_LITELLM`` naming its ``litellm`` executable). It starts on
loopback with no database, no telemetry, the local model-cost map and no admin UI, so it
makes no outside calls, and a master key the client sends as its bearer token.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

from benchmarks.harness import (
    JWT_SECRET,
    ROOT,
    Pinning,
    ServerOptions,
    ServerProcess,
    Target,
    free_port,
    log_tail,
    run_loadgen,
    wait_listening,
)

DEFAULT_LITELLM = "/tmp/venv-litellm/bin/litellm"
MASTER_KEY = "sk-bench-master-key"
MODEL = "bench-model"
LITELLM_ENV = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "LITELLM_TELEMETRY": "False",
    "DISABLE_ADMIN_UI": "True",
    "LITELLM_LOG": "ERROR",
}


def litellm_executable(explicit: str | None = None) -> str | None:
    for candidate in (explicit, os.environ.get("BENCH_LITELLM"), DEFAULT_LITELLM, shutil.which("litellm")):
        if candidate and Path(candidate).exists():
            return candidate
    return None


class Process:
    """A helper process (the upstream, LiteLLM): pinned, on a free port, its CPU sampled."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], workdir: Path, port: int) -> None:
        self.name = name
        self.port = port
        self.log_path = workdir / f"{name}-{port}.log"
        self._log = self.log_path.open("wb")
        self.popen = subprocess.Popen(command, env=env, cwd=workdir, stdout=self._log, stderr=subprocess.STDOUT)
        self.process = psutil.Process(self.popen.pid)

    def cpu_s(self) -> float:
        total = 0.0
        with contextlib.suppress(psutil.Error):
            for proc in [self.process, *self.process.children(recursive=True)]:
                times = proc.cpu_times()
                total += times.user + times.system
        return total

    def wait_http(self, path: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited at start:\n{self.log_tail()}")
            with contextlib.suppress(OSError), urllib.request.urlopen(
                    f"http://127.0.0.1:{self.port}{path}", timeout=2) as response:
                if response.status == 200:
                    return
            time.sleep(0.25)
        raise RuntimeError(f"{self.name} not healthy within {timeout:.0f}s:\n{self.log_tail()}")

    def wait_port(self, timeout: float = 15.0) -> None:
        wait_listening(self.popen, self.port, self.name, self.log_tail, timeout)

    def log_tail(self, lines: int = 20) -> str:
        return log_tail(self._log, self.log_path, lines)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._log.close()


@contextlib.contextmanager
def running(process: Process) -> Iterator[Process]:
    try:
        yield process
    finally:
        process.stop()


def upstream_process(pinning: Pinning, workdir: Path) -> Process:
    port = free_port()
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    # With the load generator: the server's core is for the proxy under test.
    command = [*pinning.client, sys.executable, "-m", "benchmarks.upstream", "--port", str(port)]
    process = Process("upstream", command, env, workdir, port)
    process.wait_port()
    return process


def litellm_process(executable: str, upstream_port: int, pinning: Pinning, workdir: Path) -> Process:
    port = free_port()
    config = workdir / "litellm.yaml"
    config.write_text(
        "model_list:\n"
        f"  - model_name: {MODEL}\n"
        "    litellm_params:\n"
        f"      model: openai/{MODEL}\n"
        f"      api_base: http://127.0.0.1:{upstream_port}/v1\n"
        "      api_key: sk-upstream-unused\n"
        "general_settings:\n"
        f"  master_key: {MASTER_KEY}\n"
        "litellm_settings:\n"
        "  telemetry: false\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "PYTHONPATH")}
    env.update(LITELLM_ENV)
    command = [*pinning.server, executable, "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
               "--num_workers", "1"]
    return Process("litellm", command, env, workdir, port)


def measure_sse(process: Process, pinning: Pinning, port: int, streams: int, tokens: int,
                api_key: str | None) -> dict[str, Any]:
    spec = {"kind": "sse", "host": "127.0.0.1", "port": port, "connections": streams, "max_tokens": tokens,
            "model": MODEL, "api_key": api_key, "timeout_s": 300.0}
    run = run_loadgen(spec, _Sampled(process), pinning, timeout=600.0)  # type: ignore[arg-type]
    window = run.window("sgo", "send")
    return {**run.result, **window}


class _Sampled:
    """What ``run_loadgen`` needs of a server: a port, a name and CPU/RSS samples."""

    def __init__(self, process: Process) -> None:
        self.port = process.port
        self._process = process
        self.target = Target(process.name, "gateway")

    def sample(self) -> Any:
        from benchmarks.harness import Sample

        rss = 0
        with contextlib.suppress(psutil.Error):
            rss = self._process.process.memory_info().rss
        return Sample(time.monotonic(), self._process.cpu_s(), rss)

    @contextlib.contextmanager
    def sampling(self, interval: float = 0.2) -> Iterator[list[Any]]:
        yield []


def measure_gateway(ctx: Any, upstream_port: int, streams: int, tokens: int) -> dict[str, Any]:
    target = Target("gateway (openai backend)", "gateway", backend="openai", env=(
        ("GATEWAY_OPENAI_BASE_URL", f"http://127.0.0.1:{upstream_port}/v1"),
        ("GATEWAY_OPENAI_MODEL", MODEL),
        ("GATEWAY_OPENAI_MAX_CONNECTIONS", str(max(streams, 1))),
    ))
    spec = {"kind": "stream", "connections": streams, "max_tokens": tokens, "jwt_secret": JWT_SECRET,
            "timeout_s": 300.0}
    with ServerProcess(target, ServerOptions(), ctx.pinning, ctx.workdir) as server:
        # A first run opens the gateway's upstream connections, as LiteLLM's warm-up request does.
        run_loadgen({**spec, "connections": 1, "max_tokens": 10}, server, ctx.pinning, timeout=120.0)
        run = run_loadgen(spec, server, ctx.pinning, timeout=600.0)
    window = run.window("sgo", "send")
    return {**run.result, **window}


def measure_gateway_http(ctx: Any, upstream_port: int, streams: int, tokens: int) -> dict[str, Any]:
    """The gateway's OpenAI-compatible HTTP API, read by the same SSE client as LiteLLM."""
    import jwt

    target = Target("gateway (openai backend, HTTP)", "gateway", backend="openai", env=(
        ("GATEWAY_OPENAI_BASE_URL", f"http://127.0.0.1:{upstream_port}/v1"),
        ("GATEWAY_OPENAI_MODELS", MODEL),
        ("GATEWAY_OPENAI_MAX_CONNECTIONS", str(max(streams, 1))),
        # Every stream is one user's, as every LiteLLM request carries its master key: the
        # per-user limits are raised to let them all run at once.
        ("GATEWAY_MAX_STREAMS_PER_USER", str(streams + 1)),
        ("GATEWAY_USER_GENERATE_BURST", str(streams + 1)),
        ("GATEWAY_USER_GENERATE_RATE_PER_S", str(streams + 1)),
    ))
    token = jwt.encode({"sub": "bench", "exp": int(time.time()) + 3600}, JWT_SECRET, algorithm="HS256")
    spec = {"kind": "sse", "host": "127.0.0.1", "connections": streams, "max_tokens": tokens, "model": MODEL,
            "api_key": token, "timeout_s": 300.0}
    with ServerProcess(target, ServerOptions(), ctx.pinning, ctx.workdir) as server:
        run = run_loadgen({**spec, "port": server.port}, server, ctx.pinning, timeout=600.0)
    window = run.window("sgo", "send")
    return {**run.result, **window}
