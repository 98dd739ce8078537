"""The run directory: the contract between `train` and every later command.

    runs/<name>/
      model.safetensors, config.json, generation_config.json   the tuned weights
      tokenizer.json, tokenizer_config.json, ...                its tokenizer
      instructlm.json   template, settings, base, data file + SHA-256, metrics
      data.jsonl        the examples it was taught and is evaluated on (split: train/eval)
      losses.jsonl      the training loss per step, eval loss per epoch
      README.md         a model card

A run is written into a hidden sibling folder and renamed into place at the end, so a killed
run never leaves a directory that looks complete, and an earlier run is replaced only with
`force` and only after the new one is fully written.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from instructlm.data.formats import Example, InstructionSet, read_instruction_file
from instructlm.data.templates import Template
from instructlm.errors import InstructlmError
from instructlm.folders import recover_set_aside, written_beside

RUN_FILE = "instructlm.json"
LOSS_FILE = "losses.jsonl"
DATA_FILE = "data.jsonl"


def is_run(path: str | Path) -> bool:
    return (Path(path) / RUN_FILE).is_file()


def check_output(output: Path, force: bool) -> None:
    """Refuse before any work is done if saving would overwrite something (after putting
    back an earlier run that a killed command left moved aside)."""
    if output.parent.is_dir():
        recover_hidden(output)
    if not output.exists():
        return
    if not output.is_dir():
        raise InstructlmError(f"{output} exists and is not a folder", hint="choose another --output")
    if is_run(output):
        if not force:
            raise InstructlmError(f"{output} already holds a trained run",
                                  hint="pass --force to replace it, or choose --output")
    elif any(output.iterdir()):
        raise InstructlmError(f"{output} is a folder that is not a run; not touching it",
                              hint="choose an empty or new --output folder")


@contextmanager
def output_lock(output: Path) -> Iterator[None]:
    """Hold `output` for one training at a time: a second one into the same place is
    refused at once (it would silently replace the first one's run)."""
    import fcntl

    output.parent.mkdir(parents=True, exist_ok=True)
    path = output.with_name(f".{output.name}.lock")
    with open(path, "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise InstructlmError(f"another training is writing to {output} ({holder})",
                                  hint="wait for it to end, or choose another --output"
                                  ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()}")
        handle.flush()
        try:
            yield
        finally:
            path.unlink(missing_ok=True)  # while still locked: no one else holds it


@contextmanager
def staged_run(output: Path, force: bool) -> Iterator[Path]:
    """Yield a hidden staging folder; on clean exit, move it into place as `output`.

    An earlier run at `output` is moved aside first and put back if the new one cannot
    take its place; a run that was killed between the two renames is put back by the next
    command that saves into the same place.
    """
    check_output(output, force)
    try:
        with written_beside(output, hidden=True) as staging:
            yield staging
            check_output(output, force)  # something may have appeared while we trained
    except OSError as err:
        raise disk_error(err, output) from None


def disk_error(err: OSError, output: Path) -> Exception:
    """An OSError while saving, said plainly: a full disk above all."""
    if err.errno == errno.ENOSPC:
        return InstructlmError(f"the disk is full: {output} could not be saved; any earlier "
                               "run there is unchanged", hint="free some space and train again")
    return InstructlmError(f"{output} could not be saved: {err.strerror or err}; any earlier "
                           "run there is unchanged")


def check_free_space(place: Path, needed: int, what: str) -> None:
    """Refuse to start when the disk cannot hold what the run will write there."""
    folder = next((p for p in (place, *place.parents) if p.is_dir()), Path("."))
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise InstructlmError(f"not enough disk space for {what}: about {needed / 1e9:.1f} GB "
                              f"needed, {free / 1e9:.1f} GB free in {folder}",
                              hint="free some space, or choose another --output")


def recover_hidden(output: Path) -> None:
    """Tidy what killed commands left beside a run: see `recover_set_aside`."""
    recover_set_aside(output, hidden=True, complete=RUN_FILE)


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_losses(path: Path, records: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")


def write_examples(path: Path, data: InstructionSet) -> None:
    """The run's own copy of its examples, so `eval RUN` works wherever the file went."""
    with open(path, "w", encoding="utf-8") as f:
        for split, examples in (("train", data.train), ("eval", data.eval)):
            for ex in examples:
                f.write(json.dumps({**ex.to_dict(), "split": split}, ensure_ascii=False) + "\n")


def read_run_examples(run: str | Path) -> tuple[list[Example], list[Example]]:
    """The training and evaluation examples a run was taught with."""
    path = Path(run) / DATA_FILE
    if path.is_file():
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
                   if line.strip()]
        return ([Example.from_dict(r) for r in records if r["split"] == "train"],
                [Example.from_dict(r) for r in records if r["split"] == "eval"])
    # Runs from before data.jsonl: the original file, if it is still the same.
    data = read_run_info(run)["data"]
    original = Path(data["file"])
    if original.is_file():
        parsed = read_instruction_file(original)
        if parsed.sha256 == data["sha256"]:
            return parsed.train, parsed.eval
    raise InstructlmError(f"{run} holds no copy of its examples and {original} has changed "
                          "or is gone", hint="pass the instruction file to evaluate on")


def read_run_info(run: str | Path) -> dict[str, Any]:
    path = Path(run) / RUN_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InstructlmError(f"{run} is not a trained run (no {RUN_FILE})") from None
    except json.JSONDecodeError as err:
        raise InstructlmError(f"{path} is damaged: {err}",
                              hint="train the run again") from None


def run_template(source: str | Path) -> Template | None:
    """The template a run was taught in; None for a model folder or hub id."""
    return Template.from_dict(read_run_info(source)["template"]) if is_run(source) else None
