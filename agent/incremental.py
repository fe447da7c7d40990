"""Incremental checkpoints: chunks whose bytes did not change are referenced, not uploaded.

Frozen layers, embeddings and the base weights under LoRA adapters are the same bytes in
every checkpoint of a fine-tuning run. In incremental mode the agent hashes every chunk it
is about to upload (SHA-256 of the raw bytes, on the upload threads; hashlib releases the
GIL) and looks the chunk up in the **base**: the job's newest committed checkpoint of the
same kind, named by the coordinator when the attempt opens. A chunk is reused when the base
has a shard with the same name, dtype, global shape, offsets and local shape, written with
the same compressor setting, holding a chunk with the same byte range and digest. The new
shard record then names the base's object (its key stays under the older step) and nothing
is uploaded. A reused shard keeps the base's codec chain, so one shard never mixes chains.

Each incrementally written shard records ``digest_algorithm`` and ``digest`` (the
algorithm over its chunk table), so ``layervault diff`` and ``verify`` can compare and
check content without trusting CRCs alone. Manifests written without incremental mode have
neither and still read.

Objects shared this way are deleted only when no manifest refers to them
(:mod:`layervault.agent.lifecycle`). A base deleted while a save is in flight cannot slip
through: the coordinator refuses to delete the base of a pending attempt, and before the
manifest write it checks that the base is still committed (same attempt) and names every
object the new manifest borrows (:func:`check_borrowed`). A delete by another process (the
CLI with ``--storage``) between that check and the manifest write is the one window left.
"""

from __future__ import annotations

import hashlib
import logging
import struct
from typing import Iterable

from layervault.agent import keys
from layervault.agent.catalog import Catalog
from layervault.errors import NotFoundError, SaveFailedError
from layervault.proto import agent_pb2, manifest_pb2

log = logging.getLogger("layervault.agent")

DIGEST_ALGORITHM = "sha256-chunks/1"

ShardIdentity = tuple[str, str, tuple[int, ...], tuple[int, ...], tuple[int, ...]]


def chunk_digest(data: bytes | memoryview) -> bytes:
    """SHA-256 of a chunk's raw bytes (SHA-NI makes it ~2x faster than BLAKE2b here)."""
    return hashlib.sha256(data).digest()


def shard_digest(chunks: Iterable[manifest_pb2.ChunkRef]) -> bytes:
    """``sha256-chunks/1``: SHA-256 over (raw offset, raw size, chunk digest) of every chunk,
    in byte order. Equal digests mean equal bytes; shards of equal bytes cut into chunks
    differently get different digests (chunk boundaries follow the hand-off)."""
    h = hashlib.sha256()
    for chunk in sorted(chunks, key=lambda c: c.raw_offset):
        h.update(struct.pack("<qq", chunk.raw_offset, chunk.raw_size))
        h.update(chunk.digest)
    return h.digest()


def identity(name: str, layout: manifest_pb2.TensorLayout) -> ShardIdentity:
    return (name, layout.dtype, tuple(layout.global_shape), tuple(layout.offsets), tuple(layout.local_shape))


class ReuseIndex:
    """The chunks of a base checkpoint that new shards may reference, by shard identity."""

    def __init__(self, base: manifest_pb2.Manifest | None = None, compressor: str = "") -> None:
        self.base = base
        self._shards: dict[ShardIdentity, manifest_pb2.ShardRecord] = {}
        self._chunks: dict[ShardIdentity, dict[tuple[int, int], manifest_pb2.ChunkRef]] = {}
        if base is None or base.config.compressor != compressor:
            return  # another compressor setting: reusing would keep the old one's choice
        for shard in base.shards:
            if shard.digest_algorithm != DIGEST_ALGORITHM:
                continue
            ident = identity(shard.name, shard.layout)
            self._shards[ident] = shard
            self._chunks[ident] = {(c.raw_offset, c.raw_size): c for c in shard.chunks if c.digest}

    @property
    def label(self) -> str:
        return f"step {self.base.step} (attempt {self.base.save_id})" if self.base is not None else "none"

    def shard(self, spec: agent_pb2.EntrySpec) -> manifest_pb2.ShardRecord | None:
        """The base's shard with the same identity as ``spec``, if it has one."""
        return self._shards.get(identity(spec.name, spec.layout))

    def chunk(self, base_shard: manifest_pb2.ShardRecord, raw_offset: int, raw_size: int,
              digest: bytes) -> manifest_pb2.ChunkRef | None:
        """The base chunk holding exactly these bytes, or None (then the chunk is uploaded)."""
        found = self._chunks.get(identity(base_shard.name, base_shard.layout), {}).get((raw_offset, raw_size))
        return found if found is not None and found.digest == digest else None


def borrowed_keys(manifest: manifest_pb2.Manifest) -> set[str]:
    """Object keys the manifest refers to that lie outside its own step's folder."""
    own = keys.step_prefix(manifest.job, manifest.kind, manifest.step)
    return {c.key for s in manifest.shards for c in s.chunks if not c.key.startswith(own)}


def check_borrowed(manifest: manifest_pb2.Manifest, base: manifest_pb2.Manifest | None, label: str) -> None:
    """Commit guard: every borrowed object is named by the (still committed) base manifest.

    An object a committed manifest names is never deleted, so this proves they all exist
    without a request per object. Raises SaveFailedError naming the base and an object.
    """
    borrowed = borrowed_keys(manifest)
    if not borrowed:
        return
    if base is None:
        raise SaveFailedError(
            f"{label}: its base checkpoint was deleted while the incremental save was in flight "
            f"(e.g. {sorted(borrowed)[0]} may be gone); save again")
    named = {c.key for s in base.shards for c in s.chunks}
    missing = sorted(borrowed - named)
    if missing:
        raise SaveFailedError(
            f"{label}: {len(missing)} referenced objects are not named by base {base.job}/{base.kind} step "
            f"{base.step}, e.g. {missing[0]}; save again")


def load_base(catalog: Catalog, job: str, kind: str, step: int, save_id: str) -> manifest_pb2.Manifest | None:
    """The base checkpoint the coordinator named (None when it named none, or it is gone:
    then every chunk is uploaded, which is always correct)."""
    if not save_id:
        return None
    key = keys.manifest_key(job, kind, step)
    for _ in range(2):
        try:
            manifest = catalog.manifest(key)
        except NotFoundError:
            return None
        if manifest.save_id == save_id:
            return manifest
        catalog.forget(key)  # a cached copy of a since overwritten step: read it again
    log.warning("%s/%s: base step %d is no longer attempt %s; saving without reuse", job, kind, step, save_id)
    return None
