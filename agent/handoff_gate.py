"""Hand-offs first: uploads hold back while a rank copies its state into the agent.

A rank is stalled for its whole hand-off; an upload only delays the moment a checkpoint is
durable. On a node whose cores are busy both compete for CPU and memory bandwidth: on 2
cores the gRPC hand-off ran at 0.5 GB/s while the agent uploaded meanwhile, against 0.9 GB/s
with a single upload thread, and the shared-memory copy of an optimizer's state took 2-4x
its quiet time while the model's chunks were uploading.

So an upload worker does not start a new chunk while a hand-off is open on this agent, nor
within ``linger`` seconds after one ended (a rank saves its model and then at once its
optimizer: chunks started in that gap would still be on the wire during the second copy).
It waits at most ``max_wait`` per chunk, so a stalled or endless stream of hand-offs only
slows uploads down, never stops them; and not at all while a rank waits for staging memory,
which only uploads can free.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Callable, Iterator

#: The longest an upload worker defers one chunk to hand-offs.
DEFAULT_MAX_WAIT = 0.25
#: How long after a hand-off ends uploads still defer to the next one of the same rank.
DEFAULT_LINGER = 0.02
_POLL = 0.01  # how often a waiting worker looks whether a rank now waits for memory


class HandoffGate:
    def __init__(self, memory_waiters: Callable[[], int], max_wait: float = DEFAULT_MAX_WAIT,
                 linger: float = DEFAULT_LINGER) -> None:
        """``memory_waiters``: how many hand-offs wait for staging memory right now."""
        self._memory_waiters = memory_waiters
        self.max_wait = max_wait
        self.linger = linger
        self._active = 0
        self._last_end = float("-inf")
        self._cond = threading.Condition()

    @property
    def active(self) -> int:
        return self._active

    @contextlib.contextmanager
    def handoff(self) -> Iterator[None]:
        """The ``with`` block is one rank's hand-off (from its open to its finish)."""
        with self._cond:
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                self._last_end = time.monotonic()
                self._cond.notify_all()

    def yield_to_handoffs(self) -> float:
        """Called by an upload worker before it starts a chunk; returns the seconds it waited."""
        start = time.monotonic()
        if self.max_wait <= 0 or not self._busy(start):
            return 0.0
        deadline = start + self.max_wait
        with self._cond:
            while (now := time.monotonic()) < deadline and self._busy(now) and not self._memory_waiters():
                self._cond.wait(min(deadline - now, _POLL))
        return time.monotonic() - start

    def _busy(self, now: float) -> bool:
        return self._active > 0 or now - self._last_end < self.linger
