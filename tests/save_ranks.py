"""The rank program of the chaos, memory-bound and load tests, and how those tests run it.

    python save_ranks.py SPEC.json RANK

Every rank is a real process in a gloo group (rank and world size reach layervault through
``torch.distributed``, as in a training job) that saves through its node agent. A rank
never asserts: it appends what it did to ``{events_dir}/rank{RANK}.{tag}.jsonl`` - sha256
digests of every tensor it is about to save, when its hand-off returned, when a save
committed, the digests a load gave back, the error that stopped it - and the test reads
these records while the rank runs (to time a SIGKILL) and after it ended (to compare with
what storage holds). Exit status: 0 done, 3 stopped by a layervault error (recorded with its
type and message), 1 anything else (traceback on stderr).

Modes (``RankSpec.mode``):

``chaos``   train a small MLP; save model + Adam at step 1 and wait; then step 2 and wait.
``resume``  what a restarted job does: load step 1, load step 2 if it is listed, train one
            step on another batch (``variant``), save step 2 again (overwrite) and wait.
``bulk``    save ``tensors`` x ``tensor_mib`` MiB of replicated random tensors (each rank
            fills and saves only those it owns), wait, read every owned one back.
``stream``  ``steps`` back-to-back asynchronous saves of ``tensors`` x ``tensor_mib`` MiB
            (one handle per step, all waited at the end), then load every step back.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import pathlib
import subprocess
import sys
import time
import traceback
from typing import Any

import torch

KINDS = ("model", "optimizer")
LAYERVAULT_ERROR_EXIT = 3


@dataclasses.dataclass
class RankSpec:
    """What every rank of one group does (JSON-serialisable)."""

    mode: str
    job: str
    world_size: int
    agent: str
    events_dir: str
    master_port: int
    tag: str = ""               # tells apart event files of several groups in one directory
    layers: int = 3             # chaos/resume: Linear(width, width) layers
    width: int = 640            # 1.56 MiB weights: two 1 MiB chunks each
    variant: int = 0            # resume: which batch trains the new step
    tensors: int = 16           # bulk/stream: replicated tensors in the state
    tensor_mib: int = 1
    steps: int = 5              # stream: saves back to back
    wait_timeout: float = 120.0

    @property
    def label(self) -> str:
        return self.tag or self.mode


# -- rank side -----------------------------------------------------------------------------------


def digest(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's raw bytes, the form the checks compare (equal digests: bit-identical)."""
    flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(flat.numpy().tobytes()).hexdigest()


def bytes_digest(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


class Events:
    """Append-only JSON lines, flushed per record so they survive a SIGKILL of the writer."""

    def __init__(self, path: pathlib.Path) -> None:
        self._file = open(path, "a", buffering=1)

    def __call__(self, event: str, **fields: Any) -> None:
        self._file.write(json.dumps({"event": event, "t": time.monotonic(), **fields}) + "\n")
        self._file.flush()


def _mlp(spec: RankSpec) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)  # same weights on every rank: replicated, as under DDP
    layers: list[torch.nn.Module] = []
    for _ in range(spec.layers):
        layers += [torch.nn.Linear(spec.width, spec.width), torch.nn.Tanh()]
    model = torch.nn.Sequential(*layers)
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


def _train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, step: int, variant: int) -> None:
    batch = torch.randn(8, model[0].in_features, generator=torch.Generator().manual_seed(1000 * step + variant))
    opt.zero_grad()
    model(batch).square().mean().backward()
    opt.step()


def mlp_digests(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, dict[str, str]]:
    """Digests by kind and entry name, named as ModelManager/OptimizerManager(model=) store them."""
    names = {id(p): n for n, p in model.named_parameters()}
    params = [p for group in opt.param_groups for p in group["params"]]
    optimizer = {f"{names[id(p)]}/{key}": digest(value)
                 for p in params for key, value in opt.state[p].items() if isinstance(value, torch.Tensor)}
    return {"model": {n: digest(t) for n, t in model.state_dict().items()}, "optimizer": optimizer}


def _managers(spec: RankSpec):
    import layervault as lv
    from layervault.torch import ModelManager, OptimizerManager

    agent = lv.AgentClient(spec.agent)
    return (ModelManager(lv.ModelConfig(job=spec.job, name="mlp"), agent=agent),
            OptimizerManager(lv.OptimizerConfig(job=spec.job, name="adam"), agent=agent))


