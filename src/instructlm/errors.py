"""Errors meant for people: what was wrong, where, and what to do."""

from __future__ import annotations

import re
from typing import Callable

Report = Callable[[str], None]  # where progress and warnings are said to a person


class InstructlmError(Exception):
    """An error the command line prints as one clear message, without a traceback."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


EXCERPT = 200  # characters of a file's line shown in an error
# Control characters but tab and line breaks: no text to teach, and printed raw they would act
# on the terminal (move the cursor, change its colours).
CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def visible(text: str) -> str:
    """`text` with its control characters written as escapes (`\\x00`)."""
    return CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


class InstructionFileError(InstructlmError):
    """A problem in an instruction file, located at `path:line`."""

    def __init__(self, path: str, line: int | None, message: str, text: str | None = None,
                 hint: str | None = None) -> None:
        where = f"{path}:{line}" if line else path
        full = f"{where}: {message}"
        if text is not None:  # a bounded excerpt: a line may be megabytes long
            shown = text if len(text) <= EXCERPT else f"{text[:EXCERPT]}… ({len(text)} characters)"
            full += f"\n  {line} | {visible(shown)}"
        super().__init__(full, hint)
        self.path = path
        self.line = line
