"""Rank programs for the DCP tests (spawned processes, gloo): FSDP2 save and resharded load."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp


@dataclasses.dataclass
class DcpJob:
    job: str
    world_size: int
    master_port: int
    agents: list[str]      # agent address per rank
    out_dir: str
    mode: str              # "save" or "load"
    step: int = 2
    replicated: bool = False   # also save a plain (replicated) tensor


def build(seed: int, mesh):  # -> (model, optimizer)
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256), torch.nn.Linear(256, 10))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def full_state(state: dict) -> dict:
    """Every DTensor gathered to a full tensor (for comparison), keyed by flattened name."""
    from torch.distributed.tensor import DTensor

    out = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, DTensor):
            out[prefix] = value.full_tensor()
        elif isinstance(value, torch.Tensor):
            out[prefix] = value
    walk("", state)
    return out


def run(rank: int, spec: DcpJob) -> None:
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict)
    from torch.distributed.device_mesh import init_device_mesh

    from layervault.torch.dcp import AgentStorageReader, AgentStorageWriter

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{spec.master_port}", rank=rank, world_size=spec.world_size)
    mesh = init_device_mesh("cpu", (spec.world_size,))
    out = pathlib.Path(spec.out_dir)
    if spec.mode == "save":
        model, opt = build(0, mesh)
        for step in range(spec.step):
            gen = torch.Generator().manual_seed(step)
            model(torch.randn(8, 256, generator=gen)).square().mean().backward()
            opt.step()
            opt.zero_grad()
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt),
                 "progress": {"step": spec.step, "tag": "fsdp2", "history": [0.5, 0.25]}}
        if spec.replicated:
            state["replicated"] = torch.arange(64 * 1024, dtype=torch.float32)
        dcp.save(state, storage_writer=AgentStorageWriter(job=spec.job, step=spec.step, agent=spec.agents[rank]))
        reference = full_state(state)
        if rank == 0:
            torch.save(reference, out / f"{spec.job}.reference.pt")
    else:
        model, opt = build(1, mesh)  # other initial values: everything must come from the checkpoint
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt),
                 "progress": {"step": 0, "tag": "", "history": []}}
        if spec.replicated:
            state["replicated"] = torch.zeros(64 * 1024)
        reader = AgentStorageReader(job=spec.job, agent=spec.agents[rank])
        dcp.load(state, storage_reader=reader)
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, opt, state["optim"])
        loaded = full_state({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt),
                             **({"replicated": state["replicated"]} if spec.replicated else {})})
        reference = torch.load(out / f"{spec.job}.reference.pt", weights_only=True)
        mismatched = [k for k in reference if k not in loaded or not torch.equal(reference[k], loaded[k])]
        report = {"rank": rank, "mismatched": mismatched, "compared": len(reference),
                  "progress": state["progress"], "bytes_received": reader.bytes_received}
        (out / f"{spec.job}.load.{spec.world_size}.{rank}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()
    # Known PyTorch issue (pytorch/pytorch#179291): gloo worker threads that still hold work
    # objects can abort the interpreter's finalization ("terminate called without an active
    # exception"), rarely, after everything is done. This rank's results are written; skip it.
    os._exit(0)


def run_ranks(spec: DcpJob) -> list[dict]:
    mp.start_processes(run, args=(spec,), nprocs=spec.world_size, start_method="spawn", join=True)
    if spec.mode == "save":
        return []
    out = pathlib.Path(spec.out_dir)
    return [json.loads((out / f"{spec.job}.load.{spec.world_size}.{r}.json").read_text()) for r in range(spec.world_size)]
