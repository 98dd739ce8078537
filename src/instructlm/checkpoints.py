"""Checkpoints during training (`--save-every N`) and resuming an interrupted run (`--resume`).

A checkpoint sits beside the run it will become, in RUN.checkpoint/: the trained weights in
full precision, AdamW's state and the schedule, the random number generator, the loss
records so far, and what is needed to start the same training again (file, its SHA-256,
settings). Resuming replays the same batch order and restores all of that, so a resumed run
ends where an uninterrupted one would. The folder is removed once the run is saved.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InstructlmError

STATE_FILE = "state.json"
TENSORS_FILE = "training_state.pt"


def checkpoint_dir(output: Path) -> Path:
    return output.with_name(f"{output.name}.checkpoint")


@dataclass
class Checkpoint:
    """Where training stands: steps done, and the loss records up to there."""

    done: int
    records: list[dict[str, Any]]
    tensors: dict[str, Any]  # TrainStep.state_dict() and the random number generator


def save(folder: Path, done: int, records: list[dict[str, Any]], step_state: dict[str, Any],
         about: dict[str, Any]) -> None:
    """Write the checkpoint next to the old one, then swap: a kill leaves one whole."""
    import torch

    partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    # The GPUs' generators too: LoRA's dropout draws from them when training on CUDA.
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    torch.save({**step_state, "rng": torch.get_rng_state(), "cuda_rng": cuda_rng},
               partial / TENSORS_FILE)
    state = {**about, "done": done, "records": records}
    (partial / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")
    old = folder.with_name(f"{folder.name}.old-{os.getpid()}")
    if folder.exists():
        folder.rename(old)
    partial.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


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


def restore_rng(checkpoint: Checkpoint) -> None:
    import torch

    torch.set_rng_state(checkpoint.tensors["rng"])
    cuda_rng = checkpoint.tensors.get("cuda_rng") or []
    if cuda_rng and torch.cuda.is_available() and len(cuda_rng) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_rng)


def remove(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
