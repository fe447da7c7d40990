"""The benchmark's state, timing and memory probes, and the per-system result record.

Every system saves the same state (issue 5): a stack of ``Linear(2048, 2048)`` layers plus
Adam after one step, so its bytes are dense fp32 that no codec shrinks much.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import threading
import time
from typing import Callable

import psutil
import torch

GB = 1e9
MiB = 2**20


def make_state(layers: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048) for _ in range(layers)])
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    model(torch.randn(4, 2048)).sum().backward()
    opt.step()
    return model, opt


def tensors(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    out = list(model.state_dict().values())
    for s in opt.state_dict()["state"].values():
        out += [v for v in s.values() if isinstance(v, torch.Tensor)]
    return out


def state_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for t in tensors(model, opt))


def dcp_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    """The state as DCP sees it, one process: ``{"model", "optim"}`` state dicts."""
    return {"model": model.state_dict(), "optim": opt.state_dict()}


def fresh_dcp_target(layers: int) -> dict:
    """A DCP load target of the same shapes, in a fresh model and optimizer."""
    model, opt = make_state(layers)
    return dcp_state(model, opt)


def stats(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})" if values else "-"


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class PeakRss:
    """This process's peak RSS increase over a ``with`` block, sampled every few ms.

    ``ru_maxrss`` only ever grows over a process's life, so it cannot tell the second run from
    the first; a sampling thread can. Short spikes between samples may be missed.
    """

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.increase = 0
        self._process = psutil.Process(os.getpid())
        self._stop = threading.Event()

    def __enter__(self) -> "PeakRss":
        self._base = self._peak = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, self._process.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._process.memory_info().rss)
        self.increase = self._peak - self._base


@dataclasses.dataclass
class SystemResult:
    """One row of the main table: a checkpoint system's figures over ``runs`` runs (seconds, bytes)."""

    name: str
    blocked: list[float] = dataclasses.field(default_factory=list)  # every save, the first included
    staged: list[float] = dataclasses.field(default_factory=list)  # background staging only: until it ended
    durable: list[float] = dataclasses.field(default_factory=list)
    restore: list[float] = dataclasses.field(default_factory=list)
    layer: list[float] = dataclasses.field(default_factory=list)  # one-layer restore; empty: not offered
    stored: int = 0
    trainer_rss: list[int] = dataclasses.field(default_factory=list)  # peak increase during each save
    agent_rss: int | None = None  # agent's peak RSS over its life (Stats), for layervault rows
    agent_pool: int | None = None
    note: str = ""

    @property
    def blocked_first(self) -> float:
        return self.blocked[0]

    @property
    def blocked_later(self) -> list[float]:
        return self.blocked[1:] or self.blocked


def timed_dcp_save(state: dict, writer: object, asynchronous: bool, result: SystemResult,
                   then: Callable[[], object] | None = None, background_staging: bool = False) -> None:
    """One DCP save into ``result``: blocked until ``save``/``async_save`` returns, durable once
    its future and ``then`` (an upload, for the disk peers) are done; the trainer's peak RSS.

    ``background_staging``: async_save stages on DCP's own thread (``DefaultStager`` with
    ``use_async_staging``, its zero-overhead mode) and ``staged`` records when that ended."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    with PeakRss() as rss:
        start = time.perf_counter()
        if background_staging:
            stager = DefaultStager(StagingOptions(use_pinned_memory=False, use_shared_memory=False,
                                                  use_async_staging=True, use_non_blocking_copy=False))
            response = dcp.async_save(state, storage_writer=writer, async_stager=stager)
            result.blocked.append(time.perf_counter() - start)
            response.staging_completion.result()
            result.staged.append(time.perf_counter() - start)
            response.upload_completion.result()
            stager.close()
        elif asynchronous:
            future = dcp.async_save(state, storage_writer=writer)
            result.blocked.append(time.perf_counter() - start)
            future.result()
        else:
            dcp.save(state, storage_writer=writer)
            result.blocked.append(time.perf_counter() - start)
        if then is not None:
            then()
        result.durable.append(time.perf_counter() - start)
    result.trainer_rss.append(rss.increase)
