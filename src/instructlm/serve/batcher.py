"""Continuous batching: one decoding loop a model, in its own thread, that rows join and
leave between steps.

A request's answers are rows. A row waits in a bounded queue, is prefilled alone (so its
numbers do not depend on who else is asking) and joins the running batch at the next step:
its key/value cache and the batch's are left-padded to one width and stacked, so rows join
only while rows x the widest row's reach stays within a token budget. The prompt's
opening (the template and conversation before the instruction, the same for many requests)
is always prefilled apart from the rest, and its keys and values are kept for the next
prompts that open the same way. Each step
decodes one token for every row; a row leaves as soon as it ends (end token, token limit,
stop text, or its client went away), taking its cache rows with it. What a row needs to
hear (its tokens, its end) it hears through its listener, in this loop's thread.

Families whose decoder does not take explicit positions and a cache (architectures.py)
answer one row at a time through `generate`, from the same queue.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Protocol

from instructlm.answering.answerer import Answerer, DecodeSettings
from instructlm.data.formats import Example
from instructlm.model.architectures import architecture
from instructlm.model.base import cache_argument
from instructlm.serve.settings import MAX_BATCH_TOKENS

MAX_OPENINGS = 16  # prompt openings whose keys and values are kept (a few MB each)


class QueueFull(Exception):
    """No room in the queue: the request is refused at once (429)."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"retry after {retry_after} s")
        self.retry_after = retry_after


class QueueTimeout(Exception):
    """A row waited longer than the queue timeout for a place in the batch (503)."""


class Listener(Protocol):
    """What a row tells its request, from the decoding thread."""

    def admitted(self, row: "Row") -> None: ...
    def token(self, row: "Row", token: int) -> bool: ...  # true: a stop text ended it
    def ended(self, row: "Row") -> None: ...


@dataclass
class Row:
    """One answer being decoded: what it was asked, and what has happened to it."""

    prompt: list[int]
    opening: int  # the prompt's first tokens, before the instruction (0: none told apart)
    example: Example
    decode: DecodeSettings  # its own seed for sampling
    listener: Listener
    request: int  # rows of one request share it: the queue counts requests
    submitted: float = 0.0
    first_token: float | None = None
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" once ended
    error: BaseException | None = None
    cancelled: bool = False

    def __post_init__(self) -> None:
        self.tokens: list[int] = []
        self.generator: Any = None  # with sampling: the row's own random numbers
        self.warpers: Any = None

    def cancel(self) -> None:
        """The client went away: the row leaves the queue or the batch at the next step."""
        self.cancelled = True

    @property
    def ended(self) -> bool:
        return self.finish_reason is not None or self.error is not None


