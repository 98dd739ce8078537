"""A decoding loop that drops each answer from the batch as soon as it has ended.

`model.generate` keeps finished answers in the batch until the last one ends, so one answer
that runs on to the token limit makes the whole batch pay for it (on a CPU, 32 answers then
took as long as answering them one at a time). This loop does what `generate` does for
greedy and sampled decoding, with the library's own logits warpers, but after each step
keeps only the unfinished rows of the batch and of its key/value cache. Beam search,
stop texts and n-gram blocking stay with `generate`.
"""

from __future__ import annotations

from typing import Any

from .base import LLAMA_LIKE_MODELS, cache_argument
from .loss import MIN_SHARED_PREFIX


def can_drop_finished(model: Any, beams: int, stop: tuple[str, ...], no_repeat_ngram: int,
                      streaming: bool) -> bool:
    return (model.config.model_type in LLAMA_LIKE_MODELS and beams == 1 and not stop
            and not no_repeat_ngram and not streaming)


def decode_dropping_finished(model: Any, ids: Any, mask: Any, max_new_tokens: int,
                             end_ids: list[int], sample: bool = False,
                             temperature: float = 1.0, top_p: float = 1.0) -> list[list[int]]:
    """New token ids of each left-padded row, each ending with its end token if it ended."""
    import torch
    from transformers import (DynamicCache, LogitsProcessorList, TemperatureLogitsWarper,
                              TopPLogitsWarper)

    warpers = LogitsProcessorList(
        [TemperatureLogitsWarper(temperature), TopPLogitsWarper(top_p)] if sample else [])
    ends = torch.tensor(end_ids, device=ids.device)
    rows = torch.arange(ids.shape[0], device=ids.device)  # which input row each row is
    answers: list[list[int]] = [[] for _ in range(ids.shape[0])]
    start, ids, mask = _shared_prefix_first(ids, mask)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # padding: count real tokens only
    cache = DynamicCache(config=model.config)
    name = cache_argument(model)
    if start:  # a prompt opening every row shares: run it once, repeat its keys and values
        model(input_ids=ids[:1, :start], use_cache=True, logits_to_keep=1, **{name: cache})
        cache.batch_repeat_interleave(ids.shape[0])
    logits = model(input_ids=ids[:, start:], attention_mask=mask,
                   position_ids=positions[:, start:], use_cache=True, logits_to_keep=1,
                   **{name: cache}).logits[:, -1]
    position = positions[:, -1:] + 1
    for _ in range(max_new_tokens):
        scores = warpers(ids[rows], logits.float())
        if sample:
            token = torch.multinomial(scores.softmax(-1), 1).squeeze(1)
        else:
            token = scores.argmax(-1)
        for row, t in zip(rows.tolist(), token.tolist(), strict=True):
            answers[row].append(t)
        going = ~torch.isin(token, ends)
        if not going.any():
            break
        if not going.all():  # drop the finished rows from the batch and its cache
            keep = going.nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            rows, token, mask, position = rows[keep], token[keep], mask[keep], position[keep]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        logits = model(input_ids=token[:, None], attention_mask=mask, position_ids=position,
                       use_cache=True, **{name: cache}).logits[:, -1]
        position = position + 1
    return answers


def _shared_prefix_first(ids: Any, mask: Any) -> tuple[int, Any, Any]:
    """Left-padded rows rearranged as shared opening, padding, rest of each prompt.

    Returns the opening's length (0 if the rows share less than MIN_SHARED_PREFIX tokens, or
    there is one row) and the rearranged ids and mask.
    """
    import torch

    rows = [r[m.bool()] for r, m in zip(ids, mask, strict=True)]
    shortest = min(len(r) for r in rows)
    if len(rows) < 2 or shortest <= MIN_SHARED_PREFIX:
        return 0, ids, mask
    same = torch.stack([r[:shortest] for r in rows]).eq(rows[0][:shortest]).all(0)
    start = min(int(same.int().cumprod(0).sum()), shortest - 1)  # each row keeps a token
    if start < MIN_SHARED_PREFIX:
        return 0, ids, mask
    width = ids.shape[1]
    new_ids = torch.zeros_like(ids)  # padding: any id, masked out
    new_mask = torch.zeros_like(mask)
    for i, r in enumerate(rows):
        new_ids[i, :start], new_mask[i, :start] = r[:start], 1
        new_ids[i, width - len(r) + start:] = r[start:]
        new_mask[i, width - len(r) + start:] = 1
    return start, new_ids, new_mask
