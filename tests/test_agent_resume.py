"""An agent killed while uploading a handed-off save finishes it after a restart (issue 6, guarantee 5).

The agent reaches the real S3 server through :class:`BytesBudgetProxy`, which stalls its
uploads on cue while the coordinator keeps talking to S3 directly; then the agent process is
SIGKILLed after the rank's hand-off returned and before the commit, and started again on the
same socket (so the same state directory).
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import threading
import urllib.parse

import pytest
import torch

import layervault as lv
from layervault.agent.journal import JournalError, JournalFile, SaveJournal, StagedPiece, StateDir
from layervault.agent.server import start_agent, start_coordinator
from layervault.agent.staging import POOL_PREFIX, hold_path, remove_stale_pools
from layervault.agent.storage import open_store
from layervault.client import AgentClient
from layervault.errors import LayervaultError
from layervault.proto import agent_pb2, common_pb2, manifest_pb2
from layervault.torch import ModelManager, OptimizerManager

from budget_proxy import BytesBudgetProxy
from polling import eventually
from services import ServiceProcess

MiB = 1 << 20
DEAD_PID = 999_999_999  # above any pid_max: no such process


class Node:
    """A coordinator and one agent as `layervault` processes; the agent's S3 traffic goes through a proxy."""

    def __init__(self, s3_endpoint: str, bucket: str, workdir: pathlib.Path, staging_mib: int,
                 tokens: pathlib.Path | None = None) -> None:
        self.storage = f"s3://{bucket}/lv"
        self.workdir, self.staging_mib = workdir, staging_mib
        self.security = ["--tokens", str(tokens)] if tokens else []  # the same file for both services
        self.socket = workdir / "agent.sock"
        self.state_dir = workdir / "agent.state"
        url = urllib.parse.urlsplit(s3_endpoint)
        self.proxy = BytesBudgetProxy(url.hostname, url.port)
        self.start_coordinator()
        self.agent = self._agent(self.proxy.endpoint)

    def start_coordinator(self) -> None:
        self.coordinator = ServiceProcess(["coordinator", "--storage", self.storage, "--host", "127.0.0.1", "--port", "0",
                                           *self.security], self.workdir, "coordinator")

    def _agent(self, endpoint: str | None) -> ServiceProcess:
        env = {"AWS_ENDPOINT_URL": endpoint} if endpoint else {}
        return ServiceProcess(["agent", "--coordinator", self.coordinator.info["coordinator"], "--storage", self.storage,
                               "--socket", str(self.socket), "--staging-mib", str(self.staging_mib), "--chunk-mib", "1", "--grace", "2",
                               *self.security],
                              self.workdir, "agent", env=env)

    @property
    def address(self) -> str:
        return self.agent.info["agent"]

    def kill_and_restart_agent(self) -> None:
        """SIGKILL the agent; the new one talks to S3 directly."""
        self.agent.kill()
        self.proxy.close()
        self.agent = self._agent(None)

    def journals(self) -> list[pathlib.Path]:
        return sorted(self.state_dir.glob(f"{POOL_PREFIX}*/*.journal"))

    def stop(self) -> None:
        self.proxy.limit(None)  # let stalled uploads finish, so the agent exits promptly
        self.agent.stop()
        self.coordinator.stop()
        self.proxy.close()


@pytest.fixture
def node_factory(s3_server, s3_bucket, tmp_path):
    if s3_server.external:
        pytest.skip("the upload-stalling proxy is set up for the local SeaweedFS server")
    nodes = []

    def make(staging_mib: int = 64, tokens: pathlib.Path | None = None) -> Node:
        nodes.append(Node(s3_server.endpoint, s3_bucket, tmp_path, staging_mib, tokens))
        return nodes[-1]

    yield make
    for node in nodes:
        node.stop()


def _waiter(handle: lv.SaveHandle, results: dict, name: str) -> threading.Thread:
    def wait() -> None:
        try:
            results[name] = handle.wait(timeout=120)
        except LayervaultError as exc:
            results[name] = exc

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    return thread


def _trained(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512),
                                torch.nn.ReLU(), torch.nn.Linear(512, 512))  # 3 MiB of weights, 6 MiB of Adam state
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(8, 512)).square().mean().backward()
    optimizer.step()
    return model, optimizer


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict:
    return {f"{i}/{k}": v for i, s in optimizer.state_dict()["state"].items() for k, v in s.items()}


