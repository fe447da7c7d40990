"""torch.distributed.checkpoint (DCP) with layervault as its storage layer.

    dcp.save(state_dict, storage_writer=AgentStorageWriter(job="run-42", step=200))
    dcp.load(state_dict, storage_reader=AgentStorageReader(job="run-42"))            # latest
    dcp.load(state_dict, storage_reader=AgentStorageReader(job="run-42", step=200))

DCP call order and what each step does here (see ``torch/distributed/checkpoint/storage.py``):

Save - (all ranks) ``set_up_storage_writer``, ``prepare_local_plan``; (coordinator)
``prepare_global_plan`` names the save's incarnation (:mod:`layervault.incarnation`: the
launcher's, else a fresh id) in every rank's plan, so a save after a restart replaces an
attempt the dead run left open; (all ranks) ``write_data``: every item (tensor shard or DCP's
serialized bytes) becomes one entry of this rank's save, handed to the node agent like any
other (shared memory on the same node); the save is opened with ``needs_seal``, so it cannot
commit yet. (coordinator) ``finish``: DCP's metadata that storage cannot derive (tensor
properties, which items are bytes, the planner's key mappings) is sent as a seal; the
coordinator then writes the one layervault manifest and ``finish`` returns once it is
committed. There is no second metadata file: shard layouts come from the manifest.

Load - ``read_metadata`` rebuilds DCP's ``Metadata`` from the manifest; ``read_data`` asks
the agent for only the byte ranges of the shards this rank's plan reads (whole chunks
overlapping them are fetched, at most a few MiB beyond), then narrows and copies into the
planner's tensors (a read item that covers a whole shard receives its bytes in place, with
no intermediate buffer; as with DCP's own readers, a load that fails midway may leave
targets partly written). Loading at another world size (resharding) is DCP's planning; the
bytes come from here.

Non-tensor items (ints, strings, lr-scheduler state...) are DCP's own ``torch.save`` bytes,
stored as uint8 entries and handed back to DCP's planner; layervault's own load paths never
unpickle anything.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import uuid
from typing import Any

import torch
from torch.futures import Future
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, SavePlan, SavePlanner, WriteItemType
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult

from layervault.agent.manifest import encode_keys
from layervault.client import AgentClient, CheckpointRef, SaveEntry, SaveHandle, agent_client
from layervault.errors import InvalidArgumentError, ManifestError
from layervault.incarnation import from_environment, fresh
from layervault.proto import manifest_pb2
from layervault.dtypes import itemsize_of as itemsize
from layervault.torch.dtypes import dtype_name, torch_dtype
from layervault.torch.managers import rank_and_world
from layervault.torch.tensors import TensorSink, TensorSource

DCP_METADATA = "torch.dcp.metadata"
SCHEME = "layervault://"


def parse_checkpoint_id(checkpoint_id: str | os.PathLike) -> tuple[str, str, int | None]:
    """``layervault://JOB[/KIND][/STEP]`` -> (job, kind, step or None)."""
    text = str(checkpoint_id)
    if not text.startswith(SCHEME):
        raise InvalidArgumentError(f"not a layervault checkpoint id: {text!r} (expected {SCHEME}JOB[/KIND][/STEP])")
    parts = [p for p in text[len(SCHEME):].split("/") if p]
    if not 1 <= len(parts) <= 3:
        raise InvalidArgumentError(f"bad layervault checkpoint id {text!r}")
    job, kind, step = parts[0], "model", None
    for part in parts[1:]:
        if part.isdigit():
            step = int(part)
        else:
            kind = part
    return job, kind, step


def _valid_id(checkpoint_id: str | os.PathLike) -> bool:
    try:
        parse_checkpoint_id(checkpoint_id)
        return True
    except InvalidArgumentError:
        return False


