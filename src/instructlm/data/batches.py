"""Batches laid out for the model, for training and answering alike: padded rows, the
prompt opening that every row shares (computed once), and padding-free packed rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from instructlm.data.encode import IGNORE_INDEX, EncodedExample, EncodedPair

MIN_SHARED_PREFIX = 8  # tokens; below this the extra call costs more than it saves


def collate(batch: list[EncodedExample], pad_id: int) -> dict[str, Any]:
    """Right-pad a batch into tensors; padded positions carry no loss and no attention."""
    import torch

    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate_pairs(pairs: list[EncodedPair], pad_id: int) -> dict[str, Any]:
    """Preference pairs as one batch: every chosen row, then every rejected row (as TRL lays
    them out), and the reference log-probabilities in the same order where they are known."""
    import torch

    batch = collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    if all(p.reference is not None for p in pairs):
        batch["reference"] = torch.tensor([p.reference[0] for p in pairs]
                                          + [p.reference[1] for p in pairs])
    return batch


def collate_any(items: list[Any], pad_id: int) -> dict[str, Any]:
    """Training examples or preference pairs, collated as they need."""
    if items and isinstance(items[0], EncodedPair):
        return collate_pairs(items, pad_id)
    return collate(items, pad_id)


def common_prefix(rows: list[Any]) -> int:
    """How many leading tokens all `rows` (1-d tensors of token ids) have in common."""
    import torch

    shortest = min(len(r) for r in rows)
    same = torch.stack([r[:shortest] for r in rows]).eq(rows[0][:shortest]).all(0)
    return int(same.int().cumprod(0).sum())


def shared_prefix_length(batch: dict[str, Any]) -> int:
    """How many leading tokens every row of a collated training batch shares that predict no
    label (the template's opening, a chat model's system prompt): 0 when that is too short
    to be worth sharing."""
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    if ids.shape[0] < 2:
        return 0
    shared = common_prefix([r[m.bool()] for r, m in zip(ids, mask, strict=True)])
    # Hidden states before the end of the prefix are not kept, so their targets (labels
    # 1..n) must be prompt tokens in every row.
    prompt = (labels[:, 1:] == IGNORE_INDEX).all(dim=0)
    n = min(shared, int(prompt.int().cumprod(0).sum()))
    return n if n >= MIN_SHARED_PREFIX else 0


def shared_opening_first(ids: Any, mask: Any) -> tuple[int, Any, Any]:
    """Left-padded prompts (for answering) rearranged as shared opening, padding, rest of
    each prompt.

    Returns the opening's length (0 if the rows share less than MIN_SHARED_PREFIX tokens, or
    there is one row) and the rearranged ids and mask.
    """
    import torch

    rows = [r[m.bool()] for r, m in zip(ids, mask, strict=True)]
    shortest = min(len(r) for r in rows)
    if len(rows) < 2 or shortest <= MIN_SHARED_PREFIX:
        return 0, ids, mask
    start = min(common_prefix(rows), shortest - 1)  # each row keeps a token
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


def packing_pays(config: Any, mask: Any, start: int) -> bool:
    """Whether one packed row (no padding, but attention over all of it) costs fewer
    multiply-adds than the padded rows. Attention in the packed row also spans the other
    examples, masked out, so with long examples padding is the cheaper waste."""
    rows, width = mask.shape
    tokens = int(mask.sum()) - (rows - 1) * start  # the shared prefix once
    if rows < 2 or tokens == rows * width - (rows - 1) * start:
        return False
    window = getattr(config, "sliding_window", None)
    if window and tokens > window:
        return False  # the packed row's mask would let tokens see past the model's window
    hidden = config.hidden_size
    per_token = 4 * hidden * hidden + 3 * hidden * config.intermediate_size  # ~ weights
    per_key = 2 * hidden  # scores and weighted values, per query and key
    padded = (start + rows * (width - start)) * per_token \
        + rows * (width - start) * per_key * width
    packed = tokens * (per_token + per_key * tokens)
    return packed < padded


@dataclass
class PackedRow:
    """A batch as one row: token ids, position ids and the attention mask to run the decoder
    with (each of leading shape 1), and the token each position predicts."""

    ids: Any
    positions: Any
    attention: Any  # boolean, [1, 1, length, length]: who may attend to whom
    targets: Any  # IGNORE_INDEX where there is no label
    rows: Any  # the batch row each position came from (-1: the shared prefix)


def packed_row(batch: dict[str, Any], start: int) -> PackedRow:
    """The collated `batch` as one row without padding ("padding-free" packing): the shared
    prefix of `start` tokens once, then every row's tokens after it, each attending to the
    prefix and causally to its own tokens only.

    Random batches of short examples were about a third padding after the prefix; grouping
    rows by length would remove it too but makes batches of one kind of example, which hurt
    what the model learned (see fit.py). In one row every weight also meets the prefix and
    the rest in one product, where a separate prefix call needed two and a sum.
    """
    import torch

    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    device = ids.device
    pieces, positions, targets = [ids[0, :start]], [torch.arange(start, device=device)], []
    segments = [torch.full((start,), -1, device=device)]  # -1: the shared prefix
    if start:
        targets.append(labels.new_full((start,), IGNORE_INDEX))  # prompt: no labels there
    for row in range(ids.shape[0]):
        real = mask[row].bool()
        n = int(real.sum())
        pieces.append(ids[row][real][start:])
        positions.append(torch.arange(start, n, device=device))
        follow = labels[row][real][start + 1:]  # position t predicts token t + 1
        targets.append(torch.cat([follow, follow.new_full((1,), IGNORE_INDEX)]))
        segments.append(torch.full((n - start,), row, device=device))
    segment = torch.cat(segments)
    index = torch.arange(len(segment), device=device)
    allowed = (index[:, None] >= index[None, :]) \
        & ((segment[:, None] == segment[None, :]) | (segment[None, :] == -1))
    return PackedRow(torch.cat(pieces)[None], torch.cat(positions)[None], allowed[None, None],
                     torch.cat(targets), segment)
