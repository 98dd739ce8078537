"""The served models: a request checked into a plan, then answered whole or streamed.

One model call runs at a time (a lock): answers cannot mix, and two decodings would only
share the same CPU cores. A streamed answer is decoded in a worker thread that hands its
text over as it comes; when the client goes away, decoding stops at the next token.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, AsyncIterator, Callable

from ..answerer import MIN_TEMPERATURE, Answer, Answerer, DecodeSettings
from ..errors import InstructlmError
from ..formats import Example
from ..textcut import TextCutter
from . import schema as api
from .schema import ApiError


@dataclass(frozen=True)
class Job:
    """One answer to produce: its choice index and what is asked."""

    index: int
    example: Example


@dataclass(frozen=True)
class Plan:
    """A checked request: which model, the answers to produce, how to decode them."""

    model: str
    answerer: Answerer
    jobs: list[Job]
    decode: DecodeSettings
    prompt_tokens: int  # each distinct prompt counted once, as OpenAI does


@dataclass(frozen=True)
class Piece:
    """Streamed text of one job; the last piece of a job carries its finish reason."""

    job: Job
    text: str
    finish_reason: str | None = None
    new_tokens: int = 0


class Models:
    """The served models (the first is the default), the limits on what a request may ask
    (`max_tokens` is also the default), and the one model lock."""

    def __init__(self, models: dict[str, Answerer], max_tokens: int,
                 max_prompt_tokens: int) -> None:
        self.models = models
        self.default = next(iter(models))
        self.max_tokens = max_tokens
        self.max_prompt_tokens = max_prompt_tokens
        self.lock = threading.Lock()
        self.created = int(time.time())

    def cards(self) -> list[api.ModelCard]:
        return [api.ModelCard(id=name, created=self.created) for name in self.models]

    def plan(self, request: api.Sampling, examples: list[Example], param: str) -> Plan:
        name = request.model or self.default
        if name not in self.models:
            raise ApiError(404, f"The model '{name}' does not exist; this server has "
                                f"{', '.join(self.models)}", "model", "model_not_found")
        answerer = self.models[name]
        lengths = [self._prompt_length(answerer, ex, param) for ex in examples]
        room = _context_size(answerer) - max(lengths)
        limit = min(request.max_tokens or self.max_tokens, self.max_tokens,
                    room)
        if limit < 1:
            raise ApiError(400, f"the prompt leaves no room for an answer in the model's "
                                f"{_context_size(answerer)} positions", param,
                           "context_length_exceeded")
        # OpenAI's API takes any temperature from 0: those too low to sample with are greedy.
        temperature = (request.temperature
                       if (request.temperature or 0) >= MIN_TEMPERATURE else 0.0)
        seed = request.seed if request.seed is not None else secrets.randbits(32)
        decode = DecodeSettings(max_new_tokens=limit, sample=temperature > 0,
                                temperature=temperature or 1.0, top_p=request.top_p or 1.0,
                                stop=request.stops(), seed=seed % 2**32)
        jobs = [Job(i * request.n + j, ex) for i, ex in enumerate(examples)
                for j in range(request.n)]
        return Plan(name, answerer, jobs, decode, sum(lengths))

    def _prompt_length(self, answerer: Answerer, example: Example, param: str) -> int:
        limit = self.max_prompt_tokens
        too_long = ApiError(400, f"the prompt is longer than this server accepts ({limit} "
                                 "tokens, set by serve --max-prompt-tokens)", param,
                            "context_length_exceeded")
        text = example.instruction + "".join(m["content"] for m in example.history)
        if len(text) > 16 * limit:  # refused before spending time tokenizing it
            raise too_long
        try:
            n = len(answerer.prompt_ids(example))
        except InstructlmError as err:
            raise ApiError(400, err.message, param) from None
        except Exception as err:  # the tokenizer's chat template refused the messages
            raise ApiError(400, f"the model's chat template refused the messages: {err}",
                           param) from None
        if n > limit:
            raise too_long
        return n

    def answer_all(self, plan: Plan, gone: Callable[[], bool] = lambda: False) -> list[Answer]:
        """Every job's answer, decoded together; ended early (and the answers thrown away by
        the caller) once `gone()` says the client has left."""
        with self.lock:
            if gone():  # it left while waiting for the model
                return []
            return list(plan.answerer.answer([job.example for job in plan.jobs], plan.decode,
                                             batch_size=len(plan.jobs), should_stop=gone))

    async def stream(self, plan: Plan) -> AsyncIterator[Piece]:
        """Pieces of text as they are decoded, job after job, in order."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Piece | BaseException | None] = asyncio.Queue()
        gone = threading.Event()

        def put(item: Piece | BaseException | None) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def work() -> None:
            try:
                with self.lock:
                    for job in plan.jobs:
                        if gone.is_set():
                            return
                        self._stream_job(plan, job, put, gone)
            except Exception as err:  # reported in the stream, not lost in a thread
                put(err)
            finally:
                put(None)

        threading.Thread(target=work, daemon=True).start()
        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            gone.set()  # the client went away, or the stream ended: stop decoding

    @staticmethod
    def _stream_job(plan: Plan, job: Job, put: Any, gone: threading.Event) -> None:
        cutter = TextCutter(plan.decode.stop)

        def on_text(text: str) -> None:
            if piece := cutter.feed(text):
                put(Piece(job, piece))

        # Stop texts are cut here, where streamed text can be held back; each choice gets
        # its own seed so that sampled choices differ.
        decode = replace(plan.decode, stop=(), seed=(plan.decode.seed + job.index) % 2**32)
        answer = plan.answerer.answer_streaming(
            job.example, decode, on_text, should_stop=lambda: gone.is_set() or cutter.stopped)
        put(Piece(job, cutter.finish(), "stop" if cutter.stopped else answer.finish_reason,
                  answer.new_tokens))


def _context_size(answerer: Answerer) -> int:
    config = answerer.model.config
    return int(getattr(config, "max_position_embeddings", None)
               or getattr(config, "n_positions", None) or 2048)


# --- requests -> examples -------------------------------------------------------------------

def completion_examples(request: api.CompletionRequest) -> list[Example]:
    prompts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
    return [Example(p, "") for p in prompts]


def chat_example(request: api.ChatRequest, answerer: Answerer) -> Example:
    """The instruction is the last user message (the last message, if none is the user's).
    A run taught with the chat template also sees the conversation before it; any other run
    sees the instruction alone, which is how it was taught."""
    messages = request.messages
    users = [i for i, m in enumerate(messages) if m.role == "user"]
    last = users[-1] if users else len(messages) - 1
    history = ()
    if answerer.template.name == "chat":
        history = tuple({"role": "system" if m.role == "developer" else m.role,
                         "content": m.text()} for m in messages[:last])
    return Example(messages[last].text(), "", history=history)


