"""Layer-wise learning rates (`--layer-decay`): the top layer at the full rate, each layer
below at `decay` times the one above it, the input embedding lowest ("discriminative
fine-tuning", Howard and Ruder, 2018; layer-wise learning-rate decay in BERT fine-tuning).

The idea: a small file's format is carried by the top layers, while the lower ones hold
what the base model knows about words, which a few epochs of the same lines overwrite with
the file's own items. Off by default: 0.95 tied the defaults on the suite's tuning half and
lost answers on its check half, spelling words in capitals among them (docs/experiments.md).
"""

from __future__ import annotations

import re
from typing import Any

LAYER_DECAY = 1.0  # every layer alike

# The index of a transformer block in a parameter's name: Llama, Qwen, Mistral, Gemma, GPT-NeoX
# ("layers.3."), GPT-2 and BLOOM ("h.3."), others ("blocks.3.").
_BLOCK = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")
# The input embeddings by name: Llama and kin (embed_tokens), GPT-NeoX (embed_in; its
# embed_out is the output layer, at the top), GPT-2 (wte, wpe), BLOOM (word_embeddings and
# the norm right after it).
_EMBEDDING = re.compile(r"(?:^|\.)(?:embed_tokens|embed_in|wte|wpe|word_embeddings"
                        r"(?:_layernorm)?)\.")


def rate_multipliers(names: list[str], decay: float) -> list[float]:
    """For each parameter name, its learning rate as a multiple of the peak rate."""
    blocks = [_BLOCK.search(name) for name in names]
    depth = 1 + max((int(b.group(1)) for b in blocks if b), default=-1)
    multipliers = []
    for name, block in zip(names, blocks, strict=True):
        if block:
            below_top = depth - 1 - int(block.group(1))
        elif _EMBEDDING.search(name):
            below_top = depth  # under the lowest block
        else:
            below_top = 0  # the final norm, and an output layer not tied to the embedding
        multipliers.append(decay ** below_top)
    return multipliers


def parameter_groups(names: list[str], params: list[Any], lr: float, weight_decay: float,
                     decay: float) -> list[dict[str, Any]]:
    """AdamW's groups: one per learning rate and weight decay (matrices decay, norms and
    biases do not, as is customary), so the fused update still runs over few groups."""
    groups: dict[tuple[float, float], list[Any]] = {}
    for param, multiplier in zip(params, rate_multipliers(names, decay), strict=True):
        key = (lr * multiplier, weight_decay if param.ndim >= 2 else 0.0)
        groups.setdefault(key, []).append(param)
    return [{"params": group, "lr": rate, "weight_decay": wd}
            for (rate, wd), group in groups.items()]
