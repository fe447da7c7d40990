"""End-to-end demo: a 2-rank data-parallel job checkpoints through layervault, dies, and resumes.

    python -m layervault.demo            (what ``scripts/dev demo`` runs)

It starts ``layervault up`` on the embedded default storage (a folder under your home),
trains a small transformer on two gloo ranks, saves model + AdamW state at two steps,
stops everything, starts fresh services and fresh ranks, restores the latest checkpoint and
checks that training continues with exactly the losses of an uninterrupted run. The same
rank program serves the multi-node test (``tests/test_multiprocess.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class TinyTransformer(torch.nn.Module):
    def __init__(self, vocab: int = 256, width: int = 64, layers: int = 2) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        block = torch.nn.TransformerEncoderLayer(width, nhead=4, dim_feedforward=4 * width, dropout=0.0, batch_first=True)
        self.encoder = torch.nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.head = torch.nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)))


@dataclasses.dataclass
class RankJob:
    """What every rank of a demo/test run does (picklable, for spawn)."""

    job: str
    world_size: int
    master_port: int
    agents: list[str]            # agent address per rank
    out_dir: str
    mode: str                    # "train": train, save at save_steps, go on; "resume": load latest, go on
    save_steps: tuple[int, ...] = (3, 6)
    extra_steps: int = 4
    shared_memory: bool = True


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    tokens = torch.randint(0, 256, (8, 16), generator=gen)
    return tokens[:, :-1], tokens[:, 1:]


def _train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, rank: int, step: int) -> float:
    inputs, targets = _batch(rank, step)
    logits = model(inputs)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    opt.zero_grad()
    loss.backward()
    # Data parallel like DDP, but reduced one parameter at a time in a fixed order: DDP
    # re-buckets gradients after its first iteration, so with more than two ranks a resumed
    # run sums floats in another order than the uninterrupted one and losses drift in the
    # last bits - which would hide whether the checkpoint itself restored bit-exactly.
    world = dist.get_world_size()
    for param in model.parameters():
        dist.all_reduce(param.grad)
        param.grad /= world
    opt.step()
    return loss.item()


def run_rank(rank: int, spec: RankJob) -> None:
    import layervault as lv
    from layervault.torch import ModelManager, OptimizerManager

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{spec.master_port}", rank=rank, world_size=spec.world_size)
    torch.manual_seed(0)
    model = TinyTransformer()  # same seed on every rank: replicated parameters, as under DDP
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    agent = lv.AgentClient(spec.agents[rank], shared_memory=spec.shared_memory)
    mm = ModelManager(lv.ModelConfig(job=spec.job, name="tiny-transformer", additional={"creator": "layervault-demo", "version": "1.0"}), agent=agent)
    om = OptimizerManager(lv.OptimizerConfig(job=spec.job, name="adamw"), agent=agent)
    report: dict = {"rank": rank, "losses": {}, "saves": []}
    if spec.mode == "train":
        first = 1
    else:
        loaded = mm.load(model)
        om.load(opt, step=loaded.step, model=model)
        report["resumed_from"] = loaded.step
        first = loaded.step + 1
    last = max(spec.save_steps) + spec.extra_steps
    for step in range(first, last + 1):
        report["losses"][step] = _train_step(model, opt, rank, step)
        if spec.mode == "train" and step in spec.save_steps:
            started = time.perf_counter()
            handles = [mm.save(model, step=step, epoch=step // 3), om.save(opt, model=model)]
            blocked = time.perf_counter() - started
            infos = [h.wait(timeout=120) for h in handles]
            report["saves"].append({"step": step, "blocked_s": blocked, "committed_s": time.perf_counter() - started,
                                    "stored_bytes": [i.stored_bytes for i in infos]})
    pathlib.Path(spec.out_dir, f"rank{rank}.{spec.mode}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


def run_ranks(spec: RankJob) -> list[dict]:
    """Run ``spec.world_size`` real rank processes (spawn + gloo); their reports, by rank."""
    mp.start_processes(run_rank, args=(spec,), nprocs=spec.world_size, start_method="spawn", join=True)
    return [json.loads(pathlib.Path(spec.out_dir, f"rank{r}.{spec.mode}.json").read_text()) for r in range(spec.world_size)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Services:
    """``layervault up`` in a child process, stopped with SIGTERM."""

    def __init__(self, storage: str, workdir: pathlib.Path, staging_mib: int = 256) -> None:
        self.storage, self.workdir, self.staging_mib = storage, workdir, staging_mib
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        ready = self.workdir / "up.ready.json"
        ready.unlink(missing_ok=True)
        with open(self.workdir / "up.log", "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "layervault.cli", "up", "--storage", self.storage,
                 "--socket", str(self.workdir / "agent.sock"), "--staging-mib", str(self.staging_mib),
                 "--ready-file", str(ready)],
                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"layervault up did not start; see {self.workdir / 'up.log'}")
            time.sleep(0.05)
        self.info = json.loads(ready.read_text())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)
        self.proc = None


def _demo(job: str, ranks: int, storage: str, workdir: pathlib.Path, services: "Services") -> bool:
    print(f"  started coordinator {services.info['coordinator']} and agent {services.info['agent']}")
    spec = RankJob(job, ranks, free_port(), [services.info["agent"]] * ranks, str(workdir), "train")
    reference = run_ranks(spec)
    for save in reference[0]["saves"]:
        print(f"  step {save['step']}: rank 0 blocked {save['blocked_s'] * 1e3:.1f} ms in save(), "
              f"committed after {save['committed_s'] * 1e3:.0f} ms ({sum(save['stored_bytes'])} bytes stored)")
    services.stop()
    print("  stopped every service and rank (the job 'crashed' after step 10)")

    services.start()
    print(f"  restarted services; agent {services.info['agent']}")
    resumed = run_ranks(dataclasses.replace(spec, mode="resume", master_port=free_port()))
    ok = True
    for ref, res in zip(reference, resumed):
        same = all(ref["losses"][step] == loss for step, loss in res["losses"].items())
        ok &= same
        print(f"  rank {res['rank']}: resumed from step {res['resumed_from']}, losses of steps "
              f"{', '.join(res['losses'])}: {'identical to the uninterrupted run' if same else 'DIFFERENT'}")

    env = {**os.environ, "LAYERVAULT_AGENT": services.info["agent"]}
    print("\n$ layervault ls " + job)
    subprocess.run([sys.executable, "-m", "layervault.cli", "ls", job], env=env, check=True)
    print(f"\n$ layervault show {job} 6")
    subprocess.run([sys.executable, "-m", "layervault.cli", "show", job, "6"], env=env, check=True)

    import layervault as lv
    from layervault.torch import ModelManager

    mm = ModelManager(lv.ModelConfig(job=job, name="tiny-transformer"), agent=services.info["agent"])
    layer = mm.load_layer("encoder.layers.0.linear1.weight", step=3)
    print(f"\nload_layer('encoder.layers.0.linear1.weight', step=3) -> {tuple(layer.shape)} {layer.dtype}")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--storage", help="storage URL (default: the embedded default, ~/.layervault/storage)")
    parser.add_argument("--ranks", type=int, default=2)
    args = parser.parse_args(argv)
    from layervault.cli import DEFAULT_HOME_STORAGE

    storage = args.storage or DEFAULT_HOME_STORAGE.as_uri()
    job = time.strftime("demo-%Y%m%d-%H%M%S")
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="layervault-demo-"))
    print(f"layervault demo: job {job!r}, storage {storage}, {args.ranks} gloo ranks")

    services = Services(storage, workdir)
    try:
        ok = _demo(job, args.ranks, storage, workdir, services)
    finally:
        services.stop()
    print(f"\ndemo {'PASSED' if ok else 'FAILED'}; checkpoints stay in {storage} (job {job})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
