"""Processes under test and the load generator, pinned to separate cores, and the
measurements taken of them (CPU time and RSS of the server, the generator's own CPU)."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
JWT_SECRET = "benchmark-secret-0123456789abcdef0123456789"


def raise_nofile_limit() -> int:
    """Children inherit it: 10,000 connections need more than the usual 1,024 descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


@dataclass(frozen=True)
class Pinning:
    server: list[str]
    client: list[str]
    description: str


def choose_pinning() -> Pinning:
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if shutil.which("taskset") and len(cpus) >= 2:
        return Pinning(
            ["taskset", "-c", str(cpus[0])],
            ["taskset", "-c", str(cpus[1])],
            f"server on CPU {cpus[0]}, load generator on CPU {cpus[1]} (taskset)",
        )
    return Pinning([], [], "not pinned (needs taskset and two CPUs): figures mix server and client work")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True)
class Target:
    """Something to measure: the gateway (possibly a variant) or a floor."""

    name: str
    kind: str  # gateway | fastapi | websockets
    ws: str = "default"
    loop: str = "auto"
    http: str = "auto"
    backend: str = "synthetic"
    env: tuple[tuple[str, str], ...] = ()  # extra GATEWAY_* settings

    @property
    def is_variant(self) -> bool:
        return (self.ws, self.loop, self.http) != ("default", "auto", "auto")

    def command(self, port: int, tokens_per_s: float, ttft_ms: float, ws_ping_s: float) -> list[str]:
        py = [sys.executable, "-m"]
        if self.kind == "gateway":
            if not self.is_variant:
                return [*py, "gateway", "serve", "--port", str(port)]
            ws = "gateway" if self.ws == "default" else self.ws
            return [*py, "benchmarks.gateway_variant", "--port", str(port), "--ws", ws, "--loop", self.loop,
                    "--http", self.http]
        pacing = ["--tokens-per-s", str(tokens_per_s), "--ttft-ms", str(ttft_ms), "--ws-ping-interval-s",
                  str(ws_ping_s)]
        if self.kind == "fastapi":
            ws = "websockets-sansio" if self.ws == "default" else self.ws
            return [*py, "benchmarks.floor_fastapi", "--port", str(port), *pacing, "--ws", ws, "--loop", self.loop,
                    "--http", self.http]
        if self.kind == "websockets":
            loop = "uvloop" if self.loop == "auto" else self.loop
            return [*py, "benchmarks.floor_websockets", "--port", str(port), *pacing, "--loop", loop]
        raise ValueError(self.kind)


GATEWAY = Target("gateway", "gateway")
FLOOR_FASTAPI = Target("floor: FastAPI", "fastapi")
FLOOR_WEBSOCKETS = Target("floor: websockets", "websockets")


@dataclass(frozen=True)
class ServerOptions:
    tokens_per_s: float = 0.0
    ttft_ms: float = 0.0
    heartbeat_interval_s: float = 15.0
    heartbeat_timeout_s: float = 45.0
    ws_ping_interval_s: float = 20.0
    extra_env: dict[str, str] = field(default_factory=dict)

    def gateway_env(self, target: Target) -> dict[str, str]:
        backend = "benchmarks.backends:PacedOrFullSpeed" if target.backend == "paced-or-full" else target.backend
        env = {
            "GATEWAY_ENV": "dev",
            "GATEWAY_JWT_SECRET": JWT_SECRET,
            "GATEWAY_BACKEND": backend,
            "GATEWAY_LOG_LEVEL": "warning",
            "GATEWAY_ACCESS_LOG": "false",
            "GATEWAY_SYNTHETIC_TOKENS_PER_S": str(self.tokens_per_s),
            "GATEWAY_SYNTHETIC_TTFT_MS": str(self.ttft_ms),
            "GATEWAY_MAX_TOKENS": "1000000",
            "GATEWAY_MAX_CONNECTIONS": "20000",
            "GATEWAY_USER_GENERATE_RATE_PER_S": "1000",
            "GATEWAY_USER_GENERATE_BURST": "1000",
            "GATEWAY_HEARTBEAT_INTERVAL_S": str(self.heartbeat_interval_s),
            "GATEWAY_HEARTBEAT_TIMEOUT_S": str(self.heartbeat_timeout_s),
            "GATEWAY_WS_PING_INTERVAL_S": str(self.ws_ping_interval_s),
            "GATEWAY_WS_PING_TIMEOUT_S": str(self.ws_ping_interval_s),
            "GATEWAY_DRAIN_TIMEOUT_S": "0",
        }
        env.update(target.env)
        env.update(self.extra_env)
        return env


@dataclass
class Sample:
    t: float
    cpu_s: float
    rss: int


