"""Node-local cache of decoded chunks, so ranks of one node that read the same layer
(replicated parameters, or overlapping shards after resharding) fetch and decode it once.

Concurrent requests for one chunk share a single fetch; finished chunks stay in an LRU
bounded by bytes. Chunks are immutable (their keys carry the save attempt), so an entry
never goes stale.
"""

from __future__ import annotations

import collections
import threading
from concurrent.futures import Future
from typing import Callable


class ChunkCache:
    def __init__(self, capacity_bytes: int) -> None:
        self.capacity = capacity_bytes
        self._lru: collections.OrderedDict[str, bytes | memoryview] = collections.OrderedDict()
        self._size = 0
        self._in_flight: dict[str, Future] = {}
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: str, fetch: Callable[[], bytes | memoryview]) -> bytes | memoryview:
        with self._lock:
            data = self._lru.get(key)
            if data is not None:
                self._lru.move_to_end(key)
                self.hits += 1
                return data
            waiting = self._in_flight.get(key)
            if waiting is None:
                mine: Future = Future()
                self._in_flight[key] = mine
                self.misses += 1
            else:
                self.hits += 1
        if waiting is not None:
            return waiting.result()
        try:
            data = fetch()
        except BaseException as exc:
            with self._lock:
                del self._in_flight[key]
            mine.set_exception(exc)
            raise
        with self._lock:
            del self._in_flight[key]
            if len(data) <= self.capacity:
                self._lru[key] = data
                self._size += len(data)
                while self._size > self.capacity:
                    _, evicted = self._lru.popitem(last=False)
                    self._size -= len(evicted)
        mine.set_result(data)
        return data
