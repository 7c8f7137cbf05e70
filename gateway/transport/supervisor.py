"""``gateway serve --workers N``: N worker processes sharing one listening socket.

The parent binds the socket, starts the workers (spawned, so each builds its own app
from the environment), restarts a worker that dies, with backoff, and on SIGTERM/SIGINT
forwards SIGTERM to every worker and waits for each one's drain. A worker that keeps
dying as it starts (a bad setting, a backend that cannot load) is not restarted forever:
after ``CRASH_LOOP_DEATHS`` such deaths in a row the parent stops and exits non-zero.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from multiprocessing.context import SpawnProcess
from socket import socket
from types import FrameType

from uvicorn._subprocess import get_subprocess

from gateway.transport.uvicorn import GatewayConfig, GatewayServer

logger = logging.getLogger("gateway.supervisor")

# A worker that dies within this long of its start died starting.
STARTUP_S = 10.0
# Deaths at start in a row after which the parent gives up.
CRASH_LOOP_DEATHS = 5
# Backoff before restarting a worker that died at start: doubles from the first, up to the last.
RESTART_BACKOFF_S = (0.5, 30.0)


class WorkerCrashLoop(RuntimeError):
    """Every restart of a worker died at start: the configuration, not chance, is at fault."""


@dataclass
class WorkerSlot:
    process: SpawnProcess | None
    started_at: float
    deaths_at_start: int = 0
    restart_at: float = 0.0

    def backoff_s(self) -> float:
        first, cap = RESTART_BACKOFF_S
        return float(min(cap, first * 2 ** (self.deaths_at_start - 1)))


def run_workers(config: GatewayConfig, sockets: list[socket], count: int, drain_timeout_s: float) -> None:
    stop = threading.Event()

    def handle_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, handle_signal) for sig in (signal.SIGTERM, signal.SIGINT)}

    def start_worker() -> SpawnProcess:
        process = get_subprocess(config=config, target=GatewayServer(config).run, sockets=sockets)
        process.start()
        logger.info("started worker process [%s]", process.pid)
        return process

    slots = [WorkerSlot(start_worker(), time.monotonic()) for _ in range(count)]
    try:
        while not stop.wait(0.1):
            now = time.monotonic()
            for slot in slots:
                process = slot.process
                if process is not None and not process.is_alive():
                    lived = now - slot.started_at
                    slot.deaths_at_start = slot.deaths_at_start + 1 if lived < STARTUP_S else 0
                    if slot.deaths_at_start >= CRASH_LOOP_DEATHS:
                        raise WorkerCrashLoop(
                            f"a worker died at start {slot.deaths_at_start} times in a row; the last exited with "
                            f"{process.exitcode} (its error is logged above): not restarting it")
                    delay = slot.backoff_s() if slot.deaths_at_start else 0.0
                    logger.warning("worker [%s] exited with %s after %.1fs; starting another in %.1fs",
                                   process.pid, process.exitcode, lived, delay)
                    slot.process = None
                    slot.restart_at = now + delay
                if slot.process is None and now >= slot.restart_at:
                    slot.process = start_worker()
                    slot.started_at = time.monotonic()
    finally:
        processes = [slot.process for slot in slots if slot.process is not None]
        for process in processes:
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)
        for process in processes:
            process.join(drain_timeout_s + 10)
            if process.is_alive():
                logger.error("worker [%s] did not finish draining; killing it", process.pid)
                process.kill()
                process.join(5)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        logger.info("all workers stopped")
