"""Checkpoint lifecycle on real stores and services: incremental saves, rm, gc, verify, diff, retention.

A fine-tuning run with most layers frozen is the case incremental mode exists for: the
tests count the bytes the agent PUTs per checkpoint (its store statistics, as the Stats RPC
reports them) and load every checkpoint back bit-identically, before and after deletes.
"""

from __future__ import annotations

import dataclasses
import json
import time

import pytest
import torch

import layervault as lv
from layervault.agent import keys, lifecycle
from layervault.agent.catalog import Catalog
from layervault.agent.diff import diff_manifests
from layervault.agent.storage import open_store
from layervault.agent.verify import verify_checkpoint
from layervault.cli import main
from layervault.errors import ManifestError
from layervault.client import AgentClient
from layervault.proto import common_pb2, coordinator_pb2
from layervault.torch import ModelManager

from services import start_in_process

WIDTH = 128
LAYER_BYTES = WIDTH * WIDTH * 4 + WIDTH * 4   # one Linear(128, 128): weight + bias, float32


@pytest.fixture
def services(store_url):
    running = start_in_process(store_url, chunk_size=32 << 10)
    yield running
    running.stop()


def fine_tuning_model(trainable: int = 2, layers: int = 10) -> torch.nn.Module:
    """``layers`` Linear layers; only the last ``trainable`` have gradients (the rest are frozen)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH) for _ in range(layers)])
    for layer in list(model)[:layers - trainable]:
        layer.requires_grad_(False)
    return model


def train_step(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.01)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_loads_identically(mm: ModelManager, step: int, expected: dict[str, torch.Tensor]) -> None:
    target = fine_tuning_model()
    for p in target.parameters():
        p.data.zero_()
    mm.load(target, step=step)
    for name, value in target.state_dict().items():
        assert torch.equal(value, expected[name]), f"step {step}: {name} differs"


def save_run(services, job: str, incremental: bool, steps=(1, 2, 3)):
    """Three checkpoints of a fine-tuning run; returns (manager, {step: state}, {step: bytes PUT})."""
    client = AgentClient(services.agent_address)
    mm = ModelManager(lv.ModelConfig(job=job, name="ft", compressor="none", incremental=incremental), agent=client)
    model = fine_tuning_model()
    states, uploaded = {}, {}
    for step in steps:
        train_step(model)
        before = client.stats().store_put_bytes
        mm.save(model, step=step).wait(60)
        uploaded[step] = client.stats().store_put_bytes - before
        states[step] = snapshot(model)
    return mm, states, uploaded


def test_incremental_fine_tuning_uploads_only_the_trainable_layers(services, store_url):
    trainable, total = 2 * LAYER_BYTES, 10 * LAYER_BYTES
    mm, states, uploaded = save_run(services, "ft-incr", incremental=True)
    full_mm, full_states, full_uploaded = save_run(services, "ft-full", incremental=False)
    catalog = Catalog(open_store(store_url))
    manifest_bytes = {s: len(services.store.get(keys.manifest_key("ft-incr", "model", s))) for s in states}
    print(f"\nbytes PUT per checkpoint, 10 x Linear({WIDTH},{WIDTH}), 2 trainable ({trainable} B), {total} B in all:\n"
          f"  incremental {uploaded}\n  full        {full_uploaded}\n  manifests   {manifest_bytes}")
    # The agent PUTs chunks only (the coordinator writes manifests through its own store).
    assert uploaded[1] == total and full_uploaded == {1: total, 2: total, 3: total}
    assert uploaded[2] == uploaded[3] == trainable
    # The frozen layers of step 3 are step 1's objects.
    m3 = catalog.manifest(keys.manifest_key("ft-incr", "model", 3))
    frozen = [s for s in m3.shards if s.name.split(".")[0] not in ("8", "9")]
    assert frozen and all(c.key.startswith(keys.step_prefix("ft-incr", "model", 1)) for s in frozen for c in s.chunks)
    for step in states:
        assert_loads_identically(mm, step, states[step])
        assert_loads_identically(full_mm, step, full_states[step])
        assert verify_checkpoint(services.store, catalog.manifest(keys.manifest_key("ft-incr", "model", step))).ok

    # rm of the first step, from another process's point of view (a fresh store and catalog):
    store = open_store(store_url)
    result = lifecycle.delete_checkpoint(store, Catalog(store), "ft-incr", "model", 1)
    assert result.shared > 0 and result.latest == 3
    assert not store.exists(keys.manifest_key("ft-incr", "model", 1))
    assert [c.step for c in mm.checkpoints()] == [2, 3]
    for step in (2, 3):
        assert_loads_identically(mm, step, states[step])
    # Only step 1's trainable chunks went; gc finds nothing else unreferenced.
    assert all(k.startswith(keys.step_prefix("ft-incr", "model", 1)) for k in result.deleted)
    assert lifecycle.collect_garbage(store, Catalog(store), "ft-incr", min_age=0).deleted == []
    # Deleting the rest leaves no object of the job behind.
    for step in (3, 2):
        lifecycle.delete_checkpoint(store, Catalog(store), "ft-incr", "model", step)
    assert list(store.list("ft-incr/")) == []


def test_a_save_whose_base_was_deleted_meanwhile_fails_instead_of_committing(services, store_url):
    ftjob = "ft-race"
    save_run(services, ftjob, incremental=True, steps=(1,))
    commits = services.coordinator.service.commits
    manifest1 = Catalog(services.store).manifest(keys.manifest_key(ftjob, "model", 1))
    begun = commits.begin(coordinator_pb2.BeginSaveRequest(
        id=common_pb2.CheckpointId(job=ftjob, kind="model", step=2), world_size=1, rank=0, agent_id="test",
        incremental=True))
    assert (begun.base_step, begun.base_save_id) == (1, manifest1.save_id)
    with pytest.raises(lv.IncompatibleStateError, match="is being saved, or is the base"):
        commits.lifecycle.delete(ftjob, "model", 1)  # the coordinator spares a pending base
    # Another process (the CLI with --storage) does not know about the save and deletes the base.
    store = open_store(store_url)
    lifecycle.delete_checkpoint(store, Catalog(store), ftjob, "model", 1)
    commits.report(coordinator_pb2.ReportShardsRequest(
        id=common_pb2.CheckpointId(job=ftjob, kind="model", step=2), save_id=begun.save_id, rank=0, world_size=1,
        config=manifest1.config, shards=manifest1.shards))  # every chunk borrowed from step 1
    with pytest.raises(lv.SaveFailedError, match="base checkpoint was deleted"):
        commits.wait(coordinator_pb2.WaitCommitRequest(id=common_pb2.CheckpointId(job=ftjob, kind="model", step=2),
                                                       save_id=begun.save_id, timeout_s=30))
    assert not store.exists(keys.manifest_key(ftjob, "model", 2))


def test_gc_removes_old_orphans_of_a_crashed_attempt_and_keeps_young_ones(services, store_url):
    mm, states, _ = save_run(services, "gc-job", incremental=True, steps=(1,))
    store = open_store(store_url)
    orphans = [keys.chunk_key("gc-job", "model", 2, "0.weight", "deadbeef0001", 0, n) for n in range(3)]
    for key in orphans:  # what a crashed attempt leaves: chunks, no manifest
        store.put(key, b"x" * 100)
    referenced = lifecycle.referenced_keys(Catalog(store), "gc-job")
    young = lifecycle.collect_garbage(store, Catalog(store), "gc-job", min_age=3600)
    assert young.deleted == [] and young.young == 3 and young.referenced == len(referenced)
    dry = lifecycle.collect_garbage(store, Catalog(store), "gc-job", min_age=60, dry_run=True, now=time.time() + 120)
    assert sorted(dry.deleted) == sorted(orphans) and all(store.exists(k) for k in orphans)
    # A pending attempt's objects survive whatever their age (the coordinator passes them in).
    pending = [("gc-job", "model", 2, "deadbeef0001")]
    spared = lifecycle.collect_garbage(store, Catalog(store), "gc-job", min_age=60, pending=pending, now=time.time() + 120)
    assert spared.deleted == [] and spared.young == 3
    done = lifecycle.collect_garbage(store, Catalog(store), "", min_age=60, now=time.time() + 120)
    assert sorted(done.deleted) == sorted(orphans) and done.deleted_bytes == 300
    assert not any(store.exists(k) for k in orphans) and all(store.exists(k) for k in referenced)
    assert_loads_identically(mm, 1, states[1])


def test_gc_deletes_nothing_while_a_manifest_of_the_job_cannot_be_read(services, store_url):
    """A damaged manifest's references are unknown: gc must not take its chunks for orphans."""
    mm, states, _ = save_run(services, "gc-damaged", incremental=True, steps=(1, 2))
    store = open_store(store_url)
    chunks = sorted(lifecycle.referenced_keys(Catalog(store), "gc-damaged"))
    store.put(keys.manifest_key("gc-damaged", "model", 1), b"[]")  # step 1's manifest is damaged
    with pytest.raises(ManifestError, match="gc-damaged/model/manifests/"):
        lifecycle.collect_garbage(store, Catalog(store), "gc-damaged", min_age=0, now=time.time() + 3600)
    assert all(store.exists(key) for key in chunks)
    assert_loads_identically(mm, 2, states[2])


