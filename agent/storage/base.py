"""The one small interface every object store backend implements.

The agent and the coordinator only ever talk to storage through :class:`ObjectStore`;
``file://`` and ``s3://`` are two implementations of it. Keys are ``/``-separated
relative paths *below* the store's prefix; they are built by :mod:`layervault.agent.keys`
and never contain ``..``, empty segments or a leading ``/``.

Only idempotent operations are retried by callers, so every method here must be safe to
call twice with the same arguments (``put_if_absent`` returns ``False`` the second time).
"""

from __future__ import annotations

import abc
import builtins
import dataclasses
import threading
import uuid
from typing import Callable, Iterator


class StorageError(Exception):
    """A storage operation failed for a reason other than a missing object."""


def check_key(key: str) -> str:
    """Return ``key`` if it is a relative ``/``-separated key that cannot escape the prefix.

    Backends call this on every key as defense in depth: :mod:`layervault.agent.keys`
    already builds safe keys, but a key like ``../x`` reaching a backend would write
    outside the store's folder (local) or outside its prefix (S3).
    """
    if not isinstance(key, str) or not key or key.startswith("/") or "\\" in key or "\x00" in key:
        raise ValueError(f"invalid object key {key!r}: must be a relative '/'-separated path")
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise ValueError(f"invalid object key {key!r}: empty, '.' or '..' segment")
    return key


class ObjectNotFound(StorageError, FileNotFoundError):
    """The object (or the bucket) does not exist."""


@dataclasses.dataclass(frozen=True)
class ByteRange:
    """Half-open byte range ``[start, stop)`` of an object."""

    start: int
    stop: int

    def __post_init__(self) -> None:
        if self.start < 0 or self.stop < self.start:
            raise ValueError(f"bad byte range [{self.start}, {self.stop})")

    @property
    def length(self) -> int:
        return self.stop - self.start


@dataclasses.dataclass(frozen=True)
class ObjectInfo:
    """One listed object: its key, size and last-modified time (seconds since the epoch)."""

    key: str
    size: int
    modified: float


@dataclasses.dataclass
class StoreStats:
    """Request and byte counters, so tests and metrics can see what crossed the wire.

    ``puts``/``gets``/``lists`` count calls of the store's methods (one ranged ``get`` is
    one get), ``deletes`` counts keys asked to be deleted, ``*_bytes`` count payload
    bytes. The meaning is the same for every backend, so a test can assert exact numbers.
    ``retries`` counts requests sent again after a transient failure (throttling, 5xx,
    reset, timeout; see :mod:`.retry`): a rising rate means the store is struggling.
    """

    puts: int = 0
    put_bytes: int = 0
    gets: int = 0
    get_bytes: int = 0
    deletes: int = 0
    lists: int = 0
    retries: int = 0
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.name.startswith("_")}


@dataclasses.dataclass(frozen=True)
class IncompleteUpload:
    """A multipart upload that was begun and neither completed nor aborted.

    Its parts are stored (and, on AWS, billed) but no LIST of objects shows them; only an
    abort frees them.
    """

    key: str
    upload_id: str


class ObjectStore(abc.ABC):
    """Flat key -> bytes store below one prefix (a folder, or ``bucket/prefix``)."""

    #: True when ``put_if_absent`` is a real conditional write of the store, not check-then-put.
    supports_conditional_put: bool = False

    def __init__(self) -> None:
        self.stats = StoreStats()

    @property
    @abc.abstractmethod
    def url(self) -> str:
        """The URL this store was opened from (``file:///...`` or ``s3://bucket/prefix``)."""

    @abc.abstractmethod
    def put(self, key: str, data: bytes | memoryview) -> None:
        """Write (or replace) one object; returns once it is durable."""

    @abc.abstractmethod
    def put_if_absent(self, key: str, data: bytes | memoryview) -> bool:
        """Create the object only if no object has the key; False if it already existed."""

    @abc.abstractmethod
    def get(self, key: str, byte_range: ByteRange | None = None) -> bytes:
        """Read an object, or a byte range of it. Raises :class:`ObjectNotFound`.

        A range that runs past the end of the object is cut at the end, like a slice.
        """

    @abc.abstractmethod
    def exists(self, key: str) -> bool:
        """True if the object exists."""

    @abc.abstractmethod
    def list(self, prefix: str) -> Iterator[str]:
        """Keys that start with ``prefix`` (a plain string prefix), in lexical order.

        Raises :class:`StorageError` on failure; an error is never an empty listing.
        """

    def list_info(self, prefix: str) -> Iterator[ObjectInfo]:
        """Like :meth:`list`, with each object's size and age: garbage collection spares
        young objects (those of a save still in flight) by their modification time."""
        raise StorageError(f"{self.url}: this store does not report object ages")

    @abc.abstractmethod
    def delete(self, keys: builtins.list[str]) -> None:  # `list` is a method here
        """Delete objects; missing keys are not an error."""

    def incomplete_uploads(self, prefix: str) -> builtins.list[IncompleteUpload]:
        """Multipart uploads open below ``prefix`` (a plain string prefix of their keys).

        Backends that never upload in parts have none. Raises :class:`StorageError` on
        failure, never an empty answer.
        """
        return []

    def abort_uploads(self, uploads: builtins.list[IncompleteUpload]) -> None:
        """Abort multipart uploads, freeing their parts; already finished ones are not an error."""
        if uploads:
            raise StorageError(f"{self.url} does not upload in parts; cannot abort {len(uploads)} uploads")

    def check(self) -> None:
        """Prove the store is usable (bucket exists, credentials work). Raises StorageError."""
        # A unique name: several agents may check one shared store at the same moment.
        probe = f".layervault-probe-{uuid.uuid4().hex}"

        def read_back() -> None:
            if self.get(probe) != b"ok":
                raise StorageError(f"{self.url}: read back of {probe!r} returned different bytes")

        self._check_step("put", lambda: self.put(probe, b"ok"), probe)
        self._check_step("get", read_back, probe)
        self._check_step("delete", lambda: self.delete([probe]), probe)

    def _check_step(self, step: str, run: Callable[[], object], key: str | None = None) -> None:
        """One step of :meth:`check` (``put``, ``get``, ``delete`` of ``key``); a backend may
        override it to say which of its operations failed, and where."""
        run()

    def close(self) -> None:
        """Release connections; the store may not be used afterwards."""
