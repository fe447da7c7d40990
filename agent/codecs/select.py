"""Choose a layer's codec chain from a sample of its bytes.

A codec pays only when the bytes it saves cost more than the CPU it spends. Both sides vary
by orders of magnitude: lz4 on dense fp32 weights saves nothing, byte-shuffle+lz4 saves
~10% of them at ~1 CPU-s per GB (encode and decode), mostly-zero or integer tensors shrink
2-10x for less. A stored byte costs the store's write time once and its read time on every
restore; on the development machine's S3 server that is ~6 s per GB, and there shuffle+lz4
on the bench state (a 10-14% gain) made time to durable 6% and full restore 43% slower than
storing it raw.

So the agent encodes and decodes a sample of each layer with each candidate chain, timing
both, and keeps the chain with the lowest estimated cost per layer, codec time plus stored
bytes at :class:`StoreRates`; a chain must also save at least ``min_gain`` of the bytes.
The timing runs on the agent's own CPU under its current load, so a busy agent compresses
less.
"""

from __future__ import annotations

import dataclasses
import functools
import time

from layervault.agent.codecs.base import CodecChain

SAMPLE_BYTES = 256 * 1024
GB = 1e9


@dataclasses.dataclass(frozen=True)
class StoreRates:
    """How fast the agent's storage writes and reads back bytes, GB/s for the whole agent.

    The defaults are what SeaweedFS S3 on loopback sustains on the 2-core development machine
    (writes 0.19, ranged reads 1.3 GB/s): a slow store, on which compression pays most. A
    store faster than that makes codecs worth it for fewer layers; to keep the fewest bytes
    whatever the time, give a tiny write rate.
    """

    write_gbps: float = 0.2
    read_gbps: float = 1.3

    def __post_init__(self) -> None:
        if not (self.write_gbps > 0 and self.read_gbps > 0):
            raise ValueError(f"store rates must be positive GB/s, got write {self.write_gbps}, read {self.read_gbps}")

    @property
    def seconds_per_byte(self) -> float:
        """Writing one stored byte and reading it back once."""
        return 1 / (self.write_gbps * GB) + 1 / (self.read_gbps * GB)


def candidate_chains(compressor: str, itemsize: int) -> list[list[str]]:
    """Chains worth trying for a requested compressor and a dtype's element size."""
    if compressor == "none":
        return []
    chains = [["lz4/1:1"]]
    if compressor in ("lz4", "auto") and itemsize > 1:
        chains.append([f"shuffle/1:{itemsize}", "lz4/1:1"])
    return chains


@dataclasses.dataclass(frozen=True)
class Trial:
    """One chain on the sample: stored bytes and codec CPU seconds (encode + decode)."""

    chain: list[str]
    stored: int
    seconds: float

    def cost(self, rates: StoreRates) -> float:
        return self.seconds + self.stored * rates.seconds_per_byte


@functools.lru_cache(maxsize=None)
def _warmed(chain: tuple[str, ...]) -> CodecChain:
    """The chain, run once on a small buffer: a codec's first call in a process (imports,
    tables) would otherwise be timed as the first layer's cost."""
    codec = CodecChain(list(chain))
    warm = memoryview(bytes(range(256)) * 16)
    codec.decode(codec.encode(warm), len(warm))
    return codec


def trial(chain: list[str], sample: memoryview) -> Trial:
    codec = _warmed(tuple(chain))
    start = time.thread_time()  # this thread's CPU: time the scheduler gave others is not the codec's
    encoded = codec.encode(sample)
    codec.decode(encoded, len(sample))
    return Trial(chain, len(encoded), time.thread_time() - start)


def choose_chain(sample: memoryview, compressor: str, itemsize: int, rates: StoreRates = StoreRates(),
                 min_gain: float = 0.03) -> list[str]:
    """The chain to use for a layer whose first bytes are ``sample`` (empty = store raw)."""
    sample = sample[:SAMPLE_BYTES]
    if len(sample) == 0:
        return []
    best = Trial([], len(sample), 0.0)
    for chain in candidate_chains(compressor, itemsize):
        candidate = trial(chain, sample)
        if candidate.stored <= len(sample) * (1.0 - min_gain) and candidate.cost(rates) < best.cost(rates):
            best = candidate
    return best.chain
