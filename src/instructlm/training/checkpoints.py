"""Checkpoints during training (`--save-every N`) and resuming an interrupted run (`--resume`).

A checkpoint sits beside the run it will become, in RUN.checkpoint/: the trained weights in
full precision, AdamW's state and the schedule, every process's random number generators,
the loss records so far, and what is needed to start the same training again (file, its SHA-256,
settings). Resuming replays the same batch order and restores all of that, so a resumed run
ends where an uninterrupted one would. The folder is removed once the run is saved.
"""

from __future__ import annotations

import errno
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from instructlm.errors import InstructlmError
from instructlm.folders import recover_set_aside, written_beside

STATE_FILE = "state.json"
TENSORS_FILE = "training_state.pt"


def checkpoint_dir(output: Path) -> Path:
    return output.with_name(f"{output.name}.checkpoint")


@dataclass
class Checkpoint:
    """Where training stands: steps done, and the loss records up to there."""

    done: int
    records: list[dict[str, Any]]
    tensors: dict[str, Any]  # TrainStep.state_dict() and the random number generators


def rng_state() -> dict[str, Any]:
    """This process's random number generators: the CPU's, and the GPUs' (LoRA's dropout
    draws from them when training on CUDA)."""
    import torch

    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def save(folder: Path, done: int, records: list[dict[str, Any]], step_state: dict[str, Any],
         about: dict[str, Any], rng_states: list[dict[str, Any]]) -> None:
    """Write the checkpoint next to the old one, then swap: a kill leaves one whole.
    `rng_states` holds rng_state() of every process, in process order."""
    import torch

    try:
        with written_beside(folder, hidden=False) as partial:
            torch.save({**step_state, "rng_states": rng_states}, partial / TENSORS_FILE)
            state = {**about, "done": done, "records": records}
            (partial / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n",
                                              encoding="utf-8")
    except (OSError, RuntimeError) as err:  # torch.save reports a full disk as RuntimeError
        full = getattr(err, "errno", None) == errno.ENOSPC or "No space left" in str(err) \
            or "unexpected pos" in str(err)
        raise InstructlmError(
            f"{'the disk is full: ' if full else ''}the checkpoint in {folder} could not be "
            f"written ({err}); the one before it, if any, is unchanged",
            hint="free some space and continue with `instructlm train --resume`") from None


def read_about(folder: Path) -> dict[str, Any]:
    """The checkpoint's description: file, SHA-256, settings, output, steps done."""
    path = folder / STATE_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InstructlmError(f"there is no checkpoint to resume in {folder}",
                              hint="a run saves checkpoints when trained with --save-every N"
                              ) from None
    except json.JSONDecodeError as err:
        raise InstructlmError(f"{path} is damaged: {err}") from None


def load(folder: Path) -> Checkpoint:
    import torch

    about = read_about(folder)
    # weights_only: a checkpoint is data, never code, even if someone swapped the file.
    tensors = torch.load(folder / TENSORS_FILE, weights_only=True)
    return Checkpoint(about["done"], about["records"], tensors)


def restore_rng(checkpoint: Checkpoint, process: int = 0) -> None:
    """Give this process the generators it had at the checkpoint."""
    import torch

    states = checkpoint.tensors["rng_states"]
    state = states[process] if process < len(states) else states[0]
    torch.set_rng_state(state["cpu"])
    if state["cuda"] and torch.cuda.is_available() \
            and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def remove(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    tidy(folder)


def tidy(folder: Path) -> None:
    """Remove what killed checkpoint writes left beside `folder` (half-written copies), and
    put back a checkpoint moved aside by one that was killed mid-swap."""
    if folder.parent.is_dir():
        recover_set_aside(folder, hidden=False, complete=STATE_FILE)