@pytest.mark.slow
@pytest.mark.s3
def test_agent_killed_during_upload_resumes_and_commits(node_factory):
    node = node_factory()
    model, optimizer = _trained(0)
    mm = ModelManager(lv.ModelConfig(job="resume", name="mlp"), agent=node.address)
    om = OptimizerManager(lv.OptimizerConfig(job="resume", name="adam"), agent=node.address)
    pool_path = pathlib.Path(AgentClient(node.address).stats().pool_path)

    node.proxy.limit(0)  # from here on, no byte of an upload reaches S3
    results: dict = {}
    waiters = [_waiter(mm.save(model, step=2), results, "model"),
               _waiter(om.save(optimizer, step=2, model=model), results, "optimizer")]
    assert len(node.journals()) == 2  # both hand-offs returned, so both are journaled
    assert hold_path(pool_path).is_symlink()

    node.kill_and_restart_agent()
    for waiter in waiters:
        waiter.join(150)
    assert [results[k].id.step for k in ("model", "optimizer")] == [2, 2], results

    fresh, fresh_optimizer = _trained(1)
    mm.load(fresh, step=2)
    om.load(fresh_optimizer, step=2, model=fresh)
    assert _same_state(fresh.state_dict(), model.state_dict())
    assert _same_state(_optimizer_tensors(fresh_optimizer), _optimizer_tensors(optimizer))
    eventually(lambda: not pool_path.exists(), f"the old pool {pool_path} is deleted")
    assert not hold_path(pool_path).exists() and node.journals() == []
    assert not (node.state_dir / pool_path.name).exists()
    assert node.agent.log_path.read_text().count("resumed after an agent restart") == 2


@pytest.mark.slow
@pytest.mark.s3
def test_a_save_made_with_a_job_token_resumes_without_the_token_on_disk(node_factory, tmp_path):
    """The journal keeps only the token's SHA-256; the restarted agent finds the token again in its
    --tokens file and reports for the rank with it (the coordinator checks job tokens too)."""
    token = "resume-token-0123456789abcdef"
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{token} secured\n")
    tokens.chmod(0o600)
    node = node_factory(tokens=tokens)
    model, _ = _trained(0)
    client = AgentClient(node.address, token=token)
    mm = ModelManager(lv.ModelConfig(job="secured", name="mlp"), agent=client)

    node.proxy.limit(0)
    results: dict = {}
    waiter = _waiter(mm.save(model, step=1), results, "model")
    journals = node.journals()
    assert len(journals) == 1
    on_disk = b"".join(p.read_bytes() for p in node.state_dir.rglob("*") if p.is_file())
    assert token.encode() not in on_disk and hashlib.sha256(token.encode()).hexdigest().encode() in on_disk

    node.kill_and_restart_agent()
    waiter.join(150)
    assert results["model"].id.step == 1, results
    fresh, _ = _trained(1)
    mm.load(fresh, step=1)
    assert _same_state(fresh.state_dict(), model.state_dict())
    assert "resumed after an agent restart" in node.agent.log_path.read_text()


@pytest.mark.slow
@pytest.mark.s3
def test_a_token_save_is_not_resumed_when_the_restarted_agent_lacks_the_token(node_factory, tmp_path):
    token = "resume-token-0123456789abcdef"
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{token} secured\n")
    tokens.chmod(0o600)
    node = node_factory(tokens=tokens)
    model, _ = _trained(0)
    mm = ModelManager(lv.ModelConfig(job="secured", name="mlp"), agent=AgentClient(node.address, token=token))
    node.proxy.limit(0)
    results: dict = {}
    waiter = _waiter(mm.save(model, step=1), results, "model")
    assert len(node.journals()) == 1

    tokens.write_text("another-token-0123456789abcdef secured\n")  # the restarted agent reads this file
    node.kill_and_restart_agent()
    waiter.join(150)
    assert isinstance(results["model"], LayervaultError), results
    assert ("not resumed: it was saved with a job token that this agent's --tokens file does not hold"
            in node.agent.log_path.read_text())
    assert node.journals() == []


