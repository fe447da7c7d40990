"""Byte shuffle: group the k-th byte of every element together.

Dense float weights and optimizer state compress ~1.0x with lz4 alone, but the exponent
bytes of neighbouring values are similar, so after a shuffle lz4 gains 1.08x (fp32) to
1.19x (bf16) and int64 counters 2.6x. It hurts mostly-zero tensors, hence it is chosen per
layer from a sample (see :mod:`layervault.agent.codecs.select`).

Format: plane k (k = 0..itemsize-1) holds byte k of every element, in memory order; a tail
shorter than one element is appended as is. For 2-, 4- and 8-byte elements the planes are
cut and joined with integer shifts on little-endian views, 2-4x faster than a strided
numpy transpose (decode 3.8 vs 1.0 GB/s for fp32 on this machine) and byte-identical to it.
"""

from __future__ import annotations

import numpy as np

from layervault.agent.codecs.base import CodecError, register

_LITTLE = {2: np.dtype("<u2"), 4: np.dtype("<u4"), 8: np.dtype("<u8")}


def shuffle_reference(data: memoryview, itemsize: int) -> np.ndarray:
    """The format's definition, as a plain transpose (also the path for 1- and 16-byte elements)."""
    n = len(data) // itemsize
    src = np.frombuffer(data, dtype=np.uint8)
    out = np.empty(len(data), dtype=np.uint8)
    out[: n * itemsize].reshape(itemsize, n)[...] = src[: n * itemsize].reshape(n, itemsize).T
    out[n * itemsize:] = src[n * itemsize:]
    return out


def unshuffle_reference(data: bytes | memoryview, itemsize: int) -> np.ndarray:
    n = len(data) // itemsize
    src = np.frombuffer(data, dtype=np.uint8)
    out = np.empty(len(data), dtype=np.uint8)
    out[: n * itemsize].reshape(n, itemsize)[...] = src[: n * itemsize].reshape(itemsize, n).T
    out[n * itemsize:] = src[n * itemsize:]
    return out


class ShuffleCodec:
    def __init__(self, itemsize: int) -> None:
        self.itemsize = itemsize
        self.descriptor = f"shuffle/1:{itemsize}"

    def encode(self, data: memoryview) -> bytes | memoryview:
        wide = _LITTLE.get(self.itemsize)
        if wide is None:
            return memoryview(shuffle_reference(data, self.itemsize))
        n = len(data) // self.itemsize
        values = np.frombuffer(data, dtype=wide, count=n)
        out = np.empty(len(data), dtype=np.uint8)
        planes = out[: n * self.itemsize].reshape(self.itemsize, n)
        for k in range(self.itemsize):
            planes[k] = values >> (8 * k)  # assignment truncates to the low byte
        out[n * self.itemsize:] = np.frombuffer(data, dtype=np.uint8)[n * self.itemsize:]
        return memoryview(out)

    def decode(self, data: bytes | memoryview, raw_size: int) -> bytes | memoryview:
        if len(data) != raw_size:
            raise CodecError(f"shuffle: got {len(data)} bytes, expected {raw_size}")
        wide = _LITTLE.get(self.itemsize)
        if wide is None:
            return memoryview(unshuffle_reference(data, self.itemsize))
        n = raw_size // self.itemsize
        src = np.frombuffer(data, dtype=np.uint8)
        planes = src[: n * self.itemsize].reshape(self.itemsize, n)
        out = np.empty(raw_size, dtype=np.uint8)
        values = np.frombuffer(out, dtype=wide, count=n)
        values[...] = planes[0]
        for k in range(1, self.itemsize):
            values |= planes[k].astype(wide) << np.array(8 * k, dtype=wide)
        out[n * self.itemsize:] = src[n * self.itemsize:]
        return memoryview(out)


@register("shuffle", 1)
def _make(param: str) -> ShuffleCodec:
    if not param.isdigit() or int(param) not in (1, 2, 4, 8, 16):
        raise CodecError(f"shuffle/1 needs an element size of 1, 2, 4, 8 or 16, got {param!r}")
    return ShuffleCodec(int(param))