def test_verify_names_a_flipped_byte_and_a_missing_object(services):
    mm, states, _ = save_run(services, "verify-job", incremental=True, steps=(1,))
    manifest = Catalog(services.store).manifest(keys.manifest_key("verify-job", "model", 1))
    assert verify_checkpoint(services.store, manifest).ok
    shard = next(s for s in manifest.shards if s.name == "3.weight")
    flipped, gone = shard.chunks[0].key, shard.chunks[1].key
    body = bytearray(services.store.get(flipped))
    body[7] ^= 0x01
    services.store.put(flipped, bytes(body))
    services.store.delete([gone])
    result = verify_checkpoint(services.store, manifest)
    assert {(b.key, b.problem) for b in result.bad} == {(flipped, "CRC32C mismatch"), (gone, "missing")}
    assert str(result.bad[0]).startswith("verify-job/model step 1, layer '3.weight', object ")


def test_diff_by_digest_and_by_crc(services):
    for job, incremental in (("diff-incr", True), ("diff-full", False)):
        save_run(services, job, incremental=incremental, steps=(1, 2))
        catalog = Catalog(services.store)
        a, b = (catalog.manifest(keys.manifest_key(job, "model", s)) for s in (1, 2))
        changes = {c.name: (c.status, c.how) for c in diff_manifests(a, b)}
        how = "sha256" if incremental else "crc32c"
        assert changes["0.weight"] == ("same", how) and changes["7.bias"] == ("same", how)
        assert changes["8.weight"] == ("changed", how) and changes["9.bias"] == ("changed", how)
    # Added/removed layers and a layout change.
    client = AgentClient(services.agent_address)
    mm = ModelManager(lv.ModelConfig(job="diff-shape", name="x"), agent=client)
    mm.save({"a": torch.zeros(4), "b": torch.ones(2)}, step=1).wait(60)
    mm.save({"a": torch.zeros(2, 2), "c": torch.ones(2)}, step=2).wait(60)
    m1, m2 = (Catalog(services.store).manifest(keys.manifest_key("diff-shape", "model", s)) for s in (1, 2))
    assert [(c.name, c.status, c.how) for c in diff_manifests(m1, m2)] == [
        ("a", "changed", "layout"), ("b", "removed", ""), ("c", "added", "")]


