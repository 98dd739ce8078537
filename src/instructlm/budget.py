"""How long to train, and with which learning-rate schedule, for a file of a given size.

A fixed number of epochs under-trains small files: 24 lines in batches of 8 are 3 steps an
epoch, and with 4 epochs, a warm-up and a decay to zero, the model got about half the
learning a constant rate gives. So every run gets at least `min_steps` optimizer steps
(epochs are raised to reach them; a file large enough keeps the default epochs), and the
learning rate stays at its peak until the last 20% of the steps, where it decays to zero
(warm-up-stable-decay): a constant rate to the end made answers of one family run into
another's form. A batch holds at most about a quarter of the file (`MIN_BATCHES` steps an
epoch): in batches of 8, a 10-line file reached the minimum in 15 epochs of two steps, each
seeing most of the file; in batches of 3 it takes 8 epochs of 4 steps, in less time, with
as many answers in form and fewer answers that copy a taught one. How the numbers were
chosen, on a suite of files other than the ones they are reported on: the README's
"Defaults that generalize".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

DEFAULT_EPOCHS = 4
DEFAULT_BATCH = 8  # examples a step, the tutorial's
MIN_STEPS = 30  # optimizer steps at least, whatever the file's size
MIN_BATCHES = 4  # steps an epoch at least: smaller batches for smaller files
SCHEDULES = ("linear", "constant", "cosine", "wsd")
DEFAULT_SCHEDULE = "wsd"


@dataclass(frozen=True)
class Budget:
    epochs: int
    steps: int
    batch_size: int
    why: str  # one line for people


def choose_batch_size(n_examples: int, asked: int | None) -> int:
    """`asked` when given, else DEFAULT_BATCH, or less where that would make an epoch fewer
    than MIN_BATCHES steps."""
    return asked or min(DEFAULT_BATCH, math.ceil(n_examples / MIN_BATCHES))


def choose_budget(n_examples: int, batch_size: int | None, epochs: int | None,
                  min_steps: int = MIN_STEPS, unit: str = "examples") -> Budget:
    """Batch size and epochs for `n_examples` (of `unit`: examples, or preference pairs):
    each as given, else the batch from `choose_batch_size` and the default epochs raised to
    reach `min_steps` optimizer steps."""
    batch = choose_batch_size(n_examples, batch_size)
    per_epoch = math.ceil(n_examples / batch)
    smaller = "" if batch_size or batch == DEFAULT_BATCH else \
        f"batches of {batch} for a small file, "
    if epochs is not None:
        return Budget(epochs, per_epoch * epochs, batch, f"{smaller}{epochs} epochs as asked")
    chosen = max(DEFAULT_EPOCHS, math.ceil(min_steps / per_epoch))
    if chosen == DEFAULT_EPOCHS:
        why = (f"{smaller}{DEFAULT_EPOCHS} epochs, {per_epoch * DEFAULT_EPOCHS} steps (at "
               f"least {min_steps})")
    else:
        why = (f"{smaller}{chosen} epochs: {n_examples} {unit} are {per_epoch} step"
               f"{'s' if per_epoch > 1 else ''} an epoch, and a run takes at least "
               f"{min_steps} steps")
    return Budget(chosen, per_epoch * chosen, batch, why)


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
