"""The training loop: random batches, one step each, the eval loss after every epoch.

Read top to bottom, as nanoGPT's loop: `fit` draws the batches, calls the training step
(optimize.TrainStep: loss, backward, clip, update, schedule), records the losses, saves a
checkpoint now and then and stops cleanly on Ctrl-C. What comes before (the model, the
examples, the budget) and after (answers, the saved run) is in train.py.
"""

from __future__ import annotations

import itertools
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from instructlm.data.batches import collate_any
from instructlm.data.encode import EncodedExample, EncodedPair
from instructlm.errors import Report
from instructlm.model.loss import mean_loss
from instructlm.training import checkpoints
from instructlm.training.distributed import Shard
from instructlm.training.optimize import TrainStep
from instructlm.training.preference import pair_metrics
from instructlm.training.settings import TrainSettings


@dataclass
class Trainee:
    """What `fit` trains, and on what."""

    model: Any
    train_set: list[EncodedExample] | list[EncodedPair]  # pairs for preference tuning
    eval_set: list[EncodedExample] | list[EncodedPair]
    pad_id: int
    device: str
    precision: str
    accelerator: Any = None  # several processes (Accelerate)
    fsdp: Any = None  # Accelerate's FSDP settings: the model is sharded
    objective: Any = None  # preference tuning (preference.PreferenceObjective); None: supervised

    @property
    def main(self) -> bool:  # the process that reports, answers and saves
        return self.accelerator is None or self.accelerator.is_main_process


