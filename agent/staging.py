"""The staging pool: the agent's bounded, pre-faulted, shared-memory hand-off buffer.

Ranks on the node copy tensor bytes straight into this pool (one memcpy, ~19 GB/s) and send
only offsets over gRPC. It is allocated once at agent start (fallocate + MAP_POPULATE: every page resident),
because copying into fresh pages runs 10-18x slower than into warm ones; it is never
resized. Its size is the staging budget: when it is full, ``allocate`` blocks (back-pressure
to the rank) until uploads free space; nothing queues outside it.

The pool is a file in /dev/shm (mode 0600, named after the agent's pid) so ranks can map it
by path; stale pools of dead agents are removed at start, except a pool whose hold link
(``layervault-hold-*``, a symlink to the folder of the save journals that still need its
bytes, see :mod:`layervault.agent.journal`) leads to a journal: a restarted agent resumes
those saves from it.
"""

from __future__ import annotations

import bisect
import mmap
import os
import pathlib
import threading
import time
import uuid

from layervault.errors import DeadlineError, InvalidArgumentError

ALIGN = 4096
SHM_DIR = pathlib.Path("/dev/shm")
POOL_PREFIX = "layervault-pool-"
HOLD_PREFIX = "layervault-hold-"
JOURNAL_SUFFIX = ".journal"


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def hold_path(pool_path: pathlib.Path) -> pathlib.Path:
    """The hold link of a pool: a symlink, beside it, to the folder of the journals that need it."""
    return pool_path.parent / (HOLD_PREFIX + pool_path.name[len(POOL_PREFIX):])


def pool_owner_alive(pool_path: pathlib.Path) -> bool:
    """Whether the agent process that created this pool (its pid is in the name) still runs."""
    try:
        os.kill(int(pool_path.name[len(POOL_PREFIX):].split("-")[0]), 0)
    except ProcessLookupError:
        return False
    except (ValueError, PermissionError):
        return True  # not ours to judge
    return True


def pool_is_held(pool_path: pathlib.Path) -> bool:
    """A save journal still names this pool's bytes (its agent died before they were durable)."""
    hold = hold_path(pool_path)
    try:
        return hold.is_symlink() and any(hold.glob("*" + JOURNAL_SUFFIX))
    except OSError:
        return False


def remove_stale_pools(shm_dir: pathlib.Path = SHM_DIR) -> list[str]:
    """Delete pool files whose owning agent process no longer exists and that no journal holds,
    and hold links whose pool is gone."""
    removed = []
    for path in shm_dir.glob(POOL_PREFIX + "*"):
        if pool_owner_alive(path) or pool_is_held(path):
            continue
        path.unlink(missing_ok=True)
        hold_path(path).unlink(missing_ok=True)
        removed.append(path.name)
    for hold in shm_dir.glob(HOLD_PREFIX + "*"):
        if not (shm_dir / (POOL_PREFIX + hold.name[len(HOLD_PREFIX):])).exists():
            hold.unlink(missing_ok=True)
    return removed