def _save_mlp(spec: RankSpec, events: Events, mm, om, model, opt, step: int, overwrite: bool = False) -> None:
    events("saving", step=step, digests=mlp_digests(model, opt))
    handles = []
    for kind, save in (("model", lambda: mm.save(model, step=step, overwrite=overwrite)),
                       ("optimizer", lambda: om.save(opt, step=step, model=model, overwrite=overwrite))):
        handles.append((kind, save()))
        events("handed_off", kind=kind, step=step)
    for kind, handle in handles:
        handle.wait(timeout=spec.wait_timeout)
        events("committed", kind=kind, step=step)


def run_chaos(spec: RankSpec, events: Events) -> None:
    mm, om = _managers(spec)
    model, opt = _mlp(spec)
    for step in (1, 2):
        _train_step(model, opt, step, spec.variant)
        _save_mlp(spec, events, mm, om, model, opt, step)


def run_resume(spec: RankSpec, events: Events) -> None:
    mm, om = _managers(spec)
    listed = {kind: [c.step for c in manager.checkpoints()] for kind, manager in (("model", mm), ("optimizer", om))}
    events("listed", steps=listed)
    relisted = [kind for kind in KINDS if 2 in listed[kind]]
    if relisted:  # a kill after the commit point: step 2 must then be whole and exact
        model, opt = _mlp(spec)
        if "model" in relisted:
            mm.load(model, step=2)
        if "optimizer" in relisted:
            om.load(opt, step=2, model=model)
        events("loaded", step=2, digests={k: v for k, v in mlp_digests(model, opt).items() if k in relisted})
    model, opt = _mlp(spec)
    mm.load(model, step=1)
    om.load(opt, step=1, model=model)
    events("loaded", step=1, digests=mlp_digests(model, opt))
    _train_step(model, opt, 2, spec.variant)
    _save_mlp(spec, events, mm, om, model, opt, 2, overwrite=True)


def _replicated(spec: RankSpec, fill: bool, step: int = 0) -> dict[str, torch.Tensor]:
    """``tensors`` float32 tensors of ``tensor_mib`` MiB; only those ``fill`` selects get values
    (the rest are never touched, so they cost no resident memory)."""
    numel = spec.tensor_mib << 18
    out = {}
    for i in range(spec.tensors):
        name = f"block{i:02d}.weight"
        tensor = torch.empty(numel)
        if fill:
            tensor.uniform_(-1, 1, generator=torch.Generator().manual_seed(1000 * step + i))
        out[name] = tensor
    return out


def _owned(spec: RankSpec, rank: int) -> set[str]:
    from layervault.placement import assign_owners

    sizes = {f"block{i:02d}.weight": spec.tensor_mib << 20 for i in range(spec.tensors)}
    return {name for name, owner in assign_owners(sizes, spec.world_size).items() if owner == rank}


def run_bulk(spec: RankSpec, events: Events, rank: int) -> None:
    mm, _ = _managers(spec)
    owned = _owned(spec, rank)
    state = _replicated(spec, fill=False)
    for i, name in enumerate(sorted(state)):
        if name in owned:
            state[name].uniform_(-1, 1, generator=torch.Generator().manual_seed(i))
    mine = {name: digest(state[name]) for name in sorted(owned)}
    events("saving", step=1, digests={"model": mine})
    handle = mm.save(state, step=1)
    events("handed_off", kind="model", step=1)
    handle.wait(timeout=spec.wait_timeout)
    events("committed", kind="model", step=1)
    del state
    torch.distributed.barrier()  # every save committed before any rank reads: the test samples the phases apart
    loaded = {name: digest(mm.load_layer(name, step=1)) for name in sorted(owned)}
    events("loaded", step=1, digests={"model": loaded})


def run_stream(spec: RankSpec, events: Events) -> None:
    mm, _ = _managers(spec)
    handles = []
    for step in range(1, spec.steps + 1):
        state = _replicated(spec, fill=True, step=step)
        events("saving", step=step, digests={"model": {n: digest(t) for n, t in state.items()}})
        handles.append((step, mm.save(state, step=step)))
        events("handed_off", kind="model", step=step)
    for step, handle in handles:
        handle.wait(timeout=spec.wait_timeout)
        events("committed", kind="model", step=step)
    for step, _ in handles:
        state = _replicated(spec, fill=False)
        mm.load(state, step=step)
        events("loaded", step=step, digests={"model": {n: digest(t) for n, t in state.items()}})


