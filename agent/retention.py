"""Retention: which committed checkpoints of a job to keep, as a pure function.

A policy is a union of rules - the ``keep_last`` newest steps, every step that is a
multiple of ``keep_every``, the ``keep_best`` steps with the best value of a training key
(smallest loss, largest accuracy) - and a checkpoint survives if any rule keeps it. Two
guards hold whatever the rules say: the newest committed step is never deleted (a restart
always finds something), nor is any step the caller protects (a save of it is in flight,
or a pending incremental save references it). A policy with no rule keeps everything.

The coordinator applies a policy after each commit (see :mod:`layervault.agent.commit`),
deleting through :func:`layervault.agent.lifecycle.delete_checkpoint`, which follows
references: an object shared with a kept checkpoint is never deleted.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Collection, Mapping, Sequence

from layervault.errors import InvalidArgumentError
from layervault.proto import common_pb2

BEST_MODES = ("min", "max")


@dataclasses.dataclass(frozen=True)
class Retention:
    """Which checkpoints of a job to keep (see the module docstring); all zero keeps everything.

    ``Retention(keep_last=3, keep_every=1000, keep_best=2, best_key="loss", best_mode="min")``
    keeps the 3 newest steps, every 1000th step and the 2 steps with the smallest loss.
    """

    keep_last: int = 0
    keep_every: int = 0
    keep_best: int = 0
    best_key: str = ""
    best_mode: str = "min"

    def __post_init__(self) -> None:
        for name in ("keep_last", "keep_every", "keep_best"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InvalidArgumentError(f"retention {name} must be a non-negative integer, got {value!r}")
        if self.best_mode not in BEST_MODES:
            raise InvalidArgumentError(f"retention best_mode must be 'min' or 'max', got {self.best_mode!r}")
        if self.keep_best and not self.best_key:
            raise InvalidArgumentError("retention keep_best needs best_key, the training key to rank by (e.g. 'loss')")
        if self.best_key and not self.keep_best:
            raise InvalidArgumentError(f"retention best_key={self.best_key!r} needs keep_best=M, how many to keep")

    @property
    def active(self) -> bool:
        """False when no rule is set: nothing is ever deleted."""
        return bool(self.keep_last or self.keep_every or self.keep_best)

    def to_proto(self) -> common_pb2.RetentionPolicy:
        return common_pb2.RetentionPolicy(keep_last=self.keep_last, keep_every=self.keep_every,
                                          keep_best_key=self.best_key, keep_best=self.keep_best,
                                          keep_best_max=self.best_mode == "max")

    @classmethod
    def from_proto(cls, msg: common_pb2.RetentionPolicy) -> "Retention":
        return cls(keep_last=msg.keep_last, keep_every=msg.keep_every, keep_best=msg.keep_best,
                   best_key=msg.keep_best_key, best_mode="max" if msg.keep_best_max else "min")

    @classmethod
    def parse(cls, text: str) -> "Retention":
        """``keep_last=3,keep_every=100,keep_best=loss:min:2`` (the coordinator's ``--retention``;
        ``keep_best=loss:2`` ranks by smallest loss)."""
        fields: dict[str, Any] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, eq, value = part.partition("=")
            try:
                if name in ("keep_last", "keep_every") and eq:
                    fields[name] = int(value)
                    continue
                bits = value.split(":")
                if name == "keep_best" and eq and len(bits) in (2, 3):
                    key, mode, count = bits if len(bits) == 3 else (bits[0], "min", bits[1])
                    fields.update(best_key=key, best_mode=mode, keep_best=int(count))
                    continue
            except ValueError:
                pass
            raise InvalidArgumentError(
                f"bad retention rule {part!r} in {text!r}: expected keep_last=N, keep_every=K or keep_best=KEY:min|max:M")
        return cls(**fields)

    def __str__(self) -> str:
        rules = []
        if self.keep_last:
            rules.append(f"keep_last={self.keep_last}")
        if self.keep_every:
            rules.append(f"keep_every={self.keep_every}")
        if self.keep_best:
            rules.append(f"keep_best={self.best_key}:{self.best_mode}:{self.keep_best}")
        return ",".join(rules) or "keep everything"


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def steps_to_delete(policy: Retention, checkpoints: Sequence[tuple[int, Mapping[str, Any]]],
                    protected: Collection[int] = ()) -> list[int]:
    """The steps ``policy`` drops from ``checkpoints`` ((step, decoded training keys) pairs).

    Never the newest step, never a step in ``protected``; steps without a numeric value of
    ``best_key`` are not ranked by ``keep_best`` (other rules may still keep them).
    """
    if not policy.active or not checkpoints:
        return []
    steps = sorted({step for step, _ in checkpoints})
    keep = {steps[-1], *protected}
    if policy.keep_last:
        keep.update(steps[-policy.keep_last:])
    if policy.keep_every:
        keep.update(s for s in steps if s % policy.keep_every == 0)
    if policy.keep_best:
        ranked = [(value, step) for step, keys in checkpoints
                  if (value := _number(keys.get(policy.best_key))) is not None]
        # Best first; among equal values the newer step wins.
        ranked.sort(key=lambda vs: (-vs[0] if policy.best_mode == "max" else vs[0], -vs[1]))
        keep.update(step for _, step in ranked[:policy.keep_best])
    return [s for s in steps if s not in keep]
