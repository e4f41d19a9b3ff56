"""Pure text-streaming helpers shared by engines: stop-string matching with hold-back.

Kept free of torch and tokenizers so they can be tested exhaustively (Hypothesis) and reused by any
engine that decodes text incrementally.
"""

from __future__ import annotations


class StopStringMatcher:
    """Trims stop strings from a stream of text chunks without ever emitting part of a stop string.

    Feed decoded chunks in order; each `feed` returns the text that is safe to emit now and whether a
    stop string completed. Text that might be the beginning of a stop string is held back until it
    either completes the stop string (then it is dropped, with everything after it) or can no longer
    do so (then it is emitted). The result does not depend on how the text is split into chunks: the
    stream ends at the stop string that *completes* first (on a tie, the one that starts first).
    """

    __slots__ = ("_pending", "_stopped", "_stops")

    def __init__(self, stops: tuple[str, ...] | list[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._pending = ""
        self._stopped = False

    @property
    def stopped(self) -> bool:
        return self._stopped

    def feed(self, text: str) -> tuple[str, bool]:
        """Add `text`; return (text to emit now, whether a stop string completed)."""
        if self._stopped:
            return "", True
        if not self._stops:
            return text, False
        start = len(self._pending)
        pending = self._pending + text
        # Check every end position inside the new text, so the earliest-completing stop wins no matter
        # how the text was chunked.
        for end in range(start + 1, len(pending) + 1):
            hit = -1
            for stop in self._stops:
                if end >= len(stop) and pending.endswith(stop, 0, end):
                    begin = end - len(stop)
                    hit = begin if hit < 0 else min(hit, begin)
            if hit >= 0:
                self._pending = ""
                self._stopped = True
                return pending[:hit], True
        hold = self._held_suffix_length(pending)
        self._pending = pending[len(pending) - hold :]
        return pending[: len(pending) - hold], False

    def flush(self) -> str:
        """The stream ended without a stop string: release what was held back."""
        if self._stopped:
            return ""
        out, self._pending = self._pending, ""
        return out

    def _held_suffix_length(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        best = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:k]):
                    best = k
                    break
        return best
