"""numpy arrays as byte sources and sinks, and shards put back together as whole arrays.

numpy is the framework-neutral form of a tensor: the TensorFlow adapter saves and loads
through it, and ``layervault pull`` writes it to ``.npy`` files without importing any
framework. dtype names follow :mod:`layervault.dtypes`; bfloat16 and float8 have no numpy
dtype of their own and come from ``ml_dtypes`` (a TensorFlow and JAX dependency), imported
only when such a tensor is met.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Protocol

import numpy as np

from layervault.dtypes import ITEMSIZE, NUMPY_NAME, itemsize_of
from layervault.errors import IncompatibleStateError, InvalidArgumentError
from layervault.proto import manifest_pb2

#: dtypes numpy only has through ml_dtypes.
EXTENDED = ("bfloat16", "float8_e4m3fn", "float8_e5m2")


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype for a manifest dtype name."""
    if name in NUMPY_NAME:
        return np.dtype(NUMPY_NAME[name])
    itemsize_of(name)  # unknown names fail here with the list of known ones
    try:
        import ml_dtypes
    except ImportError:
        raise InvalidArgumentError(f"dtype {name} needs the ml_dtypes package (pip install ml_dtypes)") from None
    return np.dtype(getattr(ml_dtypes, name))


def dtype_name(dtype: np.dtype) -> str:
    """The manifest dtype name for a numpy dtype (bfloat16/float8 from ml_dtypes included)."""
    dtype = np.dtype(dtype)
    name = dtype.name
    if (name in NUMPY_NAME or name in EXTENDED) and ITEMSIZE[name] == dtype.itemsize:
        return name
    raise InvalidArgumentError(f"layervault cannot store arrays of dtype {dtype}")


def _bytes_view(array: np.ndarray) -> np.ndarray:
    return array.reshape(-1).view(np.uint8)


class ArraySource:
    """Bytes of a numpy array (made C-contiguous first if needed)."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = np.asarray(array, order="C")  # not ascontiguousarray: it turns 0-d into 1-d
        self._u8 = _bytes_view(self.array)
        self.nbytes = int(self._u8.size)

    def copy_to(self, offset: int, dst: memoryview) -> None:
        np.frombuffer(dst, dtype=np.uint8)[:] = self._u8[offset:offset + len(dst)]

    def read(self, offset: int, length: int) -> memoryview:
        return memoryview(self._u8[offset:offset + length])

    def modified(self) -> bool:
        return False  # numpy keeps no version; the TensorFlow managers hand over snapshots


def write_piece(dst: np.ndarray, offset: int, src: bytes | memoryview, what: str) -> int:
    """Copy a restored piece into the bytes ``dst`` (uint8) of a ``what`` at ``offset``, on this
    thread alone; returns its length. Refuses a piece that does not fit."""
    n = len(src)
    if offset < 0 or offset + n > dst.size:
        raise InvalidArgumentError(f"restored piece [{offset}, {offset + n}) exceeds the {what}'s {dst.size} bytes")
    if n:
        dst[offset:offset + n] = np.frombuffer(src, dtype=np.uint8)
    return n


class ArraySink:
    """Receives the bytes of one restored shard into a fresh numpy array."""

    def __init__(self, layout: manifest_pb2.TensorLayout) -> None:
        self.layout = layout
        self.array = np.empty(tuple(layout.local_shape), dtype=numpy_dtype(layout.dtype))
        self._u8 = _bytes_view(self.array)
        self.received = 0

    def write(self, offset: int, src: memoryview) -> None:
        self.received += write_piece(self._u8, offset, src, "array")


def whole_layout(array: np.ndarray) -> manifest_pb2.TensorLayout:
    """Layout of an unsharded tensor: offsets all 0, local shape == global shape."""
    shape = [int(d) for d in array.shape]
    return manifest_pb2.TensorLayout(dtype=dtype_name(array.dtype), global_shape=shape,
                                     offsets=[0] * len(shape), local_shape=shape)


def shard_sinks(manifest: manifest_pb2.Manifest, indices: Iterable[int]) -> dict[int, ArraySink]:
    """One sink per shard index, for ``AgentClient.restore`` or a direct read from storage."""
    return {i: ArraySink(manifest.shards[i].layout) for i in indices}


class ReceivedShard(Protocol):
    """A restore sink as the assemblers see it: how many bytes of its shard arrived."""

    received: int


def group_shards(manifest: manifest_pb2.Manifest, sinks: Mapping[int, ReceivedShard]) -> dict[str, list[int]]:
    """Restored shard indices by entry name, checked before anything is assembled: every shard
    arrived whole, and the shards of an entry agree on dtype and global shape and cover it.

    Raises IncompatibleStateError naming the layer otherwise. Shared by the numpy assembler
    below and the torch managers, which place shards into tensors of their own.
    """
    by_name: dict[str, list[int]] = {}
    for index, sink in sinks.items():
        shard = manifest.shards[index]
        if sink.received != shard.raw_bytes:
            raise IncompatibleStateError(f"layer {shard.name!r}: received {sink.received} of {shard.raw_bytes} bytes")
        by_name.setdefault(shard.name, []).append(index)
    for name, indices in by_name.items():
        layouts = [manifest.shards[i].layout for i in indices]
        first = layouts[0]
        if any(layout.dtype != first.dtype or list(layout.global_shape) != list(first.global_shape) for layout in layouts):
            raise IncompatibleStateError(f"layer {name!r}: its shards disagree on dtype or global shape")
        covered, total = sum(math.prod(layout.local_shape) for layout in layouts), math.prod(first.global_shape)
        if covered != total:
            raise IncompatibleStateError(f"layer {name!r}: its shards cover {covered} of {total} elements")
    return by_name


def is_whole(manifest: manifest_pb2.Manifest, indices: list[int]) -> bool:
    """True when an entry was stored as one unsharded shard: its sink already holds the entry."""
    layout = manifest.shards[indices[0]].layout
    return len(indices) == 1 and list(layout.local_shape) == list(layout.global_shape)


def assemble(manifest: manifest_pb2.Manifest, sinks: Mapping[int, ArraySink]) -> dict[str, np.ndarray]:
    """Whole arrays by entry name from restored shards; shards of one entry are placed at their
    offsets. Raises IncompatibleStateError as :func:`group_shards` does."""
    out = {}
    for name, indices in group_shards(manifest, sinks).items():
        if is_whole(manifest, indices):
            out[name] = sinks[indices[0]].array
            continue
        first = manifest.shards[indices[0]].layout
        whole = np.empty(tuple(first.global_shape), dtype=numpy_dtype(first.dtype))
        for index in indices:
            layout = manifest.shards[index].layout
            whole[tuple(slice(o, o + n) for o, n in zip(layout.offsets, layout.local_shape))] = sinks[index].array
        out[name] = whole
    return out


def npy_compatible(array: np.ndarray) -> np.ndarray:
    """The array as ``np.save`` can write it: bfloat16/float8 widen to float32 (exactly)."""
    if array.dtype.name in EXTENDED:
        return array.astype(np.float32)
    return array
