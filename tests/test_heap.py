"""agent/heap.py: chunk-sized buffers reuse warm heap pages instead of fresh mmaps."""

from __future__ import annotations

import platform
import resource

import lz4.block
import pytest

from layervault.agent.heap import keep_buffers_in_heap

CHUNK = 4 << 20
PAGES = CHUNK // resource.getpagesize()


def _minor_faults_decoding(times: int) -> int:
    """Minor page faults of decoding one chunk ``times`` times, each buffer freed before the next."""
    block = lz4.block.compress(bytes(CHUNK), store_size=False)
    lz4.block.decompress(block, uncompressed_size=CHUNK)  # warm: the heap grows once
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(times):
        out = lz4.block.decompress(block, uncompressed_size=CHUNK)
        del out
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc mallopt")
def test_decoded_chunks_reuse_warm_pages():
    assert keep_buffers_in_heap()
    times = 16
    faults = _minor_faults_decoding(times)
    # A fresh mmap per buffer faults every page of it (times x PAGES); reused heap pages fault
    # none. The slack is for other threads of the test process.
    assert faults < times * PAGES // 4, f"{faults} minor faults for {times} chunks of {PAGES} pages"
