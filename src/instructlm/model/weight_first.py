"""Answering's matrix products on a CPU, written with the weight on the left.

A decode step multiplies a few rows (one per answer) by every weight matrix. `nn.Linear`
computes that as x @ W.T; MKL, PyTorch's CPU BLAS, runs the same product written W @ x.T
much faster for a few rows, and no slower for many (docs/experiments.md, 2026-12-02), so
batched answers and the server's shared steps gain most. Only in inference mode (answers and
held-out losses), on the CPU, in fp32, and only on a model an Answerer holds: training and
the GPU run `nn.Linear` unchanged. The two orders round differently in the last bits, so an
answer can rarely differ from one decoded with plain `nn.Linear`; the tests compare logits.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class WeightFirstLinear(nn.Linear):
    """An `nn.Linear` that, while answering on a CPU in fp32, multiplies W @ x.T."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (torch.is_inference_mode_enabled() and x.device.type == "cpu"
                and x.dtype == torch.float32 and self.weight.dtype == torch.float32):
            return super().forward(x)
        rows = x.reshape(-1, x.shape[-1])
        out = (self.weight @ rows.T).T
        if self.bias is not None:
            out = out + self.bias
        return out.contiguous().view(*x.shape[:-1], self.out_features)


def use_weight_first(model: Any) -> Any:
    """Give every plain `nn.Linear` of `model` the weight-first product, in place.

    The modules keep their parameters (tied ones stay tied), hooks and state dict: only
    their class changes. Subclasses of `nn.Linear` (quantised layers and the like) are
    left as they are.
    """
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = WeightFirstLinear
    return model
