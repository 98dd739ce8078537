"""Where the model runs, in which precision, and how fast this machine multiplies matrices."""

from __future__ import annotations

import time
from functools import lru_cache

from instructlm.errors import InstructlmError

PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def pick_device(choice: str = "auto") -> str:
    """`auto`: a CUDA GPU when there is one, else the CPU; or the device asked for, checked."""
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(choice)
    except RuntimeError:
        raise InstructlmError(f"unknown device {choice!r}",
                              hint="use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or
                                  (device.index or 0) >= torch.cuda.device_count()):
        raise InstructlmError(f"--device {choice}: no such CUDA device here",
                              hint="leave --device out to use what there is")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise InstructlmError(f"--device {choice}: Apple's MPS is not available here")
    return str(device)


def resolve_precision(choice: str, device: str) -> str:
    """bf16 where the hardware multiplies bf16 matrices faster than fp32; on a GPU without
    bf16, fp16 (with loss scaling); fp32 otherwise.

    On a CPU, bf16 instructions are not enough: some CPUs emulate them more slowly than fp32,
    so a short matmul probe decides.
    """
    import torch

    if choice != "auto":
        return choice
    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if not device.startswith("cpu"):
        return "fp32"
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "fp32"
    return "bf16" if bf16_speedup() >= 1.2 else "fp32"


@lru_cache(maxsize=1)
def bf16_speedup() -> float:
    """How many times faster a bf16 matmul is than an fp32 one here (a ~0.1 s probe)."""
    import torch

    # Alternated and the best of each kept, so that a busy moment (another program on the
    # cores) slows both kinds alike instead of deciding the answer.
    bf16, fp32 = 0.0, 0.0
    for _ in range(3):
        bf16 = max(bf16, matmul_gflops(torch.bfloat16, size=512, seconds=0.015))
        fp32 = max(fp32, matmul_gflops(torch.float32, size=512, seconds=0.015))
    return bf16 / fp32


def matmul_gflops(dtype: object, size: int = 2048, seconds: float = 1.0) -> float:
    """The best GFLOP/s of square matmuls of `dtype` over about `seconds`."""
    import torch

    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    torch.matmul(a, b)  # warm-up: kernel selection, page faults
    best, spent = 0.0, 0.0
    while spent < seconds:
        started = time.perf_counter()
        torch.matmul(a, b)
        took = time.perf_counter() - started
        spent += took
        best = max(best, 2 * size ** 3 / took / 1e9)
    return best
