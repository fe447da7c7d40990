"""lz4 block compression: ~2-3 GB/s per core and it releases the GIL.

The block format (not the frame format) is used because the raw size is recorded in the
manifest anyway; it is ~30% faster than lz4.frame on this hardware.
"""

from __future__ import annotations

import lz4.block

from layervault.agent.codecs.base import CodecError, register


class Lz4Codec:
    descriptor = "lz4/1"

    def encode(self, data: memoryview) -> bytes:
        return lz4.block.compress(data, store_size=False)

    def decode(self, data: bytes | memoryview, raw_size: int) -> bytes:
        try:
            return lz4.block.decompress(data, uncompressed_size=raw_size)
        except lz4.block.LZ4BlockError as exc:
            raise CodecError(f"lz4: corrupt block ({exc})") from exc


@register("lz4", 1)
def _make(param: str) -> Lz4Codec:
    if param:
        raise CodecError(f"lz4/1 takes no parameter, got {param!r}")
    return Lz4Codec()
