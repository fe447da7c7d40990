"""Keras 3 variables by stable name: what a checkpoint entry of a model or optimizer is called.

Model variables are named by their Keras path (``variable.path``: ``"conv1_conv/kernel"``,
``"net/encoder/kernel"``). Two kinds of path depend on how many objects the process made
before, not on the model, and are renamed so that a fresh process finds them again:

* a seed generator's state (Dropout and other random layers) is called
  ``"seed_generator_7/seed_generator_state"`` after a process-wide counter; it is named
  after the chain of layer names that owns it instead: ``"block/dropout/seed_generator_state"``;
* an optimizer's variables sit under the optimizer's name, which Keras numbers per process
  (``"adam"``, ``"adam_1"``); that prefix is dropped: ``"iteration"``, ``"learning_rate"``,
  ``"dense_kernel_momentum"``.

Other auto-generated names (``"dense_1"``) are also numbered per process by Keras: name the
layers, or build the model the same way in a fresh process, for names that match.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np
import tensorflow as tf

from layervault.errors import InvalidArgumentError
from layervault.tensorflow.dtypes import dtype_name

_SEED_STATE = "seed_generator_state"


def _children(layer: Any) -> list[Any]:
    flatten = getattr(layer, "_flatten_layers", None)
    return list(flatten(include_self=False, recursive=False)) if flatten else []


def _seed_state_names(root: Any) -> dict[int, str]:
    """id(state variable) -> name under its owning layer, for every seed generator in the tree."""
    names: dict[int, str] = {}
    seen: set[int] = set()

    def walk(layer: Any, prefix: str) -> None:
        if id(layer) in seen:  # shared layers are visited once
            return
        seen.add(id(layer))
        generators = list(getattr(layer, "_seed_generators", []) or [])
        for i, generator in enumerate(generators):
            leaf = _SEED_STATE if len(generators) == 1 else f"seed_generator_{i}_state"
            names.setdefault(id(generator.state), f"{prefix}/{leaf}" if prefix else leaf)
        for child in _children(layer):
            walk(child, f"{prefix}/{child.name}" if prefix else child.name)

    walk(root, "")
    return names


def _unique(pairs: Iterable[tuple[str, Any]], what: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    seen: set[int] = set()
    duplicates = []
    for name, variable in pairs:
        if id(variable) in seen:
            continue
        seen.add(id(variable))
        if name in out:
            duplicates.append(name)
        out[name] = variable
    if duplicates:
        raise InvalidArgumentError(
            f"{what} has several variables named {', '.join(sorted(set(duplicates))[:8])}; give its layers unique names")
    return out


def model_variables(model: Any) -> dict[str, Any]:
    """Every variable of a Keras model or layer (trainable, non-trainable, seed states) by name."""
    variables = list(getattr(model, "variables", None) or [])
    if not variables or not getattr(model, "built", True):  # unbuilt: only seed states would be there
        raise InvalidArgumentError(
            f"{type(model).__name__} {getattr(model, 'name', '')!r} has no variables yet: build it first "
            "(call it on a batch, or model.build(input_shape))")
    seeds = _seed_state_names(model)
    return _unique(((seeds.get(id(v), v.path), v) for v in variables), f"model {model.name!r}")


def optimizer_variables(optimizer: Any) -> dict[str, Any]:
    """Every variable of a Keras optimizer by its path below the optimizer's own name."""
    prefix = f"{optimizer.name}/"
    return _unique(((v.path[len(prefix):] if v.path.startswith(prefix) else v.path, v) for v in optimizer.variables),
                   f"optimizer {optimizer.name!r}")


def as_variables(state: Mapping[str, Any]) -> dict[str, Any]:
    """A user's name -> variable/tensor/array mapping, checked."""
    for name, value in state.items():
        if not isinstance(name, str) or not name:
            raise InvalidArgumentError(f"entry names must be non-empty strings, got {name!r}")
        if not (hasattr(value, "shape") and hasattr(value, "dtype")):
            raise InvalidArgumentError(f"{name!r} is a {type(value).__name__}, not a variable, tensor or array")
    return dict(state)


def to_numpy(value: Any) -> np.ndarray:
    """A snapshot of a variable's (or tensor's) value as a C-contiguous numpy array."""
    array = value if isinstance(value, np.ndarray) else np.asarray(value.numpy())
    return np.asarray(array, order="C")  # keeps 0-d arrays 0-d, unlike np.ascontiguousarray


def spec(value: Any) -> tuple[list[int], str]:
    """(shape, manifest dtype name) of a variable, tensor or array."""
    dtype = value.dtype
    name = dtype_name(dtype) if not isinstance(dtype, np.dtype) else _numpy_name(dtype)
    return [int(d) for d in value.shape], name


def _numpy_name(dtype: np.dtype) -> str:
    from layervault.arrays import dtype_name as numpy_dtype_name

    return numpy_dtype_name(dtype)


def assign_all(variables: Mapping[str, Any], values: Mapping[str, np.ndarray]) -> None:
    """Assign every value to its variable (outside any tf.function being traced); arrays are filled in place."""
    with tf.init_scope():
        for name, variable in variables.items():
            if isinstance(variable, np.ndarray):
                np.copyto(variable, values[name])
            else:
                variable.assign(values[name])
