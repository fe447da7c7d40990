"""The agent-wide restore slots: however many restores run, they hold at most ``slots``
chunks between them, and every slot comes back when a restore ends, fails or is abandoned."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from layervault.agent.checksum import crc32c
from layervault.agent.restore import FetchSlots, fetch_spans, select_spans
from layervault.agent.storage import open_store
from layervault.errors import DeadlineError
from layervault.proto import manifest_pb2

CHUNKS = [bytes([i]) * 1000 for i in range(6)]


@pytest.fixture
def manifest_and_store(tmp_path):
    store = open_store((tmp_path / "store").as_uri())
    chunks = []
    for i, data in enumerate(CHUNKS):
        store.put(f"job/model/layers/w/a.r0.c{i:05d}", data)
        chunks.append(manifest_pb2.ChunkRef(key=f"job/model/layers/w/a.r0.c{i:05d}", raw_offset=1000 * i,
                                            raw_size=1000, stored_size=1000, crc32c=crc32c(data)))
    shard = manifest_pb2.ShardRecord(name="w", raw_bytes=6000, chunks=chunks)
    yield manifest_pb2.Manifest(job="job", kind="model", step=1, shards=[shard]), store
    store.close()


def _free(slots: FetchSlots) -> int:
    taken = 0
    while slots.take(wait=False):
        taken += 1
    for _ in range(taken):
        slots.give()
    return taken


def test_restores_share_the_agents_slots_and_give_them_back(manifest_and_store):
    manifest, store = manifest_and_store
    spans = select_spans(manifest, [], [])
    slots = FetchSlots(2, timeout=0.2)
    with ThreadPoolExecutor(4) as executor:
        first = fetch_spans(store, manifest, spans, executor, slots=slots)
        assert next(first).data == CHUNKS[0]
        assert _free(slots) == 0  # the first restore holds both slots (window 16, but 2 slots)
        second = fetch_spans(store, manifest, spans, executor, slots=slots)
        with pytest.raises(DeadlineError, match="restore slots"):
            next(second)
        first.close()  # abandoned mid-way (the rank went away): its slots come back
        assert _free(slots) == 2

        third = fetch_spans(store, manifest, spans, executor, slots=slots)
        assert b"".join(bytes(c.data) for c in third) == b"".join(CHUNKS)
        assert _free(slots) == 2

        store.delete(["job/model/layers/w/a.r0.c00003"])  # a failing restore gives its slots back too
        with pytest.raises(Exception, match="missing object"):
            list(fetch_spans(store, manifest, spans, executor, slots=slots))
        assert _free(slots) == 2
