"""The README's wscat session, run with the real wscat as printed."""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.support import ROOT, SECRET, ServerProcess

pytestmark = pytest.mark.slow


def readme_commands() -> tuple[str, str]:
    text = (ROOT / "README.md").read_text()
    mint_line = next(line for line in text.splitlines() if line.startswith("TOKEN=$(gateway token"))
    wscat_line = next(line for line in text.splitlines() if line.startswith("wscat -c "))
    return mint_line, wscat_line


def test_readme_wscat_session() -> None:
    if shutil.which("wscat") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("wscat is not installed (npm install -g wscat)")
        pytest.skip("wscat is not installed")
    mint_line, wscat_line = readme_commands()
    with ServerProcess({"GATEWAY_JWT_SECRET": SECRET}) as server:
        script = f"{mint_line}\n{wscat_line.replace('127.0.0.1:8000', f'127.0.0.1:{server.port}')}\n"
        env = {**os.environ, "GATEWAY_JWT_SECRET": SECRET, "PYTHONPATH": str(ROOT),
               "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        proc = subprocess.Popen(["bash", "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=env)
        lines: queue.Queue[str] = queue.Queue()

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.put(line)

        pump_thread = threading.Thread(target=pump, daemon=True)
        pump_thread.start()
        frames = []
        try:
            def next_frame() -> dict[str, object]:
                while True:
                    line = lines.get(timeout=15)
                    match = re.search(r"(\{.*\})", line)
                    if match:
                        return dict(json.loads(match.group(1)))

            hello = next_frame()
            assert hello["type"] == "hello" and hello["user"] == "alice"
            assert proc.stdin is not None
            proc.stdin.write("hello there\n")
            proc.stdin.flush()
            while True:
                frame = next_frame()
                frames.append(frame)
                if frame["type"] in ("done", "error"):
                    break
        finally:
            proc.kill()
            proc.wait(10)
            pump_thread.join(10)
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    pipe.close()
    assert frames[0]["type"] == "start"
    assert "".join(str(f["text"]) for f in frames if f["type"] == "token") == "hello there"
    assert frames[-1]["type"] == "done"
