"""The gateway in front of a real OpenAI-compatible server this project did not write:
``transformers serve`` with the tiny model, started on loopback by the test."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx
import pytest

from tests.conftest import require_modules, require_program
from tests.support import (
    SECRET,
    Serve,
    ServerProcess,
    connected,
    mint,
    recv_until,
    stream_text,
    terminal_for,
)

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

STARTUP_TIMEOUT_S = 120.0


@dataclass
class Served:
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    async def cpu_rate(self, window_s: float = 0.5) -> float:
        """CPU seconds per second the server used over a short window."""
        before = self.cpu_seconds()
        await anyio.sleep(window_s)
        return (self.cpu_seconds() - before) / window_s


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def served(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    program = require_program("transformers")
    require_modules("openai", "accelerate", "rich")  # transformers[serving]
    work = tmp_path_factory.mktemp("transformers-serve")
    (work / "hub").mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(work / "hub"), "HF_HOME": str(work)}
    port = free_port()
    log = work / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [program, "serve", str(tiny_model_dir), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
            env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"transformers serve exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"transformers serve did not answer /health:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield Served(process, port, log)
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def reference(model_dir: Path, max_tokens: int, *, messages: list[dict[str, str]] | None = None,
              prompt: str | None = None) -> str:
    """The tiny model's greedy answer, computed here."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if messages is not None:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    else:
        text = prompt
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)
    return str(tokenizer.decode(output[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True))


@pytest.mark.parametrize("api", ["chat", "completions"])
async def test_streams_end_to_end_from_environment_settings(served: Served, tiny_model_dir: Path, api: str) -> None:
    env = {"GATEWAY_BACKEND": "openai", "GATEWAY_OPENAI_BASE_URL": served.base_url, "GATEWAY_OPENAI_API": api,
           "GATEWAY_JWT_SECRET": SECRET}
    messages = [{"role": "user", "content": "hello gateway"}]
    with ServerProcess(env) as gateway:
        async with httpx.AsyncClient() as client:
            assert (await client.get(gateway.http + "/readyz")).status_code == 200
        async with connected(gateway, mint()) as ws:
            await ws.send(json.dumps({"type": "generate", "id": "real", "messages": messages, "max_tokens": 24}))
            frames = await recv_until(ws, terminal_for("real"), timeout=60)
    tokens = [f for f in frames if f["type"] == "token"]
    assert len(tokens) > 1 and frames[-1]["type"] == "done"
    assert frames[-1]["finish_reason"] == "length" and frames[-1]["usage"]["completion_tokens"] == 24
    if api == "chat":
        expected = reference(tiny_model_dir, 24, messages=messages)
    else:
        expected = reference(tiny_model_dir, 24, prompt="hello gateway")
    assert stream_text(frames, "real") == expected


async def test_cancel_through_the_gateway_ends_generation_on_the_server(served: Served, serve: Serve) -> None:
    gateway = serve(backend="openai", openai_base_url=served.base_url, upstream_first_token_timeout_s=30)
    async with connected(gateway, mint()) as ws:
        await ws.send(json.dumps({"type": "generate", "id": "long", "prompt": "go on", "max_tokens": 4000}))
        await recv_until(ws, lambda f: f.get("type") == "token", timeout=60)
        busy = await served.cpu_rate()
        assert busy > 0.2, f"the server should be generating (cpu {busy:.2f})"
        await ws.send(json.dumps({"type": "cancel", "id": "long"}))
        frames = await recv_until(ws, terminal_for("long"))
        assert frames[-1]["type"] == "done" and frames[-1]["finish_reason"] == "cancelled"
        with anyio.fail_after(10):
            while (rate := await served.cpu_rate()) > 0.1:
                pass
    assert rate <= 0.1
    assert frames[-1]["usage"]["completion_tokens"] < 4000
