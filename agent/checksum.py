"""CRC32C of chunk bytes (hardware accelerated: ~14 GB/s per core, releases the GIL)."""

from __future__ import annotations

import google_crc32c


def crc32c(data: bytes | memoryview) -> int:
    return google_crc32c.value(data)
