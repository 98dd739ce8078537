"""One training step: the loss of a batch, backward, clipping, an AdamW update, the schedule.

In bf16 the weights are kept twice: the model computes with bf16 copies, and AdamW updates fp32
master weights, which are copied back into the model after each step. Pure bf16 weights barely
learn (updates of 1e-4 vanish in bf16's 8-bit mantissa); the usual alternative, fp32 weights
under autocast, re-casts every weight on every forward pass.
"""

from __future__ import annotations

import math
from typing import Any

from .budget import make_scheduler
from .errors import InstructlmError
from .loss import batch_loss


class TrainStep:
    """Call with a collated batch to train on it; returns the batch's loss."""

    def __init__(self, model: Any, lr: float, weight_decay: float, warmup_ratio: float,
                 total_steps: int, device: str, precision: str, schedule: str = "linear",
                 labels_only: bool = True,
                 master_weights: bool = True, sparse_embedding: bool = True,
                 share_prefix: bool = True, pack: bool = True, accelerator: Any = None,
                 fsdp: Any = None) -> None:
        import torch

        from .distributed import shard_model

        self.model = model
        self.accelerator, self.fsdp = accelerator, fsdp is not None
        with torch.no_grad():  # weights of one's own to write to (see _own_memory)
            for p in model.parameters():
                if p.requires_grad:
                    p.data = _own_memory(p.data)
        self.world = accelerator.num_processes if accelerator else 1
        # DistributedDataParallel averages dense gradients; the sparse embedding trick stays
        # with single-process training.
        self.sparse_embedding = sparse_embedding and self.world == 1 and _sparse_embedding(model)
        if self.fsdp:  # before the optimizer sees the parameters, which become shards
            shard_model(model, fsdp, precision)
            # Through the model's own forward, whose hooks gather the sharded weights. FSDP
            # casts to bf16 itself over fp32 shards: no autocast and no master copies here.
            labels_only, share_prefix, pack, precision = False, False, False, "fp32"
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.master: list[Any] | None = None
        if precision == "bf16" and master_weights:
            self.master = [p.detach().float() for p in self.params]
            for m in self.master:
                m.grad = torch.zeros_like(m)
            # Parameters only: buffers such as rotary frequencies stay fp32.
            for p in self.params:
                p.data = p.data.to(torch.bfloat16)
        self.loss = loss_module(model, device, precision, labels_only, share_prefix, pack)
        if self.world > 1 and not self.fsdp:  # wrapped in DDP (once the weights have their
            # dtype), whose backward averages the gradients of every process
            self.loss = accelerator.prepare_model(self.loss, device_placement=False)
        # fp16 keeps fp32 weights under autocast, with the loss scaled so that small
        # gradients do not underflow fp16's range (bf16 has fp32's range and needs none).
        self.scaler = (torch.amp.GradScaler(torch.device(device).type)
                       if precision == "fp16" else None)
        trained = self.master or self.params
        # Weight decay on matrices only, as is customary: not on norms and biases.
        groups = [{"params": [p for p in trained if p.ndim >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in trained if p.ndim < 2], "weight_decay": 0.0}]
        # The fused kernel updates all parameters in one pass: ~5x faster than the for-loop
        # default on a CPU, where that took a third of the step.
        self.optimizer = torch.optim.AdamW(groups, lr=lr, fused=True)
        self.scheduler = make_scheduler(self.optimizer, schedule, warmup_ratio, total_steps)

    @property
    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def __call__(self, batch: dict[str, Any], share: float = 1.0) -> float:
        """Train on `batch`; return the mean loss per response token of the global batch.

        In several processes `batch` is this process's shard and `share` its weight (see
        distributed.Shard).
        """
        import torch

        loss = self.loss(batch)
        scaled = loss * share
        (self.scaler.scale(scaled) if self.scaler else scaled).backward()
        if self.master is not None:
            for m, p in zip(self.master, self.params, strict=True):
                if p.grad is None:  # a parameter this batch did not use
                    m.grad.zero_()
            used = [(m.grad, p.grad) for m, p in zip(self.master, self.params, strict=True)
                    if p.grad is not None]
            torch._foreach_copy_([m for m, _ in used], [g for _, g in used])
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        clip_gradients(self.master or self.params, 1.0, plain=self.world == 1)
        if self.scaler:  # skips the step when the scaled gradients overflowed
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        if self.master is not None:
            with torch.no_grad():
                torch._foreach_copy_(self.params, self.master)
        self.model.zero_grad(set_to_none=True)
        value = loss.detach() * (share / self.world)
        if self.world > 1:
            value = self.accelerator.reduce(value, reduction="sum")
        return value.item()

    def state_dict(self) -> dict[str, Any]:
        """What resuming needs: the trained weights in full precision, AdamW's moments and
        the schedule's position. With FSDP every process must call it (the shards are
        gathered); the main process gets the whole state."""
        state = {"scheduler": self.scheduler.state_dict(),
                 "scaler": self.scaler.state_dict() if self.scaler else None,
                 "fsdp": self.fsdp}
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import get_state_dict

            weights, optimizer = get_state_dict(self.model, self.optimizer,
                                                options=_full_state(ignore_frozen_params=True))
            return {**state, "weights": weights, "optimizer": optimizer}
        weights = {n: t.detach().float().clone()
                   for n, t in zip(self.names, self.master or self.params, strict=True)}
        return {**state, "weights": weights, "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        import torch

        if bool(state.get("fsdp")) != self.fsdp:
            raise InstructlmError(
                "the checkpoint was saved " + ("with" if state.get("fsdp") else "without") +
                " FSDP; resume it the way it was started",
                hint="launch with the same Accelerate config as the interrupted run")
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import set_state_dict

            set_state_dict(self.model, self.optimizer, model_state_dict=state["weights"],
                           optim_state_dict=state["optimizer"],
                           options=_full_state(strict=False))
            return
        with torch.no_grad():
            for i, name in enumerate(self.names):
                value = state["weights"][name]
                if self.master is not None:
                    self.master[i].copy_(value)
                self.params[i].copy_(value)  # cast to the model's dtype
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
        if self.master is not None:
            for p, m in zip(self.params, self.master, strict=True):
                p.data = m.detach()
            self.master = None
        self.optimizer.state.clear()  # AdamW's moments: twice the model's size


def clip_gradients(params: list[Any], max_norm: float, plain: bool = True) -> float:
    """Scale the gradients down to a total norm of at most `max_norm`, as
    `torch.nn.utils.clip_grad_norm_` does; return the norm before.

    For dense CPU gradients of one process (`plain`) the norm is summed from dot products
    and the gradients are multiplied only when they are clipped: the library's norm per
    tensor took 47 ms of a ~1.3 s step of the embedded model here, the dot products 22 ms,
    and it always multiplies (by 1.0 when the norm is small enough; 26 ms). Elsewhere
    (GPUs, where a branch on the norm would wait for the device; sharded or sparse
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


def loss_module(model: Any, device: str, precision: str, labels_only: bool,
                share_prefix: bool, pack: bool) -> Any:
    """The training loss of `model` as a module of its own, so that DistributedDataParallel
    can wrap it: its backward then averages the gradients of every process."""
    import torch

    class LossOf(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, batch: dict[str, Any]) -> Any:
            return batch_loss(self.model, batch, device, precision, labels_only, share_prefix,
                              pack)

    return LossOf()


def _own_memory(tensor: Any) -> Any:
    """`tensor` in memory of its own. Weights loaded from safetensors are mapped from the
    file, privately: the first write to each page then copies it, which made the first
    optimizer step of the embedded model 2.3 s instead of 0.1 s; one copy takes 0.15 s."""
    return tensor.clone() if tensor.device.type == "cpu" else tensor


def _sparse_embedding(model: Any) -> bool:
    """Let the input embedding send back a sparse gradient (only the rows of the batch's
    tokens), where it shares its weight with the output layer.

    The dense default writes and then adds a vocabulary-sized gradient (49k x 576 for the
    embedded model) every step, about a tenth of a CPU step. Because the output layer's
    gradient is dense, the shared weight's summed gradient stays dense, as AdamW needs.
    """
    import torch

    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if not isinstance(embedding, torch.nn.Embedding) or head is None \
            or head.weight is not embedding.weight:
        return False
    embedding.sparse = True
    return True
