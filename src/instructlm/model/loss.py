"""The model's loss on encoded examples: the number training lowers and evaluation reports."""

from __future__ import annotations

from typing import Any

from instructlm.data.batches import collate, packed_row, packing_pays, shared_prefix_length
from instructlm.data.encode import IGNORE_INDEX, EncodedExample
from instructlm.model.architectures import architecture
from instructlm.model.base import cache_argument

# How a batch's loss averages its tokens. "token": every labelled token alike, as Hugging
# Face does. "example": each example's mean, then the mean over the examples, so that an
# answer of three words weighs as much as a long one (docs/experiments.md). Held-out losses
# are always per token.
AVERAGES = ("example", "token")
DEFAULT_AVERAGE = "token"


def batch_loss(model: Any, batch: dict[str, Any], device: str, precision: str,
               labels_only: bool = True, share_prefix: bool = True, pack: bool = True,
               average: str = "token") -> Any:
    """Mean cross-entropy over the labelled tokens of one collated batch, averaged as
    `average` says (see AVERAGES).

    With `labels_only` the output layer runs only where there is a label: the prompt (or
    its opening) carries no loss, and with a 49k-word vocabulary the output layer over every
    position was about a tenth of a training step. With `share_prefix` a prompt opening that
    every row shares is computed once (see `_hidden_states`); with `pack` the rows run
    without their padding (see batches.packed_row).
    """
    batch = {k: v.to(device) for k, v in batch.items()}
    with autocast(model, device, precision):
        if not (labels_only and architecture(model).plain_head):
            if average == "token":
                return model(**batch).loss
            unlabelled = {k: v for k, v in batch.items() if k != "labels"}
            logits = model(**unlabelled).logits[:, :-1]
            targets = batch["labels"][:, 1:]  # position t predicts token t + 1
            keep = targets != IGNORE_INDEX
            return _cross_entropy(logits[keep], targets, keep, _rows(targets), average)
        hidden, targets, rows = _hidden_states(model, batch, share_prefix, pack)
        keep = targets != IGNORE_INDEX
        logits = model.get_output_embeddings()(hidden[keep])
    return _cross_entropy(logits, targets, keep, rows, average)


def _cross_entropy(logits: Any, targets: Any, keep: Any, rows: Any, average: str) -> Any:
    """The mean loss of the labelled positions (`keep`; `logits` holds theirs only), each
    from batch row `rows`: over the positions, or per row and then over the rows. The rows
    are looked up only for the per-row mean, off the default's path."""
    import torch

    if average == "token":
        return torch.nn.functional.cross_entropy(logits.float(), targets[keep])
    per_token = torch.nn.functional.cross_entropy(logits.float(), targets[keep],
                                                  reduction="none")
    _, row, count = torch.unique(rows[keep], return_inverse=True, return_counts=True)
    return (per_token / count[row]).sum() / len(count)


def _rows(targets: Any) -> Any:
    """The row of each position of a [rows, positions] tensor."""
    import torch

    return torch.arange(targets.shape[0], device=targets.device)[:, None].expand_as(targets)


def autocast(model: Any, device: str, precision: str) -> Any:
    """The model's forward in `precision` (bf16, fp16), or as it is (fp32). Autocast only if
    the weights are fp32: a model already in bf16 runs as it is."""
    import torch

    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    cast = half is not None and next(model.parameters()).dtype == torch.float32
    kind = torch.device(device).type  # "cuda" for "cuda:1"
    return torch.autocast(device_type=kind, dtype=half or torch.bfloat16, enabled=cast)


def _hidden_states(model: Any, batch: dict[str, Any], share_prefix: bool,
                   pack: bool) -> tuple[Any, Any, Any]:
    """The decoder's last hidden states and, for each, the token it predicts (IGNORE_INDEX
    where there is no label) and the batch row it belongs to, all with the same leading
    shape.

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
            and packing_pays(model.config, mask, start):
        row = packed_row(batch, start)
        hidden = decoder(input_ids=row.ids, attention_mask=row.attention,
                         position_ids=row.positions, use_cache=False).last_hidden_state
        return hidden[0], row.targets, row.rows
    targets = labels[:, start + 1:]  # position t predicts token t + 1
    if not start:
        hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        return hidden[:, :-1], targets, _rows(targets)
    name = cache_argument(decoder)
    cache = getattr(decoder(input_ids=ids[:1, :start], use_cache=True), name)
    cache.batch_repeat_interleave(ids.shape[0])
    positions = torch.arange(start, ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
    hidden = decoder(input_ids=ids[:, start:], attention_mask=mask, position_ids=positions,
                     use_cache=True, **{name: cache}).last_hidden_state
    return hidden[:, :-1], targets, _rows(targets)


def mean_loss(model: Any, examples: list[EncodedExample], batch_size: int, pad_id: int,
              device: str, precision: str = "fp32", labels_only: bool = True) -> float:
    """Mean loss per labelled token over `examples`, without touching the gradients."""
    import torch

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            n = sum(e.n_labels for e in chunk)
            total += batch_loss(model, collate(chunk, pad_id), device, precision,
                                labels_only).item() * n
            count += n
    model.train(was_training)
    return total / max(count, 1)
