"""A byte progress bar for the command line: on stderr, only when stderr is a terminal."""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO


def human_bytes(n: float) -> str:
    """Bytes as a person reads them: ``512 B``, ``1.5 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


class ByteProgress:
    """``[#####.....]  1.2 GiB / 2.0 GiB  61%``, redrawn at most 10 times a second; thread-safe."""

    def __init__(self, total: int, stream: TextIO, label: str = "", width: int = 30) -> None:
        self.total, self.stream, self.label, self.width = max(total, 0), stream, label, width
        self.done = 0
        self._drawn = 0.0
        self._lock = threading.Lock()

    @classmethod
    def for_terminal(cls, total: int, label: str = "", stream: TextIO | None = None) -> "ByteProgress | None":
        """A bar on ``stream`` (stderr) if it is a terminal, else None: pipes and logs stay clean."""
        stream = stream or sys.stderr
        return cls(total, stream, label) if stream.isatty() else None

    def add(self, n: int) -> None:
        with self._lock:
            self.done += n
            now = time.monotonic()
            if now - self._drawn >= 0.1 or self.done >= self.total:
                self._drawn = now
                self._draw()

    def _draw(self) -> None:
        fraction = min(1.0, self.done / self.total) if self.total else 1.0
        filled = int(fraction * self.width)
        bar = "#" * filled + "." * (self.width - filled)
        self.stream.write(f"\r{self.label}[{bar}] {human_bytes(self.done)} / {human_bytes(self.total)} {fraction:4.0%}")
        self.stream.flush()

    def close(self) -> None:
        with self._lock:
            self._draw()
            self.stream.write("\n")
            self.stream.flush()


class CountingSink:
    """Wraps a byte sink (``write(offset, data)``) and reports each write to a progress bar."""

    def __init__(self, sink: object, progress: ByteProgress) -> None:
        self.sink, self.progress = sink, progress

    def write(self, offset: int, data: memoryview) -> None:
        self.sink.write(offset, data)  # type: ignore[attr-defined]
        self.progress.add(len(data))
