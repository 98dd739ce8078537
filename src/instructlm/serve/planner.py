"""The served models: a request checked into a plan, then answered whole or streamed.

Each job of a plan (a prompt and choice) becomes a row of its model's decoding loop
(batcher.py), where it decodes together with every other request's rows. What the loop
tells a row comes back here: text for a stream, the tokens of a whole answer, and refusals
(a full queue, a wait past the queue timeout) as errors in OpenAI's shape.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, AsyncIterator

from instructlm.answering.answerer import MIN_TEMPERATURE, Answer, Answerer, DecodeSettings
from instructlm.answering.textcut import TextCutter
from instructlm.data.formats import Example
from instructlm.errors import InstructlmError
from instructlm.serve import schema as api
from instructlm.serve.batcher import Batcher, QueueFull, QueueTimeout, Row
from instructlm.serve.metrics import Metrics
from instructlm.serve.schema import ApiError
from instructlm.serve.settings import ServeSettings


@dataclass(frozen=True)
class Job:
    """One answer to produce: its choice index, what is asked, and its prompt's tokens."""

    index: int
    example: Example
    prompt: tuple[int, ...] = ()
    opening: int = 0  # of the prompt's tokens, those before the instruction


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
    """The served models (the first is the default), each with its decoding loop, and the
    limits on what a request may ask (`max_tokens` is also the default)."""

    def __init__(self, models: dict[str, Answerer], settings: ServeSettings = ServeSettings(),
                 metrics: Metrics | None = None) -> None:
        self.models = models
        self.default = next(iter(models))
        self.max_tokens = settings.max_tokens
        self.max_prompt_tokens = settings.max_prompt_tokens
        self.metrics = metrics
        lock = threading.Lock()  # one model call at a time: they would share the same cores
        self.batchers = {
            name: Batcher(answerer, settings.max_batch, settings.max_queue,
                          settings.queue_timeout_s, lock,
                          metrics.observer(name) if metrics else None,
                          settings.max_batch_tokens)
            for name, answerer in models.items()}
        self.created = int(time.time())
        self.requests = itertools.count()

    def close(self) -> None:
        for batcher in self.batchers.values():
            batcher.close()

    def cards(self) -> list[api.ModelCard]:
        return [api.ModelCard(id=name, created=self.created) for name in self.models]

    def plan(self, request: api.Sampling, examples: list[Example], param: str) -> Plan:
        name = request.model or self.default
        if name not in self.models:
            raise ApiError(404, f"The model '{name}' does not exist; this server has "
                                f"{', '.join(self.models)}", "model", "model_not_found")
        answerer = self.models[name]
        prompts = [self._prompt(answerer, ex, param) for ex in examples]
        room = _context_size(answerer) - max(len(p) for p in prompts)
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
        openings = [answerer.opening_length(ex, p) for ex, p in zip(examples, prompts,
                                                                      strict=True)]
        jobs = [Job(i * request.n + j, ex, tuple(prompt), opening)
                for i, (ex, prompt, opening) in enumerate(zip(examples, prompts, openings,
                                                              strict=True))
                for j in range(request.n)]
        return Plan(name, answerer, jobs, decode, sum(len(p) for p in prompts))

    def _prompt(self, answerer: Answerer, example: Example, param: str) -> list[int]:
        limit = self.max_prompt_tokens
        too_long = ApiError(400, f"the prompt is longer than this server accepts ({limit} "
                                 "tokens, set by serve --max-prompt-tokens)", param,
                            "context_length_exceeded")
        text = example.instruction + "".join(m["content"] for m in example.history)
        if len(text) > 16 * limit:  # refused before spending time tokenizing it
            raise too_long
        try:
            ids = answerer.prompt_ids(example)
        except InstructlmError as err:
            raise ApiError(400, err.message, param) from None
        except Exception as err:  # the tokenizer's chat template refused the messages
            raise ApiError(400, f"the model's chat template refused the messages: {err}",
                           param) from None
        if len(ids) > limit:
            raise too_long
        return ids

    def start(self, plan: Plan, stream: bool) -> "Answering":
        """Queue the plan's rows in its model's decoding loop, or refuse them at once (429)
        when the queue is full."""
        batcher = self.batchers[plan.model]
        answering = Answering(plan, asyncio.get_running_loop(), stream)
        request = next(self.requests)
        # Stop texts are cut here, by the same rule for streamed and whole answers; each
        # choice gets its own seed so that sampled choices differ.
        rows = [Row(list(job.prompt), job.opening, job.example,
                    replace(plan.decode, stop=(), seed=(plan.decode.seed + job.index) % 2**32),
                    answering, request) for job in plan.jobs]
        answering.rows = rows
        try:
            batcher.submit(rows)
        except QueueFull as full:
            raise ApiError(429, f"the server is busy: {batcher.max_queue} requests are "
                                "waiting for the model already (serve --max-queue); try again "
                                f"in {full.retry_after} s", code="queue_full",
                           kind="rate_limit_error",
                           headers={"Retry-After": str(full.retry_after)}) from None
        return answering

    def answered(self, answering: "Answering") -> None:
        """Record a finished request's time to its first token and its whole time."""
        if self.metrics is None:
            return
        firsts = [r.first_token for r in answering.rows if r.first_token is not None]
        self.metrics.answered(answering.plan.model,
                              min(firsts) - answering.started if firsts else None,
                              time.monotonic() - answering.started)


