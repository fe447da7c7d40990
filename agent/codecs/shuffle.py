"""Byte shuffle: group the k-th byte of every element together.

Dense float weights and optimizer state compress ~1.0x with lz4 alone, but the exponent
bytes of neighbouring values are similar, so after a shuffle lz4 gains 1.08x (fp32) to
1.19x (bf16) and int64 counters 2.6x. It hurts mostly-zero tensors, hence it is chosen per
layer from a sample (see :mod:`layervault.agent.codecs.select`).
"""

from __future__ import annotations

import numpy as np

from layervault.agent.codecs.base import CodecError, register


class ShuffleCodec:
    def __init__(self, itemsize: int) -> None:
        self.itemsize = itemsize
        self.descriptor = f"shuffle/1:{itemsize}"

    def encode(self, data: memoryview) -> bytes | memoryview:
        n = len(data) // self.itemsize
        body = np.frombuffer(data, dtype=np.uint8, count=n * self.itemsize)
        out = np.empty(len(data), dtype=np.uint8)
        out[: n * self.itemsize].reshape(self.itemsize, n)[...] = body.reshape(n, self.itemsize).T
        out[n * self.itemsize :] = np.frombuffer(data, dtype=np.uint8)[n * self.itemsize :]
        return memoryview(out)

    def decode(self, data: bytes | memoryview, raw_size: int) -> bytes | memoryview:
        if len(data) != raw_size:
            raise CodecError(f"shuffle: got {len(data)} bytes, expected {raw_size}")
        n = raw_size // self.itemsize
        src = np.frombuffer(data, dtype=np.uint8)
        out = np.empty(raw_size, dtype=np.uint8)
        out[: n * self.itemsize].reshape(n, self.itemsize)[...] = src[: n * self.itemsize].reshape(self.itemsize, n).T
        out[n * self.itemsize :] = src[n * self.itemsize :]
        return memoryview(out)


@register("shuffle", 1)
def _make(param: str) -> ShuffleCodec:
    if not param.isdigit() or int(param) not in (1, 2, 4, 8, 16):
        raise CodecError(f"shuffle/1 needs an element size of 1, 2, 4, 8 or 16, got {param!r}")
    return ShuffleCodec(int(param))
