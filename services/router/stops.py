"""Stop strings on a stream of text deltas.

A stop string can span token (and so chunk) boundaries, so text that might be the start of a
stop string is held back until the next delta settles it; the matched string is never sent."""

from __future__ import annotations


class StopStringMatcher:
    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self._held = ""
        self.stopped = False

    def push(self, delta: str) -> str:
        """Returns the text that is safe to send now; sets `stopped` when a stop string matched."""
        if not self.stops:
            return delta
        text = self._held + delta
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            self._held = ""
            return text[: min(hits)]
        # hold back the longest tail that is a prefix of some stop string
        keep = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), 0, -1):
                if stop.startswith(text[-n:]):
                    keep = max(keep, n)
                    break
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        """The held-back text, once generation ended without a match."""
        held, self._held = self._held, ""
        return held
