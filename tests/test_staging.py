import threading
import time

import pytest

from layervault.agent.staging import ALIGN, ExtentAllocator, StagingPool, map_pool
from layervault.errors import DeadlineError


def test_allocate_free_coalesces():
    alloc = ExtentAllocator(16 * ALIGN)
    a = alloc.allocate(4 * ALIGN, ALIGN)
    b = alloc.allocate(4 * ALIGN, ALIGN)
    c = alloc.allocate(8 * ALIGN, ALIGN)
    assert alloc.in_use == 16 * ALIGN
    alloc.free(*b)
    alloc.free(*a)
    alloc.free(*c)
    assert alloc.in_use == 0
    assert alloc.allocate(16 * ALIGN, 16 * ALIGN) == (0, 16 * ALIGN)


def test_partial_grant_when_fragmented():
    alloc = ExtentAllocator(8 * ALIGN)
    first = alloc.allocate(6 * ALIGN, ALIGN)
    offset, length = alloc.allocate(4 * ALIGN, ALIGN)
    assert (offset, length) == (6 * ALIGN, 2 * ALIGN)
    alloc.free(*first)


def test_full_pool_blocks_until_freed():
    alloc = ExtentAllocator(4 * ALIGN)
    held = alloc.allocate(4 * ALIGN, 4 * ALIGN)
    got = []
    waiter = threading.Thread(target=lambda: got.append(alloc.allocate(ALIGN, ALIGN, timeout=10)))
    waiter.start()
    time.sleep(0.2)
    assert not got  # back-pressure: it waits, it does not grow
    alloc.free(*held)
    waiter.join(5)
    assert got == [(0, ALIGN)]


def test_full_pool_times_out_with_a_message():
    alloc = ExtentAllocator(ALIGN)
    alloc.allocate(ALIGN, ALIGN)
    with pytest.raises(DeadlineError, match="staging memory stayed full"):
        alloc.allocate(ALIGN, ALIGN, timeout=0.1)


def test_pool_is_shared_with_another_mapping():
    pool = StagingPool(1 << 20)
    try:
        mm, view = map_pool(str(pool.path), pool.size)
        view[100:105] = b"hello"
        assert bytes(pool.view[100:105]) == b"hello"
        assert oct(pool.path.stat().st_mode & 0o777) == "0o600"
        view.release()
        mm.close()
    finally:
        pool.close()
    assert not pool.path.exists()
