"""What ``Manager.checkpoints()`` returns: a plain, framework-free description."""

from __future__ import annotations

import dataclasses
from typing import Any

from layervault.agent.manifest import decode_keys
from layervault.proto import common_pb2


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    job: str
    kind: str
    step: int
    keys: dict[str, Any]
    name: str
    world_size: int
    entries: int
    raw_bytes: int
    stored_bytes: int
    committed_at: str

    @classmethod
    def from_info(cls, info: common_pb2.CheckpointInfo) -> "Checkpoint":
        return cls(info.id.job, info.id.kind, info.id.step, decode_keys(info.keys), info.config_name,
                   info.world_size, info.entries, info.raw_bytes, info.stored_bytes, info.committed_at)