@pytest.mark.slow
@pytest.mark.s3
def test_an_incremental_save_resumes_and_still_references_its_base(node_factory):
    """The journal names the base checkpoint; the restarted agent references the unchanged
    chunks from it again instead of uploading them."""
    node = node_factory()
    model, _ = _trained(0)
    mm = ModelManager(lv.ModelConfig(job="incr", name="mlp", incremental=True, compressor="none"), agent=node.address)
    mm.save(model, step=1).wait(timeout=60)
    with torch.no_grad():
        model[4].weight.add_(1.0)  # the last layer trains, the first two are frozen

    node.proxy.limit(64 * 1024)  # the base manifest's GET gets through, the 1 MiB PUT of the trained layer stalls
    results: dict = {}
    waiter = _waiter(mm.save(model, step=2), results, "model")
    assert len(node.journals()) == 1
    node.kill_and_restart_agent()
    waiter.join(150)
    assert results["model"].id.step == 2, results

    manifest = mm.client.resolve("incr", "model", {"step": "2"})
    base_keys = {c.key for s in mm.client.resolve("incr", "model", {"step": "1"}).shards for c in s.chunks}
    referenced = {s.name for s in manifest.shards if all(c.key in base_keys for c in s.chunks)}
    assert {"0.weight", "0.bias", "2.weight", "2.bias", "4.bias"} <= referenced and "4.weight" not in referenced
    fresh, _ = _trained(1)
    mm.load(fresh, step=2)
    assert _same_state(fresh.state_dict(), model.state_dict())