class Batcher:
    """The decoding loop of one served model. `lock` is shared by every model of a server,
    so that one model call runs at a time (they would only share the same cores)."""

    def __init__(self, answerer: Answerer, max_batch: int, max_queue: int,
                 queue_timeout_s: float, lock: threading.Lock, observe: Any = None,
                 max_batch_tokens: int = MAX_BATCH_TOKENS) -> None:
        self.answerer = answerer
        self.model = answerer.model
        self.batchable = architecture(self.model).positions_and_cache
        # Caches can be stacked and kept only where every layer keeps every position.
        self.joinable = self.batchable and _joinable(self.model)
        self.max_batch = max_batch if self.joinable else 1
        self.max_queue = max_queue
        self.max_batch_tokens = max_batch_tokens  # rows x the widest row's reach, at most
        self.queue_timeout_s = queue_timeout_s
        self.lock = lock
        self.observe = observe  # metrics: observe(kind, value)
        self.end_ids = answerer.end_ids()
        self.waiting: deque[Row] = deque()
        self.decoding = 0  # rows in the batch, and those taken to join it
        self.openings: OrderedDict[tuple[int, ...], list[tuple[Any, Any]]] = OrderedDict()
        self.changed = threading.Condition()
        self.closed = False
        self.seconds_per_request = 1.0  # a running mean, for Retry-After
        self.thread = threading.Thread(target=self._loop, daemon=True,
                                       name=f"decode {answerer.name}")
        self.thread.start()

    # --- the requests' side -------------------------------------------------------------

    def submit(self, rows: list[Row]) -> None:
        """Queue a request's rows, or refuse them all at once when the queue is full."""
        now = time.monotonic()
        with self.changed:
            if self.queued_requests() >= self.max_queue:
                raise QueueFull(self.retry_after())
            for row in rows:
                row.submitted = now
                self.waiting.append(row)
            self._tell("queue", self.queued_requests())
            self.changed.notify()

    def queued_requests(self) -> int:
        """Requests with a row that waits for a place in the batch (read with `changed`
        held): rows the batch has room for are not queued, even before the loop takes them,
        so a burst fills the batch first."""
        room = max(0, self.max_batch - self.decoding)
        return len({row.request for row in list(self.waiting)[room:]})

    def retry_after(self) -> int:
        """Seconds until a place is likely free: the queue ahead, in batches, times how
        long a request has been taking."""
        batches = (self.queued_requests() + 1) / max(1, self.max_batch)
        return max(1, math.ceil(batches * self.seconds_per_request))

    def close(self) -> None:
        with self.changed:
            self.closed = True
            self.changed.notify()
        self.thread.join(timeout=10)

    # --- the loop -----------------------------------------------------------------------

    def _loop(self) -> None:
        batch: _Batch | None = None
        while True:
            with self.changed:
                while not self.closed and not self.waiting and batch is None:
                    self.changed.wait()
                if self.closed:
                    for row in list(self.waiting) + (batch.rows if batch else []):
                        row.error = RuntimeError("the server is shutting down")
                        self._end(row, None)
                    break
                ready = self._take_ready(batch)
                self.decoding = (len(batch.rows) if batch else 0) + len(ready)  # placed
                self._tell("queue", self.queued_requests())
            try:
                for row in ready:
                    batch = self._admit(row, batch)
                if batch is not None:
                    batch = self._step(batch)
            except Exception as err:  # every row in the batch learns of it; the loop goes on
                for row in (batch.rows if batch else []) + ready:
                    if not row.ended:
                        row.error = err
                        self._end(row, None)
                batch = None
            emptied = batch is None and self.decoding > 0
            self.decoding = len(batch.rows) if batch else 0
            self._tell("batch", self.decoding)
            if emptied:
                _give_back_memory()

    def _take_ready(self, batch: "_Batch | None") -> list[Row]:
        """Rows to admit now, in their order, while the batch has a place and its cache stays
        within the token budget; rows cancelled or waited out end here."""
        now, ready = time.monotonic(), []
        rows = batch.rows if batch else []
        widest = max((_reach(row) for row in rows), default=0)
        kept: deque[Row] = deque()
        for row in self.waiting:
            if row.cancelled:
                self._end(row, "cancelled")
            elif now - row.submitted > self.queue_timeout_s:
                row.error = QueueTimeout(f"waited over {self.queue_timeout_s:g} s")
                self._end(row, None)
            elif not kept and self._fits(len(rows) + len(ready) + 1, max(widest, _reach(row))):
                ready.append(row)
                widest = max(widest, _reach(row))
            else:  # first come, first placed: none passes a row that waits
                kept.append(row)
        self.waiting = kept
        return ready

    def _fits(self, rows: int, width: int) -> bool:
        """Whether `rows` answers as wide as `width` may decode together: the padded cache
        holds rows x width positions. One row always may."""
        return rows == 1 or (rows <= self.max_batch and rows * width <= self.max_batch_tokens)

    def _admit(self, row: Row, batch: "_Batch | None") -> "_Batch | None":
        """Prefill `row` alone and choose its first token; then it joins the batch (or, if
        that token ended it, it is done already)."""
        import torch

        row.listener.admitted(row)
        if row.decode.sample:
            row.generator = torch.Generator(self.model.device).manual_seed(row.decode.seed)
            row.warpers = _warpers(row.decode)
        if not self.batchable:
            self._answer_alone(row)
            return batch
        ids = torch.tensor([row.prompt], device=self.model.device)
        start = row.opening if self.joinable else 0
        with self.lock, torch.inference_mode():
            cache = self._opening(row.prompt[:start])
            logits = self._forward(ids[:, start:], start, cache)
        token = self._choose(row, logits[0])
        if self._heard(row, token):
            return batch
        single = _Batch([row], cache, torch.ones_like(ids),
                        torch.tensor([[ids.shape[1]]], device=ids.device),
                        torch.tensor([token], device=ids.device))
        return single if batch is None else batch.joined(single)

    def _opening(self, opening: list[int]) -> Any:
        """A cache holding the keys and values of `opening`: kept from an earlier prompt
        that opened the same way, or computed now (and kept)."""
        import torch
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        if not opening:
            return cache
        key = tuple(opening)
        if key not in self.openings:
            self._forward(torch.tensor([opening], device=self.model.device), 0, cache)
            # Kept as they are: the cache grows by concatenating, never in place.
            self.openings[key] = [(layer.keys, layer.values) for layer in cache.layers]
            while len(self.openings) > MAX_OPENINGS:
                self.openings.popitem(last=False)
            return cache
        self.openings.move_to_end(key)
        for i, (keys, values) in enumerate(self.openings[key]):
            cache.update(keys, values, i)
        return cache

    def _forward(self, ids: Any, start: int, cache: Any) -> Any:
        """The next-token logits after `ids`, which follow `start` cached positions."""
        import torch

        positions = torch.arange(start, start + ids.shape[1], device=ids.device)[None]
        mask = torch.ones(1, start + ids.shape[1], dtype=torch.long, device=ids.device)
        return self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                          use_cache=True, logits_to_keep=1,
                          **{cache_argument(self.model): cache}).logits[:, -1]

    def _step(self, batch: "_Batch") -> "_Batch | None":
        """One token for every row of the batch; the rows that ended leave it."""
        import torch

        batch.mask = torch.cat([batch.mask, batch.mask.new_ones(len(batch.rows), 1)], dim=1)
        with self.lock, torch.inference_mode():
            logits = self.model(input_ids=batch.last[:, None], attention_mask=batch.mask,
                                position_ids=batch.position, use_cache=True,
                                **{cache_argument(self.model): batch.cache}).logits[:, -1]
        self._tell("step", len(batch.rows))
        batch.position = batch.position + 1
        greedy = logits.float().argmax(-1).tolist()
        going = []
        for i, row in enumerate(batch.rows):
            token = self._choose(row, logits[i]) if row.decode.sample else greedy[i]
            going.append(not self._heard(row, token))
            batch.last[i] = token
        return batch.kept(going)

    def _choose(self, row: Row, logits: Any) -> int:
        """The row's next token: the most likely, or drawn with its own generator."""
        import torch

        if not row.decode.sample:
            return int(logits.float().argmax())
        scores = row.warpers(None, logits.float()[None])
        return int(torch.multinomial(scores.softmax(-1), 1, generator=row.generator))

    def _heard(self, row: Row, token: int) -> bool:
        """Give the row its new token; true if the row has ended with it."""
        if row.first_token is None:
            row.first_token = time.monotonic()
        row.tokens.append(token)
        try:
            told = token not in self.end_ids and row.listener.token(row, token)
        except Exception as err:  # this request's failure, not the others'
            row.error = err
            self._end(row, None)
            return True
        if token in self.end_ids or told:
            self._end(row, "stop")
        elif len(row.tokens) >= row.decode.max_new_tokens:
            self._end(row, "length")
        elif row.cancelled:
            self._end(row, "cancelled")
        return row.ended

    def _end(self, row: Row, reason: str | None) -> None:
        row.finish_reason = reason
        if row.error is None:
            took = time.monotonic() - row.submitted
            self.seconds_per_request += 0.2 * (took - self.seconds_per_request)
            ended = bool(row.tokens) and row.tokens[-1] in self.end_ids
            self._tell("tokens", len(row.tokens) - ended)  # as the usage counts them
        try:
            row.listener.ended(row)
        except Exception:  # a request that cannot hear its end must not end the loop
            logging.getLogger(__name__).exception("a finished answer could not be handed over")

    def _answer_alone(self, row: Row) -> None:
        """A family that cannot join a batch: the row decoded alone by `generate`."""
        import torch

        batcher = self

        class Tokens:  # a streamer for `generate`: it is given the prompt first, then tokens
            prompt_seen = False
            told = False

            def put(self, value: Any) -> None:
                if not self.prompt_seen:
                    self.prompt_seen = True
                    return
                for token in torch.as_tensor(value).flatten().tolist():
                    if not self.told and batcher._heard(row, token):
                        self.told = True

            def end(self) -> None:
                pass

        streamer = Tokens()
        with self.lock:
            self.answerer.generate_tokens(row.prompt, row.decode, streamer,
                                          should_stop=lambda: row.cancelled or streamer.told)
        if not row.ended:
            self._end(row, "cancelled" if row.cancelled else "length")

    def _tell(self, kind: str, value: float) -> None:
        if self.observe is not None:
            self.observe(kind, value)


