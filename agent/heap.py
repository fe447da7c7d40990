"""Keep the agent's chunk-sized buffers in the C heap, where freed pages are reused.

Every chunk the agent encodes or decodes passes through a few fresh buffers of about one
chunk (lz4's output, the shuffle's output, boto3's body). glibc serves allocations above its
mmap threshold (128 KiB, raised only as mmapped chunks are freed) with a fresh ``mmap`` and
returns them with ``munmap``, and shrinks the heap top past the trim threshold, so each
buffer lands in pages never touched before: on this hardware the page faults make lz4
decode run at ~1.1 GB/s instead of ~8 GB/s, shuffle at ~1.7 instead of ~5 GB/s, and they
were the largest single cost of a restore. With both thresholds above a chunk, freed buffers
stay mapped and the next chunk reuses them. The memory kept is bounded: live buffers are
bounded by the agent's upload and restore slots as before, the heap keeps at most
``TRIM_THRESHOLD`` free at its top per arena, and there are at most ``ARENA_MAX`` arenas.

glibc only (``mallopt``); elsewhere this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

#: glibc's ceiling for M_MMAP_THRESHOLD on 64-bit (HEAP_MAX_SIZE / 2): buffers up to 32 MiB
#: (8x the default chunk) come from the heap.
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 64 << 20
#: Each arena keeps its own freed buffers, and glibc makes up to 8 per core for the agent's
#: dozens of threads; a few arenas bound what the heap keeps, at no measurable lock cost for
#: allocations of a chunk's size.
ARENA_MAX = 4


def keep_buffers_in_heap() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; False where not glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = (mallopt(_M_ARENA_MAX, ARENA_MAX) == 1 and mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
            and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1)
    if not done:
        log.warning("mallopt refused the heap thresholds; chunk buffers stay in fresh pages (slower codecs)")
    return done
