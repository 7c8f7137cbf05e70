"""``transformers``: a local Hugging Face model (``pip install '.[local]'``).

The model loads once in ``start()`` from ``GATEWAY_LOCAL_MODEL`` (a directory, or a hub id
where the machine has network access), on the GPU when there is one. Guarantees:

- The event loop never blocks: loading and ``generate`` run in worker threads; each new
  token crosses back to the loop through a small bounded buffer, so a slow client pauses
  its generation (backpressure) instead of piling tokens up.
- When the gateway stops iterating, generation stops within one token (a stopping
  criterion reads a flag after every step) and its thread ends before ``aclose()`` returns.
- The model is shared: ``GATEWAY_LOCAL_MAX_CONCURRENCY`` generations run at once and up to
  ``GATEWAY_LOCAL_QUEUE_SIZE`` more wait, first come first served; beyond that a request
  fails at once with ``too_many_streams``. The gateway sends ``start`` when it admits a
  request, so a waiting client has its ``start`` and sees its first token once it runs.

torch and transformers are imported here only, so the rest of the gateway does not need them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, ClassVar

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread
import torch
from pydantic import Field
from pydantic_settings import SettingsConfigDict
from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from config import Settings
from gateway.backends.base import BackendSettings, Chunk, FinishChunk, GenerationRequest, TokenChunk
from gateway.wire.codes import ErrorCode
from gateway.wire.errors import BackendError, GatewayError

logger = logging.getLogger("gateway.backends.transformers")

# Tokens a generation may run ahead of its client.
BUFFER_TOKENS = 8
# How long aclose() waits for the generation thread to notice its stop flag.
THREAD_JOIN_TIMEOUT_S = 10.0


class _Stop(StoppingCriteria):  # type: ignore[misc]
    def __init__(self, flag: threading.Event) -> None:
        self.flag = flag

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        return torch.full((input_ids.shape[0],), self.flag.is_set(), dtype=torch.bool, device=input_ids.device)


@dataclass
class _End:
    generated: int
    error: BaseException | None = None


class _LoopStreamer(BaseStreamer):  # type: ignore[misc]
    """Receives token ids in the generation thread and sends the newly decoded text to the
    event loop.

    Decoding is incremental and bounded: only the ids since the last emitted text (plus the
    few before them, which settle spacing and merges) are decoded at each step, and text
    that ends inside a multi-byte character waits for the next token.
    """

    def __init__(self, tokenizer: Any, send: Any, token: Any, stop: threading.Event) -> None:
        self.tokenizer = tokenizer
        self.send = send
        self.token = token
        self.stop = stop
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] were decoded and emitted already
        self.read = 0
        self.prompt_seen = False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:  # generate() first passes the prompt
            self.prompt_seen = True
            return
        self.ids.extend(int(i) for i in value.reshape(-1).tolist())
        self._advance(final=False)

    def end(self) -> None:
        self._advance(final=True)

    def _advance(self, *, final: bool) -> None:
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix : self.read], skip_special_tokens=True)
        after = decode(self.ids[self.prefix :], skip_special_tokens=True)
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self._emit(after[len(before) :])
            self.prefix, self.read = self.read, len(self.ids)

    def _emit(self, text: str) -> None:
        if not text or self.stop.is_set():
            return
        try:
            anyio.from_thread.run(self.send.send, text, token=self.token)
        except Exception:  # the client went away (a closed stream) or the loop stopped
            self.stop.set()


class _Admission:
    """At most ``capacity`` holders; up to ``queue_size`` wait in FIFO order; more are refused."""

    def __init__(self, capacity: int, queue_size: int) -> None:
        self.capacity = capacity
        self.queue_size = queue_size
        self.running = 0
        self.waiting = 0
        self._semaphore: anyio.Semaphore | None = None

    async def acquire(self) -> None:
        if self._semaphore is None:
            self._semaphore = anyio.Semaphore(self.capacity)
        if self.running >= self.capacity and self.waiting >= self.queue_size:
            raise GatewayError(
                f"the local model is busy: {self.capacity} running, {self.waiting} waiting; try again later",
                code=ErrorCode.TOO_MANY_STREAMS,
            )
        self.waiting += 1
        try:
            await self._semaphore.acquire()
        finally:
            self.waiting -= 1
        self.running += 1

    def release(self) -> None:
        assert self._semaphore is not None
        self.running -= 1
        self._semaphore.release()


@dataclass
class _Loaded:
    model: Any
    tokenizer: Any
    device: Any


class TransformersSettings(BackendSettings):
    """``GATEWAY_LOCAL_*``: the model and how it is shared."""

    model_config = SettingsConfigDict(env_prefix="GATEWAY_LOCAL_")

    # A model directory, or a hub id where the machine has network access.
    model: str | None = None
    # auto (cuda when available, else cpu), cpu, cuda, cuda:1, mps...
    device: str = "auto"
    max_concurrency: int = Field(default=1, ge=1)
    queue_size: int = Field(default=16, ge=0)


class TransformersBackend:
    name = "transformers"
    settings_model: ClassVar[type[BackendSettings]] = TransformersSettings
    # Plain text only: tools, images, response formats and the rest are refused.
    features: frozenset[str] = frozenset()

    def __init__(self, settings: Settings) -> None:
        local = settings.backend_settings_as(TransformersSettings)
        if not local.model:
            raise ValueError("the transformers backend needs GATEWAY_LOCAL_MODEL (a model directory or hub id)")
        self.local = local
        self.model_name = local.model
        self._loaded: _Loaded | None = None
        self.admission = _Admission(local.max_concurrency, local.queue_size)

    async def start(self) -> None:
        self._loaded = await anyio.to_thread.run_sync(self._load)
        logger.info("local model loaded on %s", self._loaded.device)

    def _load(self) -> _Loaded:
        requested = self.local.device
        if requested == "auto":
            requested = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(requested)
        tokenizer = AutoTokenizer.from_pretrained(self.model_name)
        model = AutoModelForCausalLM.from_pretrained(self.model_name)
        model.to(device)
        model.eval()
        return _Loaded(model, tokenizer, device)

    async def aclose(self) -> None:
        self._loaded = None

    async def ready(self) -> bool:
        return self._loaded is not None

    def encode(self, request: GenerationRequest) -> Any:
        """The prompt's input ids: messages through the tokenizer's chat template when it has
        one, otherwise the prompt (or the messages' contents) as plain text."""
        loaded = self._loaded
        assert loaded is not None
        tokenizer = loaded.tokenizer
        if request.prompt is None and request.messages and getattr(tokenizer, "chat_template", None):
            turns = [{"role": turn.role, "content": turn.text} for turn in request.messages]
            text = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
        else:
            text = request.prompt if request.prompt is not None else "\n\n".join(t.text for t in request.messages)
        return tokenizer(text, return_tensors="pt", add_special_tokens=False)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        loaded = self._loaded
        if loaded is None:
            raise BackendError("the local model is not loaded")
        await self.admission.acquire()
        try:
            # A long prompt and its chat template take milliseconds to tokenise: not on the
            # event loop, where every other connection waits for it.
            inputs = await anyio.to_thread.run_sync(self.encode, request)
            prompt_tokens = int(inputs["input_ids"].shape[1])
            send, receive = anyio.create_memory_object_stream[str](BUFFER_TOKENS)
            stop = threading.Event()
            finished = anyio.Event()
            token = anyio.lowlevel.current_token()
            outcome: list[_End] = []
            streamer = _LoopStreamer(loaded.tokenizer, send, token, stop)
            kwargs = self._generate_kwargs(request, loaded, inputs, streamer, stop)

            def generate() -> None:
                end = _End(0)
                try:
                    with torch.inference_mode():
                        output = loaded.model.generate(**kwargs)
                    end.generated = int(output.shape[1]) - prompt_tokens
                except BaseException as exc:
                    end.error = exc
                finally:
                    outcome.append(end)
                    try:
                        anyio.from_thread.run_sync(send.close, token=token)
                        anyio.from_thread.run_sync(finished.set, token=token)
                    except Exception:  # the event loop is gone: nobody waits any more
                        pass

            thread = threading.Thread(target=generate, name=f"generate {request.id}", daemon=True)
            thread.start()
            try:
                async with receive:
                    async for text in receive:
                        yield TokenChunk(text)
                await finished.wait()
                end = outcome[0]
                if end.error is not None:
                    logger.error("stream=%s local generation failed: %s", request.id, type(end.error).__name__)
                    raise BackendError("local generation failed")
                reason = "length" if end.generated >= request.max_tokens else "stop"
                yield FinishChunk(reason, prompt_tokens=prompt_tokens, completion_tokens=end.generated)
            finally:
                stop.set()
                receive.close()
                # The slot is released only once the model is free again, or the limit on
                # concurrent generations would not hold.
                with anyio.move_on_after(THREAD_JOIN_TIMEOUT_S, shield=True):
                    await finished.wait()
        finally:
            self.admission.release()

    def _generate_kwargs(
        self, request: GenerationRequest, loaded: _Loaded, inputs: Any, streamer: Any, stop: threading.Event
    ) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "input_ids": inputs["input_ids"].to(loaded.device),
            "attention_mask": inputs["attention_mask"].to(loaded.device),
            "max_new_tokens": request.max_tokens,
            "streamer": streamer,
            "stopping_criteria": StoppingCriteriaList([_Stop(stop)]),
        }
        if request.temperature:
            kwargs.update(do_sample=True, temperature=request.temperature)
            if request.top_p is not None:
                kwargs["top_p"] = request.top_p
        else:
            kwargs["do_sample"] = False
        if request.stop:
            kwargs.update(stop_strings=list(request.stop), tokenizer=loaded.tokenizer)
        return kwargs
