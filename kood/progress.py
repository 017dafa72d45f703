"""A small progress display for long loops (stderr, one line, rate and ETA)."""

from __future__ import annotations

import sys
import time


class Progress:
    """Prints `desc: done/total (rate/s, eta)` at most every `interval` seconds.

    On a terminal the line is redrawn in place; into a file or pipe (a log) it is a new line at most
    every `log_interval` seconds, so logs stay readable.

    Example:
        with Progress("convert", total=n) as bar:
            for ...: bar.update(1)
    """

    def __init__(self, desc: str, total: int | None = None, unit: str = "img",
                 interval: float = 0.5, stream=None, log_interval: float = 30.0):
        self.desc, self.total, self.unit = desc, total, unit
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval if self.tty else log_interval
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
            eta = f"{(self.total - self.done) / rate:,.0f}s" if rate > 0 else "?"
            text = f"{self.desc}: {self.done}/{self.total} {self.unit} ({rate:,.0f}/s, eta {eta})"
        else:
            text = f"{self.desc}: {self.done} {self.unit} ({rate:,.0f}/s)"
        if self.tty:
            self.stream.write("\r" + text + " " * 4 + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self._print(final=True)