def fit(t: Trainee, settings: TrainSettings, report: Report, progress: bool,
        save_checkpoint: Callable[[int, list[dict[str, Any]], TrainStep], None] | None = None,
        resumed: checkpoints.Checkpoint | None = None
        ) -> tuple[list[dict[str, Any]], TrainStep]:
    """Train `t.model` in place for `settings.epochs`; return the loss records (per step,
    and eval per epoch) and the finished training step.

    With `save_checkpoint`, it is called every `settings.save_every` steps; with `resumed`,
    training goes on from that checkpoint as if it had never stopped. With several
    processes, each trains on its shard of every batch (see distributed.Shard).
    """
    from tqdm.auto import tqdm

    per_epoch = math.ceil(len(t.train_set) / settings.batch_size)
    total = per_epoch * settings.epochs
    step = _train_step(t, settings, total)
    shard = Shard(t.accelerator)
    # of each in its batch's mean loss: its tokens, or one share per example
    weights = [e.weight if settings.loss_average == "token" else 1 for e in t.train_set]
    records: list[dict[str, Any]] = []
    skip = 0  # steps a resumed run has done already
    if resumed is not None:
        step.load_state_dict(resumed.tensors)
        checkpoints.restore_rng(resumed, shard.rank)
        records, skip = list(resumed.records), resumed.done

    def evaluate_epoch(epoch: int, done: int) -> None:
        record = _held_out(t, settings, step, epoch, done)
        if record is not None:
            records.append(record)
            say = bar.write if progress else report  # bar.write keeps the bar intact
            say(_epoch_message(records, record))

    bar = tqdm(total=total, initial=skip, desc="training", unit="step",
               disable=not progress, leave=False)
    if _eval_missed(records, skip, per_epoch):
        evaluate_epoch(skip // per_epoch, skip)
    t.model.train()
    # One process only: several stop as their launcher stops them, as before.
    with _ctrl_c_between_steps(t.accelerator is None) as stop_asked:
        for done, epoch, indices, ends_epoch in itertools.islice(
                _batches(len(t.train_set), settings.batch_size, settings.epochs,
                         settings.seed), skip, None):
            mine, counts = shard.rows(indices)
            batch = collate_any([t.train_set[i] for i in mine], t.pad_id)
            value = step(batch, shard.share(mine, counts, indices, weights))
            records.append({"step": done, "epoch": epoch, "loss": round(value, 5),
                            "lr": step.lr, **_tokens(t, shard, indices)})
            bar.set_postfix(epoch=epoch, loss=f"{value:.3f}", refresh=False)
            bar.update(1)
            if save_checkpoint and done % settings.save_every == 0 and done < total:
                save_checkpoint(done, records, step)
            if ends_epoch:
                evaluate_epoch(epoch, done)
            if stop_asked():
                raise KeyboardInterrupt
    bar.close()
    step.finish()
    return records, step


def _train_step(t: Trainee, settings: TrainSettings, total: int) -> TrainStep:
    return TrainStep(t.model, settings.lr, settings.weight_decay, settings.warmup_ratio,
                     total, t.device, t.precision, settings.schedule,
                     accelerator=t.accelerator, fsdp=t.fsdp, objective=t.objective,
                     loss_average=settings.loss_average, layer_decay=settings.layer_decay)


def _tokens(t: Trainee, shard: Shard, indices: list[int]) -> dict[str, int]:
    """A step's tokens, and what its rows held with their padding (several processes)."""
    return {"tokens": sum(sum(t.train_set[i].lengths) for i in indices),
            "padded_tokens": shard.padded_tokens(indices, t.train_set)}


def _eval_missed(records: list[dict[str, Any]], done: int, per_epoch: int) -> bool:
    """Whether a run resumed after `done` steps stopped at an epoch's end, before its eval."""
    return bool(done) and done % per_epoch == 0 and not any(
        r.get("epoch") == done // per_epoch and "eval_loss" in r for r in records)


def _held_out(t: Trainee, settings: TrainSettings, step: TrainStep, epoch: int,
              done: int) -> dict[str, Any] | None:
    """The eval record of an epoch: the held-out loss (and, for pairs, the rewards)."""
    # A sharded model answers only when every process takes part. FSDP casts to bf16
    # itself, and gathers the weights only in the model's forward.
    if not t.eval_set or not (t.main or t.fsdp is not None):
        return None
    precision = "fp32" if step.fsdp else t.precision
    if t.objective is not None:  # held-out pairs: loss and rewards
        pairs = pair_metrics(t.model, t.eval_set, t.objective, settings.batch_size,
                             t.pad_id, t.device, precision, labels_only=not step.fsdp)
        eval_loss = pairs.pop("loss")
        rewards = {k: round(v, 5) for k, v in pairs.items()}
    else:
        eval_loss = mean_loss(t.model, t.eval_set, settings.batch_size, t.pad_id,
                              t.device, precision, labels_only=not step.fsdp)
        rewards = {}
    return {"step": done, "epoch": epoch, "eval_loss": round(eval_loss, 5), **rewards}


def _epoch_message(records: list[dict[str, Any]], record: dict[str, Any]) -> str:
    epoch = record["epoch"]
    message = (f"epoch {epoch}: train loss {_epoch_mean(records, epoch):.3f}, "
               f"eval loss {record['eval_loss']:.3f}")
    if "reward_accuracy" in record:
        message += (f", reward accuracy {record['reward_accuracy']:.0%}, margin "
                    f"{record['reward_margin']:+.3f}")
    return message


def _batches(n: int, batch_size: int, epochs: int, seed: int
             ) -> Iterator[tuple[int, int, list[int], bool]]:
    """(step, epoch, example indices, whether it ends its epoch) for every step of a run.

    Random batches: grouping them by length would make batches of one family (its examples
    have similar lengths), and the held-out answers got worse (docs/experiments.md). Each
    batch is packed into one row without padding instead (batches.py). Every epoch's order
    is drawn from one generator, so a resumed run that skips the steps it has done replays
    the same batches.
    """
    import torch

    order = torch.Generator().manual_seed(seed)
    done = 0
    for epoch in range(1, epochs + 1):
        perm = torch.randperm(n, generator=order).tolist()
        starts = range(0, n, batch_size)
        for start in starts:
            done += 1
            yield done, epoch, perm[start:start + batch_size], start == starts[-1]


@contextmanager
def _ctrl_c_between_steps(active: bool = True) -> Iterator[Callable[[], bool]]:
    """Within it, Ctrl-C (or SIGTERM, as `kill` and container stops send) ends training after
    the step under way: yields whether it was asked.

    A KeyboardInterrupt raised anywhere in a step can be lost (Python ignores one raised in
    a finalizer, and library code may catch it), and training would go on. The first signal
    only sets a flag, checked after every step; a second one interrupts at once. The caller
    turns the flag into a KeyboardInterrupt, handled like one pressed outside training.
    """
    import os
    import signal
    import threading

    if not active or threading.current_thread() is not threading.main_thread():
        yield lambda: False  # only the main thread may handle signals
        return
    pressed: list[bool] = []
    # None: installed outside Python; what it then does is the default.
    previous = {signal.SIGINT: signal.getsignal(signal.SIGINT) or signal.default_int_handler,
                signal.SIGTERM: signal.getsignal(signal.SIGTERM) or signal.SIG_DFL}

    def first(signum: int, frame: Any) -> None:
        pressed.append(True)
        for number, handler in previous.items():
            signal.signal(number, handler)
        # os.write, not print: a signal handler may run in the middle of a print
        os.write(2, b"\nStopping after this step (Ctrl-C again to stop at once).\n")

    for number in previous:
        signal.signal(number, first)
    try:
        yield lambda: bool(pressed)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _epoch_mean(records: list[dict[str, Any]], epoch: int) -> float:
    values = [r["loss"] for r in records if r.get("epoch") == epoch and "loss" in r]
    return sum(values) / max(len(values), 1)
