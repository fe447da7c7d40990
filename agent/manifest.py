"""The manifest format: the schema is ``proto/manifest.proto``, the encoding its JSON mapping.

JSON keeps a checkpoint readable by people and by any language; the proto schema keeps one
definition for the wire and for storage. ``format_version`` guards compatibility: a reader
refuses a version it does not know rather than guess. Nothing here is ever pickled.

Training keys (step, epoch, loss, ...) are stored as JSON scalars in a string map, so
``epoch=3`` is ``{"epoch": "3"}`` and matching is exact on the canonical JSON text.
"""

from __future__ import annotations

import datetime
import json
from typing import Any, Mapping

from google.protobuf import json_format

from layervault.agent import keys as key_rules
from layervault.agent.codecs import CodecChain
from layervault.agent.storage.base import check_key
from layervault.dtypes import ITEMSIZE
from layervault.errors import InvalidArgumentError, ManifestError
from layervault.proto import common_pb2, manifest_pb2

FORMAT_VERSION = 1
Manifest = manifest_pb2.Manifest


def encode_key_value(name: str, value: Any) -> str:
    """Canonical JSON text of one training key value (int, float, str or bool)."""
    if isinstance(value, bool) or isinstance(value, (int, str)):
        return json.dumps(value)
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise InvalidArgumentError(f"training key {name!r} must be finite, got {value!r}")
        return json.dumps(int(value)) if value.is_integer() else repr(value)
    if hasattr(value, "item"):  # numpy / torch scalars
        return encode_key_value(name, value.item())
    raise InvalidArgumentError(f"training key {name!r} must be an int, float, str or bool, got {type(value).__name__}")


def encode_keys(keys: Mapping[str, Any]) -> dict[str, str]:
    out = {}
    for name, value in keys.items():
        if not isinstance(name, str) or not name:
            raise InvalidArgumentError(f"training key names must be non-empty strings, got {name!r}")
        out[name] = encode_key_value(name, value)
    return out


def check_json_map(values: Mapping[str, str], what: str, scalars: bool = True) -> None:
    """Refuse a map of JSON texts (training keys: JSON ``scalars``) that a reader could not parse."""
    for name, text in values.items():
        if not name:
            raise InvalidArgumentError(f"{what} names must be non-empty")
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):
            raise InvalidArgumentError(f"{what} {name!r} is not JSON text: {text[:80]!r}") from None
        if scalars and (value is None or isinstance(value, (list, dict)) or value != value
                        or value in (float("inf"), float("-inf"))):
            raise InvalidArgumentError(f"{what} {name!r} must be a finite JSON number, string or boolean, got {text[:80]!r}")


def decode_keys(keys: Mapping[str, str]) -> dict[str, Any]:
    return {name: json.loads(text) for name, text in keys.items()}


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def encode_manifest(manifest: Manifest) -> bytes:
    return json_format.MessageToJson(manifest, preserving_proto_field_name=True, indent=1, sort_keys=True).encode()


def decode_manifest(data: bytes, source: str = "manifest") -> Manifest:
    """Parse and validate a stored manifest; ManifestError says what is wrong and where."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as exc:  # RecursionError: absurdly nested arrays or objects
        raise ManifestError(f"{source}: not valid JSON ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(doc, dict):
        raise ManifestError(f"{source}: expected a JSON object")
    version = doc.get("format_version")
    if version != FORMAT_VERSION:
        raise ManifestError(f"{source}: unsupported manifest format_version {version!r} (this reader knows {FORMAT_VERSION})")
    manifest = Manifest()
    try:
        json_format.ParseDict(doc, manifest, ignore_unknown_fields=False)
    except json_format.ParseError as exc:
        raise ManifestError(f"{source}: {exc}") from exc
    validate_manifest(manifest, source)
    return manifest


def validate_manifest(manifest: Manifest, source: str = "manifest") -> None:
    """Structural checks a reader relies on, so a damaged or hostile manifest is refused here,
    naming what is wrong, and never reaches a reader as a crash or a read outside its job.

    Identity (valid job, kind and step), training keys that parse as JSON scalars,
    per shard: a rank inside the world, a known dtype, a layout whose byte count is its raw
    size, codecs this reader knows, chunk keys below the job's folder, and chunks that tile
    the raw bytes.
    """
    try:
        key_rules.check_job(manifest.job)
        key_rules.check_kind(manifest.kind)
        key_rules.check_step(manifest.step)
        check_json_map(manifest.keys, "training key")
    except InvalidArgumentError as exc:
        raise ManifestError(f"{source}: {exc}") from None
    if manifest.world_size < 1:
        raise ManifestError(f"{source}: world_size must be >= 1")
    job_folder = f"{manifest.job}/"
    for shard in manifest.shards:
        where = f"{source}: layer {shard.name!r} (rank {shard.rank})"
        if not 0 <= shard.rank < manifest.world_size:
            raise ManifestError(f"{where}: rank is not within world size {manifest.world_size}")
        _check_layout(shard, where)
        try:
            CodecChain(list(shard.codec))
        except ValueError as exc:
            raise ManifestError(f"{where}: {exc}") from None
        for chunk in shard.chunks:
            if not chunk.key.startswith(job_folder) or not _safe_key(chunk.key):
                raise ManifestError(f"{where}: chunk key {chunk.key!r} is not an object of job {manifest.job!r}")
        position = 0
        for chunk in shard.chunks:
            if chunk.raw_offset != position or chunk.raw_size < 0 or chunk.stored_size < 0:
                raise ManifestError(f"{source}: layer {shard.name!r}: chunks do not tile its bytes")
            position += chunk.raw_size
        if position != shard.raw_bytes:
            raise ManifestError(f"{source}: layer {shard.name!r}: chunks hold {position} bytes, expected {shard.raw_bytes}")


def _check_layout(shard: manifest_pb2.ShardRecord, where: str) -> None:
    layout = shard.layout
    if layout.dtype not in ITEMSIZE:
        raise ManifestError(f"{where}: unknown dtype {layout.dtype!r}")
    shape, offsets, full = list(layout.local_shape), list(layout.offsets), list(layout.global_shape)
    if not len(shape) == len(offsets) == len(full) or any(
            d < 0 or o < 0 or o + d > g for d, o, g in zip(shape, offsets, full)):
        raise ManifestError(f"{where}: shard {shape} at {offsets} does not fit in global shape {full}")
    nbytes = ITEMSIZE[layout.dtype]
    for d in shape:
        nbytes *= d
    if nbytes != shard.raw_bytes or shard.stored_bytes < 0:
        raise ManifestError(f"{where}: {layout.dtype}{shape} holds {nbytes} bytes, but the record says {shard.raw_bytes}")


def _safe_key(key: str) -> bool:
    try:
        check_key(key)
        return True
    except ValueError:
        return False


def checkpoint_info(manifest: Manifest, manifest_key: str) -> common_pb2.CheckpointInfo:
    return common_pb2.CheckpointInfo(
        id=common_pb2.CheckpointId(job=manifest.job, kind=manifest.kind, step=manifest.step),
        keys=dict(manifest.keys),
        config_name=manifest.config.name,
        world_size=manifest.world_size,
        raw_bytes=sum(s.raw_bytes for s in manifest.shards),
        stored_bytes=sum(s.stored_bytes for s in manifest.shards),
        entries=len({s.name for s in manifest.shards}),
        committed_at=manifest.committed_at,
        manifest_key=manifest_key,
        save_id=manifest.save_id,
    )


def matches(keys: Mapping[str, str], selector: Mapping[str, str]) -> bool:
    return all(keys.get(name) == value for name, value in selector.items())
