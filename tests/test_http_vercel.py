"""The Vercel AI SDK (npm ``ai`` with ``@ai-sdk/openai-compatible``), run by Node against a
real gateway: ``streamText`` streams text and a tool call through the OpenAI-compatible
API. ``.ci/run`` installs the packages into ``tests/js`` (``npm install --prefix tests/js``)."""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

import pytest

from gateway.backends.synthetic import iter_synthetic_tokens
from tests.conftest import require_program
from tests.support import ROOT, Serve, mint

pytestmark = pytest.mark.slow

JS = ROOT / "tests" / "js"


def stream_text(base_url: str, mode: str) -> dict[str, Any]:
    node = require_program("node")
    modules = JS / "node_modules"
    if not (modules / "ai").is_dir() or not (modules / "@ai-sdk" / "openai-compatible").is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail("the Vercel AI SDK is not installed (npm install --prefix tests/js)")
        pytest.skip("the Vercel AI SDK is not installed (npm install --prefix tests/js)")
    done = subprocess.run([node, str(JS / "stream_text.mjs"), base_url, mint(), mode], capture_output=True,
                          text=True, timeout=60, check=True)
    return dict(json.loads(done.stdout))


def test_stream_text_streams_text(serve: Serve) -> None:
    server = serve(backend="synthetic", synthetic_tokens_per_s=200)
    result = stream_text(server.http + "/v1", "text")
    assert result["errors"] == []
    assert result["text"] == "".join(iter_synthetic_tokens("the quick brown fox jumps", 12))
    assert result["finishReason"] == "length"
    assert (result["usage"]["inputTokens"], result["usage"]["outputTokens"]) == (5, 12)


def test_stream_text_streams_a_tool_call(serve: Serve) -> None:
    server = serve(backend="synthetic", synthetic_tokens_per_s=200)
    result = stream_text(server.http + "/v1", "tool")
    assert result["errors"] == []
    (call,) = result["toolCalls"]
    assert call["name"] == "get_weather" and call["id"]
    assert set(call["input"]) == {"city"}
    assert result["finishReason"] == "tool-calls"
