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
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{source}: not valid JSON ({exc})") from exc
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
    """Structural checks a reader relies on: every shard's chunks tile its raw bytes."""
    if manifest.world_size < 1:
        raise ManifestError(f"{source}: world_size must be >= 1")
    for shard in manifest.shards:
        position = 0
        for chunk in shard.chunks:
            if chunk.raw_offset != position or chunk.raw_size < 0 or chunk.stored_size < 0:
                raise ManifestError(f"{source}: layer {shard.name!r}: chunks do not tile its bytes")
            position += chunk.raw_size
        if position != shard.raw_bytes:
            raise ManifestError(f"{source}: layer {shard.name!r}: chunks hold {position} bytes, expected {shard.raw_bytes}")


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
