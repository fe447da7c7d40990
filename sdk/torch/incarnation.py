"""The incarnation of a PyTorch job (see :mod:`layervault.incarnation`), agreed by its ranks.

Without a launcher-given id, global rank 0 makes one and broadcasts it over the default
process group: a collective, so every rank must call :func:`job_incarnation` at the same
point - the managers do it when they are constructed, which every rank already does. The id
travels as 16 raw bytes in a tensor, never pickled.
"""

from __future__ import annotations

import uuid

import torch

from layervault.incarnation import from_environment, fresh


def job_incarnation() -> str:
    """This run's incarnation: the launcher's, else one id broadcast from rank 0, else a fresh
    one (torch.distributed not initialised, or a world of one)."""
    given = from_environment()
    if given:
        return given
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return fresh()
    proposal = uuid.UUID(fresh()).bytes if dist.get_rank() == 0 else bytes(16)
    buffer = torch.tensor(list(proposal), dtype=torch.uint8, device=_collective_device())
    dist.broadcast(buffer, src=0)
    return uuid.UUID(bytes=bytes(buffer.cpu().tolist())).hex


def _collective_device() -> torch.device:
    """Where the default group's backend takes tensors: the CPU for gloo and MPI (also when
    gloo serves the CPU beside an accelerator backend), else this rank's accelerator."""
    backend = str(torch.distributed.get_backend()).lower()
    accelerator = torch.accelerator.current_accelerator()
    if "gloo" in backend or "mpi" in backend or accelerator is None:
        return torch.device("cpu")
    return torch.device(accelerator.type, torch.accelerator.current_device_index())
