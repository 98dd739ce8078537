"""A decoding loop that drops each answer from the batch, and hands it over, as soon as it
has ended.

`model.generate` keeps finished answers in the batch until the last one ends, so one answer
that runs on to the token limit makes the whole batch pay for it (on a CPU, 32 answers then
took as long as answering them one at a time). This loop does what `generate` does for
greedy and sampled decoding, with the library's own logits warpers, but after each step
keeps only the unfinished rows of the batch and of its key/value cache. A row also ends
when the caller says so on hearing its latest token (a stop text appeared). Beam search and
n-gram blocking stay with `generate`.

Once one greedy answer is left (alone from the start, or the last of a batch), it goes on
with prompt lookup decoding: tokens that followed the same few tokens earlier in the
prompt or the answer are proposed, and one call of the model checks them all; it keeps those
the model would have chosen itself, so the answer stays the same. Checking many tokens in
one call costs a few times one token, not many (the weights are read once either way), so
answers that copy from their instruction or repeat themselves (a list running on to the
token limit) come several times faster. Streamed answers take the same path, token by token.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

from instructlm.data.batches import shared_opening_first
from instructlm.model.architectures import architecture
from instructlm.model.base import cache_argument

MAX_NGRAM = 3  # the longest run of last tokens looked up in the text so far
MAX_GUESS = 32  # tokens proposed at most: past this a check costs more than it saves


def can_drop_finished(model: Any, beams: int, no_repeat_ngram: int) -> bool:
    return architecture(model).positions_and_cache and beams == 1 and not no_repeat_ngram


def answers_as_they_end(model: Any, ids: Any, mask: Any, max_new_tokens: int,
                        end_ids: list[int], sample: bool = False, temperature: float = 1.0,
                        top_p: float = 1.0,
                        on_token: Callable[[int, int], bool | None] | None = None,
                        should_stop: Callable[[], bool] | None = None,
                        ) -> Iterator[tuple[int, list[int]]]:
    """(row, new token ids) of each left-padded row as soon as it has ended, the ids ending
    with its end token if it ended; rows that reach `max_new_tokens` together come in order.

    `on_token(row, token)` hears of each new token as it comes (for streaming, and stop
    texts): when it returns true, that row has ended. Decoding ends early once
    `should_stop()` is true. The model runs in inference mode, which is
    left while the caller has the answer.
    """
    import torch

    return torch.inference_mode()(_decode)(model, ids, mask, max_new_tokens, end_ids, sample,
                                          temperature, top_p, on_token, should_stop)


def _decode(model: Any, ids: Any, mask: Any, max_new_tokens: int, end_ids: list[int],
            sample: bool, temperature: float, top_p: float,
            on_token: Callable[[int, int], bool | None] | None,
            should_stop: Callable[[], bool] | None) -> Iterator[tuple[int, list[int]]]:
    import torch
    from transformers import (
        DynamicCache,
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopPLogitsWarper,
    )

    warpers = LogitsProcessorList(
        [TemperatureLogitsWarper(temperature), TopPLogitsWarper(top_p)] if sample else [])
    ends = torch.tensor(end_ids, device=ids.device)
    rows = torch.arange(ids.shape[0], device=ids.device)  # which input row each row is
    answers: list[list[int]] = [[] for _ in range(ids.shape[0])]
    prompts = [r[m.bool()].tolist() for r, m in zip(ids, mask, strict=True)]
    cache = DynamicCache(config=model.config)
    name = cache_argument(model)
    ids, mask, logits, position = _prefill(model, ids, mask, cache, name)
    for step in range(1, max_new_tokens + 1):
        scores = warpers(ids[rows], logits.float())
        token = (torch.multinomial(scores.softmax(-1), 1).squeeze(1) if sample
                 else scores.argmax(-1))
        told = []  # rows the caller ended
        for row, t in zip(rows.tolist(), token.tolist(), strict=True):
            answers[row].append(t)
            told.append(bool(on_token and on_token(row, t)))
        going = ~torch.isin(token, ends)
        if any(told):  # (no tensor built on the steps where no caller ended a row)
            going &= ~torch.tensor(told, device=token.device)
        if not going.any() or step == max_new_tokens or (should_stop and should_stop()):
            break
        for row in rows[~going].tolist():
            yield row, answers[row]
        if not going.all():  # drop the finished rows from the batch and its cache
            keep = going.nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            rows, token, mask, position = rows[keep], token[keep], mask[keep], position[keep]
        if len(rows) == 1 and not sample:
            row = int(rows[0])
            _finish_by_lookup(model, {name: cache}, prompts[row], answers[row], mask,
                              int(position), max_new_tokens, end_ids,
                              lambda token: bool(on_token and on_token(row, token)),
                              should_stop)
            break
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        logits = model(input_ids=token[:, None], attention_mask=mask, position_ids=position,
                       use_cache=True, **{name: cache}).logits[:, -1]
        position = position + 1
    for row in rows.tolist():  # the rows still in the batch when it ended
        yield row, answers[row]


def _prefill(model: Any, ids: Any, mask: Any, cache: Any, name: str
             ) -> tuple[Any, Any, Any, Any]:
    """The prompts run into `cache` (the model's argument `name`): ids and mask with the
    shared opening first, the last position's logits, and each row's next position."""
    start, ids, mask = shared_opening_first(ids, mask)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # padding: count real tokens only
    if start:  # a prompt opening every row shares: run it once, repeat its keys and values
        model(input_ids=ids[:1, :start], use_cache=True, logits_to_keep=1, **{name: cache})
        cache.batch_repeat_interleave(ids.shape[0])
    logits = model(input_ids=ids[:, start:], attention_mask=mask,
                   position_ids=positions[:, start:], use_cache=True, logits_to_keep=1,
                   **{name: cache}).logits[:, -1]
    return ids, mask, logits, positions[:, -1:] + 1


def _finish_by_lookup(model: Any, cache: dict[str, Any], prompt: list[int],
                      answer: list[int], mask: Any, position: int, max_new_tokens: int,
                      end_ids: list[int], on_token: Callable[[int], bool],
                      should_stop: Callable[[], bool] | None) -> None:
    """Continue one greedy `answer` (its last token not yet run) by prompt lookup decoding.

    `mask` covers the cached positions, `position` is the last token's position. How many
    tokens are proposed adapts: twice as many after all were right, one more than were right
    otherwise, so that a wrong guess costs little (checking 2 tokens costs hardly more than 1).
    """
    import torch

    guess = 4
    while len(answer) < max_new_tokens:
        proposed = _look_up(prompt + answer, min(guess, max_new_tokens - len(answer) - 1))
        inputs = [answer[-1]] + proposed
        mask = torch.cat([mask, mask.new_ones(1, len(inputs))], dim=1)
        positions = torch.arange(position, position + len(inputs), device=mask.device)
        logits = model(input_ids=torch.tensor([inputs], device=mask.device),
                       attention_mask=mask, position_ids=positions[None], use_cache=True,
                       **cache).logits[0]
        chosen = logits.float().argmax(-1).tolist()  # the model's token after each input
        right = 0
        while right < len(proposed) and proposed[right] == chosen[right]:
            right += 1
        new = chosen[:right + 1]
        for token in new:  # one at a time, as plain decoding would hand them out
            answer.append(token)
            if on_token(token) or token in end_ids or (should_stop and should_stop()):
                return
        wrong = len(proposed) - right  # their keys and values are not the answer's
        if wrong:
            next(iter(cache.values())).crop(-wrong)
            mask = mask[:, :-wrong]
        position += right + 1
        guess = min(2 * guess, MAX_GUESS) if proposed and right == len(proposed) else right + 1


def _look_up(tokens: list[int], count: int) -> list[int]:
    """`count` tokens that followed the latest earlier occurrence of the last few tokens
    (3, else 2, else 1) of `tokens`; none if they did not occur before.

    The copy may run on into the tokens it proposes, so a repeating stretch of text is
    proposed as repeating on beyond its end.
    """
    for n in range(min(MAX_NGRAM, len(tokens) - 1), 0, -1):
        tail = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start:start + n] == tail:
                copied = list(tokens)
                for i in range(start + n, start + n + count):
                    copied.append(copied[i])
                return copied[len(tokens):]
    return []
