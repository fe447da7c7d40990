"""Reading shards back: fetch chunk objects in parallel, verify, decode.

Only the chunks of the requested entries are fetched, so one layer costs one layer's
objects. Every chunk is checked against the CRC32C recorded in the manifest after decoding;
a mismatch (or bytes that do not decode) is a :class:`ChecksumError` naming job, step,
layer and object - never silently wrong weights.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import Executor, Future
from typing import Iterator

from layervault.agent.checksum import crc32c
from layervault.agent.codecs import CodecChain, CodecError
from layervault.agent.manifest import Manifest
from layervault.agent.storage import ObjectNotFound, ObjectStore
from layervault.errors import ChecksumError, NotFoundError
from layervault.proto import manifest_pb2


@dataclasses.dataclass(frozen=True)
class DecodedChunk:
    shard: int              # index into manifest.shards
    shard_offset: int
    data: bytes | memoryview


def select_shards(manifest: Manifest, names: list[str]) -> list[int]:
    """Indices of the shards holding ``names`` (all when empty); NOT_FOUND lists unknown names."""
    if not names:
        return list(range(len(manifest.shards)))
    wanted = set(names)
    found = [i for i, s in enumerate(manifest.shards) if s.name in wanted]
    missing = wanted - {manifest.shards[i].name for i in found}
    if missing:
        shown = ", ".join(repr(n) for n in sorted(missing)[:5])
        raise NotFoundError(f"{manifest.job}/{manifest.kind} step {manifest.step} has no layer {shown}")
    return found


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


def fetch_shards(store: ObjectStore, manifest: Manifest, shards: list[int], executor: Executor,
                 window: int = 16) -> Iterator[DecodedChunk]:
    """Decoded chunks of ``shards``, at most ``window`` fetches in flight; order not guaranteed."""
    work = [(i, manifest.shards[i], c) for i in shards for c in manifest.shards[i].chunks]
    in_flight: list[tuple[int, int, Future]] = []
    position = 0
    while position < len(work) or in_flight:
        while position < len(work) and len(in_flight) < window:
            index, shard, chunk = work[position]
            in_flight.append((index, chunk.raw_offset, executor.submit(fetch_chunk, store, manifest, shard, chunk)))
            position += 1
        index, offset, future = in_flight.pop(0)
        try:
            data = future.result()
        except BaseException:
            for _, _, other in in_flight:
                other.cancel()
            raise
        yield DecodedChunk(index, offset, data)