class AgentStorageWriter(StorageWriter):
    """DCP StorageWriter that saves through the node's layervault agent."""

    def __init__(self, job: str, step: int | None = None, kind: str = "model", name: str = "dcp",
                 agent: str | AgentClient | None = None, shared_memory: bool | None = None, overwrite: bool = False,
                 compressor: str = "lz4", additional: dict[str, str] | None = None, keys: dict[str, Any] | None = None,
                 timeout: float = 600.0) -> None:
        from layervault.config import ModelConfig

        ModelConfig(job=job, name=name, additional=additional or {}, compressor=compressor)  # validates
        self.job, self.kind, self.step = job, kind, step
        self.config = manifest_pb2.Config(name=name, framework="torch.distributed.checkpoint",
                                          additional=additional or {}, compressor=compressor)
        self.keys = encode_keys(keys or {})
        self.overwrite, self.timeout = overwrite, timeout
        self.client = agent_client(agent, shared_memory)
        self._handle: SaveHandle | None = None
        self.save_id = uuid.uuid4().hex

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if checkpoint_id:
            self.job, self.kind, step = parse_checkpoint_id(checkpoint_id)
            self.step = step if step is not None else self.step
        self._handle = None
        self.save_id = uuid.uuid4().hex

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return _valid_id(checkpoint_id)

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        if self.step is None:
            raise InvalidArgumentError("AgentStorageWriter needs a step: AgentStorageWriter(job, step=N)")
        self.is_coordinator = is_coordinator

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=f"{SCHEME}{self.job}/{self.kind}/{self.step}", save_id=self.save_id)

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        run = _Incarnation(from_environment() or fresh())
        return [dataclasses.replace(plan, storage_data=run) for plan in plans]

    def _ref(self) -> CheckpointRef:
        return CheckpointRef(self.job, self.kind, int(self.step))  # type: ignore[arg-type]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        entries, results = [], []
        for item in plan.items:
            data = planner.resolve_data(item)
            if item.type == WriteItemType.BYTE_IO:
                raw = data.getvalue() if isinstance(data, io.BytesIO) else bytes(data)
                tensor = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
                layout = manifest_pb2.TensorLayout(dtype="uint8", global_shape=[len(raw)], offsets=[0], local_shape=[len(raw)])
            else:
                tensor = data
                td = item.tensor_data
                layout = manifest_pb2.TensorLayout(dtype=dtype_name(td.properties.dtype), global_shape=list(td.size),
                                                   offsets=list(td.chunk.offsets), local_shape=list(td.chunk.sizes))
            source = TensorSource(tensor)
            entries.append(SaveEntry(item.index.fqn, layout, source))
            results.append(WriteResult(index=item.index, size_in_bytes=source.nbytes, storage_data=None))
        rank, world_size = rank_and_world()
        run = plan.storage_data.id if isinstance(plan.storage_data, _Incarnation) else from_environment()
        self._handle = self.client.save(self._ref(), rank, world_size, self.config, self.keys, {}, entries,
                                        overwrite=self.overwrite, needs_seal=True, incarnation=run)
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """Seal the save with DCP's metadata and return once the checkpoint is committed."""
        _, world_size = rank_and_world()
        self.client.seal(self._ref(), world_size, self.keys, {DCP_METADATA: encode_dcp_metadata(metadata)})
        if self._handle is None:
            raise InvalidArgumentError("finish() without write_data() on the coordinator rank")
        self._handle.wait(self.timeout)


@dataclasses.dataclass(frozen=True)
class _Incarnation:
    """SavePlan.storage_data: the save's incarnation, chosen once by the coordinator rank."""

    id: str


def encode_dcp_metadata(metadata: Metadata) -> str:
    """What DCP needs back that the manifest's shard records do not already say."""
    tensors, byte_items = {}, []
    for fqn, md in metadata.state_dict_metadata.items():
        if isinstance(md, BytesStorageMetadata):
            byte_items.append(fqn)
        else:
            props = md.properties
            tensors[fqn] = {"requires_grad": props.requires_grad, "pin_memory": props.pin_memory,
                            "channels_last": props.memory_format == torch.channels_last}
    planner_data = metadata.planner_data
    if planner_data is not None:
        try:
            planner_data = {k: list(v) for k, v in planner_data.items()}
            json.dumps(planner_data)
        except (AttributeError, TypeError) as exc:
            raise InvalidArgumentError(f"this planner's planner_data cannot be stored as JSON ({exc})") from exc
    return json.dumps({"format": 1, "version": metadata.version, "tensors": tensors, "bytes": byte_items,
                       "planner_data": planner_data})


@dataclasses.dataclass(frozen=True)
class _Located:
    """Metadata.storage_data: which manifest, and each item's shard index in it."""

    job: str
    kind: str
    step: int
    save_id: str
    shards: dict[MetadataIndex, int]


def decode_dcp_metadata(manifest: manifest_pb2.Manifest) -> Metadata:
    doc = json.loads(manifest.extra.get(DCP_METADATA, "{}"))
    if doc and doc.get("format") != 1:
        raise ManifestError(f"{manifest.job}/{manifest.kind} step {manifest.step}: unknown DCP metadata format {doc.get('format')!r}")
    byte_items = set(doc.get("bytes", []))
    props = doc.get("tensors", {})
    state: dict[str, Any] = {}
    shards: dict[MetadataIndex, int] = {}
    for index, shard in enumerate(manifest.shards):
        if shard.name in byte_items:
            state[shard.name] = BytesStorageMetadata()
            shards[MetadataIndex(shard.name)] = index
            continue
        layout = shard.layout
        p = props.get(shard.name, {})
        md = state.get(shard.name)
        if md is None:
            md = state[shard.name] = TensorStorageMetadata(
                TensorProperties(dtype=torch_dtype(layout.dtype), requires_grad=p.get("requires_grad", False),
                                 memory_format=torch.channels_last if p.get("channels_last") else torch.contiguous_format,
                                 pin_memory=p.get("pin_memory", False)),
                torch.Size(layout.global_shape), [])
        md.chunks.append(ChunkStorageMetadata(offsets=torch.Size(layout.offsets), sizes=torch.Size(layout.local_shape)))
        shards[MetadataIndex(shard.name, list(layout.offsets))] = index
    planner_data = doc.get("planner_data")
    if planner_data is not None:
        planner_data = {k: tuple(v) for k, v in planner_data.items()}
    located = _Located(manifest.job, manifest.kind, manifest.step, manifest.save_id, shards)
    return Metadata(state_dict_metadata=state, planner_data=planner_data, storage_data=located,
                    storage_meta=StorageMeta(checkpoint_id=f"{SCHEME}{manifest.job}/{manifest.kind}/{manifest.step}"),
                    version=doc.get("version"))


