"""Rank and world size of a TensorFlow worker, from its distribution strategy or TF_CONFIG.

One process is one rank. ``MirroredStrategy`` (several devices, one process) is one rank of
a world of one: its replicas hold the same variables, which are stored once.
``MultiWorkerMirroredStrategy`` has one rank per worker process; the chief (if the cluster
has one) is rank 0, then the workers in index order. The strategy's cluster resolver says
which task this process is; without a multi-worker strategy in sight, ``TF_CONFIG`` does.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import tensorflow as tf

from layervault.errors import InvalidArgumentError

_SAVING_TASKS = ("chief", "worker")


def _rank_in(cluster: Mapping[str, Any], task_type: str, task_index: int) -> tuple[int, int]:
    tasks = [(kind, i) for kind in _SAVING_TASKS for i in range(len(cluster.get(kind, []) or []))]
    if (task_type, task_index) not in tasks:
        raise InvalidArgumentError(
            f"this process is task {task_type}:{task_index}; only chief and worker tasks save checkpoints")
    return tasks.index((task_type, task_index)), len(tasks)


def _is_default(strategy: Any) -> bool:
    return strategy is None or type(strategy).__name__ == "_DefaultDistributionStrategy"


def rank_and_world(strategy: Any = None) -> tuple[int, int]:
    """(rank, world size) of this process for a save; ``strategy`` defaults to the one in scope."""
    if _is_default(strategy) and tf.distribute.has_strategy():
        strategy = tf.distribute.get_strategy()
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is not None:
        cluster = resolver.cluster_spec().as_dict()
        if cluster and resolver.task_type is not None:
            return _rank_in(cluster, resolver.task_type, int(resolver.task_id or 0))
    if not _is_default(strategy):
        return 0, 1  # a single-worker strategy (Mirrored, OneDevice): all replicas live in this process
    config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    cluster, task = config.get("cluster") or {}, config.get("task") or {}
    if any(cluster.get(kind) for kind in _SAVING_TASKS) and task.get("type"):
        return _rank_in(cluster, task["type"], int(task.get("index", 0)))
    return 0, 1