@functools.cache
def _libc() -> Any:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return None


def _give_back_memory() -> None:
    """Hand the memory that the batch's caches freed back to the system: glibc keeps freed
    blocks for reuse, and an idle server would stay at its busiest size."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _reach(row: Row) -> int:
    """The widest the row's cache can grow: its prompt and every token it may be given."""
    return len(row.prompt) + row.decode.max_new_tokens


def _joinable(model: Any) -> bool:
    """Whether rows' caches can be left-padded and stacked: every layer keeps every
    position (a sliding-window layer drops old ones by its own count)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer for layer in DynamicCache(config=model.config).layers)


def _warpers(decode: DecodeSettings) -> Any:
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

    return LogitsProcessorList([TemperatureLogitsWarper(decode.temperature),
                                TopPLogitsWarper(decode.top_p)])


@dataclass
class _Batch:
    """The rows decoding together, their key/value cache, attention mask (left-padded),
    next positions and last tokens, all in the rows' order."""

    rows: list[Row]
    cache: Any
    mask: Any
    position: Any
    last: Any

    def joined(self, other: "_Batch") -> "_Batch":
        """Both batches in one: the narrower cache is left-padded to the wider one."""
        import torch
        from torch.nn.functional import pad

        width = max(self.mask.shape[1], other.mask.shape[1])
        a, b = width - self.mask.shape[1], width - other.mask.shape[1]  # padding to add
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat([pad(mine.keys, (0, 0, a, 0)), pad(theirs.keys, (0, 0, b, 0))])
            mine.values = torch.cat([pad(mine.values, (0, 0, a, 0)),
                                     pad(theirs.values, (0, 0, b, 0))])
        self.mask = torch.cat([pad(self.mask, (a, 0)), pad(other.mask, (b, 0))])
        self.rows = self.rows + other.rows
        self.position = torch.cat([self.position, other.position])
        self.last = torch.cat([self.last, other.last])
        return self

    def kept(self, going: list[bool]) -> "_Batch | None":
        """The batch without the rows that ended; None once none is left. Columns that are
        padding in every remaining row are cut off the left."""
        import torch

        if all(going):
            return self
        if not any(going):
            return None
        keep = torch.tensor([i for i, g in enumerate(going) if g], device=self.mask.device)
        self.cache.batch_select_indices(keep)
        self.rows = [row for row, g in zip(self.rows, going, strict=True) if g]
        self.mask, self.position, self.last = self.mask[keep], self.position[keep], self.last[keep]
        empty = int((self.mask.sum(0) == 0).long().cumprod(0).sum())  # leading padding
        if empty:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, empty:], layer.values[:, :, empty:]
            self.mask = self.mask[:, empty:]
        return self
