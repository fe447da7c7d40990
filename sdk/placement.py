"""Which rank stores which replicated tensor (framework-neutral).

Under data parallelism every rank holds the same variables; storing them once per rank
would multiply upload time and bytes by the world size. Each replicated entry is owned by
exactly one rank, chosen by a deterministic greedy balance on bytes (largest first, to the
least loaded rank), so all ranks agree without talking and the upload work spreads over
every node's agent. Framework-neutral: the torch and TensorFlow managers both use it.
"""

from __future__ import annotations

from typing import Mapping


def assign_owners(sizes: Mapping[str, int], world_size: int) -> dict[str, int]:
    """Owner rank of each entry, from its size in bytes; identical on every rank."""
    load = [0] * world_size
    owners = {}
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owners[name] = rank
        load[rank] += max(sizes[name], 1)
    return owners
