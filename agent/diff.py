"""Comparing two checkpoints layer by layer: which layers are the same, changed, added or removed.

Content is compared without reading any object: by the shards' SHA-256 digests when both
manifests have them (incremental saves), else by the chunks' CRC32Cs. Shards cut into
chunks differently cannot be compared by chunk and count as changed; a 32-bit CRC match
is strong evidence, not proof (``how`` says which was used).
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

from layervault.agent.manifest import Manifest
from layervault.proto import manifest_pb2

STATUSES = ("same", "changed", "added", "removed")


@dataclasses.dataclass(frozen=True)
class LayerDiff:
    name: str
    status: str        # one of STATUSES
    how: str           # "sha256", "crc32c", "layout" (dtype/shape/sharding differ), or "" for added/removed


def _by_layer(manifest: Manifest) -> dict[str, list[manifest_pb2.ShardRecord]]:
    layers: dict[str, list[manifest_pb2.ShardRecord]] = {}
    for shard in manifest.shards:
        layers.setdefault(shard.name, []).append(shard)
    for shards in layers.values():
        shards.sort(key=lambda s: tuple(s.layout.offsets))
    return layers


def _layout(shards: Iterable[manifest_pb2.ShardRecord]) -> list[tuple]:
    return [(s.layout.dtype, tuple(s.layout.global_shape), tuple(s.layout.offsets), tuple(s.layout.local_shape))
            for s in shards]


def _compare(old: list[manifest_pb2.ShardRecord], new: list[manifest_pb2.ShardRecord]) -> tuple[str, str]:
    if _layout(old) != _layout(new):
        return "changed", "layout"
    if all(a.digest and a.digest_algorithm == b.digest_algorithm and b.digest for a, b in zip(old, new)):
        return ("same" if all(a.digest == b.digest for a, b in zip(old, new)) else "changed"), "sha256"
    table = lambda s: [(c.raw_offset, c.raw_size, c.crc32c) for c in sorted(s.chunks, key=lambda c: c.raw_offset)]  # noqa: E731
    same = all(table(a) == table(b) for a, b in zip(old, new))
    return ("same" if same else "changed"), "crc32c"


def diff_manifests(old: Manifest, new: Manifest) -> list[LayerDiff]:
    """Per layer name (sorted): how ``new`` differs from ``old``."""
    a, b = _by_layer(old), _by_layer(new)
    out = []
    for name in sorted(a.keys() | b.keys()):
        if name not in b:
            out.append(LayerDiff(name, "removed", ""))
        elif name not in a:
            out.append(LayerDiff(name, "added", ""))
        else:
            out.append(LayerDiff(name, *_compare(a[name], b[name])))
    return out
