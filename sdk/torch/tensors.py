"""torch tensors as byte sources and sinks for the agent client."""

from __future__ import annotations

import warnings

import torch

from layervault.arrays import write_piece
from layervault.errors import InvalidArgumentError
from layervault.proto import manifest_pb2
from layervault.torch.dtypes import dtype_name, torch_dtype


# Restored bytes are only read from; torch warns about read-only buffers anyway.
warnings.filterwarnings("ignore", message="The given buffer is not writable")


def _flat(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor as one dimension of stride 1. Not ``reshape(-1)``: torch calls a tensor
    contiguous whatever the strides of its size-1 dimensions (``x[::2]`` of 2 elements), and
    reshaping such a one keeps a stride that ``view(torch.uint8)`` refuses."""
    return t.as_strided((t.numel(),), (1,))


def _bytes_view(t: torch.Tensor) -> torch.Tensor:
    return _flat(t).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)


def check_savable(tensor: torch.Tensor, name: str | None = None) -> None:
    """Refuse a tensor layervault cannot store (not dense, or a dtype without a manifest name),
    naming it when ``name`` is given."""
    what = repr(name) if name is not None else "the tensor"
    if tensor.layout != torch.strided:
        raise InvalidArgumentError(f"{what} is a {tensor.layout} tensor; convert it to dense first")
    try:
        dtype_name(tensor.dtype)
    except InvalidArgumentError as exc:
        raise InvalidArgumentError(f"{what}: {exc}") from None


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version  # detach() shares it; a non-contiguous tensor was copied, a snapshot
    except RuntimeError:  # an inference-mode tensor
        return None


class TensorSource:
    """Bytes of a tensor (moved to CPU and made contiguous first if needed)."""

    def __init__(self, tensor: torch.Tensor) -> None:
        t = tensor.detach()
        check_savable(t)
        self.tensor = t.contiguous()
        self._u8 = _bytes_view(self.tensor)
        self._flat = _flat(self.tensor)
        self.nbytes = self._u8.numel()
        self._version = _version(self.tensor)

    def modified(self) -> bool:
        """In-place updates through the tensor (torch.optim's steps) bump its version counter;
        writes through ``.data`` do not, and inference tensors have none."""
        return self._version is not None and _version(self.tensor) != self._version

    def copy_to(self, offset: int, dst: memoryview) -> None:
        # In the tensor's own dtype where the piece allows: torch copies uint8 ~10% slower
        # (1.1 GB into the pool: 0.069 s as bytes, 0.062 s as float32; memcpy floor 0.061 s).
        size = self._flat.element_size()
        if offset % size == 0 and len(dst) % size == 0 and len(dst):
            first = offset // size
            torch.frombuffer(dst, dtype=self._flat.dtype).copy_(self._flat[first:first + len(dst) // size])
        else:
            torch.frombuffer(dst, dtype=torch.uint8).copy_(self._u8[offset:offset + len(dst)])

    def read(self, offset: int, length: int) -> memoryview:
        return memoryview(self._u8[offset:offset + length].cpu().numpy())  # a view, unless on a GPU


class TensorSink:
    """Receives the bytes of one restored tensor into a fresh CPU tensor."""

    def __init__(self, layout: manifest_pb2.TensorLayout, into: torch.Tensor | None = None) -> None:
        """``into``: write straight into this contiguous CPU tensor of the shard's shape and dtype."""
        self.tensor = into.detach() if into is not None else torch.empty(tuple(layout.local_shape), dtype=torch_dtype(layout.dtype))
        # Pieces are copied through numpy (write_piece), on this thread alone: torch's copy_ splits
        # each piece over its intra-op threads, which spin-wait while the agent and the store hold
        # the other cores of a busy node (a 1.1 GB restore on 2 cores: rank CPU 1.4 s with copy_, 0.3 s so).
        self._bytes = _bytes_view(self.tensor).numpy()
        self.received = 0

    @staticmethod
    def fits(layout: manifest_pb2.TensorLayout, tensor: torch.Tensor) -> bool:
        """Whether restored bytes of ``layout`` can be written into ``tensor`` as they are."""
        return (tensor.device.type == "cpu" and tensor.is_contiguous() and list(tensor.shape) == list(layout.local_shape)
                and tensor.dtype == torch_dtype(layout.dtype) and tensor.numel() > 0)

    def write(self, offset: int, src: memoryview) -> None:
        self.received += write_piece(self._bytes, offset, src, "tensor")


def whole_layout(tensor: torch.Tensor) -> manifest_pb2.TensorLayout:
    shape = list(tensor.shape)
    return manifest_pb2.TensorLayout(dtype=dtype_name(tensor.dtype), global_shape=shape,
                                     offsets=[0] * len(shape), local_shape=shape)