def _byte_span(layout: manifest_pb2.TensorLayout, offsets: list[int], lengths: list[int]) -> tuple[int, int]:
    """Smallest byte range of a row-major shard that holds the hypercube at ``offsets`` of ``lengths``."""
    shape = list(layout.local_shape)
    if any(n == 0 for n in lengths) or not shape:
        return (0, itemsize(layout.dtype) if not shape else 0)
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= n
    strides.reverse()
    first = sum(o * s for o, s in zip(offsets, strides))
    last = sum((o + n - 1) * s for o, n, s in zip(offsets, lengths, strides))
    size = itemsize(layout.dtype)
    return first * size, (last + 1) * size


class AgentStorageReader(StorageReader):
    """DCP StorageReader that loads through the node's layervault agent."""

    def __init__(self, job: str, step: int | None = None, kind: str = "model", agent: str | AgentClient | None = None,
                 shared_memory: bool | None = None, **keys: Any) -> None:
        self.job, self.kind, self.step, self.keys = job, kind, step, keys
        self.client = agent_client(agent, shared_memory)
        self._manifest: manifest_pb2.Manifest | None = None
        self._located: _Located | None = None
        self.bytes_received = 0

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if checkpoint_id:
            self.job, self.kind, step = parse_checkpoint_id(checkpoint_id)
            self.step = step if step is not None else self.step
        self._manifest = None

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return _valid_id(checkpoint_id)

    def _resolve(self, selector: dict[str, str]) -> manifest_pb2.Manifest:
        return self.client.resolve(self.job, self.kind, selector)

    def read_metadata(self) -> Metadata:
        selector = encode_keys(self.keys)
        if self.step is not None:
            selector["step"] = json.dumps(int(self.step))
        self._manifest = self._resolve(selector)
        return decode_dcp_metadata(self._manifest)

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        located = metadata.storage_data
        if not isinstance(located, _Located):
            raise InvalidArgumentError("metadata was not read by an AgentStorageReader")
        if self._manifest is None or self._manifest.save_id != located.save_id:
            self._manifest = self._resolve({"step": json.dumps(located.step)})
            if self._manifest.save_id != located.save_id:
                raise InvalidArgumentError(f"{located.job}/{located.kind} step {located.step} was overwritten while loading")
        self._located = located

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        manifest, located = self._manifest, self._located
        assert manifest is not None and located is not None, "set_up_storage_reader() was not called"
        readers: dict[int, list] = {}
        for item in plan.items:
            readers.setdefault(located.shards[item.storage_index], []).append(item)
        sinks: dict[int, TensorSink] = {}
        direct: dict[int, torch.Tensor] = {}  # shard -> planner tensor its bytes go straight into
        ranges = []
        for index, items in readers.items():
            shard = manifest.shards[index]
            item = items[0]
            if len(items) == 1 and item.type == LoadItemType.TENSOR and list(item.lengths) == list(shard.layout.local_shape):
                target = planner.resolve_tensor(item).detach()
                if TensorSink.fits(shard.layout, target):
                    direct[index] = target
            sinks[index] = TensorSink(shard.layout, into=direct.get(index))
            for item in items:
                if item.type == LoadItemType.BYTE_IO:
                    ranges.append((index, 0, shard.raw_bytes))
                else:
                    ranges.append((index, *_byte_span(shard.layout, list(item.storage_offsets), list(item.lengths))))
        if ranges:  # (an empty request would mean "everything")
            self.client.restore(manifest, [], sinks, ranges=ranges)
        self.bytes_received += sum(sink.received for sink in sinks.values())
        for index, items in readers.items():
            shard_tensor = sinks[index].tensor
            for item in items:
                if item.type == LoadItemType.BYTE_IO:
                    planner.load_bytes(item, io.BytesIO(shard_tensor.numpy().tobytes()))
                elif index in direct:
                    planner.commit_tensor(item, direct[index])  # already in place
                else:
                    target = planner.resolve_tensor(item).detach()
                    target.copy_(narrow_tensor_by_index(shard_tensor, item.storage_offsets, item.lengths))
                    planner.commit_tensor(item, target)
        future: Future[None] = Future()
        future.set_result(None)
        return future


__all__ = ["AgentStorageWriter", "AgentStorageReader", "parse_checkpoint_id"]