def wait_listening(popen: subprocess.Popen[bytes], port: int, name: str, tail: Callable[[], str],
                   timeout: float) -> None:
    """Until a child process accepts connections on ``port``; its log's tail if it exits or
    does not listen in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            raise RuntimeError(f"{name} exited at start:\n{tail()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{name} did not listen within {timeout:.0f}s:\n{tail()}")


def log_tail(log: IO[bytes], path: Path, lines: int = 20) -> str:
    """The last lines a child process wrote to ``log`` (open at ``path``)."""
    log.flush()
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


class ServerProcess:
    """A server under test in its own process, pinned, on a free loopback port."""

    def __init__(self, target: Target, options: ServerOptions, pinning: Pinning, workdir: Path) -> None:
        self.target = target
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        if target.kind == "gateway":
            env.update(options.gateway_env(target))
        command = pinning.server + target.command(
            self.port, options.tokens_per_s, options.ttft_ms, options.ws_ping_interval_s
        )
        self.log_path = workdir / f"server-{self.port}.log"
        self._log = self.log_path.open("wb")
        # cwd is an empty directory, so a developer's .env cannot change what is measured.
        self.popen = subprocess.Popen(command, env=env, cwd=workdir, stdout=self._log, stderr=subprocess.STDOUT)
        self.process = psutil.Process(self.popen.pid)

    def wait_ready(self, timeout: float = 30.0) -> None:
        wait_listening(self.popen, self.port, self.target.name, self.log_tail, timeout)

    def log_tail(self, lines: int = 20) -> str:
        return log_tail(self._log, self.log_path, lines)

    def sample(self) -> Sample:
        times = self.process.cpu_times()
        return Sample(time.monotonic(), times.user + times.system, self.process.memory_info().rss)

    @contextlib.contextmanager
    def sampling(self, interval: float = 0.2) -> Iterator[list[Sample]]:
        """RSS and CPU sampled in the background while the block runs."""
        samples: list[Sample] = []
        stop = threading.Event()

        def run() -> None:
            while not stop.wait(interval):
                with contextlib.suppress(psutil.Error):
                    samples.append(self.sample())

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        try:
            yield samples
        finally:
            stop.set()
            thread.join()

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._log.close()

    def __enter__(self) -> ServerProcess:
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class Phase:
    name: str
    t: float
    client_cpu_s: float
    client_t: float
    server: Sample | None
    steal_s: float = float("nan")


def host_steal_s() -> float:
    """CPU time the hypervisor gave to other guests, summed over this machine's CPUs since
    boot (``/proc/stat``); NaN where it is not reported."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            fields = stat.readline().split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


@dataclass
class LoadRun:
    result: dict[str, Any]
    phases: dict[str, Phase]
    samples: list[Sample]

    def window(self, start: str, end: str) -> dict[str, float]:
        """Server and load-generator CPU between two phases, as % of one core."""
        a, b = self.phases[start], self.phases[end]
        wall = max(b.t - a.t, 1e-9)
        client_wall = max(b.client_t - a.client_t, 1e-9)
        server_cpu = (b.server.cpu_s - a.server.cpu_s) if a.server and b.server else float("nan")
        return {
            "wall_s": wall,
            "server_cpu_s": server_cpu,
            "server_cpu_pct": 100.0 * server_cpu / wall,
            "client_cpu_pct": 100.0 * (b.client_cpu_s - a.client_cpu_s) / client_wall,
            # A share of all CPUs' time: on a shared host, the run was that much slower than
            # its own CPU figures say, and its latencies may carry the hypervisor's pauses.
            "steal_pct": 100.0 * (b.steal_s - a.steal_s) / (wall * (os.cpu_count() or 1)),
        }


def run_loadgen(spec: dict[str, Any], server: ServerProcess, pinning: Pinning, timeout: float) -> LoadRun:
    """Run the load generator against ``server``; sample the server at each phase line."""
    spec = {"host": "127.0.0.1", "port": server.port, **spec}
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    command = [*pinning.client, sys.executable, "-m", "benchmarks.loadgen", json.dumps(spec)]
    phases: dict[str, Phase] = {}
    result: dict[str, Any] | None = None
    with tempfile.TemporaryFile() as errors, server.sampling() as samples:
        child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=errors, cwd=ROOT, text=True)
        killer = threading.Timer(timeout, child.kill)
        killer.start()
        try:
            assert child.stdout is not None
            for line in child.stdout:
                if line.startswith("PHASE "):
                    _, name, cpu, t = line.split()
                    sample = None
                    with contextlib.suppress(psutil.Error):
                        sample = server.sample()
                    phases[name] = Phase(name, time.monotonic(), float(cpu), float(t), sample, host_steal_s())
                elif line.startswith("RESULT "):
                    result = json.loads(line[len("RESULT ") :])
            child.wait()
        finally:
            killer.cancel()
        if result is None:
            errors.seek(0)
            tail = errors.read().decode(errors="replace")[-2000:]
            raise RuntimeError(f"load generator failed (exit {child.returncode}) against {server.target.name}:\n{tail}")
    return LoadRun(result, phases, list(samples))
