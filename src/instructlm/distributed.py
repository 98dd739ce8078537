"""Training in several processes, launched by `torchrun` or `accelerate launch`.

Hugging Face Accelerate sets up the processes (gloo on CPUs, NCCL on GPUs) and wraps the loss
in PyTorch's DistributedDataParallel, which averages the gradients. instructlm shards each
batch: every process takes its share of the rows of the global batch (still --batch-size),
and weights its loss by its share of the batch's response tokens, so the averaged gradient
is the one a single process computes on the whole batch. Only the main process reports,
evaluates, answers and saves.

Started as a plain command, instructlm runs in one process and does not use Accelerate.
"""

from __future__ import annotations

import os
from typing import Any

from .errors import InstructlmError


def launched() -> bool:
    """Started by torchrun or accelerate launch with more than one process?"""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def main_process() -> bool:
    """The process that speaks and saves (also true when there is only one)."""
    return int(os.environ.get("RANK", "0")) == 0


def make_accelerator() -> Any:
    """The Accelerator of a multi-process launch, refusing what instructlm cannot do yet."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    # Without cpu=True, Accelerate leaves CPU processes unaware of each other.
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    supported = {DistributedType.MULTI_CPU, DistributedType.MULTI_GPU, DistributedType.NO}
    if accelerator.distributed_type not in supported:
        raise InstructlmError(
            f"instructlm trains with data parallelism (DDP); "
            f"{accelerator.distributed_type.value} is not supported yet",
            hint="use an Accelerate config with distributed_type MULTI_GPU or MULTI_CPU")
    return accelerator


def broadcast_object_list(objects: list[Any], from_process: int = 0) -> list[Any]:
    from accelerate.utils import broadcast_object_list as broadcast

    return broadcast(objects, from_process=from_process)


class Shard:
    """This process's part of each global batch."""

    def __init__(self, accelerator: Any = None) -> None:
        self.world = accelerator.num_processes if accelerator else 1
        self.rank = accelerator.process_index if accelerator else 0

    def rows(self, indices: list[int]) -> tuple[list[int], bool]:
        """(rows to run, whether they count). A process left without rows by a short last
        batch runs one row with no weight: every process must take part in every step."""
        mine = indices[self.rank::self.world]
        return (mine, True) if mine else (indices[:1], False)

    def share(self, mine: list[int], counts: bool, indices: list[int],
              response_tokens: list[int]) -> float:
        """The weight of this process's mean loss: its share of the batch's response tokens,
        times the number of processes (whose gradients DDP averages)."""
        if not counts:
            return 0.0
        local = sum(response_tokens[i] for i in mine)
        return local * self.world / sum(response_tokens[i] for i in indices)

    def padded_tokens(self, indices: list[int], examples: list[Any]) -> int:
        """Positions computed for the global batch, padding included, over all processes."""
        total = 0
        for rank in range(self.world):
            rows = indices[rank::self.world]
            total += max((len(examples[i].input_ids) for i in rows), default=0) * len(rows)
        return total
