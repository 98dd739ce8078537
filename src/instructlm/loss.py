"""The model's loss on encoded examples: the number training lowers and evaluation reports."""

from __future__ import annotations

from typing import Any

from .encode import IGNORE_INDEX, EncodedExample, collate

# Architectures whose logits are exactly lm_head(last hidden state): for them the loss can be
# computed on the response positions only (see `batch_loss`). Others (e.g. with logit scaling
# or soft-capping) use the model's own loss.
PLAIN_HEAD_MODELS = {"llama", "mistral", "qwen2", "qwen3", "gpt2", "bloom", "gpt_neox", "phi3"}


def batch_loss(model: Any, batch: dict[str, Any], device: str, precision: str,
               labels_only: bool = True) -> Any:
    """Mean cross-entropy over the response tokens of one collated batch.

    With `labels_only` the output layer runs only where there is a label: prompt positions
    carry no loss, and with a 49k-word vocabulary the output layer over every position was
    about a tenth of a training step.
    """
    import torch

    batch = {k: v.to(device) for k, v in batch.items()}
    # autocast only if the weights are fp32: a model already in bf16 runs as it is.
    cast = precision == "bf16" and next(model.parameters()).dtype == torch.float32
    with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=cast):
        if not (labels_only and model.config.model_type in PLAIN_HEAD_MODELS):
            return model(**batch).loss
        hidden = model.base_model(input_ids=batch["input_ids"],
                                  attention_mask=batch["attention_mask"]).last_hidden_state
        targets = batch["labels"][:, 1:]  # position t predicts token t + 1
        keep = targets != IGNORE_INDEX
        logits = model.get_output_embeddings()(hidden[:, :-1][keep])
    return torch.nn.functional.cross_entropy(logits.float(), targets[keep])


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
