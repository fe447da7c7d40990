"""What the process-level tests observe from outside the services: a process's resident
memory over time, and checkpoints read straight from storage (no agent, no coordinator)."""

from __future__ import annotations

import collections
import threading

import psutil

from layervault.agent import keys
from layervault.agent.catalog import Catalog
from layervault.agent.manifest import Manifest
from layervault.agent.restore import fetch_chunk
from layervault.agent.storage import open_store

from save_ranks import bytes_digest


class RssSampler:
    """Samples a process's RSS every ``interval`` seconds on a thread, until stopped."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.process = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss-sampler")

    def sample(self) -> int:
        rss = self.process.memory_info().rss
        self.peak = max(self.peak, rss)
        self.samples += 1
        return rss

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sample()
            except psutil.NoSuchProcess:
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def listed_steps(store_url: str, job: str) -> dict[str, list[int]]:
    """Committed steps by kind, from the manifests in storage (what ``layervault ls --storage`` lists)."""
    store = open_store(store_url)
    try:
        found: dict[str, list[int]] = collections.defaultdict(list)
        for _, kind, step, _ in sorted(Catalog(store).manifest_keys(job)):
            found[kind].append(step)
        return dict(found)
    finally:
        store.close()


def stored_digests(store_url: str, job: str, kind: str, step: int) -> tuple[Manifest, dict[str, str]]:
    """The committed manifest and the sha256 of every entry's bytes, read from storage.

    Every chunk is fetched and checked against its CRC32C (a missing object or a mismatch
    raises ChecksumError), and the chunks of each shard must tile its bytes exactly.
    """
    store = open_store(store_url)
    try:
        manifest = Catalog(store).manifest(keys.manifest_key(job, kind, step))
        digests = {}
        for shard in manifest.shards:
            assert shard.name not in digests, f"{job}/{kind} step {step}: entry {shard.name!r} stored twice"
            data = bytearray()
            for chunk in sorted(shard.chunks, key=lambda c: c.raw_offset):
                assert chunk.raw_offset == len(data), f"{shard.name}: chunk at {chunk.raw_offset}, expected {len(data)}"
                data += fetch_chunk(store, manifest, shard, chunk)
            assert len(data) == shard.raw_bytes, f"{shard.name}: {len(data)} of {shard.raw_bytes} bytes stored"
            digests[shard.name] = bytes_digest(data)
        return manifest, digests
    finally:
        store.close()
