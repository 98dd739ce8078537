"""Folders (and files) written beside their place, then renamed into it: runs, checkpoints,
the converted embedded model, exports. A killed process never leaves a folder that looks
whole, and what was there before stays whole until the new one has taken its place.

Beside `NAME` a writer uses `NAME.partial-PID` (being written) and `NAME.old-PID` (the
folder it replaces, for the moment of the swap), with a leading dot where `hidden`;
`recover_set_aside` tidies what killed processes left of them.
"""

from __future__ import annotations

import glob
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def written_beside(target: Path, hidden: bool) -> Iterator[Path]:
    """Yield an empty folder beside `target` to write into; when the block ends without an
    error, that folder becomes `target` (see `swap_into_place`). It is removed in any case."""
    dot, pid = "." if hidden else "", os.getpid()
    partial = target.with_name(f"{dot}{target.name}.partial-{pid}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        partial.mkdir(parents=True)
        yield partial
        swap_into_place(partial, target, target.with_name(f"{dot}{target.name}.old-{pid}"))
    finally:
        shutil.rmtree(partial, ignore_errors=True)


@contextmanager
def file_written_beside(target: Path) -> Iterator[Path]:
    """Yield a path beside `target` (`.NAME.partial-PID`) to write one file to; when the
    block ends without an error, it replaces `target` in one rename. It is removed in any
    case."""
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    try:
        yield partial
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def swap_into_place(new: Path, target: Path, aside: Path) -> None:
    """Make the folder `new` the folder `target`; what was at `target` is moved to `aside`
    meanwhile, put back if `new` cannot take its place, and removed once it has."""
    if target.exists():
        target.rename(aside)
    try:
        new.rename(target)
    except BaseException:
        if aside.exists() and not target.exists():
            aside.rename(target)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def recover_set_aside(target: Path, hidden: bool, complete: str) -> None:
    """Remove the half-written copies (`NAME.partial-PID`) that killed processes left beside
    `target`, and put back a folder they had moved aside (`NAME.old-PID`, whole when it holds
    `complete`) if nothing took its place; `hidden`: the names begin with a dot."""
    prefix = f"{'.' if hidden else ''}{target.name}."
    for leftover in target.parent.glob(f"{glob.escape(prefix)}*-*"):
        kind, _, pid = leftover.name[len(prefix):].rpartition("-")
        if kind not in ("partial", "old") or not pid.isdigit() or _process_alive(int(pid)):
            continue
        if kind == "old" and not target.exists() and (leftover / complete).is_file():
            leftover.rename(target)
        else:
            shutil.rmtree(leftover, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but someone else's
        return True
    return True
