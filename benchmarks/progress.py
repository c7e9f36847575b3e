"""What a person watching a run reads on stderr: how far it is and roughly how long is left.

On a terminal, one line redrawn in place with a bar; elsewhere (a log, CI), a plain line
when a part starts and every half minute.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

WIDTH = 24  # characters in the bar
PLAIN_EVERY_S = 30.0


def duration(seconds: float) -> str:
    """'40s', '3m10s', '1h05m': rounded, as an estimate should be."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """Progress over parts of a run, each weighted by its estimated seconds.

    The time left is the estimate of what remains, scaled by how the parts done so
    far compared with their estimates; so it corrects itself as the run goes.
    """

    def __init__(self, estimates: dict[str, float], stream: TextIO | None = None) -> None:
        self.estimates = estimates
        self.total = sum(estimates.values()) or 1.0
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.start = time.monotonic()
        self.finished = 0.0  # estimated seconds of the parts done
        self.part, self.fraction = "", 0.0
        self.drawn_at = -float("inf")

    def note(self, message: str) -> None:
        """A line that stays, above the bar."""
        self.stream.write(("\r\x1b[K" if self.tty else "") + f"[bench] {message}\n")
        if self.tty and self.part:  # the bar again, below the note
            self.drawn_at = -float("inf")
            self._draw()
        self.stream.flush()

    def begin(self, part: str) -> None:
        self.part, self.fraction = part, 0.0
        self.drawn_at = -float("inf")
        self._draw()

    def step(self, done: int, total: int) -> None:
        """Part `part` is done/total of the way."""
        self.fraction = done / total
        self._draw()

    def end(self) -> None:
        self.finished += self.estimates[self.part]
        self.part, self.fraction = "", 0.0
        if self.tty:
            self.stream.write("\r\x1b[K")
            self.stream.flush()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        done = self.finished + self.fraction * self.estimates[self.part]
        elapsed = self.elapsed()
        # Scale by the run so far once there is enough of it to go by.
        pace = elapsed / done if done > 0.05 * self.total and elapsed > 2 else 1.0
        return (self.total - done) * pace

    def _draw(self) -> None:
        now = time.monotonic()
        if now - self.drawn_at < (0.1 if self.tty else PLAIN_EVERY_S):
            return
        self.drawn_at = now
        done = (self.finished + self.fraction * self.estimates[self.part]) / self.total
        text = f"{self.part} {self.fraction:4.0%}, all {done:4.0%}, about {duration(self.left())} left"
        if self.tty:
            bar = "#" * round(done * WIDTH)
            self.stream.write(f"\r\x1b[K[bench] [{bar:<{WIDTH}}] {text}")
        else:
            self.stream.write(f"[bench] {text}\n")
        self.stream.flush()
