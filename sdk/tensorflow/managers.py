"""ModelManager and OptimizerManager for TensorFlow / Keras 3 ranks.

The same configs, agent client and manifest format as :mod:`layervault.torch`; the
manifest's ``config.framework`` is ``"tensorflow"``. Entries are whole tensors named as
:mod:`layervault.tensorflow.variables` describes (Keras variable paths). Rank and world size
come from the distribution strategy or ``TF_CONFIG`` (:mod:`layervault.tensorflow.distribute`);
replicated variables are stored once, by the rank :func:`layervault.placement.assign_owners`
picks. Values travel as numpy arrays: ``save()`` snapshots each variable and copies it once
into the agent's shared memory; ``load()`` checks every name, shape and dtype against the
manifest and fetches everything before it assigns, so a failed load changes nothing.
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping

import numpy as np

from layervault.agent.manifest import encode_keys
from layervault.arrays import ArraySource, assemble, shard_sinks, whole_layout
from layervault.checkpoint import Checkpoint
from layervault.client import AgentClient, CheckpointRef, SaveEntry, SaveHandle
from layervault.config import ModelConfig, OptimizerConfig
from layervault.manager_base import ManagerBase, Specs, check_compatible, stored_specs, summary
from layervault.dtypes import itemsize_of
from layervault.errors import IncompatibleStateError, InvalidArgumentError
from layervault import incarnation
from layervault.placement import assign_owners
from layervault.proto import manifest_pb2
from layervault.tensorflow.distribute import rank_and_world
from layervault.tensorflow.variables import (
    as_variables,
    assign_all,
    model_variables,
    optimizer_variables,
    spec,
    to_numpy,
)


class _Manager(ManagerBase):
    framework = "tensorflow"

    def __init__(self, config: ModelConfig | OptimizerConfig, agent: str | AgentClient | None = None,
                 shared_memory: bool | None = None) -> None:
        super().__init__(config, agent, shared_memory)
        # The job's incarnation (layervault.incarnation). Multi-worker strategies offer no
        # collective here to agree on one, so without a launcher's LAYERVAULT_INCARNATION their
        # ranks send none and the coordinator joins them by rank number, as before incarnations.
        self._launcher_incarnation = incarnation.from_environment()
        self._process_incarnation = self._launcher_incarnation or incarnation.fresh()

    def _save(self, values: Mapping[str, Any], step: int, keys: Mapping[str, Any], extra: Mapping[str, str],
              overwrite: bool, strategy: Any, background: bool) -> SaveHandle:
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise InvalidArgumentError(f"step must be a non-negative int, got {step!r}")
        if "step" in keys:
            raise InvalidArgumentError("pass the step as save(..., step=N), not as a training key")
        rank, world_size = rank_and_world(strategy)
        specs = {name: spec(value) for name, value in values.items()}
        owners = assign_owners({n: math.prod(shape) * itemsize_of(dtype) for n, (shape, dtype) in specs.items()}, world_size)
        mine = []
        for name, value in values.items():
            if owners[name] == rank:
                array = to_numpy(value)
                if background and array is value:  # a caller's own numpy array: snapshot it too
                    array = array.copy()
                mine.append(SaveEntry(name, whole_layout(array), ArraySource(array)))
        ref = CheckpointRef(self.config.job, self.kind, step)
        run = self._process_incarnation if world_size == 1 else self._launcher_incarnation
        return self.client.save(ref, rank, world_size, self._config_proto(), encode_keys(keys), extra, mine, overwrite,
                                incarnation=run, background=background, **self._lifecycle_options())

    def _fetch(self, manifest: manifest_pb2.Manifest, names: list[str]) -> dict[str, np.ndarray]:
        wanted = set(names)
        sinks = shard_sinks(manifest, [i for i, s in enumerate(manifest.shards) if s.name in wanted])
        self.client.restore(manifest, names, sinks)
        return assemble(manifest, sinks)

    def load_layer(self, name: str, step: int | None = None, **keys: Any) -> np.ndarray:
        """One entry of a checkpoint as a numpy array (latest committed unless step/keys select another).

        Only that entry's objects are fetched. bfloat16 and float8 arrays use the ml_dtypes
        types TensorFlow uses; ``tf.convert_to_tensor`` takes the result as is.
        """
        manifest = self._resolve(step, keys)
        return self._fetch(manifest, [name])[name]


class ModelManager(_Manager):
    """Save and load a Keras 3 model's variables through the node agent.

    ``model`` is a Keras model or layer (Sequential, functional or subclassed; built), or a
    mapping of names to variables, tensors or numpy arrays.
    """

    kind = "model"

    def __init__(self, config: ModelConfig, agent: str | AgentClient | None = None, shared_memory: bool | None = None) -> None:
        if not isinstance(config, ModelConfig):
            raise InvalidArgumentError("ModelManager needs a layervault.ModelConfig")
        super().__init__(config, agent, shared_memory)

    @staticmethod
    def _variables(model: Any) -> dict[str, Any]:
        return as_variables(model) if isinstance(model, Mapping) else model_variables(model)

    def save(self, model: Any, step: int, overwrite: bool = False, background: bool = False, **keys: Any) -> SaveHandle:
        """Hand every variable to the agent; returns once the bytes are staged. ``.wait()`` for the commit.

        ``background=True``: the variables are snapshotted here and handed off on a thread, so
        training may go on at once (``wait_staged()`` says when the hand-off ended)."""
        strategy = None if isinstance(model, Mapping) else getattr(model, "distribute_strategy", None)
        return self._save(self._variables(model), step, keys, {}, overwrite, strategy, background)

    def load(self, model: Any, step: int | None = None, **keys: Any) -> Checkpoint:
        """Assign the latest committed checkpoint, or the one with ``step``/``keys``, to every variable."""
        target = self._variables(model)
        manifest = self._resolve(step, keys)
        label = f"{manifest.job}/{manifest.kind} step {manifest.step}"
        check_compatible(label, stored_specs(manifest), {n: spec(v) for n, v in target.items()})
        assign_all(target, self._fetch(manifest, list(target)))
        return summary(manifest)


# -- optimizer ------------------------------------------------------------------------------------

_CONFIG = "tensorflow.optimizer.config"
_CLASS = "tensorflow.optimizer.class"


def _json_value(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if hasattr(value, "numpy"):
        return _json_value(value.numpy())
    raise TypeError(f"{type(value).__name__} is not JSON")


def _hyper_parameters(optimizer: Any) -> str:
    try:
        return json.dumps(optimizer.get_config(), default=_json_value, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentError(f"the hyper-parameters of {type(optimizer).__name__} cannot be stored as JSON: {exc}") from exc


class OptimizerManager(_Manager):
    """Save and load a Keras 3 optimizer: every optimizer variable, and its hyper-parameters.

    Stored entries are the optimizer's variables (``iteration``, ``learning_rate``, slots like
    ``dense_kernel_momentum``); ``optimizer.get_config()`` goes into the manifest's ``extra``
    as JSON. Loading restores the variables - the learning rate and step count included - and
    leaves the optimizer object's other hyper-parameters as constructed; read the saved ones
    with :meth:`hyper_parameters`.
    """

    kind = "optimizer"

    def __init__(self, config: OptimizerConfig, agent: str | AgentClient | None = None,
                 shared_memory: bool | None = None) -> None:
        if not isinstance(config, OptimizerConfig):
            raise InvalidArgumentError("OptimizerManager needs a layervault.OptimizerConfig")
        super().__init__(config, agent, shared_memory)

    def save(self, optimizer: Any, step: int | None = None, overwrite: bool = False, background: bool = False,
             **keys: Any) -> SaveHandle:
        """Hand the optimizer's variables to the agent; ``step`` defaults to ``optimizer.iterations``
        (``background`` as for :meth:`ModelManager.save`)."""
        if not optimizer.built:
            raise InvalidArgumentError(f"optimizer {optimizer.name!r} is not built yet (it never stepped): nothing to save")
        if step is None:
            step = int(optimizer.iterations.numpy())
        extra = {_CONFIG: _hyper_parameters(optimizer), _CLASS: type(optimizer).__name__}
        strategy = getattr(optimizer, "_distribution_strategy", None)
        return self._save(optimizer_variables(optimizer), step, keys, extra, overwrite, strategy, background)

    def load(self, optimizer: Any, step: int | None = None, model: Any = None, **keys: Any) -> Checkpoint:
        """Restore the optimizer's variables from the latest checkpoint (or the one ``step``/``keys`` select).

        A fresh optimizer that is not built yet is built for ``model.trainable_variables``
        when ``model`` is given, then assigned. Without ``model`` everything is fetched now
        and assigned when Keras builds the optimizer (on the first training step), after
        the same name and shape check.
        """
        manifest, label = self._resolve_optimizer(step, keys, optimizer, _CONFIG, _CLASS)
        stored = stored_specs(manifest)
        if not optimizer.built and model is not None:
            strategy = getattr(model, "distribute_strategy", None)
            if strategy is not None:
                with strategy.scope():
                    optimizer.build(model.trainable_variables)
            else:
                optimizer.build(model.trainable_variables)
        if optimizer.built:
            variables = optimizer_variables(optimizer)
            check_compatible(label, stored, {n: spec(v) for n, v in variables.items()})
            assign_all(variables, self._fetch(manifest, list(variables)))
        else:
            _assign_when_built(optimizer, self._fetch(manifest, list(stored)), stored, label)
        return summary(manifest)

    def hyper_parameters(self, step: int | None = None, **keys: Any) -> dict[str, Any]:
        """The saved ``optimizer.get_config()``: ``type(opt).from_config(om.hyper_parameters())`` rebuilds it."""
        manifest = self._resolve(step, keys)
        if _CONFIG not in manifest.extra:
            raise IncompatibleStateError(
                f"{manifest.job}/optimizer step {manifest.step} was not saved by a tensorflow OptimizerManager")
        return json.loads(manifest.extra[_CONFIG])


def _assign_when_built(optimizer: Any, values: dict[str, np.ndarray], stored: Specs, label: str) -> None:
    """Defer the assignment until Keras builds the optimizer (it knows the model's variables; we do not)."""
    cls_build = type(optimizer).build

    def build(var_list: Any) -> None:
        vars(optimizer).pop("build", None)  # one shot: the class's own build from now on
        cls_build(optimizer, var_list)
        variables = optimizer_variables(optimizer)
        check_compatible(label, stored, {n: spec(v) for n, v in variables.items()})
        assign_all(variables, values)

    vars(optimizer).pop("build", None)
    optimizer.build = build


__all__ = ["ModelManager", "OptimizerManager"]
