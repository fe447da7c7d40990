"""A data-parallel rank as a Ray actor, for tests/test_ray.py.

It names no agent: the SDK finds the agent of the actor's Ray node through
``layervault.ray`` (the point of the test). Imported by Ray workers, so it lives in a plain
module on the workers' PYTHONPATH, not in the test file.
"""

from __future__ import annotations

import numpy as np
import ray
import torch
import torch.distributed as dist

import layervault as lv
from layervault.torch import ModelManager, OptimizerManager


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))


def _numpy(state: dict) -> dict[str, np.ndarray]:
    return {k: v.detach().clone().numpy() for k, v in state.items() if isinstance(v, torch.Tensor)}


class RankActor:
    """One rank of a gloo group; trains a small MLP and checkpoints it through layervault."""

    def __init__(self, job: str, rank: int, world_size: int, master: str) -> None:
        dist.init_process_group("gloo", init_method=f"tcp://{master}", rank=rank, world_size=world_size)
        self.job, self.rank = job, rank
        self.model = _model(seed=0)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=0.01)
        self.models = ModelManager(lv.ModelConfig(job=job, name="mlp", additional={"runner": "ray"}))
        self.optimizers = OptimizerManager(lv.OptimizerConfig(job=job, name="adam"))

    def where(self) -> tuple[str, str]:
        """(this actor's Ray node id, the agent address its managers found)."""
        return ray.get_runtime_context().get_node_id(), self.models.client.address

    def train_and_save(self, step: int) -> dict[str, np.ndarray]:
        """One data-parallel step (gradients all-reduced over gloo), then save; returns the saved state."""
        gen = torch.Generator().manual_seed(100 * step + self.rank)
        x, y = torch.randn(16, 32, generator=gen), torch.randn(16, 8, generator=gen)
        self.optimizer.zero_grad()
        torch.nn.functional.mse_loss(self.model(x), y).backward()
        for p in self.model.parameters():
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()
        self.optimizer.step()
        self.models.save(self.model, step=step).wait(timeout=60)
        self.optimizers.save(self.optimizer, model=self.model).wait(timeout=60)
        return self.state()

    def state(self) -> dict[str, np.ndarray]:
        """Model parameters and the optimizer's per-parameter tensors, by name."""
        out = {f"model/{k}": v for k, v in _numpy(self.model.state_dict()).items()}
        for index, per_param in self.optimizer.state_dict()["state"].items():
            out.update({f"optim/{index}/{k}": v for k, v in _numpy(per_param).items()})
        return out

    def load_fresh(self, step: int) -> dict[str, np.ndarray]:
        """Load ``step`` into a differently initialised model and a new optimizer; returns their state."""
        self.model = _model(seed=1 + self.rank)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=0.01)
        self.models.load(self.model, step=step)
        self.optimizers.load(self.optimizer, step=step, model=self.model)
        return self.state()

    def checkpoints(self) -> list[tuple[str, int, int]]:
        """(kind, step, world size) of every committed checkpoint of the job."""
        return [(c.kind, c.step, c.world_size) for m in (self.models, self.optimizers) for c in m.checkpoints()]

    def close(self) -> None:
        dist.destroy_process_group()
