"""A small progress display for long loops (stderr, one line, rate and ETA)."""

from __future__ import annotations

import sys
import time


class Progress:
    """Prints `desc: done/total (rate/s, eta)` at most every `interval` seconds.

    Example:
        with Progress("convert", total=n) as bar:
            for ...: bar.update(1)
    """

    def __init__(self, desc: str, total: int | None = None, unit: str = "img",
                 interval: float = 0.5, stream=None):
        self.desc, self.total, self.unit, self.interval = desc, total, unit, interval
        self.stream = stream or sys.stderr
        self.done = 0
        self._start = self._last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self._print(final=False)

    def _print(self, final: bool) -> None:
        elapsed = max(time.monotonic() - self._start, 1e-9)
        rate = self.done / elapsed
        if self.total:
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            text = f"{self.desc}: {self.done}/{self.total} {self.unit} ({rate:,.0f}/s, eta {eta:,.0f}s)"
        else:
            text = f"{self.desc}: {self.done} {self.unit} ({rate:,.0f}/s)"
        end = "\n" if final else ""
        self.stream.write("\r" + text + " " * 4 + end)
        self.stream.flush()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self._print(final=True)
