"""One training step: the loss of a batch, backward, clipping, an AdamW update, the schedule.

`TrainStep.__call__` shows those five in order; where the numbers live (bf16 copies with
fp32 master weights, fp16 with a loss scaler) is `Precision`'s matter, and the shortcuts
that make a step fast are switched in one place, `SpeedPaths`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from instructlm.errors import InstructlmError
from instructlm.model.loss import DEFAULT_AVERAGE, batch_loss
from instructlm.training.budget import make_scheduler
from instructlm.training.layer_decay import LAYER_DECAY, parameter_groups


@dataclass(frozen=True)
class SpeedPaths:
    """The shortcuts of a training step, all on in production. Each gives the same numbers
    as the plain path, faster (tests prove it); benchmarks/profile_step.py turns them on one
    by one to show what each gains."""

    labels_only: bool = True  # the output layer only where there are labels (loss.py)
    master_weights: bool = True  # in bf16: bf16 weights to compute, fp32 ones to update
    sparse_embedding: bool = True  # a sparse gradient for a tied input embedding
    share_prefix: bool = True  # a prompt opening every row shares, computed once
    pack: bool = True  # each batch as one row without padding (batches.py)


class Precision:
    """Where a step's numbers live. bf16 (with master weights): the model computes with
    bf16 copies while AdamW updates fp32 master weights, copied back after each step; pure
    bf16 weights barely learn (updates of 1e-4 vanish in bf16's 8-bit mantissa), and fp32
    weights under autocast re-cast every weight on every forward pass. fp16: fp32 weights
    under autocast, with the loss scaled so that small gradients do not underflow. fp32 and
    bf16 without master weights: the weights as they are."""

    def __init__(self, params: list[Any], precision: str, device: str,
                 master_weights: bool) -> None:
        import torch

        self.params = params
        self.master: list[Any] | None = None
        if precision == "bf16" and master_weights:
            self.master = [p.detach().float() for p in params]
            for m in self.master:
                m.grad = torch.zeros_like(m)
            # Parameters only: buffers such as rotary frequencies stay fp32.
            for p in params:
                p.data = p.data.to(torch.bfloat16)
        self.scaler = (torch.amp.GradScaler(torch.device(device).type)
                       if precision == "fp16" else None)

    @property
    def trained(self) -> list[Any]:
        """The tensors AdamW updates."""
        return self.master or self.params

    def backward(self, loss: Any) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def gradients_ready(self, optimizer: Any) -> None:
        """The gradients where AdamW reads them, at their true size."""
        import torch

        if self.master is not None:
            for m, p in zip(self.master, self.params, strict=True):
                if p.grad is None:  # a parameter this batch did not use
                    m.grad.zero_()
            used = [(m.grad, p.grad) for m, p in zip(self.master, self.params, strict=True)
                    if p.grad is not None]
            torch._foreach_copy_([m for m, _ in used], [g for _, g in used])
        if self.scaler:
            self.scaler.unscale_(optimizer)

    def update(self, optimizer: Any) -> None:
        """AdamW's step, and the model's weights made its result."""
        import torch

        if self.scaler:  # skips the step when the scaled gradients overflowed
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
        if self.master is not None:
            with torch.no_grad():
                torch._foreach_copy_(self.params, self.master)

    def load(self, values: list[Any]) -> None:
        """Set the weights (in full precision) to `values`."""
        import torch

        with torch.no_grad():
            for i, value in enumerate(values):
                if self.master is not None:
                    self.master[i].copy_(value)
                self.params[i].copy_(value)  # cast to the model's dtype

    def finish(self) -> None:
        """Leave the model with its full-precision weights."""
        if self.master is not None:
            for p, m in zip(self.params, self.master, strict=True):
                p.data = m.detach()
            self.master = None


class TrainStep:
    """Call with a collated batch to train on it; returns the batch's loss."""

    def __init__(self, model: Any, lr: float, weight_decay: float, warmup_ratio: float,
                 total_steps: int, device: str, precision: str, schedule: str = "linear",
                 speed: SpeedPaths = SpeedPaths(), accelerator: Any = None,
                 fsdp: Any = None, objective: Any = None,
                 loss_average: str = DEFAULT_AVERAGE,
                 layer_decay: float = LAYER_DECAY) -> None:
        import torch

        from instructlm.training.distributed import shard_model

        self.model = model
        self.accelerator, self.fsdp = accelerator, fsdp is not None
        self.world = accelerator.num_processes if accelerator else 1
        # DistributedDataParallel averages dense gradients; the sparse embedding trick stays
        # with single-process training.
        self.sparse_embedding = _prepare_weights(
            model, speed.sparse_embedding and self.world == 1)
        if self.fsdp:  # before the optimizer sees the parameters, which become shards
            shard_model(model, fsdp, precision)
            # Through the model's own forward, whose hooks gather the sharded weights. FSDP
            # casts to bf16 itself over fp32 shards: no autocast and no master copies here.
            speed, precision = SpeedPaths(False, False, False, False, False), "fp32"
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.numbers = Precision([p for _, p in named], precision, device,
                                 speed.master_weights)
        self.loss = loss_module(model, device, precision, speed, objective, loss_average)
        if self.world > 1 and not self.fsdp:  # wrapped in DDP (once the weights have their
            # dtype), whose backward averages the gradients of every process
            self.loss = accelerator.prepare_model(self.loss, device_placement=False)
        groups = parameter_groups(self.names, self.numbers.trained, lr, weight_decay,
                                  layer_decay)
        # The fused kernel updates all parameters in one pass; the for-loop default is slow
        # on a CPU (docs/experiments.md, speed and memory).
        self.optimizer = torch.optim.AdamW(groups, lr=lr, fused=True)
        self.scheduler = make_scheduler(self.optimizer, schedule, warmup_ratio, total_steps)

    @property
    def lr(self) -> float:
        return float(max(self.scheduler.get_last_lr()))  # the top layer's, with layer decay

    def __call__(self, batch: dict[str, Any], share: float = 1.0) -> float:
        """Train on `batch`; return the mean loss per response token of the global batch.

        In several processes `batch` is this process's shard and `share` its weight (see
        distributed.Shard).
        """
        loss = self.loss(batch)
        self.numbers.backward(loss * share)
        self.numbers.gradients_ready(self.optimizer)
        clip_gradients(self.numbers.trained, 1.0, plain=self.world == 1)
        self.numbers.update(self.optimizer)
        self.scheduler.step()
        self.model.zero_grad(set_to_none=True)
        return self._global(loss.detach() * (share / self.world))

    def _global(self, value: Any) -> float:
        if self.world > 1:
            value = self.accelerator.reduce(value, reduction="sum")
        return value.item()

    def state_dict(self) -> dict[str, Any]:
        """What resuming needs: the trained weights in full precision, AdamW's moments and
        the schedule's position. With FSDP every process must call it (the shards are
        gathered); the main process gets the whole state."""
        scaler = self.numbers.scaler
        state = {"scheduler": self.scheduler.state_dict(),
                 "scaler": scaler.state_dict() if scaler else None,
                 "fsdp": self.fsdp}
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import get_state_dict

            weights, optimizer = get_state_dict(self.model, self.optimizer,
                                                options=_full_state(ignore_frozen_params=True))
            return {**state, "weights": weights, "optimizer": optimizer}
        weights = {n: t.detach().float().clone()
                   for n, t in zip(self.names, self.numbers.trained, strict=True)}
        return {**state, "weights": weights, "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if bool(state.get("fsdp")) != self.fsdp:
            raise InstructlmError(
                "the checkpoint was saved " + ("with" if state.get("fsdp") else "without") +
                " FSDP; resume it the way it was started",
                hint="launch with the same Accelerate config as the interrupted run")
        self.scheduler.load_state_dict(state["scheduler"])
        if self.numbers.scaler and state.get("scaler"):
            self.numbers.scaler.load_state_dict(state["scaler"])
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import set_state_dict

            set_state_dict(self.model, self.optimizer, model_state_dict=state["weights"],
                           optim_state_dict=state["optimizer"],
                           options=_full_state(strict=False))
            return
        self.numbers.load([state["weights"][name] for name in self.names])
        self.optimizer.load_state_dict(state["optimizer"])

    def full_weights(self) -> dict[str, Any]:
        """Every weight of an FSDP-sharded model, gathered on the CPU of the main process
        (the others get an empty dict). Every process must call it."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(self.model, options=_full_state())

    def finish(self) -> None:
        """Leave the model with its fp32 master weights, ready to save and to answer."""
        if self.sparse_embedding:
            self.model.get_input_embeddings().sparse = False
        self.numbers.finish()
        self.optimizer.state.clear()  # AdamW's moments: twice the model's size


def clip_gradients(params: list[Any], max_norm: float, plain: bool = True) -> float:
    """Scale the gradients down to a total norm of at most `max_norm`, as
    `torch.nn.utils.clip_grad_norm_` does; return the norm before.

    For dense CPU gradients of one process (`plain`) the norm is summed from dot products
    and the gradients are multiplied only when they are clipped, because the library's norm
    per tensor is slower there and it always multiplies (by 1.0 when no clipping is needed).
    Elsewhere (GPUs, where a branch on the norm would wait for the device; sharded or sparse
    gradients) it is the library's function.
    """
    import torch

    grads = [p.grad for p in params if p.grad is not None]
    if not plain or any(g.device.type != "cpu" or g.layout != torch.strided for g in grads):
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    total = math.sqrt(sum(float(torch.dot(g.reshape(-1), g.reshape(-1))) for g in grads))
    scale = max_norm / (total + 1e-6)  # the library's coefficient
    if not scale >= 1.0:  # also when the norm is inf or nan, as the library does
        torch._foreach_mul_(grads, scale)
    return total


def _full_state(**options: Any) -> Any:
    """State dict options: whole tensors on the main process's CPU, not shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **options)


def loss_module(model: Any, device: str, precision: str, speed: SpeedPaths,
                objective: Any = None, average: str = DEFAULT_AVERAGE) -> Any:
    """The training loss of `model` as a module of its own, so that DistributedDataParallel
    can wrap it: its backward then averages the gradients of every process. The loss is the
    supervised one (its tokens averaged as `average` says: loss.AVERAGES), or
    `objective(model, batch, device, precision, labels_only)` (preference tuning)."""
    import torch

    class LossOf(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, batch: dict[str, Any]) -> Any:
            if objective is not None:
                return objective(self.model, batch, device, precision, speed.labels_only)
            return batch_loss(self.model, batch, device, precision, speed.labels_only,
                              speed.share_prefix, speed.pack, average)

    return LossOf()


def _prepare_weights(model: Any, sparse_embedding: bool) -> bool:
    """The CPU preparations, once at setup: trainable weights in memory of their own, and
    (with `sparse_embedding`) a sparse gradient for a tied input embedding; returns whether
    that was set."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.data = _own_memory(p.data)
    return sparse_embedding and _sparse_embedding(model)


def _own_memory(tensor: Any) -> Any:
    """`tensor` in memory of its own. Weights loaded from safetensors are mapped from the
    file, privately: the first write to each page then copies it, page by page, which is
    far slower than one copy up front."""
    return tensor.clone() if tensor.device.type == "cpu" else tensor


def _sparse_embedding(model: Any) -> bool:
    """Let the input embedding send back a sparse gradient (only the rows of the batch's
    tokens), where it shares its weight with the output layer.

    The dense default writes and then adds a vocabulary-sized gradient every step, a cost
    that grows with the vocabulary and not with the batch. Because the output layer's
    gradient is dense, the shared weight's summed gradient stays dense, as AdamW needs.
    """
    import torch

    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if not isinstance(embedding, torch.nn.Embedding) or head is None \
            or head.weight is not embedding.weight:
        return False
    embedding.sparse = True
    return True