def main(spec_path: str, rank_text: str) -> int:
    import torch.distributed as dist

    from layervault.errors import LayervaultError

    spec = RankSpec(**json.loads(pathlib.Path(spec_path).read_text()))
    rank = int(rank_text)
    events = Events(pathlib.Path(spec.events_dir) / f"rank{rank}.{spec.label}.jsonl")
    torch.set_num_threads(1)  # bit-identical math in every process; the machine is shared anyway
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{spec.master_port}", rank=rank,
                            world_size=spec.world_size, timeout=datetime.timedelta(seconds=60))
    events("started", pid=os.getpid())
    try:
        if spec.mode == "chaos":
            run_chaos(spec, events)
        elif spec.mode == "resume":
            run_resume(spec, events)
        elif spec.mode == "bulk":
            run_bulk(spec, events, rank)
        elif spec.mode == "stream":
            run_stream(spec, events)
        else:
            raise ValueError(f"unknown mode {spec.mode!r}")
    except LayervaultError as exc:
        events("error", type=type(exc).__name__, message=str(exc))
        return LAYERVAULT_ERROR_EXIT
    except Exception as exc:
        events("error", type=type(exc).__name__, message=str(exc), unexpected=True)
        traceback.print_exc()
        return 1
    events("done")
    # No destroy_process_group: a peer may have been SIGKILLed, and nothing here needs a collective.
    return 0


# -- test side -------------------------------------------------------------------------------------


class RankGroup:
    """``spec.world_size`` rank processes of one spec; their events and exit codes."""

    def __init__(self, spec: RankSpec) -> None:
        self.spec = spec
        self.dir = pathlib.Path(spec.events_dir)
        spec_path = self.dir / f"{spec.label}.spec.json"
        spec_path.write_text(json.dumps(dataclasses.asdict(spec)))
        self.procs = []
        for rank in range(spec.world_size):
            log = open(self.dir / f"rank{rank}.{spec.label}.log", "ab")
            self.procs.append(subprocess.Popen([sys.executable, __file__, str(spec_path), str(rank)],
                                               stdout=log, stderr=subprocess.STDOUT))

    def events(self, rank: int) -> list[dict]:
        path = self.dir / f"rank{rank}.{self.spec.label}.jsonl"
        if not path.exists():
            return []
        lines = path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.endswith("}")]  # a SIGKILL may cut the last line

    def find(self, rank: int, event: str, **match: Any) -> dict | None:
        for record in self.events(rank):
            if record["event"] == event and all(record.get(k) == v for k, v in match.items()):
                return record
        return None

    def wait_for(self, event: str, timeout: float, ranks: list[int] | None = None, **match: Any) -> list[dict]:
        """Block until every rank in ``ranks`` (default all) recorded ``event``; their records."""
        ranks = list(range(self.spec.world_size)) if ranks is None else ranks
        deadline = time.monotonic() + timeout
        while True:
            found = [self.find(rank, event, **match) for rank in ranks]
            if all(found):
                return found  # type: ignore[return-value]
            dead = [r for r in ranks if self.procs[r].poll() is not None and not found[ranks.index(r)]]
            if dead or time.monotonic() > deadline:
                raise AssertionError(f"ranks {dead or ranks} of {self.spec.label} never recorded {event} {match}:\n"
                                     + self.logs())
            time.sleep(0.005)

    def kill(self, rank: int) -> None:
        self.procs[rank].kill()
        self.procs[rank].wait(10)

    def wait(self, timeout: float) -> list[int]:
        """Exit codes by rank, once all have exited (the ones still running after ``timeout`` are killed)."""
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        return [proc.returncode for proc in self.procs]

    def logs(self) -> str:
        """Each rank's recorded error (if any) and the tail of its output, for failure messages."""
        out = []
        for r in range(self.spec.world_size):
            errors = [e for e in self.events(r) if e["event"] == "error"]
            out.append(f"--- rank {r} (exit {self.procs[r].poll()}): {errors[0] if errors else 'no error recorded'}\n"
                       + (self.dir / f"rank{r}.{self.spec.label}.log").read_text()[-2000:])
        return "\n".join(out)

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
