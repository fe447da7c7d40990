"""What a rank says about the checkpoints it saves: frozen, validated configs."""

from __future__ import annotations

import dataclasses
from typing import Mapping

from layervault.agent.retention import Retention
from layervault.errors import InvalidArgumentError

COMPRESSORS = ("lz4", "auto", "none")

__all__ = ["COMPRESSORS", "ModelConfig", "OptimizerConfig", "Retention"]


def _check_lifecycle(incremental: bool, retention: Retention | None) -> None:
    if not isinstance(incremental, bool):
        raise InvalidArgumentError(f"incremental must be True or False, got {incremental!r}")
    if retention is not None and not isinstance(retention, Retention):
        raise InvalidArgumentError(f"retention must be a layervault.Retention, got {type(retention).__name__}")


def _check_common(job: str, name: str, additional: Mapping[str, str], compressor: str) -> None:
    from layervault.agent.keys import check_job

    check_job(job)
    if not isinstance(name, str) or not name:
        raise InvalidArgumentError("config name must be a non-empty string (e.g. the model's name)")
    for key, value in additional.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidArgumentError(f"additional info must map strings to strings, got {key!r}: {value!r}")
    if compressor not in COMPRESSORS:
        raise InvalidArgumentError(f"unknown compressor {compressor!r}; choose one of {', '.join(COMPRESSORS)}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A model's checkpoints within a job.

    ``compressor``: ``"lz4"`` (default) lets the agent pick, per layer, between storing raw,
    lz4 and byte-shuffle+lz4 from a sample: whichever costs least, codec CPU time plus the
    stored bytes at the agent's store rates (so dense fp32 usually stays raw); ``"none"``
    stores raw.
    ``incremental``: chunks whose bytes are unchanged since the job's newest checkpoint
    (frozen layers) are referenced, not uploaded again. ``retention``: which checkpoints of
    the job the coordinator keeps after each commit (default: all, or its ``--retention``).
    """

    job: str
    name: str
    additional: Mapping[str, str] = dataclasses.field(default_factory=dict)
    compressor: str = "lz4"
    incremental: bool = False
    retention: Retention | None = None

    def __post_init__(self) -> None:
        _check_common(self.job, self.name, self.additional, self.compressor)
        _check_lifecycle(self.incremental, self.retention)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """An optimizer's checkpoints within a job (hyper-parameters and per-parameter state);
    ``incremental`` and ``retention`` as for :class:`ModelConfig`."""

    job: str
    name: str
    additional: Mapping[str, str] = dataclasses.field(default_factory=dict)
    compressor: str = "lz4"
    incremental: bool = False
    retention: Retention | None = None

    def __post_init__(self) -> None:
        _check_common(self.job, self.name, self.additional, self.compressor)
        _check_lifecycle(self.incremental, self.retention)
