"""tf.DType <-> manifest dtype names (see :mod:`layervault.dtypes`), mapped explicitly.

A checkpoint written by TensorFlow is read by PyTorch and numpy through these names, so
each one is listed here rather than derived from TensorFlow's own spelling.
"""

from __future__ import annotations

import tensorflow as tf

from layervault.errors import InvalidArgumentError

TO_NAME: dict[tf.DType, str] = {
    tf.bool: "bool",
    tf.uint8: "uint8", tf.int8: "int8",
    tf.uint16: "uint16", tf.int16: "int16", tf.float16: "float16", tf.bfloat16: "bfloat16",
    tf.uint32: "uint32", tf.int32: "int32", tf.float32: "float32",
    tf.uint64: "uint64", tf.int64: "int64", tf.float64: "float64",
    tf.complex64: "complex64", tf.complex128: "complex128",
}
for _name in ("float8_e4m3fn", "float8_e5m2"):  # TensorFlow keeps these under experimental
    _dtype = getattr(tf.dtypes.experimental, _name, None)
    if _dtype is not None:
        TO_NAME[_dtype] = _name
FROM_NAME: dict[str, tf.DType] = {name: dtype for dtype, name in TO_NAME.items()}


def dtype_name(dtype: tf.DType | str) -> str:
    """The manifest name of a TensorFlow (or Keras, e.g. ``"float32"``) dtype."""
    try:
        return TO_NAME[tf.as_dtype(dtype)]
    except (KeyError, TypeError):
        raise InvalidArgumentError(f"layervault cannot store tensors of dtype {dtype}") from None


def tf_dtype(name: str) -> tf.DType:
    try:
        return FROM_NAME[name]
    except KeyError:
        raise InvalidArgumentError(f"unknown dtype {name!r} in checkpoint") from None
