"""``gateway chat`` as people run it: in a terminal (a pseudo-terminal that is its
controlling terminal, so a typed Ctrl-C is a SIGINT from the terminal driver)."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from gateway.backends.synthetic import synthetic_tokens
from tests.fake_upstream import FakeUpstream, Plan
from tests.support import ROOT, SECRET, ServerThread, make_settings, mint
from tests.tcp_proxy import CuttableProxy

pytestmark = pytest.mark.slow

# The child becomes a session leader with the pty as its controlling terminal, then runs
# the gateway command line, exactly as `gateway chat …` does from a shell.
CHILD = (
    "import fcntl, os, sys, termios\n"
    "os.setsid()\n"
    "fcntl.ioctl(0, termios.TIOCSCTTY, 0)\n"
    "from gateway.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


class Terminal:
    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, *args], stdin=slave, stdout=slave, stderr=slave, close_fds=True,
            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}, cwd=str(ROOT),
        )
        os.close(slave)
        self.output = ""

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    def expect(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        """Read until ``pattern`` matches what was printed (from the start); newlines as \\n."""
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern, self.output, flags=re.S)
            if match:
                return match
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {pattern!r} in:\n{self.output}")
            ready, _, _ = select.select([self.master], [], [], remaining)
            if ready:
                try:
                    data = os.read(self.master, 65536)
                except OSError:  # EIO: the child exited and closed the terminal
                    data = b""
                if not data:
                    raise AssertionError(f"the chat exited before {pattern!r}:\n{self.output}")
                self.output += data.decode(errors="replace").replace("\r\n", "\n")

    def wait(self, timeout: float = 20.0) -> int:
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        os.close(self.master)


@pytest.fixture
def terminals() -> Iterator[Any]:
    opened: list[Terminal] = []

    def open_terminal(args: list[str], env: dict[str, str] | None = None) -> Terminal:
        terminal = Terminal(args, env)
        opened.append(terminal)
        return terminal

    yield open_terminal
    for terminal in opened:
        terminal.close()


def paced(tokens_per_s: float) -> Any:
    return make_settings(backend="synthetic", synthetic_tokens_per_s=tokens_per_s, resume_grace_s=10)


def test_type_a_prompt_read_the_streamed_answer_and_quit_with_ctrl_d(terminals: Any) -> None:
    with ServerThread(paced(200)) as server:
        chat = terminals(["chat", "--url", server.url, "--token", mint("ann"), "--max-tokens", "40"])
        chat.expect(r"connected as ann.*you> ")
        chat.type("tell me something\n")
        expected = "".join(synthetic_tokens("tell me something", 40))
        match = chat.expect(r"ai> (.*?)\n\[length · 40 tokens · first token \d+ ms · [\d.]+ tokens/s\]\nyou> ")
        assert match.group(1) == expected
        # The second turn carries the conversation; the answer is to its last message.
        chat.type("and more\n")
        chat.expect(re.escape("".join(synthetic_tokens("and more", 40))) + r"\n\[length")
        chat.type("\x04")  # Ctrl-D
        assert chat.wait() == 0


def test_ctrl_c_cancels_the_answer_and_a_second_ctrl_c_quits(terminals: Any) -> None:
    with ServerThread(paced(40)) as server:
        chat = terminals(["chat", "--url", server.url, "--token", mint("bo"), "--max-tokens", "2000"])
        chat.expect(r"you> ")
        chat.type("a very long answer please\n")
        chat.expect(r"ai> \S+ \S+ \S+")  # streaming has begun
        chat.type("\x03")  # Ctrl-C, through the terminal driver
        match = chat.expect(r"ai> (.*?)\n\[cancelled · (\d+) tokens[^\]]*\]\nyou> ")
        assert 3 <= int(match.group(2)) < 2000
        shown = match.group(1).replace("^C", "")  # the terminal driver echoes the Ctrl-C
        assert "".join(synthetic_tokens("a very long answer please", 2000)).startswith(shown)
        assert server.metric('gateway_generations_total{outcome="cancelled",transport="ws"}') == 1
        chat.type("\x03")  # at the prompt: quit
        assert chat.wait() == 0


def test_a_dropped_connection_resumes_the_answer_in_place(terminals: Any) -> None:
    with ServerThread(paced(100)) as server, CuttableProxy(server.port) as proxy:
        chat = terminals(["chat", "--url", proxy.url, "--token", mint("cy"), "--max-tokens", "300"])
        chat.expect(r"you> ")
        chat.type("survive a drop\n")
        chat.expect(r"ai> (\S+ ){20}")
        assert proxy.cut() == 1
        match = chat.expect(r"ai> (.*?)\n\[length · 300 tokens[^\]]*\]\nyou> ", timeout=30)
        notices = (r"\n\[connection closed 1006: [^\]]*; reconnecting in [\d.]+ s\]\n"
                   r"\[reconnected; resuming the answer\]\n")
        assert len(re.findall(notices, match.group(1))) == 1
        assert re.sub(notices, "", match.group(1)) == "".join(synthetic_tokens("survive a drop", 300))
        chat.type("\x04")
        assert chat.wait() == 0


def test_without_a_token_it_mints_one_in_development_or_says_what_to_do(terminals: Any) -> None:
    with ServerThread(make_settings()) as server:
        chat = terminals(["chat", "--url", server.url, "--user", "dee"],
                         env={"GATEWAY_JWT_SECRET": SECRET, "GATEWAY_ENV": "dev"})
        chat.expect(r"minted a development token for user 'dee'.*connected as dee.*you> ")
        chat.type("\x03")
        assert chat.wait() == 0
    result = subprocess.run([sys.executable, "-m", "gateway", "chat", "--url", "ws://127.0.0.1:9/ws"],
                            env={"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT)}, cwd=str(ROOT),
                            capture_output=True, text=True, timeout=30)
    assert result.returncode != 0 and "--token" in result.stderr and "GATEWAY_JWT_SECRET" in result.stderr


def test_a_long_conversation_drops_its_oldest_exchanges_to_fit_the_prompt_limit(terminals: Any) -> None:
    # Echo answers repeat the question: each exchange is twice its question's length.
    with ServerThread(make_settings(max_prompt_chars=100)) as server:
        chat = terminals(["chat", "--url", server.url, "--token", mint("dot")])
        chat.expect(r"you> ")
        for index, question in enumerate(["first question here", "second question here",
                                          "the third question, longer"]):
            if index == 2:  # 19 + 19 + 20 + 20 fit; with these 26 more the first exchange must go
                assert "dropped" not in chat.output
            chat.type(question + "\n")
            chat.expect(r"ai> " + re.escape(question) + r"\n\[stop[^\]]*\]\nyou> ")
        assert "dropped the 1 oldest exchange(s) to fit the server's prompt limit of 100" in chat.output
        assert "prompt_too_long" not in chat.output
        chat.type("\x04")
        assert chat.wait() == 0


def test_reasoning_is_dimmed_and_each_tool_call_gets_a_line(terminals: Any) -> None:
    body = (ROOT / "tests" / "fixtures" / "upstream" / "ollama_tool_call.sse").read_text()
    with FakeUpstream() as upstream:
        upstream.plans.append(Plan(kind="replay", body=body))
        settings = make_settings(backend="openai", openai_base_url=upstream.base_url)
        with ServerThread(settings) as server:
            chat = terminals(["chat", "--url", server.url, "--token", mint("ann")])
            chat.expect(r"connected as ann.*you> ")
            chat.type("weather in Paris?\n")
            chat.expect(re.escape("ai> \x1b[2mI should call get_weather.\x1b[0m\n"
                                  '[tool call get_weather({"city":"Paris"}) id=call_h2m9qz1k]\n'))
            chat.expect(r"\[tool_calls · 6 tokens")
            chat.type("\x04")
            assert chat.wait() == 0
