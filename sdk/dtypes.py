"""Framework-neutral dtype names, the ones written in manifests.

A checkpoint saved by PyTorch must be readable by TensorFlow or numpy and vice versa, so
manifests never record ``torch.float32`` or ``<f4``, only these names; each framework
adapter maps them explicitly.
"""

from __future__ import annotations

from layervault.errors import InvalidArgumentError

ITEMSIZE: dict[str, int] = {
    "bool": 1,
    "uint8": 1, "int8": 1,
    "uint16": 2, "int16": 2, "float16": 2, "bfloat16": 2,
    "uint32": 4, "int32": 4, "float32": 4,
    "uint64": 8, "int64": 8, "float64": 8,
    "complex64": 8, "complex128": 16,
    "float8_e4m3fn": 1, "float8_e5m2": 1,
}

#: numpy names for the dtypes numpy has natively (bfloat16 and float8 have none).
NUMPY_NAME: dict[str, str] = {
    name: name for name in ITEMSIZE if name not in ("bfloat16", "float8_e4m3fn", "float8_e5m2")
}


def itemsize_of(dtype: str) -> int:
    try:
        return ITEMSIZE[dtype]
    except KeyError:
        raise InvalidArgumentError(f"unknown dtype {dtype!r}; known: {', '.join(sorted(ITEMSIZE))}") from None
