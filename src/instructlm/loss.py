"""The model's loss on encoded examples: the number training lowers and evaluation reports."""

from __future__ import annotations

from typing import Any

from .encode import EncodedExample, collate


def batch_loss(model: Any, batch: dict[str, Any], device: str, precision: str) -> Any:
    """Mean cross-entropy over the response tokens of one collated batch."""
    import torch

    batch = {k: v.to(device) for k, v in batch.items()}
    with torch.autocast(device_type=device, dtype=torch.bfloat16,
                        enabled=precision == "bf16"):
        return model(**batch).loss


def mean_loss(model: Any, examples: list[EncodedExample], batch_size: int, pad_id: int,
              device: str, precision: str = "fp32") -> float:
    """Mean loss per response token over `examples`, without touching the gradients."""
    import torch

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            n = sum(e.n_response_tokens for e in chunk)
            total += batch_loss(model, collate(chunk, pad_id), device, precision).item() * n
            count += n
    model.train(was_training)
    return total / max(count, 1)
