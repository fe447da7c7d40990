"""What a rank says about the checkpoints it saves: frozen, validated configs."""

from __future__ import annotations

import dataclasses
from typing import Mapping

from layervault.errors import InvalidArgumentError

COMPRESSORS = ("lz4", "auto", "none")


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
    lz4 and byte-shuffle+lz4 from a sample - whichever shrinks the data; ``"none"`` stores raw.
    """

    job: str
    name: str
    additional: Mapping[str, str] = dataclasses.field(default_factory=dict)
    compressor: str = "lz4"

    def __post_init__(self) -> None:
        _check_common(self.job, self.name, self.additional, self.compressor)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """An optimizer's checkpoints within a job (hyper-parameters and per-parameter state)."""

    job: str
    name: str
    additional: Mapping[str, str] = dataclasses.field(default_factory=dict)
    compressor: str = "lz4"

    def __post_init__(self) -> None:
        _check_common(self.job, self.name, self.additional, self.compressor)