def test_retention_after_each_commit_never_drops_the_newest_or_a_pending_base(services):
    commits = services.coordinator.service.commits
    client = AgentClient(services.agent_address)
    policy = lv.Retention(keep_last=2, keep_every=4, keep_best=1, best_key="loss")
    mm = ModelManager(lv.ModelConfig(job="keep", name="r", incremental=True, retention=policy), agent=client)
    model = fine_tuning_model()
    losses = {1: 0.5, 2: 0.1, 3: 0.7, 4: 0.9, 5: 0.6, 6: 0.8, 7: 0.4}
    states = {}
    for step, loss in losses.items():
        train_step(model)
        mm.save(model, step=step, loss=loss).wait(60)
        states[step] = snapshot(model)
        commits.lifecycle.flush(30)
    # keep_last=2 -> 6, 7; keep_every=4 -> 4; keep_best loss -> 2.
    assert [c.step for c in mm.checkpoints()] == [2, 4, 6, 7]
    for step in (2, 4, 6, 7):
        assert_loads_identically(mm, step, states[step])
    # A pending incremental attempt's base (the newest, 7) and its own step are spared even
    # once newer steps commit under keep_last=1.
    tight = ModelManager(lv.ModelConfig(job="keep", name="r", incremental=True, retention=lv.Retention(keep_last=1)),
                         agent=client)
    begun = commits.begin(coordinator_pb2.BeginSaveRequest(
        id=common_pb2.CheckpointId(job="keep", kind="model", step=100), world_size=2, rank=0, agent_id="test",
        incremental=True))
    assert begun.base_step == 7
    for step in (8, 9):
        train_step(model)
        tight.save(model, step=step).wait(60)
        commits.lifecycle.flush(30)
    assert [c.step for c in tight.checkpoints()] == [7, 9]
    commits.abort(coordinator_pb2.AbortSaveRequest(id=common_pb2.CheckpointId(job="keep", kind="model", step=100),
                                                   save_id=begun.save_id, rank=0, reason="test over"))
    train_step(model)
    tight.save(model, step=10).wait(60)
    commits.lifecycle.flush(30)
    assert [c.step for c in tight.checkpoints()] == [10]
    assert_loads_identically(tight, 10, snapshot(model))
    assert lifecycle.collect_garbage(services.store, Catalog(services.store), "keep", min_age=0).deleted == []


