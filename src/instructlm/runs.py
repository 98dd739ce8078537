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

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .errors import InstructlmError
from .formats import Example, InstructionSet, read_instruction_file
from .scores import describe_summary

RUN_FILE = "instructlm.json"
LOSS_FILE = "losses.jsonl"
DATA_FILE = "data.jsonl"


def is_run(path: str | Path) -> bool:
    return (Path(path) / RUN_FILE).is_file()


def check_output(output: Path, force: bool) -> None:
    """Refuse before any work is done if saving would overwrite something."""
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
def staged_run(output: Path, force: bool) -> Iterator[Path]:
    """Yield a hidden staging folder; on clean exit, move it atomically to `output`."""
    check_output(output, force)
    output.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_staging(output)
    staging = output.with_name(f".{output.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        check_output(output, force)  # something may have appeared while we trained
        old = output.with_name(f".{output.name}.old-{os.getpid()}")
        if output.exists():
            output.rename(old)
        staging.rename(output)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _remove_dead_staging(output: Path) -> None:
    """Staging folders of runs that were killed outright (no chance to clean up)."""
    for stale in output.parent.glob(f".{output.name}.partial-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but someone else's
        return True
    return True


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


def model_card(info: dict[str, Any], answers: list[dict[str, Any]]) -> str:
    """A short README for the run: what it is, how it was made, how to ask it.

    `answers` are scored rows (instruction, expected, answer) from the end of training.
    """
    s, d, m = info["settings"], info["data"], info["metrics"]
    lines = [
        f"# {info['name']}",
        "",
        f"Instruction-tuned with instructlm {info['instructlm_version']} from "
        f"`{info['base']['name']}` on `{d['file']}` "
        f"({d['n_train']} training, {d['n_eval']} evaluation examples).",
        "",
        "## Ask it",
        "",
        f"    instructlm ask {info['name']} \"your instruction\"",
        "",
        "## How it was trained",
        "",
        f"- template: `{info['template']['name']}`",
        *(f"- {k}: {v}" for k, v in s.items()),
        f"- data SHA-256: `{d['sha256']}`",
        f"- final training loss: {m.get('final_train_loss')}",
        f"- eval loss per epoch: {m.get('eval_loss')}",
        f"- training time: {m.get('train_seconds')} s",
    ]
    if m.get("answer_scores"):
        lines += [f"- answers at the end: {describe_summary(m['answer_scores'])}"]
    if answers:
        lines += ["", "## Sample answers", "", "| instruction | expected | answer |",
                  "|---|---|---|"]
        for a in answers:
            cells = [a["instruction"], a["expected"], a["answer"]]
            lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ")
                                            for c in cells) + " |")
    return "\n".join(lines) + "\n"
