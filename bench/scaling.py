"""Scaling: state sizes x ranks on one agent; blocked time and time to durable per GB.

Ranks are real processes (torch.multiprocessing) in a real gloo group, as under DDP: every
rank holds the whole model and ModelManager has each save the tensors it owns (about
1/world of the bytes), all into one checkpoint that the coordinator commits once every rank
reported. A cell's blocked time is the slowest rank's ``save()``, its time to durable the
slowest rank's ``wait()``, both from a barrier that starts every rank together.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from agent_process import Up

LAYER_BYTES = (2048 * 2048 + 2048) * 4


@dataclasses.dataclass(frozen=True)
class Cell:
    gib: float
    ranks: int
    state_bytes: int
    blocked: float  # seconds, slowest rank
    durable: float


def _rank(rank: int, world: int, layers: int, agent: str, job: str, port: int, results) -> None:
    import layervault as lv
    from layervault.torch import ModelManager

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # same model on every rank, as DDP keeps it
        with torch.no_grad():
            model = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048) for _ in range(layers)])
        manager = ModelManager(lv.ModelConfig(job=job, name="stack"), agent=lv.AgentClient(agent))
        dist.barrier()
        start = time.perf_counter()
        handle = manager.save(model, step=0)
        blocked = time.perf_counter() - start
        handle.wait(timeout=900)
        results.put((rank, blocked, time.perf_counter() - start))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cell(agent: str, gib: float, ranks: int) -> Cell:
    layers = max(ranks, round(gib * 2**30 / LAYER_BYTES))
    job = f"scale-{gib:g}gib-{ranks}r"
    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_rank, args=(ranks, layers, agent, job, _free_port(), results), nprocs=ranks, join=True)
    rows = [results.get() for _ in range(ranks)]
    return Cell(gib, ranks, layers * LAYER_BYTES, max(r[1] for r in rows), max(r[2] for r in rows))


def scaling(storage: str, sizes_gib: list[float], ranks: list[int], workdir: pathlib.Path,
            skip: set[tuple[float, int]] = frozenset()) -> list[Cell]:
    """One run per cell, all on one agent whose staging holds the largest state."""
    staging_mib = max(256, int(max(sizes_gib) * 1024 * 1.1))
    cells = []
    with Up(storage, staging_mib, workdir, tag="-scaling") as up:
        for gib in sizes_gib:
            for n in ranks:
                if (gib, n) in skip:
                    continue
                cells.append(run_cell(up.info["agent"], gib, n))
                print(f"  scaling {gib:g} GiB x {n} ranks: blocked {cells[-1].blocked:.2f} s, "
                      f"durable {cells[-1].durable:.2f} s", flush=True)
    return cells