class ExtentAllocator:
    """First-fit allocator of aligned extents in ``[0, size)`` with coalescing frees.

    ``allocate`` may return less than asked (at least ``min_bytes``) so one huge tensor can
    stream through a small pool in pieces.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._starts: list[int] = [0]
        self._ends: list[int] = [size]
        self._in_use = 0
        self._waiters = 0
        self._cond = threading.Condition()
        self._closed = False

    @property
    def in_use(self) -> int:
        return self._in_use

    @property
    def waiters(self) -> int:
        """Callers of ``allocate`` now waiting for memory to be freed."""
        return self._waiters

    def _take(self, want: int, min_bytes: int) -> tuple[int, int] | None:
        best = None
        for i, (start, end) in enumerate(zip(self._starts, self._ends)):
            length = end - start
            if length >= want:
                best = i
                break
            if length >= min_bytes and (best is None or length > self._ends[best] - self._starts[best]):
                best = i
        if best is None:
            return None
        start = self._starts[best]
        length = min(want, self._ends[best] - start)
        if start + length == self._ends[best]:
            del self._starts[best], self._ends[best]
        else:
            self._starts[best] = start + length
        self._in_use += length
        return start, length

    def allocate(self, nbytes: int, min_bytes: int, timeout: float | None = None) -> tuple[int, int]:
        """(offset, length) with ``min(min_bytes, nbytes) <= length <= aligned nbytes``; blocks while full."""
        if nbytes <= 0:
            raise InvalidArgumentError(f"cannot reserve {nbytes} bytes")
        want = _align(nbytes)
        floor = min(_align(min_bytes), want, self.size)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                if self._closed:
                    raise DeadlineError("staging pool is closed (agent shutting down)")
                got = self._take(want, floor)
                if got is not None:
                    return got
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise DeadlineError(
                        f"staging memory stayed full for {timeout:.0f}s ({self._in_use} of {self.size} bytes in use)"
                    )
                self._waiters += 1
                try:
                    self._cond.wait(remaining)
                finally:
                    self._waiters -= 1

    def free(self, offset: int, length: int) -> None:
        with self._cond:
            i = bisect.bisect_left(self._starts, offset)
            end = offset + length
            if i > 0 and self._ends[i - 1] == offset:  # merge with left neighbour
                i -= 1
                self._ends[i] = end
            else:
                self._starts.insert(i, offset)
                self._ends.insert(i, end)
            if i + 1 < len(self._starts) and self._starts[i + 1] == self._ends[i]:  # merge right
                self._ends[i] = self._ends[i + 1]
                del self._starts[i + 1], self._ends[i + 1]
            self._in_use -= length
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class StagingPool:
    """A pre-faulted shared-memory region of ``size`` bytes plus its allocator."""

    def __init__(self, size: int, shm_dir: pathlib.Path = SHM_DIR) -> None:
        if size < ALIGN:
            raise InvalidArgumentError(f"staging budget must be at least {ALIGN} bytes, got {size}")
        self.size = _align(size)
        remove_stale_pools(shm_dir)
        self.path = shm_dir / f"{POOL_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, self.size)
            os.posix_fallocate(fd, 0, self.size)  # allocate every tmpfs page now, not on first copy
            self._mmap = mmap.mmap(fd, self.size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
        finally:
            os.close(fd)
        self.view = memoryview(self._mmap)
        self.allocator = ExtentAllocator(self.size)

    def allocate(self, nbytes: int, min_bytes: int, timeout: float | None = None) -> tuple[int, int]:
        return self.allocator.allocate(nbytes, min_bytes, timeout)

    def free(self, offset: int, length: int) -> None:
        self.allocator.free(offset, length)

    @property
    def in_use(self) -> int:
        return self.allocator.in_use

    @property
    def waiters(self) -> int:
        return self.allocator.waiters

    def close(self) -> None:
        self.allocator.close()
        self.view.release()
        try:
            self._mmap.close()
        except BufferError:
            pass  # a memoryview slice is still alive; the mapping goes with the process
        self.path.unlink(missing_ok=True)


def map_pool_readonly(path: str, size: int) -> tuple[mmap.mmap, memoryview]:
    """Map a dead agent's pool to finish its journaled saves (see :mod:`layervault.agent.resume`)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        actual = os.fstat(fd).st_size
        if actual < size:
            raise InvalidArgumentError(f"pool {path} holds {actual} bytes, its journal expects {size}")
        mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    return mm, memoryview(mm)


def map_pool(path: str, size: int) -> tuple[mmap.mmap, memoryview]:
    """Map an agent's pool in a rank process (pages already resident: only PTEs to fill)."""
    fd = os.open(path, os.O_RDWR)
    try:
        mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
    finally:
        os.close(fd)
    return mm, memoryview(mm)
