"""The model's loss on encoded examples: the number training lowers and evaluation reports."""

from __future__ import annotations

from typing import Any

from .architectures import architecture
from .base import cache_argument
from .encode import IGNORE_INDEX, EncodedExample, collate

MIN_SHARED_PREFIX = 8  # tokens; below this the extra call costs more than it saves


def batch_loss(model: Any, batch: dict[str, Any], device: str, precision: str,
               labels_only: bool = True, share_prefix: bool = True, pack: bool = True) -> Any:
    """Mean cross-entropy over the response tokens of one collated batch.

    With `labels_only` the output layer runs only where there is a label: prompt positions
    carry no loss, and with a 49k-word vocabulary the output layer over every position was
    about a tenth of a training step. With `share_prefix` a prompt opening that every row
    shares is computed once (see `_hidden_states`); with `pack` the rows run without their
    padding (see `_packed_hidden_states`).
    """
    import torch

    batch = {k: v.to(device) for k, v in batch.items()}
    # autocast only if the weights are fp32: a model already in bf16 runs as it is.
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    cast = half is not None and next(model.parameters()).dtype == torch.float32
    kind = torch.device(device).type  # "cuda" for "cuda:1"
    with torch.autocast(device_type=kind, dtype=half or torch.bfloat16, enabled=cast):
        if not (labels_only and architecture(model).plain_head):
            return model(**batch).loss
        hidden, targets = _hidden_states(model, batch, share_prefix, pack)
        keep = targets != IGNORE_INDEX
        logits = model.get_output_embeddings()(hidden[keep])
    return torch.nn.functional.cross_entropy(logits.float(), targets[keep])


def shared_prefix_length(batch: dict[str, Any]) -> int:
    """How many leading tokens every row shares that predict no label (the template's
    opening, a chat model's system prompt): 0 when that is too short to be worth sharing."""
    import torch

    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    if ids.shape[0] < 2:
        return 0
    same = (ids == ids[:1]).all(dim=0) & (mask == 1).all(dim=0)
    # Hidden states before `start` are not kept, so their targets (labels 1..start) must be
    # prompt tokens in every row.
    no_label = (labels == IGNORE_INDEX).all(dim=0)
    usable = same & torch.cat([no_label[1:], no_label.new_zeros(1)])
    n = int(usable.int().cumprod(0).sum())
    return n if n >= MIN_SHARED_PREFIX else 0


def _hidden_states(model: Any, batch: dict[str, Any], share_prefix: bool,
                   pack: bool) -> tuple[Any, Any]:
    """The decoder's last hidden states and, for each, the token it predicts (IGNORE_INDEX
    where there is no label), both with the same leading shape.

    A prefix every row shares is run once and its keys and values serve every row: the same
    numbers (and gradients) as running it in each row, at a fraction of the cost when the
    template's opening is a third of each short example.
    """
    import torch

    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    llama_like = architecture(model).positions_and_cache
    start = shared_prefix_length(batch) if share_prefix and llama_like else 0
    decoder = model.base_model
    if pack and llama_like and model.config._attn_implementation == "sdpa" \
            and _packing_pays(model.config, mask, start):
        return _packed_hidden_states(decoder, batch, start)
    targets = labels[:, start + 1:]  # position t predicts token t + 1
    if not start:
        hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        return hidden[:, :-1], targets
    name = cache_argument(decoder)
    cache = getattr(decoder(input_ids=ids[:1, :start], use_cache=True), name)
    cache.batch_repeat_interleave(ids.shape[0])
    positions = torch.arange(start, ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
    hidden = decoder(input_ids=ids[:, start:], attention_mask=mask, position_ids=positions,
                     use_cache=True, **{name: cache}).last_hidden_state
    return hidden[:, :-1], targets


def _packing_pays(config: Any, mask: Any, start: int) -> bool:
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


def _packed_hidden_states(decoder: Any, batch: dict[str, Any],
                          start: int) -> tuple[Any, Any]:
    """The batch as one row without padding ("padding-free" packing): the shared prefix
    once, then every row's tokens after it, each attending to the prefix and causally to its
    own tokens only.

    Random batches of short examples were about a third padding after the prefix; grouping
    rows by length would remove it too but makes batches of one kind of example, which hurt
    what the model learned (see train.py). In one row every weight also meets the prefix
    and the rest in one product, where a separate prefix call needed two and a sum.
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
    hidden = decoder(input_ids=torch.cat(pieces)[None], attention_mask=allowed[None, None],
                     position_ids=torch.cat(positions)[None], use_cache=False).last_hidden_state
    return hidden[0], torch.cat(targets)


def mean_loss(model: Any, examples: list[EncodedExample], batch_size: int, pad_id: int,
              device: str, precision: str = "fp32", labels_only: bool = True) -> float:
    """Mean loss per response token over `examples`, without touching the gradients."""
    import torch

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            n = sum(e.n_response_tokens for e in chunk)
            total += batch_loss(model, collate(chunk, pad_id), device, precision,
                                labels_only).item() * n
            count += n
    model.train(was_training)
    return total / max(count, 1)
