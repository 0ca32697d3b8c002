"""A progress line on stderr for steps that can take a while (seeding a large file)."""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

LARGE_BYTES = 1024 * 1024  # below this a seed takes well under a second: no line


class Progress:
    """`with Progress("Seeding x.sql", size):` prints a line for large inputs.

    On a terminal the line counts seconds in place until the step ends; in a
    log (stderr not a terminal) it is one line at the start and one at the end.
    The work itself is one message to Postgres, so elapsed time is the honest
    measure; a percentage would be invented.
    """

    def __init__(self, label: str, size: int, stream: TextIO | None = None, threshold: int = LARGE_BYTES) -> None:
        self.label = f"{label} ({size / (1024 * 1024):.1f} MB)"
        self.active = size >= threshold
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = 0.0

    def __enter__(self) -> Progress:
        self._started = time.monotonic()
        if not self.active:
            return self
        if self.tty:
            self._thread = threading.Thread(target=self._tick, daemon=True)
            self._thread.start()
        else:
            self._write(f"{self.label}: started\n")
        return self

    def _tick(self) -> None:
        while True:
            self._write(f"\r{self.label}: {time.monotonic() - self._started:.0f} s")
            if self._stop.wait(1.0):
                return

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.active:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        outcome = "failed" if exc_type else "done"
        start = "\r" if self.tty else ""
        self._write(f"{start}{self.label}: {outcome} in {time.monotonic() - self._started:.1f} s\n")

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()