@dataclasses.dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


@pytest.mark.parametrize("store_url", ["file"], indirect=True)
def test_cli_verify_diff_rm_gc(services, store_url, capsys):
    """The commands' own code, run in this process (``layervault`` is ``cli.main``; test_cli.py covers the entry point)."""

    def cli(*args: str, check: bool = True) -> CliResult:
        code = main(list(args))
        out, err = capsys.readouterr()
        assert code == 0 or not check, err
        return CliResult(code, out, err)

    save_run(services, "cli-lc", incremental=True)
    services.stop()  # everything below reads storage directly
    assert "OK, " in cli("verify", "cli-lc", "2", "--storage", store_url).stdout
    diff = cli("diff", "cli-lc", "1", "3", "--storage", store_url).stdout
    assert "changed  8.weight  (by sha256)" in diff and " 0.weight" not in diff and "16 same, 4 changed, 0 added, 0 removed" in diff
    manifest = Catalog(open_store(store_url)).manifest(keys.manifest_key("cli-lc", "model", 3))
    shard = next(s for s in manifest.shards if s.name == "9.bias")
    store = open_store(store_url)
    body = bytearray(store.get(shard.chunks[0].key))
    body[0] ^= 0x80
    store.put(shard.chunks[0].key, bytes(body))
    bad = cli("verify", "cli-lc", "3", "--storage", store_url, check=False)
    assert bad.returncode == 1 and f"cli-lc/model step 3, layer '9.bias', object {shard.chunks[0].key}: CRC32C mismatch" in bad.stdout
    refused = cli("rm", "cli-lc", "1", "--storage", store_url, check=False)
    assert refused.returncode == 1 and "pass --yes" in refused.stderr
    assert "shared with other checkpoints kept; latest is now step 3" in cli("rm", "cli-lc", "1", "--storage", store_url, "--yes").stdout
    listing = json.loads(cli("ls", "--storage", store_url, "--json").stdout)
    assert [c["id"]["step"] for c in listing] == ["2", "3"]
    assert "OK, " in cli("verify", "cli-lc", "2", "--storage", store_url).stdout
    store.put(keys.chunk_key("cli-lc", "model", 1, "x", "0ddba11", 0, 0), b"orphan")
    assert "would delete 1 unreferenced objects" in cli("gc", "--storage", store_url, "--min-age", "0", "--dry-run").stdout
    assert "deleted 1 unreferenced objects (6 bytes)" in cli("gc", "cli-lc", "--storage", store_url, "--min-age", "0").stdout
    missing = cli("rm", "cli-lc", "1", "--storage", store_url, "--yes", check=False)
    assert missing.returncode == 1 and "step=1" in missing.stderr and "Traceback" not in missing.stderr


def test_pull_progress_bar_only_on_a_terminal():
    import io

    from layervault.progress import ByteProgress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert ByteProgress.for_terminal(100, stream=io.StringIO()) is None  # a pipe or a log file stays clean
    stream = Terminal()
    bar = ByteProgress.for_terminal(2048, "pull ", stream=stream)
    bar.add(1024)
    bar.add(1024)
    bar.close()
    assert stream.getvalue().rstrip("\n").rsplit("\r", 1)[-1] == "pull [" + "#" * 30 + "] 2.0 KiB / 2.0 KiB 100%"
