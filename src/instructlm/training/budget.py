"""How long to train, and with which learning-rate schedule, for a file of a given size.

A fixed number of epochs under-trains small files: 24 lines in batches of 8 are 3 steps an
epoch, and with 4 epochs, a warm-up and a decay to zero, the model got about half the
learning a constant rate gives. So every run gets at least `min_steps` optimizer steps
(epochs are raised to reach them; a file large enough keeps the default epochs), and the
learning rate stays at its peak until the last 20% of the steps, where it decays to zero
(warm-up-stable-decay): a constant rate to the end made answers of one family run into
another's form. Batches stay at 8 whatever the file's size: smaller batches for small
files (at least 4 steps an epoch, with the learning rate as it is or scaled to the batch)
tied in bf16 and put fewer answers in form in fp32. How the numbers were chosen, on a suite
of files other than the ones they are reported on: the README's "Defaults that generalize".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

DEFAULT_EPOCHS = 4
MIN_STEPS = 30  # optimizer steps at least, whatever the file's size
SCHEDULES = ("linear", "constant", "cosine", "wsd")
DEFAULT_SCHEDULE = "wsd"


@dataclass(frozen=True)
class Budget:
    epochs: int
    steps: int
    why: str  # one line for people


def choose_budget(n_examples: int, batch_size: int, epochs: int | None,
                  min_steps: int = MIN_STEPS, unit: str = "examples") -> Budget:
    """Epochs for `n_examples` (of `unit`: examples, or preference pairs): `epochs` when
    given, else the default raised to reach `min_steps` optimizer steps."""
    per_epoch = math.ceil(n_examples / batch_size)
    if epochs is not None:
        return Budget(epochs, per_epoch * epochs, f"{epochs} epochs as asked")
    chosen = max(DEFAULT_EPOCHS, math.ceil(min_steps / per_epoch))
    if chosen == DEFAULT_EPOCHS:
        why = (f"{DEFAULT_EPOCHS} epochs, {per_epoch * DEFAULT_EPOCHS} steps (at least "
               f"{min_steps})")
    else:
        why = (f"{chosen} epochs: {n_examples} {unit} are {per_epoch} step"
               f"{'s' if per_epoch > 1 else ''} an epoch, and a run takes at least "
               f"{min_steps} steps")
    return Budget(chosen, per_epoch * chosen, why)


def make_scheduler(optimizer: Any, schedule: str, warmup_ratio: float,
                   total_steps: int) -> Any:
    """The learning rate over the run: a warm-up over `warmup_ratio` of the steps, then
    linear decay to zero, constant, cosine decay, or warm-up-stable-decay (constant, then
    a linear decay over the last 20%)."""
    from transformers import get_scheduler, get_wsd_schedule

    warmup = math.ceil(warmup_ratio * total_steps)
    if schedule == "wsd":
        decay = max(1, round(0.2 * total_steps))
        return get_wsd_schedule(optimizer, num_warmup_steps=warmup, num_decay_steps=decay,
                                num_stable_steps=max(0, total_steps - warmup - decay))
    name = {"linear": "linear", "constant": "constant_with_warmup", "cosine": "cosine"}[schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
