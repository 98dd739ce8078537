"""Where the model runs and in which precision."""

from __future__ import annotations

PRECISIONS = ("auto", "bf16", "fp32")


def pick_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_precision(choice: str, device: str) -> str:
    """bf16 autocast where the hardware does bf16 matmuls fast; fp32 otherwise."""
    import torch

    if choice != "auto":
        return choice
    if device == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
