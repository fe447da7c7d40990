"""ModelManager and OptimizerManager for PyTorch ranks.

Rank and world size come from ``torch.distributed`` when it is initialised. Plain tensors
are taken to be replicated across ranks (DDP): each is stored once, by the rank
:func:`~layervault.placement.assign_owners` picks. Loading validates every name,
shape and dtype against the manifest and fetches everything before touching the target,
so a failed load changes nothing.

Create managers on every rank, at the same point: with torch.distributed initialised and
no launcher-given incarnation, construction is a collective (rank 0 broadcasts this run's
incarnation, :mod:`layervault.torch.incarnation`).
"""

from __future__ import annotations

import collections
import json
from typing import Any, Mapping

import torch
from torch.distributed._shard._utils import narrow_tensor_by_index

from layervault.agent.manifest import encode_keys
from layervault.arrays import group_shards, is_whole
from layervault.checkpoint import Checkpoint
from layervault.client import AgentClient, CheckpointRef, SaveEntry, SaveHandle
from layervault.config import ModelConfig, OptimizerConfig
from layervault.manager_base import ManagerBase, stored_specs, summary
from layervault.manager_base import check_compatible as check_specs
from layervault.errors import IncompatibleStateError, InvalidArgumentError, NotFoundError
from layervault.proto import manifest_pb2
from layervault.torch.dtypes import dtype_name
from layervault.torch.incarnation import job_incarnation
from layervault.placement import assign_owners
from layervault.torch.tensors import TensorSink, TensorSource, check_savable, whole_layout

