"""lz4 block compression: ~2-3 GB/s per core and it releases the GIL.

The block format (not the frame format) is used because the raw size is recorded in the
manifest anyway; it is ~30% faster than lz4.frame on this hardware. The descriptor records
the acceleration ("level"): ``lz4/1:1`` is lz4's default mode, higher values trade ratio
for speed. Decoding does not depend on it.
"""

from __future__ import annotations

import lz4.block

from layervault.agent.codecs.base import CodecError, register

DEFAULT_ACCELERATION = 1


class Lz4Codec:
    def __init__(self, acceleration: int = DEFAULT_ACCELERATION) -> None:
        self.acceleration = acceleration
        self.descriptor = f"lz4/1:{acceleration}"

    def encode(self, data: memoryview) -> bytes:
        if self.acceleration == 1:
            return lz4.block.compress(data, store_size=False)
        return lz4.block.compress(data, mode="fast", acceleration=self.acceleration, store_size=False)

    def decode(self, data: bytes | memoryview, raw_size: int) -> bytes:
        try:
            return lz4.block.decompress(data, uncompressed_size=raw_size)
        except lz4.block.LZ4BlockError as exc:
            raise CodecError(f"lz4: corrupt block ({exc})") from exc


@register("lz4", 1)
def _make(param: str) -> Lz4Codec:
    if param == "":
        return Lz4Codec()
    if not param.isdigit() or not 1 <= int(param) <= 65537:
        raise CodecError(f"lz4/1 takes an acceleration of 1..65537, got {param!r}")
    return Lz4Codec(int(param))
