"""layervault itself: ModelManager/OptimizerManager, its DCP writer/reader, and the gRPC
(no shared memory) hand-off path, each against its own `layervault up` child so the
agent's peak RSS (Stats) belongs to that system alone."""

from __future__ import annotations

import pathlib
import time
import warnings

import torch
import torch.distributed.checkpoint as dcp

import layervault as lv
from layervault.torch import ModelManager, OptimizerManager
from layervault.torch.dcp import AgentStorageReader, AgentStorageWriter

from agent_process import Up
from peers import middle_key
from state import PeakRss, SystemResult, dcp_state, fresh_dcp_target, make_state, timed, timed_dcp_save

warnings.filterwarnings("ignore", message="torch.distributed is disabled")


def managers(storage: str, staging_mib: int, runs: int, model: torch.nn.Module, opt: torch.optim.Optimizer,
             workdir: pathlib.Path, background: bool = False) -> SystemResult:
    """``background``: ``save(background=True)``; blocked is until save() returns, ``staged``
    until both handles' ``wait_staged()`` return (when the next optimizer step may run)."""
    label = f"{staging_mib // 1024} GiB" if staging_mib >= 1024 else f"{staging_mib} MiB"
    result = SystemResult(f"layervault ModelManager, {label} staging{', background staging' if background else ''}")
    with Up(storage, staging_mib, workdir, tag="-bg" if background else "") as up:
        client = lv.AgentClient(up.info["agent"])
        job = f"bench-{staging_mib}{'-bg' if background else ''}"
        mm = ModelManager(lv.ModelConfig(job=job, name="linear-stack"), agent=client)
        om = OptimizerManager(lv.OptimizerConfig(job=job, name="adam"), agent=client)
        for run in range(runs):
            with PeakRss() as rss:
                start = time.perf_counter()
                handles = [mm.save(model, step=run, background=background),
                           om.save(opt, step=run, background=background)]
                result.blocked.append(time.perf_counter() - start)
                if background:
                    for handle in handles:
                        handle.wait_staged()
                    result.staged.append(time.perf_counter() - start)
                infos = [h.wait(timeout=600) for h in handles]
                result.durable.append(time.perf_counter() - start)
            result.trainer_rss.append(rss.increase)
            result.stored = sum(i.stored_bytes for i in infos)
        agent_stats = client.stats()
        result.agent_rss, result.agent_pool = agent_stats.peak_rss_bytes, agent_stats.pool_size
        fresh_model, fresh_opt = make_state(len(model))
        result.restore = [timed(lambda: (mm.load(fresh_model, step=r), om.load(fresh_opt, step=r))) for r in range(runs)]
        key = middle_key(len(model))
        result.layer = [timed(lambda: mm.load_layer(key, step=r)) for r in range(runs)]
        if not torch.equal(fresh_model.state_dict()[key], model.state_dict()[key]):
            raise SystemExit(f"layervault restored {key} with wrong bytes")
    return result


def dcp_writer(storage: str, runs: int, model: torch.nn.Module, opt: torch.optim.Optimizer, workdir: pathlib.Path,
               asynchronous: bool) -> SystemResult:
    kind = "async_save" if asynchronous else "save"
    result = SystemResult(f"dcp.{kind} + layervault AgentStorageWriter")
    state = dcp_state(model, opt)
    job = f"bench-dcp-{kind}"
    with Up(storage, 2048, workdir, tag=f"-dcp-{kind}") as up:
        client = lv.AgentClient(up.info["agent"])
        client.prepare()
        for run in range(runs):
            writer = AgentStorageWriter(job=job, step=run, agent=client)
            timed_dcp_save(state, writer, asynchronous, result)
        result.stored = client.list(job=job)[0].stored_bytes
        agent_stats = client.stats()
        result.agent_rss, result.agent_pool = agent_stats.peak_rss_bytes, agent_stats.pool_size
        key = middle_key(len(model))
        for run in range(runs):
            target = fresh_dcp_target(len(model))
            result.restore.append(timed(lambda: dcp.load(
                target, storage_reader=AgentStorageReader(job=job, step=run, agent=client))))
            one = {"model": {key: torch.empty_like(model.state_dict()[key])}}
            result.layer.append(timed(lambda: dcp.load(one, storage_reader=AgentStorageReader(job=job, step=run, agent=client))))
            if not torch.equal(one["model"][key], model.state_dict()[key]):
                raise SystemExit(f"AgentStorageReader restored {key} of step {run} with wrong bytes")
    return result


def grpc_handoff(storage: str, runs: int, model: torch.nn.Module, opt: torch.optim.Optimizer,
                 workdir: pathlib.Path) -> list[float]:
    """Seconds to hand the state to the agent over gRPC alone (shared memory off).

    The staging pool holds the whole state, so ``save()`` returns when the last byte is
    staged and never waits on uploads: its duration is the hand-off itself.
    """
    seconds = []
    with Up(storage, 2048, workdir, tag="-grpc") as up:
        client = lv.AgentClient(up.info["agent"], shared_memory=False)
        mm = ModelManager(lv.ModelConfig(job="bench-grpc", name="linear-stack"), agent=client)
        om = OptimizerManager(lv.OptimizerConfig(job="bench-grpc", name="adam"), agent=client)
        for run in range(runs):
            start = time.perf_counter()
            handles = [mm.save(model, step=run), om.save(opt, step=run)]
            seconds.append(time.perf_counter() - start)
            for h in handles:
                h.wait(timeout=600)
    return seconds