StateDict = Mapping[str, torch.Tensor]


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) from torch.distributed; (0, 1) when it is not initialised."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _Manager(ManagerBase):
    framework = "torch"

    def __init__(self, config: ModelConfig | OptimizerConfig, agent: str | AgentClient | None = None,
                 shared_memory: bool | None = None) -> None:
        super().__init__(config, agent, shared_memory)
        #: This run of the job, the same on all ranks: a restarted job's saves replace the
        #: attempt its dead predecessor left open instead of joining it.
        self.incarnation = job_incarnation()

    def _save(self, tensors: StateDict, step: int, keys: Mapping[str, Any], extra: Mapping[str, str],
              overwrite: bool, background: bool) -> SaveHandle:
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise InvalidArgumentError(f"step must be a non-negative int, got {step!r}")
        if "step" in keys:
            raise InvalidArgumentError("pass the step as save(..., step=N), not as a training key")
        rank, world_size = rank_and_world()
        for name, tensor in tensors.items():  # on every rank, whichever stores the tensor: the same error everywhere
            if not isinstance(tensor, torch.Tensor):
                raise InvalidArgumentError(f"{name!r} is a {type(tensor).__name__}, not a tensor")
            check_savable(tensor, name)
        owners = assign_owners({n: t.numel() * t.element_size() for n, t in tensors.items()}, world_size)
        mine = [SaveEntry(n, whole_layout(t), TensorSource(t)) for n, t in tensors.items() if owners[n] == rank]
        ref = CheckpointRef(self.config.job, self.kind, step)
        return self.client.save(ref, rank, world_size, self._config_proto(), encode_keys(keys), extra, mine, overwrite,
                                incarnation=self.incarnation, background=background, **self._lifecycle_options())

    def _fetch(self, manifest: manifest_pb2.Manifest, names: list[str],
               into: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Whole tensors for ``names``; sharded entries (saved through DCP) are reassembled.

        ``into``: tensors to restore straight into where they fit (CPU, contiguous, same shape
        and dtype); nothing is written into them unless every chunk arrived verified."""
        wanted = set(names)
        shards_of = collections.Counter(s.name for s in manifest.shards)
        sinks, in_place = {}, False
        for i, s in enumerate(manifest.shards):
            if s.name in wanted:
                target = into.get(s.name) if into is not None and shards_of[s.name] == 1 else None
                fits = target is not None and TensorSink.fits(s.layout, target)  # (fits() checks the shape)
                sinks[i] = TensorSink(s.layout, into=target if fits else None)
                in_place = in_place or fits
        self.client.restore(manifest, names, sinks, hold=in_place)
        out = {}
        for name, indices in group_shards(manifest, sinks).items():
            if is_whole(manifest, indices):
                out[name] = sinks[indices[0]].tensor
                continue
            whole = torch.empty(tuple(manifest.shards[indices[0]].layout.global_shape), dtype=sinks[indices[0]].tensor.dtype)
            for index in indices:
                layout = manifest.shards[index].layout
                narrow_tensor_by_index(whole, list(layout.offsets), list(layout.local_shape)).copy_(sinks[index].tensor)
            out[name] = whole
        return out

    def load_layer(self, name: str, step: int | None = None, **keys: Any) -> torch.Tensor:
        """One layer of a checkpoint (latest committed unless step/keys select another)."""
        manifest = self._resolve(step, keys)
        return self._fetch(manifest, [name])[name]


class ModelManager(_Manager):
    """Save and load a model's state through the node agent."""

    kind = "model"

    def __init__(self, config: ModelConfig, agent: str | AgentClient | None = None, shared_memory: bool | None = None) -> None:
        if not isinstance(config, ModelConfig):
            raise InvalidArgumentError("ModelManager needs a layervault.ModelConfig")
        super().__init__(config, agent, shared_memory)

    def save(self, model: torch.nn.Module | StateDict, step: int, overwrite: bool = False, background: bool = False,
             **keys: Any) -> SaveHandle:
        """Hand the state to the agent; returns once the bytes are staged. ``.wait()`` for the commit.

        ``background=True`` returns at once and stages on a thread: forward and backward may
        run meanwhile (a module's buffers are snapshotted first), but call ``wait_staged()`` on
        the handle before the optimizer changes the weights (a save whose tensors changed while
        staging fails, it never commits torn state).
        """
        state = model.state_dict() if isinstance(model, torch.nn.Module) else model
        if background and isinstance(model, torch.nn.Module):
            # Buffers (BatchNorm's running statistics) change in the forward pass the staging
            # overlaps; they are small, so they are snapshotted now and only parameters wait.
            buffers = {name for name, _ in model.named_buffers()}
            state = {n: t.detach().clone() if n in buffers else t for n, t in state.items()}
        return self._save(state, step, keys, {}, overwrite, background)

    def load(self, model: torch.nn.Module | StateDict, step: int | None = None, **keys: Any) -> Checkpoint:
        """Load the latest committed checkpoint, or the one with ``step``/``keys``, in place."""
        target = model.state_dict() if isinstance(model, torch.nn.Module) else model
        manifest = self._resolve(step, keys)
        check_compatible(manifest, {n: t for n, t in target.items()})
        loaded = self._fetch(manifest, list(target), into=target)
        with torch.no_grad():
            for name, tensor in target.items():
                if loaded[name].data_ptr() != tensor.data_ptr():  # restored elsewhere (GPU, sharded, ...): copy
                    tensor.copy_(loaded[name])
        return summary(manifest)


def check_compatible(manifest: manifest_pb2.Manifest, target: Mapping[str, torch.Tensor]) -> None:
    """Raise IncompatibleStateError listing every name, shape and dtype difference."""
    check_specs(f"{manifest.job}/{manifest.kind} step {manifest.step}", stored_specs(manifest),
                {name: (list(t.shape), dtype_name(t.dtype)) for name, t in target.items()})


# -- optimizer ------------------------------------------------------------------------------------

_GROUPS = "torch.optimizer.param_groups"
_SCALARS = "torch.optimizer.scalar_state"
_CLASS = "torch.optimizer.class"


def _encode_value(where: str, value: Any) -> Any:
    """Optimizer hyper-parameters as JSON (never pickle): tuples and 0-d tensors are tagged."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple):
        return {"__tuple__": [_encode_value(where, v) for v in value]}
    if isinstance(value, list):
        return [_encode_value(where, v) for v in value]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return {"__tensor__": value.item(), "dtype": dtype_name(value.dtype), "shape": list(value.shape)}
    raise InvalidArgumentError(f"optimizer value {where} of type {type(value).__name__} cannot be stored as JSON")


def _decode_value(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode_value(v) for v in value]
    if isinstance(value, dict) and "__tuple__" in value:
        return tuple(_decode_value(v) for v in value["__tuple__"])
    if isinstance(value, dict) and "__tensor__" in value:
        from layervault.torch.dtypes import torch_dtype

        return torch.tensor(value["__tensor__"], dtype=torch_dtype(value["dtype"])).reshape(value["shape"])
    return value


def _param_names(optimizer: torch.optim.Optimizer, model: torch.nn.Module | None) -> list[str]:
    params = [p for group in optimizer.param_groups for p in group["params"]]
    by_id = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
    names = [by_id.get(id(p), f"param{i}") for i, p in enumerate(params)]
    if len(set(names)) != len(names):
        raise InvalidArgumentError("optimizer parameters do not have unique names")
    return names


def _optimizer_step(state: Mapping[int, Mapping[str, Any]]) -> int:
    steps = [v.item() if isinstance(v, torch.Tensor) else v for s in state.values() for k, v in s.items() if k == "step"]
    if not steps:
        raise InvalidArgumentError("the optimizer has no step in its state yet (it never stepped); pass step=N")
    return int(max(steps))


class OptimizerManager(_Manager):
    """Save and load an optimizer's hyper-parameters and per-parameter state.

    Pass ``model=`` to key the state by the model's parameter names (``"fc.weight/exp_avg"``);
    otherwise parameters are named by position (``"param0/exp_avg"``).
    """

    kind = "optimizer"

    def __init__(self, config: OptimizerConfig, agent: str | AgentClient | None = None, shared_memory: bool | None = None) -> None:
        if not isinstance(config, OptimizerConfig):
            raise InvalidArgumentError("OptimizerManager needs a layervault.OptimizerConfig")
        super().__init__(config, agent, shared_memory)

    def save(self, optimizer: torch.optim.Optimizer, step: int | None = None, model: torch.nn.Module | None = None,
             overwrite: bool = False, background: bool = False, **keys: Any) -> SaveHandle:
        """Hand the optimizer's state to the agent (``background`` as for :meth:`ModelManager.save`)."""
        state_dict = optimizer.state_dict()
        names = _param_names(optimizer, model)
        if step is None:
            step = _optimizer_step(state_dict["state"])
        tensors: dict[str, torch.Tensor] = {}
        scalars: dict[str, dict[str, Any]] = {}
        for index, param_state in state_dict["state"].items():
            for key, value in param_state.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{names[index]}/{key}"] = value
                else:
                    scalars.setdefault(names[index], {})[key] = _encode_value(f"state[{names[index]}][{key}]", value)
        groups = []
        for g, group in enumerate(state_dict["param_groups"]):
            doc = {k: _encode_value(f"param_groups[{g}][{k}]", v) for k, v in group.items() if k != "params"}
            doc["params"] = [names[i] for i in group["params"]]
            groups.append(doc)
        extra = {_GROUPS: json.dumps(groups), _SCALARS: json.dumps(scalars), _CLASS: type(optimizer).__name__}
        return self._save(tensors, step, keys, extra, overwrite, background)

    def load(self, optimizer: torch.optim.Optimizer, step: int | None = None, model: torch.nn.Module | None = None,
             **keys: Any) -> Checkpoint:
        manifest, label = self._resolve_optimizer(step, keys, optimizer, _GROUPS, _CLASS)
        groups = json.loads(manifest.extra[_GROUPS])
        scalars = json.loads(manifest.extra.get(_SCALARS, "{}"))
        names = _param_names(optimizer, model)
        sizes = [len(g["params"]) for g in optimizer.param_groups]
        if [len(g["params"]) for g in groups] != sizes:
            raise IncompatibleStateError(
                f"{label}: parameter groups have sizes {[len(g['params']) for g in groups]} in the checkpoint, "
                f"{sizes} in the optimizer; nothing was loaded")
        saved_names = [n for g in groups for n in g["params"]]
        by_name = model is not None and not all(n.startswith("param") for n in saved_names)
        if by_name and set(saved_names) != set(names):
            diff = sorted(set(saved_names) ^ set(names))
            raise IncompatibleStateError(f"{label}: parameter names differ: {', '.join(diff[:8])}; nothing was loaded")
        index_of = {n: (names.index(n) if by_name else i) for i, n in enumerate(saved_names)}
        tensor_names = [s.name for s in manifest.shards]
        # The optimizer's own state tensors (it stepped before, or is being rolled back) are
        # restored in place: no fresh memory to fault in. A fresh optimizer has none yet.
        params = [p for group in optimizer.param_groups for p in group["params"]]
        current = {}
        for entry in tensor_names:
            pname, _, key = entry.rpartition("/")
            index = index_of.get(pname)
            value = optimizer.state.get(params[index], {}).get(key) if index is not None and index < len(params) else None
            if isinstance(value, torch.Tensor):
                current[entry] = value
        loaded = self._fetch(manifest, tensor_names, into=current)
        state: dict[int, dict[str, Any]] = {}
        for entry, tensor in loaded.items():
            pname, _, key = entry.rpartition("/")
            if pname not in index_of:
                raise IncompatibleStateError(f"{label}: state {entry!r} belongs to no parameter of the optimizer")
            state.setdefault(index_of[pname], {})[key] = tensor
        for pname, values in scalars.items():
            state.setdefault(index_of[pname], {}).update({k: _decode_value(v) for k, v in values.items()})
        param_groups = []
        for group in groups:
            restored = {k: _decode_value(v) for k, v in group.items() if k != "params"}
            restored["params"] = [index_of[n] for n in group["params"]]
            param_groups.append(restored)
        try:
            optimizer.load_state_dict({"state": state, "param_groups": param_groups})
        except (ValueError, KeyError, RuntimeError) as exc:
            raise IncompatibleStateError(f"{label}: {exc}") from exc
        return summary(manifest)


__all__ = ["ModelManager", "OptimizerManager", "check_compatible", "NotFoundError"]