class Answering:
    """One request's rows in a decoding loop, heard from that loop's thread and handed over
    to the request's coroutine: pieces of text as they come, each row's end, and errors."""

    def __init__(self, plan: Plan, loop: asyncio.AbstractEventLoop, stream: bool) -> None:
        self.plan = plan
        self.loop = loop
        self.stream = stream
        self.started = time.monotonic()
        self.rows: list[Row] = []
        self.events: asyncio.Queue[Piece | BaseException | None] = asyncio.Queue()
        self.placed = asyncio.Event()  # every row is in the batch (or has ended)
        self.placed_rows: set[int] = set()
        self.refused: BaseException | None = None  # before every row was placed
        self.texts: dict[int, _RowText] = {}
        self.going = len(plan.jobs)  # rows not yet ended

    def cancel(self) -> None:
        for row in self.rows:
            row.cancel()

    # --- heard in the decoding thread ---

    def admitted(self, row: Row) -> None:
        self._place(row)

    def token(self, row: Row, token: int) -> bool:
        if not (self.stream or self.plan.decode.stop):
            return False
        text = self.texts.get(id(row))
        if text is None:
            text = self.texts[id(row)] = _RowText(self.plan.answerer.tokenizer,
                                                  self.plan.decode.stop)
        piece = text.feed(token)
        if piece and self.stream:
            self._put(Piece(self._job(row), piece))
        return text.cutter.stopped

    def ended(self, row: Row) -> None:
        if row.error is not None:
            if len(self.placed_rows) < len(self.plan.jobs):
                self.refused = self.refused or row.error
            self._put(row.error)
        elif self.stream and row.finish_reason != "cancelled":
            text = self.texts.get(id(row)) or _RowText(self.plan.answerer.tokenizer,
                                                       self.plan.decode.stop)
            answer = self.plan.answerer.finish(row.example, row.tokens,
                                               self.plan.answerer.end_ids(), self.plan.decode)
            self._put(Piece(self._job(row), text.finish(),
                            "stop" if text.cutter.stopped else answer.finish_reason,
                            answer.new_tokens))
        self._place(row)  # (a row that ended waiting: placed nowhere, but no longer waiting)
        self.going -= 1
        if not self.going:
            self._put(None)

    def _place(self, row: Row) -> None:
        if id(row) in self.placed_rows:
            return
        self.placed_rows.add(id(row))
        if len(self.placed_rows) == len(self.plan.jobs):
            self.loop.call_soon_threadsafe(self.placed.set)

    def _put(self, item: Piece | BaseException | None) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)

    def _job(self, row: Row) -> Job:
        return self.plan.jobs[self.rows.index(row)]

    # --- in the request's coroutine ---

    async def until_placed(self) -> None:
        """Wait until every row is decoding; a wait past the queue timeout is a 503."""
        await self.placed.wait()
        if self.refused is not None:
            self.cancel()
            _raise(self.refused)

    async def whole(self) -> list[Answer]:
        """Every job's answer, in the plan's order, once all have ended."""
        while (item := await self.events.get()) is not None:
            if isinstance(item, BaseException):
                self.cancel()
                _raise(item)
        return [self.plan.answerer.finish(row.example, row.tokens,
                                          self.plan.answerer.end_ids(), self.plan.decode)
                for row in self.rows]

    async def pieces(self) -> AsyncIterator[Piece]:
        """Pieces of text as they are decoded; the rows are cancelled if the stream is left
        unfinished (the client went away)."""
        try:
            while (item := await self.events.get()) is not None:
                if isinstance(item, BaseException):
                    _raise(item)
                yield item
        finally:
            self.cancel()


def _raise(error: BaseException) -> None:
    if isinstance(error, QueueTimeout):
        raise ApiError(503, f"the server is busy: this request {error} for a place in the "
                            "decoding batch (serve --queue-timeout); try again later",
                       code="queue_timeout", kind="server_error",
                       headers={"Retry-After": "5"}) from None
    raise error


class _RowText:
    """One row's answer as text, token by token: what can be shown so far, held back
    where a character is still incomplete or a stop text may begin."""

    def __init__(self, tokenizer: Any, stops: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.cutter = TextCutter(stops)
        self.tokens: list[int] = []
        self.shown = 0  # characters of the decoded text handed to the cutter

    def feed(self, token: int) -> str:
        self.tokens.append(token)
        # The whole answer is decoded again: a token's text can depend on those before it.
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a character split across tokens: wait for the rest
            return ""
        new, self.shown = text[self.shown:], len(text)
        return self.cutter.feed(new)

    def finish(self) -> str:
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        return self.cutter.feed(text[self.shown:]) + self.cutter.finish()


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