@pytest.mark.slow
@pytest.mark.s3
def test_chunks_durable_before_the_kill_are_kept_even_where_their_memory_was_reused(node_factory):
    """12 MiB through an 8 MiB pool: the last 4 MiB are staged where the first 4 MiB were, after
    those were uploaded. Only the 4 chunks that never reached S3 are uploaded again, from the pool."""
    node = node_factory(staging_mib=8)
    state = {"a": torch.randn(6 * MiB // 4), "b": torch.randn(6 * MiB // 4)}
    mm = ModelManager(lv.ModelConfig(job="reuse", name="two", compressor="none"), agent=node.address)
    node.proxy.limit(8 * MiB + 256 * 1024)  # 8 PUTs of 1 MiB chunks (+ headers) get through, the 9th stalls

    results: dict = {}
    waiter = _waiter(mm.save(state, step=1), results, "model")
    node.kill_and_restart_agent()
    waiter.join(150)
    assert results["model"].id.step == 1, results

    uploaded = AgentClient(node.address).stats().store_put_bytes  # besides the startup check's tiny probe object
    assert 4 * MiB <= uploaded < 4 * MiB + 4096, uploaded
    loaded = {k: torch.empty_like(v) for k, v in state.items()}
    mm.load(loaded, step=1)
    assert _same_state(loaded, state)


@pytest.mark.slow
@pytest.mark.s3
def test_coordinator_restarted_too_drops_the_journal_and_keeps_the_previous_step(node_factory):
    node = node_factory()
    model, _ = _trained(0)
    mm = ModelManager(lv.ModelConfig(job="both", name="mlp"), agent=node.address)
    mm.save(model, step=1).wait(timeout=60)
    step1 = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    node.proxy.limit(0)
    results: dict = {}
    waiter = _waiter(mm.save(model, step=2), results, "model")
    assert len(node.journals()) == 1
    node.coordinator.kill()  # the pending attempt dies with it
    node.start_coordinator()
    node.kill_and_restart_agent()
    waiter.join(150)

    assert isinstance(results["model"], LayervaultError), results
    eventually(lambda: node.journals() == [], "the resumed journal is dropped")
    assert "the resumed save did not commit" in node.agent.log_path.read_text()
    assert [c.step for c in mm.checkpoints()] == [1]
    fresh, _ = _trained(1)
    mm.load(fresh)
    assert _same_state(fresh.state_dict(), step1)


# -- journals that cannot be resumed (in-process services, local storage) ------------------------------


def _open_message(job: str, nbytes: int) -> agent_pb2.SaveOpen:
    layout = manifest_pb2.TensorLayout(dtype="uint8", global_shape=[nbytes], offsets=[0], local_shape=[nbytes])
    return agent_pb2.SaveOpen(id=common_pb2.CheckpointId(job=job, kind="model", step=7), rank=0, world_size=1,
                              config=manifest_pb2.Config(name="x"), shared_memory=True,
                              entries=[agent_pb2.EntrySpec(name="w", layout=layout, nbytes=nbytes)])


def test_unusable_journals_are_skipped_with_a_log_line(tmp_path, caplog):
    shm = pathlib.Path("/dev/shm")
    state = StateDir(tmp_path / "agent.state")
    corrupt = tmp_path / "agent.state" / f"{POOL_PREFIX}{DEAD_PID}-c0ffee00"
    corrupt.mkdir()
    (corrupt / "j.model.0000000007.r0.abc.journal").write_text('{"format": "layervault-save-journal/1", "sav')
    future = tmp_path / "agent.state" / f"{POOL_PREFIX}{DEAD_PID}-c0ffee01"
    future.mkdir()
    (future / "j.model.0000000007.r0.abc.journal").write_text(json.dumps({"format": "layervault-save-journal/9"}))
    gone_pool = shm / f"{POOL_PREFIX}{DEAD_PID}-c0ffee02"  # never created: its bytes are gone
    journal = state.journal(gone_pool, _open_message("j", MiB), "abc")
    assert journal.start_log()
    assert journal.write(SaveJournal(_open_message("j", MiB), "abc", str(gone_pool), 4 * MiB, MiB,
                                     [StagedPiece(0, 0, 0, MiB)]))

    url = (tmp_path / "store").as_uri()
    coordinator = start_coordinator(open_store(url))
    caplog.set_level("INFO", logger="layervault.agent")
    agent = start_agent(open_store(url), coordinator.address, socket_path=str(tmp_path / "agent.sock"),
                        staging_bytes=4 * MiB, chunk_size=MiB)
    try:
        text = caplog.text
        assert "is not JSON (truncated or corrupt)" in text and "skipped and deleted" in text
        assert "has format 'layervault-save-journal/9'; this agent reads 'layervault-save-journal/1'" in text
        assert f"j/model/step 7 rank 0 (attempt abc): not resumed: the agent restarted and the staged bytes of 1 pieces are gone (pool {gone_pool}" in text
        assert [p.name for p in (tmp_path / "agent.state").iterdir()] == []
        assert not hold_path(gone_pool).exists()
        assert AgentClient(agent.address).stats().saves_in_flight == 0
    finally:
        agent.stop(0)
        coordinator.stop(0)


def test_a_journal_whose_chunk_checksums_do_not_match_its_chunks_is_refused(tmp_path):
    plan = SaveJournal(_open_message("j", 2 * MiB), "abc", "/dev/shm/x", 4 * MiB, MiB,
                       [StagedPiece(0, 0, 0, 2 * MiB, (1, 2, 3))])  # 2 chunks, 3 checksums
    with pytest.raises(JournalError, match=r"piece \(0, 0, 0, 2097152\) has 3 chunk checksums for its chunks"):
        SaveJournal.decode(plan.encode(), tmp_path / "j.journal")


def test_stale_pools_are_removed_unless_a_journal_holds_them(tmp_path):
    shm = tmp_path / "shm"
    shm.mkdir()
    held, orphan = shm / f"{POOL_PREFIX}{DEAD_PID}-aaaaaaaa", shm / f"{POOL_PREFIX}{DEAD_PID}-bbbbbbbb"
    for pool in (held, orphan):
        pool.write_bytes(b"\0" * 4096)
    state = StateDir(tmp_path / "state", shm_dir=shm)
    journal = state.journal(held, _open_message("j", 4096), "abc")
    journal.start_log()
    journal.write(SaveJournal(_open_message("j", 4096), "abc", str(held), 4096, 4096, [StagedPiece(0, 0, 0, 4096)]))
    empty_hold = state.journal(orphan, _open_message("j", 4096), "def")  # a hold link, but no journal written
    assert hold_path(orphan).is_symlink() and empty_hold.path.parent.is_dir()

    assert remove_stale_pools(shm) == [orphan.name]
    assert held.exists() and hold_path(held).is_symlink() and not hold_path(orphan).exists()
    journal.remove()
    assert remove_stale_pools(shm) == [held.name]
    assert list(shm.iterdir()) == []


def test_a_chunk_log_cut_short_by_the_agents_death_loses_only_its_last_line(tmp_path):
    state = StateDir(tmp_path / "state", shm_dir=tmp_path)
    pool = tmp_path / f"{POOL_PREFIX}{DEAD_PID}-cccccccc"
    journal = state.journal(pool, _open_message("j", 2 * MiB), "abc")
    journal.start_log()
    plan = SaveJournal(_open_message("j", 2 * MiB), "abc", str(pool), 4 * MiB, MiB,
                       [StagedPiece(0, 0, 0, 2 * MiB, (0xDEADBEEF, 7))])  # the rank's chunk CRCs are kept too
    assert journal.write(plan)
    from layervault.agent.journal import DurableChunk, pending_pieces

    journal.record(DurableChunk(0, (), manifest_pb2.ChunkRef(key="k0", raw_offset=0, raw_size=MiB, stored_size=MiB)))
    with open(journal.durable_path, "ab") as log:
        log.write(b'{"entry":0,"chain":[],"chu')  # killed mid-write
    read_plan, durable = JournalFile(journal.path).read()
    assert read_plan.pieces == plan.pieces and read_plan.open == plan.open
    assert [c.ref.key for c in durable] == ["k0"]
    assert pending_pieces(read_plan, durable) == plan.pieces  # the piece's second chunk is still to upload
    journal.remove()
