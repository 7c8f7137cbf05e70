"""``gateway serve --workers N``: N worker processes sharing one listening socket.

The parent binds the socket, starts the workers (spawned, so each builds its own app
from the environment), restarts a worker that dies, and on SIGTERM/SIGINT forwards
SIGTERM to every worker and waits for each one's drain.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from multiprocessing.context import SpawnProcess
from socket import socket
from types import FrameType

from uvicorn._subprocess import get_subprocess

from gateway.transport.uvicorn import GatewayConfig, GatewayServer

logger = logging.getLogger("gateway.supervisor")


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

    workers = [start_worker() for _ in range(count)]
    try:
        while not stop.wait(0.5):
            for index, process in enumerate(workers):
                if not process.is_alive():
                    logger.warning("worker [%s] exited with %s; starting another", process.pid, process.exitcode)
                    workers[index] = start_worker()
    finally:
        for process in workers:
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)
        for process in workers:
            process.join(drain_timeout_s + 10)
            if process.is_alive():
                logger.error("worker [%s] did not finish draining; killing it", process.pid)
                process.kill()
                process.join(5)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        logger.info("all workers stopped")
