"""torch.dtype <-> manifest dtype names (see :mod:`layervault.dtypes`)."""

from __future__ import annotations

import torch

from layervault.errors import InvalidArgumentError

TO_NAME: dict[torch.dtype, str] = {
    torch.bool: "bool",
    torch.uint8: "uint8", torch.int8: "int8",
    torch.int16: "int16", torch.float16: "float16", torch.bfloat16: "bfloat16",
    torch.int32: "int32", torch.float32: "float32",
    torch.int64: "int64", torch.float64: "float64",
    torch.complex64: "complex64", torch.complex128: "complex128",
    torch.uint16: "uint16", torch.uint32: "uint32", torch.uint64: "uint64",
    torch.float8_e4m3fn: "float8_e4m3fn", torch.float8_e5m2: "float8_e5m2",
}
FROM_NAME: dict[str, torch.dtype] = {name: dtype for dtype, name in TO_NAME.items()}


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return TO_NAME[dtype]
    except KeyError:
        raise InvalidArgumentError(f"layervault cannot store tensors of dtype {dtype}") from None


def torch_dtype(name: str) -> torch.dtype:
    try:
        return FROM_NAME[name]
    except KeyError:
        raise InvalidArgumentError(f"unknown dtype {name!r} in checkpoint") from None

