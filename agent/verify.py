"""Verifying a committed checkpoint: re-read every object and check what the manifest promises.

A restore checks the chunks it reads; ``verify`` reads all of them, on purpose, to find
bit rot or a lost object before a restart needs it. Each chunk must exist with its
recorded stored size, decode with its shard's codec chain, match its CRC32C and, when the
manifest has one (incremental saves), its SHA-256; each shard's recorded digest must match
its chunk table. Objects shared with other checkpoints are read like any other.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from layervault.agent.checksum import crc32c
from layervault.agent.codecs import CodecChain, CodecError
from layervault.agent.incremental import DIGEST_ALGORITHM, chunk_digest, shard_digest
from layervault.agent.manifest import Manifest
from layervault.agent.storage import ObjectNotFound, ObjectStore, StorageError
from layervault.proto import manifest_pb2


@dataclasses.dataclass(frozen=True)
class BadObject:
    """One object (or shard record) that does not hold what the manifest says."""

    job: str
    kind: str
    step: int
    layer: str
    key: str
    problem: str

    def __str__(self) -> str:
        return f"{self.job}/{self.kind} step {self.step}, layer {self.layer!r}, object {self.key}: {self.problem}"


@dataclasses.dataclass
class VerifyResult:
    chunks: int = 0             # chunk objects read
    raw_bytes: int = 0          # decoded bytes checked
    bad: list[BadObject] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.bad


def _chunk_problem(store: ObjectStore, shard: manifest_pb2.ShardRecord, chunk: manifest_pb2.ChunkRef) -> str | None:
    try:
        body = store.get(chunk.key)
    except ObjectNotFound:
        return "missing"
    except StorageError as exc:
        return f"unreadable ({exc})"
    if len(body) != chunk.stored_size:
        return f"stored size {len(body)}, manifest says {chunk.stored_size}"
    try:
        data = CodecChain(list(shard.codec)).decode(body, chunk.raw_size) if shard.codec else body
    except CodecError as exc:
        return f"does not decode ({exc})"
    if crc32c(data) != chunk.crc32c:
        return "CRC32C mismatch"
    if chunk.digest and chunk_digest(data) != chunk.digest:
        return "SHA-256 mismatch"
    return None


def verify_checkpoint(store: ObjectStore, manifest: Manifest, workers: int = 8,
                      on_chunk: Callable[[int], None] | None = None) -> VerifyResult:
    """Read and check every chunk of ``manifest``; ``on_chunk(raw_size)`` after each one."""
    result = VerifyResult()

    def bad(shard: manifest_pb2.ShardRecord, key: str, problem: str) -> BadObject:
        return BadObject(manifest.job, manifest.kind, manifest.step, shard.name, key, problem)

    for shard in manifest.shards:
        if shard.digest_algorithm and shard.digest_algorithm != DIGEST_ALGORITHM:
            result.bad.append(bad(shard, "(shard record)", f"unknown digest algorithm {shard.digest_algorithm!r}"))
        elif shard.digest and shard_digest(shard.chunks) != shard.digest:
            result.bad.append(bad(shard, "(shard record)", "shard digest does not match its chunk table"))
    work = [(shard, chunk) for shard in manifest.shards for chunk in shard.chunks]
    with ThreadPoolExecutor(workers, thread_name_prefix="lv-verify") as pool:
        for (shard, chunk), problem in zip(work, pool.map(lambda sc: _chunk_problem(store, *sc), work)):
            result.chunks += 1
            result.raw_bytes += chunk.raw_size
            if problem is not None:
                result.bad.append(bad(shard, chunk.key, problem))
            if on_chunk is not None:
                on_chunk(chunk.raw_size)
    return result
