"""The job's incarnation: one id per run of a training job, shared by all of its ranks.

A job that dies in the middle of a save leaves that save attempt open in the coordinator
until the commit timeout. Every save names its run's incarnation, so the restarted job's
ranks replace the dead run's attempt instead of joining it (see the commit protocol in
``proto/coordinator.proto``). What matters is only that all ranks of one run send the same
id and that the next run sends another one.

Where it comes from, first match wins:

1. ``LAYERVAULT_INCARNATION``, set by a launcher that knows the run (the same value on every
   rank; a new value for every restart);
2. torchelastic's ``TORCHELASTIC_RUN_ID`` and ``TORCHELASTIC_RESTART_COUNT`` (set by
   ``torchrun`` on every worker; the restart count grows with each elastic restart). A run id
   of ``none`` (torchrun's default without ``--rdzv-id``) names no run and is not used;
3. otherwise the framework adapter agrees on a fresh id among the ranks
   (:func:`layervault.torch.incarnation.job_incarnation`) or, in a single process, makes one.
"""

from __future__ import annotations

import os
import uuid
from typing import Mapping

ENV = "LAYERVAULT_INCARNATION"
TORCHELASTIC_RUN_ID = "TORCHELASTIC_RUN_ID"
TORCHELASTIC_RESTART_COUNT = "TORCHELASTIC_RESTART_COUNT"


def from_environment(environ: Mapping[str, str] | None = None) -> str:
    """The incarnation a launcher put in the environment; empty when there is none."""
    env = os.environ if environ is None else environ
    explicit = env.get(ENV, "").strip()
    if explicit:
        return explicit
    run_id = env.get(TORCHELASTIC_RUN_ID, "").strip()
    restart = env.get(TORCHELASTIC_RESTART_COUNT, "").strip()
    if run_id and run_id != "none" and restart:
        return f"torchelastic:{run_id}:{restart}"
    return ""


def fresh() -> str:
    """A new id, for a run whose ranks have no launcher-given one."""
    return uuid.uuid4().hex
