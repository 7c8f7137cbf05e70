"""``gateway chat``: an interactive terminal chat on ``gateway.client``.

Tokens are printed as they arrive, the model's reasoning dimmed (on a terminal), and each
tool call on one line once it is complete. Ctrl-C cancels the answer being streamed; at the
prompt, or pressed again before the cancelled answer has ended, it quits, as does Ctrl-D.
A dropped connection is reconnected and the answer resumes where it stopped (the client
guarantees no token is printed twice or skipped). Notices about the connection go to
stderr, the conversation to stdout.
"""

from __future__ import annotations

import asyncio
import os
import select
import signal
import sys
from typing import Any, TextIO

import anyio

from gateway.client import GatewayClient, GatewayError, Generation, StateChange, describe_close
from gateway.client.types import TokenSource, ToolCallPart

DIM = "\x1b[2m"
RESET = "\x1b[0m"


class LineReader:
    """Lines from a file descriptor without a thread: the event loop says when it is
    readable. A terminal in canonical mode hands over whole lines, edited by the user."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._buffer = b""
        self._eof = False
        self._readable = asyncio.Event()

    def __enter__(self) -> LineReader:
        asyncio.get_running_loop().add_reader(self.fd, self._readable.set)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.get_running_loop().remove_reader(self.fd)

    async def readline(self) -> str | None:
        """The next line without its newline; None at end of input."""
        while b"\n" not in self._buffer:
            if self._eof:
                if not self._buffer:
                    return None
                line, self._buffer = self._buffer, b""
                return line.decode(errors="replace")
            await self._readable.wait()
            self._readable.clear()
            # A terminal may have said readable and then dropped its input (Ctrl-C flushes
            # it). The descriptor stays blocking, since the shell shares it with stdout, so
            # read only what is there now.
            if not select.select([self.fd], [], [], 0)[0]:
                continue
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                continue
            except OSError:  # a terminal that went away reads as an error (EIO)
                data = b""
            if data:
                self._buffer += data
            else:
                self._eof = True
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode(errors="replace").rstrip("\r")


def format_stats(answer: Generation) -> str:
    terminal = answer.terminal or {}
    if terminal.get("type") == "error":
        return f"[error {terminal.get('code')}: {terminal.get('message')}]"
    parts = [f"{terminal.get('finish_reason', '?')}", f"{answer.tokens} tokens"]
    if answer.first_token_at is not None:
        parts.append(f"first token {(answer.first_token_at - answer.created_at) * 1000:.0f} ms")
        if answer.finished_at is not None and answer.tokens > 1 and answer.finished_at > answer.first_token_at:
            parts.append(f"{(answer.tokens - 1) / (answer.finished_at - answer.first_token_at):.1f} tokens/s")
    return "[" + " · ".join(parts) + "]"


def format_tool_call(call: dict[str, Any]) -> str:
    function = call["function"]
    return f"[tool call {function['name']}({function['arguments']}) id={call['id']}]"


class Chat:
    def __init__(self, client: GatewayClient, *, max_tokens: int | None, out: TextIO, err: TextIO) -> None:
        self.client = client
        self.dim, self.reset = (DIM, RESET) if out.isatty() else ("", "")
        self.max_tokens = max_tokens
        self.out = out
        self.err = err
        self.history: list[dict[str, str]] = []
        self.current: Generation | None = None
        self.cancelling = False
        self.quit = anyio.Event()
        self.mid_line = False

    def notice(self, text: str) -> None:
        if self.mid_line:
            self.out.flush()
            self.err.write("\n")
            self.mid_line = False
        self.err.write(f"[{text}]\n")
        self.err.flush()

    def on_state(self, change: StateChange) -> None:
        if change.state == "reconnecting":
            self.notice(f"connection closed {describe_close(change.code, change.reason)}; "
                        f"reconnecting in {change.delay_s or 0:.1f} s")
        elif change.state == "open" and self.client.opens > 1:
            self.notice("reconnected" + ("; resuming the answer" if self.current else ""))
        elif change.state == "closed" and change.code != 1000:
            self.notice(f"connection closed {describe_close(change.code, change.reason)}")
            self.quit.set()

    def on_error(self, frame: dict[str, Any]) -> None:
        self.notice(f"server: {frame.get('code')}: {frame.get('message')}")

    def interrupt(self) -> None:
        """Ctrl-C: cancel the answer being streamed; otherwise (or a second time) quit."""
        current = self.current
        if current is None or self.cancelling:
            self.quit.set()
            return
        self.cancelling = True
        asyncio.get_running_loop().create_task(current.cancel())

    async def converse(self, lines: LineReader) -> None:
        while True:
            self.out.write("you> ")
            self.out.flush()
            line = await lines.readline()
            if line is None:
                self.out.write("\n")
                return
            if not line.strip():
                continue
            await self.answer(line)

    async def show(self, answer: Generation) -> None:
        """Write the answer's parts as they arrive: text as is, reasoning dimmed, each tool
        call on a line of its own once complete (when a part of anything else follows it)."""
        out = self.out
        style = ""  # what the text written last is: "" (answer), "reasoning", "call"
        shown: set[int] = set()
        call: int | None = None  # the tool call whose fragments are arriving

        def switch(to: str) -> None:
            nonlocal style
            if to == style:
                return
            if style == "reasoning":
                out.write(self.reset + "\n")
                self.mid_line = False
            if to == "reasoning":
                out.write(self.dim)
            style = to

        def show_call(index: int) -> None:
            calls = answer.tool_calls
            if index < len(calls) and index not in shown:
                shown.add(index)
                out.write(("\n" if self.mid_line else "") + format_tool_call(calls[index]) + "\n")
                self.mid_line = False

        async for part in answer.parts():
            if call is not None and not (isinstance(part, ToolCallPart) and part.index == call):
                show_call(call)
                call = None
            if isinstance(part, ToolCallPart):
                switch("call")
                call = part.index
                continue
            switch("reasoning" if part.kind == "reasoning" else "")
            out.write(part.text)
            out.flush()
            self.mid_line = True
        if call is not None:
            show_call(call)
        for index in range(len(answer.tool_calls)):
            show_call(index)
        switch("")

    def fit(self, turn: dict[str, str]) -> list[dict[str, str]]:
        """The conversation to send: the oldest exchanges are dropped until it fits the
        server's ``max_prompt_chars`` (from its hello), instead of the whole turn failing
        with ``prompt_too_long`` once a long conversation outgrows it."""
        limits = (self.client.hello or {}).get("limits") or {}
        limit = limits.get("max_prompt_chars")
        if not isinstance(limit, int):
            return [*self.history, turn]
        size = len(turn["content"]) + sum(len(message["content"]) for message in self.history)
        dropped = 0
        while self.history and size > limit:
            exchange, self.history = self.history[:2], self.history[2:]  # a question and its answer
            size -= sum(len(message["content"]) for message in exchange)
            dropped += 1
        if dropped:
            self.notice(f"dropped the {dropped} oldest exchange(s) to fit the server's prompt limit of {limit} "
                        "characters")
        return [*self.history, turn]

    async def answer(self, prompt: str) -> None:
        turn = {"role": "user", "content": prompt}
        options: dict[str, Any] = {"max_tokens": self.max_tokens} if self.max_tokens else {}
        answer = await self.client.generate(messages=self.fit(turn), **options)
        self.current = answer
        self.cancelling = False
        self.out.write("ai> ")
        self.mid_line = True
        try:
            await self.show(answer)
            await answer.result()
        finally:
            self.current = None
            mid_line, self.mid_line = self.mid_line, False
        self.out.write(("\n" if mid_line else "") + format_stats(answer) + "\n")
        self.out.flush()
        terminal = answer.terminal or {}
        if terminal.get("type") == "done" and terminal.get("finish_reason") != "cancelled":
            self.history += [turn, {"role": "assistant", "content": answer.text}]


async def run_chat(url: str, token: TokenSource | None, *, auth: Any = "subprotocol", max_tokens: int | None = None,
                   stdin_fd: int | None = None, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    async with GatewayClient(url, token, auth=auth) as client:
        chat = Chat(client, max_tokens=max_tokens, out=out, err=err)
        client.on_state = chat.on_state
        client.on_error = chat.on_error
        err.write(f"[connecting to {url}]\n")
        err.flush()
        try:
            hello = await client.wait_open()
        except GatewayError as exc:
            err.write(f"[{exc}]\n")
            return 1
        err.write(f"[connected as {hello.get('user')}. Enter sends; Ctrl-C cancels an answer; "
                  "Ctrl-C at the prompt or Ctrl-D quits]\n")
        err.flush()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGINT, chat.interrupt)
        try:
            with LineReader(sys.stdin.fileno() if stdin_fd is None else stdin_fd) as lines:
                async with anyio.create_task_group() as tg:
                    async def converse() -> None:
                        await chat.converse(lines)
                        tg.cancel_scope.cancel()

                    tg.start_soon(converse)
                    await chat.quit.wait()
                    tg.cancel_scope.cancel()
        finally:
            loop.remove_signal_handler(signal.SIGINT)
        if chat.mid_line:
            out.write("\n")
        out.flush()
        closed_by_server = client.closed
    return 1 if closed_by_server else 0
