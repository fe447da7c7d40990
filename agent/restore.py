"""Reading shards back: fetch chunk objects in parallel, verify, decode.

Only the chunks of the requested entries are fetched, so one layer costs one layer's
objects. Every chunk is checked against the CRC32C recorded in the manifest after decoding;
a mismatch (or bytes that do not decode) is a :class:`ChecksumError` naming job, step,
layer and object - never silently wrong weights.
"""

from __future__ import annotations

import dataclasses
import threading
from concurrent.futures import Executor, Future
from typing import Iterator

from layervault.agent.checksum import crc32c
from layervault.agent.codecs import CodecChain, CodecError
from layervault.agent.manifest import Manifest
from layervault.agent.restore_cache import ChunkCache
from layervault.agent.storage import ObjectNotFound, ObjectStore
from layervault.errors import ChecksumError, DeadlineError, InvalidArgumentError, NotFoundError
from layervault.proto import agent_pb2, manifest_pb2


@dataclasses.dataclass(frozen=True)
class DecodedChunk:
    shard: int              # index into manifest.shards
    shard_offset: int
    data: bytes | memoryview


@dataclasses.dataclass(frozen=True)
class ShardSpan:
    """Raw bytes ``[start, stop)`` of shard ``shard`` that a reader needs."""

    shard: int
    start: int
    stop: int


def select_spans(manifest: Manifest, names: list[str], ranges: list[agent_pb2.ShardRange]) -> list[ShardSpan]:
    """What a restore reads: whole shards of ``names`` (all when both are empty), or ``ranges``."""
    if ranges:
        spans = []
        for r in ranges:
            if not 0 <= r.shard < len(manifest.shards):
                raise InvalidArgumentError(f"shard #{r.shard} does not exist ({len(manifest.shards)} shards)")
            size = manifest.shards[r.shard].raw_bytes
            if not 0 <= r.start <= r.stop <= size:
                raise InvalidArgumentError(f"range [{r.start}, {r.stop}) is outside shard #{r.shard} of {size} bytes")
            spans.append(ShardSpan(r.shard, r.start, r.stop))
        return spans
    if not names:
        return [ShardSpan(i, 0, s.raw_bytes) for i, s in enumerate(manifest.shards)]
    wanted = set(names)
    found = [i for i, s in enumerate(manifest.shards) if s.name in wanted]
    missing = wanted - {manifest.shards[i].name for i in found}
    if missing:
        shown = ", ".join(repr(n) for n in sorted(missing)[:5])
        raise NotFoundError(f"{manifest.job}/{manifest.kind} step {manifest.step} has no layer {shown}")
    return [ShardSpan(i, 0, manifest.shards[i].raw_bytes) for i in found]


def fetch_chunk(store: ObjectStore, manifest: Manifest, shard: manifest_pb2.ShardRecord, chunk: manifest_pb2.ChunkRef) -> bytes | memoryview:
    where = f"{manifest.job}/{manifest.kind} step {manifest.step}, layer {shard.name!r}, object {chunk.key}"
    try:
        body = store.get(chunk.key)
    except ObjectNotFound as exc:
        raise ChecksumError(f"missing object: {where}") from exc
    if len(body) != chunk.stored_size:
        raise ChecksumError(f"stored size {len(body)} != recorded {chunk.stored_size}: {where}")
    try:
        data = CodecChain(list(shard.codec)).decode(body, chunk.raw_size) if shard.codec else body
    except CodecError as exc:
        raise ChecksumError(f"cannot decode ({exc}): {where}") from exc
    if crc32c(data) != chunk.crc32c:
        raise ChecksumError(f"checksum mismatch: {where}")
    return data


class FetchSlots:
    """How many chunks all restores of one agent may hold at once: fetching, decoded, or not yet
    handed to their rank. A stream's own ``window`` bounds one restore; only this agent-wide
    count keeps restore memory at ``slots x chunk`` however many ranks restore at the same time."""

    def __init__(self, slots: int, timeout: float | None = None) -> None:
        self._free = threading.BoundedSemaphore(slots)
        self.slots = slots
        self.timeout = timeout

    def take(self, wait: bool) -> bool:
        """One slot; without ``wait``, False when none is free (with it, DeadlineError after ``timeout``)."""
        if not wait:
            return self._free.acquire(blocking=False)
        if not self._free.acquire(timeout=self.timeout):
            raise DeadlineError(f"all {self.slots} restore slots of the agent stayed taken for {self.timeout:.0f}s "
                                "(other restores are not reading their chunks)")
        return True

    def give(self) -> None:
        self._free.release()


def span_chunks(manifest: Manifest, spans: list[ShardSpan]) -> list[tuple[int, manifest_pb2.ShardRecord, manifest_pb2.ChunkRef]]:
    """(shard index, shard, chunk) of every chunk overlapping ``spans``, each once, in delivery order."""
    work, seen = [], set()
    for span in spans:
        shard = manifest.shards[span.shard]
        for chunk in shard.chunks:
            overlaps = chunk.raw_offset < span.stop and span.start < chunk.raw_offset + chunk.raw_size
            if overlaps and (span.shard, chunk.key) not in seen:
                seen.add((span.shard, chunk.key))
                work.append((span.shard, shard, chunk))
    return work


def fetch_spans(store: ObjectStore, manifest: Manifest, spans: list[ShardSpan], executor: Executor,
                cache: ChunkCache | None = None, window: int = 16, slots: FetchSlots | None = None) -> Iterator[DecodedChunk]:
    """Decoded chunks overlapping ``spans`` (each chunk once, in :func:`span_chunks` order), at
    most ``window`` fetches in flight, each holding one of ``slots`` until the caller asks for the next chunk."""
    work = span_chunks(manifest, spans)

    def fetch(shard: manifest_pb2.ShardRecord, chunk: manifest_pb2.ChunkRef) -> bytes | memoryview:
        if cache is None:
            return fetch_chunk(store, manifest, shard, chunk)
        return cache.get(chunk.key, lambda: fetch_chunk(store, manifest, shard, chunk))

    in_flight: list[tuple[int, int, Future]] = []
    position = 0
    try:
        while position < len(work) or in_flight:
            while position < len(work) and len(in_flight) < window:
                if slots is not None and not slots.take(wait=not in_flight):
                    break  # the agent's restores hold every slot: go on with the chunks this one has
                index, shard, chunk = work[position]
                in_flight.append((index, chunk.raw_offset, executor.submit(fetch, shard, chunk)))
                position += 1
            index, offset, future = in_flight.pop(0)
            try:
                yield DecodedChunk(index, offset, future.result())
            finally:
                if slots is not None:
                    slots.give()
    finally:  # failed or abandoned: drop what is still in flight
        for _, _, other in in_flight:
            other.cancel()
            if slots is not None:
                slots.give()
