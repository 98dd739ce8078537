"""Training in several processes, launched by `torchrun` or `accelerate launch`.

Hugging Face Accelerate sets up the processes (gloo on CPUs, NCCL on GPUs). By default the
loss is wrapped in PyTorch's DistributedDataParallel (DDP), which averages the gradients; with
an Accelerate config that asks for FSDP, the model is sharded with PyTorch's FSDP2
(`fully_shard`) instead, each process holding a slice of every weight, gradient and AdamW
moment. Either way instructlm shards each batch: every process takes its share of the rows of
the global batch (still --batch-size), and weights its loss by its share of the batch's
response tokens, so the averaged gradient is the one a single process computes on the whole
batch. Only the main process reports, answers and saves.

Started as a plain command, instructlm runs in one process and does not use Accelerate.
"""

from __future__ import annotations

import os
from typing import Any

from instructlm.errors import InstructlmError


def launched() -> bool:
    """Started by torchrun or accelerate launch with more than one process, or with FSDP?"""
    world = os.environ.get("WORLD_SIZE")
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    return world is not None and (int(world) > 1 or fsdp)


def main_process() -> bool:
    """The process that speaks and saves (also true when there is only one)."""
    return int(os.environ.get("RANK", "0")) == 0


def make_accelerator() -> Any:
    """The Accelerator of a multi-process launch, refusing what instructlm cannot do yet."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        raise InstructlmError("instructlm trains with DDP or FSDP; DeepSpeed is not supported",
                              hint="shard the model with FSDP instead: accelerate launch "
                                   "--config_file examples/accelerate/fsdp.yaml ...")
    # Without cpu=True, Accelerate leaves CPU processes unaware of each other.
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    supported = {DistributedType.MULTI_CPU, DistributedType.MULTI_GPU, DistributedType.FSDP,
                 DistributedType.NO}
    if accelerator.distributed_type not in supported:
        raise InstructlmError(
            f"instructlm trains with DDP or FSDP; {accelerator.distributed_type.value} is not "
            "supported", hint="use an Accelerate config with distributed_type MULTI_GPU, "
                              "MULTI_CPU or FSDP (see examples/accelerate/)")
    return accelerator


def fsdp_plugin(accelerator: Any) -> Any:
    """Accelerate's FSDP settings when the launch asked for FSDP, else None.

    Accelerate switches to FSDP on GPUs only; on CPUs (gloo) the same settings are read from
    the environment that `accelerate launch` sets from its config.
    """
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if accelerator.distributed_type == DistributedType.FSDP:
        return accelerator.state.fsdp_plugin
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return FullyShardedDataParallelPlugin()
    return None


def shard_model(model: Any, plugin: Any, precision: str) -> None:
    """Shard `model` in place with FSDP2: every decoder layer a unit of its own, the rest
    (embeddings, final norm, output layer) the root unit.

    The shards stay in fp32; in bf16 each unit is gathered as bf16 copies to compute, and its
    gradients are reduced in fp32: FSDP's own form of master weights.
    """
    import torch
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        MixedPrecisionPolicy,
        OffloadPolicy,
        ShardingStrategy,
        fully_shard,
    )

    mixed = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
             if precision == "bf16" else MixedPrecisionPolicy())
    reshard = plugin.reshard_after_forward  # FSDP2 configs give a bool, FSDP1 ones a strategy
    if not isinstance(reshard, bool):
        reshard = reshard in (None, ShardingStrategy.FULL_SHARD)
    offload = plugin.cpu_offload
    if not isinstance(offload, OffloadPolicy):  # FSDP1's CPUOffload(offload_params=...)
        offload = CPUOffloadPolicy() if getattr(offload, "offload_params", False) \
            else OffloadPolicy()
    if next(model.parameters()).device.type == "cpu":  # the shards are in CPU memory anyway
        offload = OffloadPolicy()
    if plugin.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    options = {"mp_policy": mixed, "offload_policy": offload}
    for layer in decoder_layers(model):
        fully_shard(layer, reshard_after_forward=reshard, **options)
    fully_shard(model, **options)


def decoder_layers(model: Any) -> list[Any]:
    """The model's repeated blocks: the modules transformers says must not be split."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(inner, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def broadcast_object_list(objects: list[Any], from_process: int = 0) -> list[Any]:
    from accelerate.utils import broadcast_object_list as broadcast

    return broadcast(objects, from_process=from_process)


def gather_objects(objects: list[Any]) -> list[Any]:
    """Every process's `objects`, concatenated in process order (every process must call)."""
    from accelerate.utils import gather_object

    return gather_object(objects)


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
              weights: list[int]) -> float:
        """The weight of this process's mean loss: its share of the batch (of its response
        tokens, of its examples or of its pairs: the examples' `weights`), times the number
        of processes (whose gradients DDP averages)."""
        if not counts:
            return 0.0
        local = sum(weights[i] for i in mine)
        return local * self.world / sum(weights[i] for i in indices)

    def padded_tokens(self, indices: list[int], examples: list[Any]) -> int:
        """Positions computed for the global batch, padding included, over all processes."""
        total = 0
        for rank in range(self.world):
            rows = [n for i in indices[rank::self.world] for n in examples[i].lengths]
            total += max(rows, default=0) * len(rows)
        return total
