"""A restarted job's saves replace the attempt its dead predecessor left open (job incarnations).

In-process coordinator and agent on a file store. A dead run begins a save of step 2 with
some of its ranks and is never heard of again; the restarted run (another incarnation)
saves the same step and must commit and load, whatever ranks or world size the dead attempt
had. Within one incarnation the earlier rules hold: a new rank joins, the same rank again is
a retry that supersedes, another world size is refused; a rank without an incarnation (an
older client) joins by rank number. Last, where the SDK gets the id: the launcher's
environment, and two gloo ranks agreeing on one.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import threading
import zlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import layervault as lv
from layervault import incarnation
from layervault.agent.catalog import Catalog
from layervault.agent.commit import CommitCoordinator
from layervault.agent.storage import open_store
from layervault.client import AgentClient, CheckpointRef, SaveEntry, SaveHandle
from layervault.demo import free_port
from layervault.errors import AlreadyExistsError, IncompatibleStateError
from layervault.proto import common_pb2, coordinator_pb2, manifest_pb2
from layervault.torch import ModelManager
from layervault.torch.incarnation import job_incarnation
from layervault.torch.tensors import TensorSource, whole_layout

from services import start_in_process

STEP = 2
RESTARTED = "superseded: the job restarted (incarnation dead-run -> next-run)"


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    services = start_in_process((tmp_path_factory.mktemp("incarnation") / "store").as_uri())
    yield services.agent_address
    services.stop()


def _tensor(run: str, rank: int) -> torch.Tensor:
    return torch.full((4096,), float(zlib.crc32(f"{run}/{rank}".encode()) % 1000), dtype=torch.float32)


def _save(address: str, job: str, rank: int, world_size: int, run: str) -> SaveHandle:
    tensor = _tensor(run, rank)
    return AgentClient(address).save(
        CheckpointRef(job, "model", STEP), rank=rank, world_size=world_size, config=manifest_pb2.Config(name="x"),
        keys={}, extra={}, entries=[SaveEntry(f"w{rank}", whole_layout(tensor), TensorSource(tensor))],
        incarnation=run)


def _run(address: str, job: str, order: tuple[int, ...], world_size: int, run: str) -> None:
    """The ranks of one run begin in ``order``; all of them must commit one checkpoint."""
    handles = [_save(address, job, rank, world_size, run) for rank in order]
    infos = [handle.wait(30) for handle in handles]
    assert len({info.save_id for info in infos}) == 1, "the ranks of one run ended up in different attempts"
    manager = ModelManager(lv.ModelConfig(job=job, name="x"), agent=address)
    [checkpoint] = manager.checkpoints()
    assert (checkpoint.step, checkpoint.world_size) == (STEP, world_size)
    for rank in range(world_size):
        assert torch.equal(manager.load_layer(f"w{rank}", step=STEP), _tensor(run, rank))


@pytest.mark.parametrize(("dead_ranks", "order"), [
    ((1,), (1, 0)),   # the new run's first rank is one the dead attempt holds
    ((1,), (0, 1)),   # ... is one it lacks (it used to join the dead attempt: chaos seed 15)
    ((0,), (1, 0)),
], ids=["overlap-first", "absent-first", "absent-first-rank1"])
def test_a_restarted_run_replaces_the_attempt_its_dead_run_left_open(agent, caplog, dead_ranks, order):
    job = f"restart-{dead_ranks[0]}-{order[0]}"
    for rank in dead_ranks:
        _save(agent, job, rank, 2, "dead-run")
    with caplog.at_level(logging.WARNING, logger="layervault.coordinator"):
        _run(agent, job, order, 2, "next-run")
    assert RESTARTED in caplog.text


def test_a_restarted_run_with_another_world_size_replaces_the_dead_attempt(agent, caplog):
    _save(agent, "regrown", 2, 3, "dead-run")  # world size 3; the restarted job runs with 2
    with caplog.at_level(logging.WARNING, logger="layervault.coordinator"):
        _run(agent, "regrown", (0, 1), 2, "next-run")
    assert RESTARTED in caplog.text


def test_ranks_of_one_run_join_one_attempt(agent):
    _run(agent, "one-run", (1, 0, 2), 3, "the-run")


def test_the_same_rank_again_within_a_run_is_a_retry_that_supersedes(agent, caplog):
    _save(agent, "retry", 0, 2, "the-run")
    with caplog.at_level(logging.WARNING, logger="layervault.coordinator"):
        _run(agent, "retry", (0, 1), 2, "the-run")
    assert "superseded by a new save attempt (rank 0 began again)" in caplog.text


def test_another_world_size_within_a_run_is_refused(agent):
    _save(agent, "resized", 0, 2, "the-run")
    with pytest.raises(IncompatibleStateError, match="rank 1 saves with world size 3, but the attempt in progress "
                                                     "has world size 2"):
        _save(agent, "resized", 1, 3, "the-run")
    _run(agent, "resized", (1,), 2, "the-run")  # rank 0's attempt is still open; rank 1 completes it


def test_a_rank_without_incarnation_joins_by_rank_number(agent):
    """Older clients send none: they join an open attempt as before incarnations existed."""
    _save(agent, "mixed", 0, 2, "the-run")
    tensor = _tensor("the-run", 1)
    AgentClient(agent).save(CheckpointRef("mixed", "model", STEP), rank=1, world_size=2,
                            config=manifest_pb2.Config(name="x"), keys={}, extra={},
                            entries=[SaveEntry("w1", whole_layout(tensor), TensorSource(tensor))]).wait(30)
    assert torch.equal(ModelManager(lv.ModelConfig(job="mixed", name="x"), agent=agent).load_layer("w0"),
                       _tensor("the-run", 0))


@pytest.mark.parametrize(("environ", "expected"), [
    ({}, ""),
    ({"LAYERVAULT_INCARNATION": "slurm-77.3"}, "slurm-77.3"),
    ({"LAYERVAULT_INCARNATION": "given", "TORCHELASTIC_RUN_ID": "r", "TORCHELASTIC_RESTART_COUNT": "1"}, "given"),
    ({"TORCHELASTIC_RUN_ID": "job-9", "TORCHELASTIC_RESTART_COUNT": "2"}, "torchelastic:job-9:2"),
    ({"TORCHELASTIC_RUN_ID": "none", "TORCHELASTIC_RESTART_COUNT": "0"}, ""),  # torchrun without --rdzv-id
    ({"TORCHELASTIC_RUN_ID": "job-9"}, ""),
])
def test_the_launchers_incarnation_comes_from_the_environment(environ, expected):
    assert incarnation.from_environment(environ) == expected


def test_managers_take_the_launchers_incarnation_or_make_one(agent, monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.delenv("LAYERVAULT_INCARNATION", raising=False)
    config = lv.ModelConfig(job="ids", name="x")
    first, second = (ModelManager(config, agent=agent).incarnation for _ in range(2))
    assert first and second and first != second
    monkeypatch.setenv("LAYERVAULT_INCARNATION", "launcher-run-5")
    assert ModelManager(config, agent=agent).incarnation == "launcher-run-5"


def _gloo_rank(rank: int, port: int, out_dir: str) -> None:
    os.environ.pop("LAYERVAULT_INCARNATION", None)
    os.environ.pop("TORCHELASTIC_RUN_ID", None)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    ids = [job_incarnation(), job_incarnation()]  # two constructions, as two runs would make
    pathlib.Path(out_dir, f"{rank}.json").write_text(json.dumps(ids))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_gloo_ranks_agree_on_one_incarnation_and_each_run_gets_a_new_one(tmp_path):
    mp.start_processes(_gloo_rank, args=(free_port(), str(tmp_path)), nprocs=2, start_method="spawn", join=True)
    rank0, rank1 = (json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(2))
    assert rank0 == rank1
    assert rank0[0] != rank0[1] and all(len(i) == 32 for i in rank0)


class _HeldManifestWrites:
    """The real file store, except that create-only (manifest) writes wait for ``release``."""

    def __init__(self, store) -> None:
        self._store, self.entered, self.release = store, threading.Event(), threading.Event()

    def put_if_absent(self, key: str, data: bytes) -> bool:
        self.entered.set()
        self.release.wait()
        return self._store.put_if_absent(key, data)

    def __getattr__(self, name: str):
        return getattr(self._store, name)


class _ObservedCondition(threading.Condition):
    """Says when someone first waits on it: the coordinator's lock, watched by the test."""

    def __init__(self) -> None:
        super().__init__()
        self.waited = threading.Event()

    def wait(self, timeout: float | None = None) -> bool:
        self.waited.set()
        return super().wait(timeout)


