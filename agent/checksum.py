"""CRC32C of chunk bytes: hardware accelerated (~14 GB/s per core), takes any buffer
without copying, and releases the GIL on large inputs."""

from __future__ import annotations

import crc32c as _crc32c


def crc32c(data: bytes | memoryview, value: int = 0) -> int:
    """``value``: the CRC32C of the bytes before ``data``, to continue it."""
    return _crc32c.crc32c(data, value)
