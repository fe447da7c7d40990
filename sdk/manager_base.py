"""What the ModelManager/OptimizerManager of every framework share.

The torch and TensorFlow managers differ only in how they turn tensors into bytes and back;
the config they record, how they find a checkpoint, what they list and how they report a
checkpoint that does not fit the target live here once.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Mapping

from layervault.agent.manifest import checkpoint_info, encode_keys
from layervault.checkpoint import Checkpoint
from layervault.client import AgentClient, agent_client
from layervault.config import ModelConfig, OptimizerConfig
from layervault.errors import IncompatibleStateError
from layervault.proto import manifest_pb2

log = logging.getLogger("layervault.sdk")

#: name -> (global shape, manifest dtype name)
Specs = Mapping[str, tuple[list[int], str]]


class ManagerBase:
    kind = ""
    framework = ""

    def __init__(self, config: ModelConfig | OptimizerConfig, agent: str | AgentClient | None = None,
                 shared_memory: bool | None = None) -> None:
        self.config = config
        self.client = agent_client(agent, shared_memory)

    def _config_proto(self) -> manifest_pb2.Config:
        return manifest_pb2.Config(name=self.config.name, framework=self.framework,
                                   additional=dict(self.config.additional), compressor=self.config.compressor)

    def _lifecycle_options(self) -> dict[str, Any]:
        """The config's incremental mode and retention policy, as ``AgentClient.save`` takes them."""
        retention = self.config.retention.to_proto() if self.config.retention is not None else None
        return {"incremental": self.config.incremental, "retention": retention}

    def _resolve(self, step: int | None, keys: Mapping[str, Any]) -> manifest_pb2.Manifest:
        selector = encode_keys(keys)
        if step is not None:
            selector["step"] = json.dumps(int(step))
        return self.client.resolve(self.config.job, self.kind, selector)

    def _resolve_optimizer(self, step: int | None, keys: Mapping[str, Any], optimizer: object,
                           marker: str, class_key: str) -> tuple[manifest_pb2.Manifest, str]:
        """The optimizer checkpoint and its label; refused unless this framework's manager wrote
        it (``marker`` in its extra) for the same optimizer class."""
        manifest = self._resolve(step, keys)
        label = f"{manifest.job}/{manifest.kind} step {manifest.step}"
        if marker not in manifest.extra:
            raise IncompatibleStateError(f"{label} was not saved by a {self.framework} OptimizerManager")
        saved_class = manifest.extra.get(class_key, "")
        if saved_class and saved_class != type(optimizer).__name__:
            raise IncompatibleStateError(
                f"{label} holds {saved_class} state, not {type(optimizer).__name__}; nothing was loaded")
        return manifest, label

    def checkpoints(self) -> list[Checkpoint]:
        """Committed checkpoints of this job and kind, oldest step first. A stored manifest
        that cannot be read is left out, with a warning naming it (``layervault ls`` exits 1)."""
        listing = self.client.listing(self.config.job, self.kind)
        for damaged in listing.damaged:
            log.warning("%s/%s step %d is damaged and left out: %s", damaged.id.job, damaged.id.kind,
                        damaged.id.step, damaged.problem)
        return [Checkpoint.from_info(info) for info in listing.checkpoints]


def summary(manifest: manifest_pb2.Manifest) -> Checkpoint:
    return Checkpoint.from_info(checkpoint_info(manifest, ""))


def stored_specs(manifest: manifest_pb2.Manifest) -> dict[str, tuple[list[int], str]]:
    return {s.name: ([int(d) for d in s.layout.global_shape], s.layout.dtype) for s in manifest.shards}


def check_compatible(label: str, stored: Specs, target: Specs) -> None:
    """Raise IncompatibleStateError listing every name, shape and dtype difference."""
    problems = []
    missing = sorted(set(target) - set(stored))
    unexpected = sorted(set(stored) - set(target))
    if missing:
        problems.append(f"not in the checkpoint: {', '.join(missing)}")
    if unexpected:
        problems.append(f"not in the target: {', '.join(unexpected)}")
    for name in sorted(set(target) & set(stored)):
        (shape, dtype), (want_shape, want_dtype) = stored[name], target[name]
        if list(shape) != list(want_shape):
            problems.append(f"{name}: shape {list(shape)} in the checkpoint, {list(want_shape)} in the target")
        if dtype != want_dtype:
            problems.append(f"{name}: dtype {dtype} in the checkpoint, {want_dtype} in the target")
    if problems:
        raise IncompatibleStateError(f"cannot load {label}; nothing was loaded: " + "; ".join(problems))
