"""What instructlm knows about each model family, in one record a family (keyed by the
config's `model_type`). Adding a family is one entry here and a test.

A family that is not listed still trains and answers, through the model's own forward and
loss, with LoRA on every linear layer but the output layer.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True)
class Architecture:
    # The logits are exactly lm_head(last hidden state) (no logit scaling or soft-capping):
    # the loss can be computed on the response positions only.
    plain_head: bool = False
    # The decoder takes explicit positions and a key/value cache everywhere: a shared prompt
    # opening can run once, and finished answers can be dropped from a batch.
    positions_and_cache: bool = False
    # LoRA's default targets: the attention and MLP projections (what QLoRA found best);
    # empty: every linear layer but the output layer.
    lora_targets: tuple[str, ...] = ()
    # Linear weights stored transposed (fan_in x fan_out, GPT-2's Conv1D).
    conv1d: bool = False
    # llama.cpp's name for the family, where `export` writes it as GGUF; empty: not yet.
    gguf: str = ""


_LLAMA = Architecture(plain_head=True, positions_and_cache=True, lora_targets=(
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), gguf="llama")
_NEOX_TARGETS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")

ARCHITECTURES: dict[str, Architecture] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": replace(_LLAMA, gguf="qwen2"),
    "qwen3": replace(_LLAMA, gguf=""),
    "bloom": Architecture(plain_head=True, lora_targets=_NEOX_TARGETS),
    "gpt_neox": Architecture(plain_head=True, lora_targets=_NEOX_TARGETS),
    "gpt2": Architecture(plain_head=True, lora_targets=("c_attn", "c_proj", "c_fc"),
                         conv1d=True),
    "phi3": Architecture(plain_head=True,
                         lora_targets=("qkv_proj", "o_proj", "gate_up_proj", "down_proj")),
}
UNKNOWN = Architecture()


def architecture(model: Any) -> Architecture:
    """The record of `model`'s family (UNKNOWN's safe defaults for one not listed)."""
    return ARCHITECTURES.get(getattr(model.config, "model_type", ""), UNKNOWN)
