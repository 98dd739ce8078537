"""An answer's text cut at the first stop text, and stripped: fed whole, or piece by piece
as it streams.

A streamed piece that might be the start of a stop text, or trailing whitespace, is held
back until the following text shows what it is; so the pieces put together are exactly the
answer a non-streamed request gets.
"""

from __future__ import annotations


class TextCutter:
    def __init__(self, stops: tuple[str, ...] = ()) -> None:
        self.stops = tuple(s for s in stops if s)
        self.pending = ""
        self.started = False  # has any text been let through yet?
        self.stopped = False  # has a stop text appeared?

    def feed(self, text: str) -> str:
        """The part of the text seen so far that can be shown now."""
        if self.stopped:
            return ""
        self.pending += text
        # What may begin a stop text is held back, with the whitespace before it.
        held = max([0, *(self._stop_prefix(s) for s in self.stops)])
        hit = self._first_stop()
        if hit is not None:
            if hit <= len(self.pending) - held:
                return self._cut(hit)
            return ""  # a stop text that begins earlier may still come: wait for it
        cut = len(self.pending[:len(self.pending) - held].rstrip())
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return self._lead(out)

    def finish(self) -> str:
        """What was held back, once the answer has ended."""
        hit = self._first_stop()
        if hit is not None:
            return self._cut(hit)
        out, self.pending = self.pending.rstrip(), ""
        return self._lead(out)

    def _first_stop(self) -> int | None:
        hits = [self.pending.find(s) for s in self.stops if s in self.pending]
        return min(hits) if hits else None

    def _cut(self, hit: int) -> str:
        self.stopped = True
        out, self.pending = self.pending[:hit].rstrip(), ""
        return self._lead(out)

    def _stop_prefix(self, stop: str) -> int:
        """The length of the longest end of the pending text that begins `stop`."""
        for n in range(min(len(stop) - 1, len(self.pending)), 0, -1):
            if self.pending.endswith(stop[:n]):
                return n
        return 0

    def _lead(self, out: str) -> str:
        if not self.started:  # an answer does not begin with whitespace
            out = out.lstrip()
            self.started = bool(out)
        return out