def test_a_restart_waits_for_a_commit_in_progress_instead_of_failing_it(tmp_path):
    """The dead run's last rank reported and the manifest write is under way when the new run
    begins: failing that attempt then would delete the chunks the manifest names. The new
    run's BeginSave waits for the write and finds the step committed."""
    store = _HeldManifestWrites(open_store((tmp_path / "store").as_uri()))
    coordinator = CommitCoordinator(store, Catalog(store))
    coordinator._cond = _ObservedCondition()
    checkpoint = common_pb2.CheckpointId(job="racing", kind="model", step=STEP)
    begin = coordinator_pb2.BeginSaveRequest(id=checkpoint, world_size=1, rank=0, agent_id="a", incarnation="dead-run")
    save_id = coordinator.begin(begin).save_id
    reporter = threading.Thread(target=coordinator.report, args=(coordinator_pb2.ReportShardsRequest(
        id=checkpoint, save_id=save_id, rank=0, world_size=1, agent_id="a", config=manifest_pb2.Config(name="x")),))
    reporter.start()
    store.entered.wait(30)  # the attempt is committing, held inside its manifest write
    outcome: list[BaseException | None] = []

    def restarted_begin() -> None:
        try:
            coordinator.begin(coordinator_pb2.BeginSaveRequest(id=checkpoint, world_size=1, rank=0, agent_id="b",
                                                               incarnation="next-run"))
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome.append(exc)

    beginner = threading.Thread(target=restarted_begin)
    beginner.start()
    coordinator._cond.waited.wait(30)  # the restarted BeginSave waits for the commit ...
    store.release.set()                # ... which now ends
    reporter.join(30)
    beginner.join(30)
    assert isinstance(outcome[0], AlreadyExistsError)
    info = coordinator.wait(coordinator_pb2.WaitCommitRequest(id=checkpoint, save_id=save_id, timeout_s=30))
    assert info.save_id == save_id
