"""Shutdown, startup and commit deadlines of the real `layervault` processes.

Guarantee 7 (graceful shutdown): SIGTERM to real agent and coordinator processes - handed-off
uploads finish, new saves are refused while the agent drains, uploads stalled on the network
(tests/budget_proxy.py between agent and S3) are aborted at the end of the grace period and
leave no object, open multipart upload or manifest, and a stopped coordinator commits nothing
still pending. Guarantee 8 (startup): unusable storage - missing bucket, unreachable endpoint,
unknown or read-only credentials on an S3 server that enforces them - stops agent and
coordinator with a message naming bucket, prefix and the failing operation, before they
ever serve. Guarantee 2: the commit deadline names the missing ranks and their agents.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

import layervault as lv
from layervault.agent import keys
from layervault.agent.storage import open_store
from layervault.cli import EXIT_BOUND_S
from layervault.client import AgentClient, CheckpointRef, SaveEntry
from layervault.errors import LayervaultError, UnavailableError
from layervault.proto import agent_pb2, agent_pb2_grpc, common_pb2, manifest_pb2
from layervault.torch import ModelManager
from layervault.torch.tensors import TensorSource, whole_layout

from budget_proxy import BytesBudgetProxy
from polling import eventually
from s3server import S3Server
from services import ServiceProcess, start_in_process

pytestmark = pytest.mark.slow

ONE_RANK_SAVE = pathlib.Path(__file__).with_name("one_rank_save.py")


def _committed_steps(store_url: str, job: str) -> list[int]:
    out = subprocess.run([sys.executable, "-m", "layervault.cli", "ls", job, "--storage", store_url, "--json"],
                         capture_output=True, text=True, check=True).stdout
    return [int(c["id"]["step"]) for c in json.loads(out)]


def _one_rank_save(address: str, job: str, step: int, nbytes: int):
    tensor = torch.arange(nbytes // 4, dtype=torch.float32)
    client = AgentClient(address)
    return client.save(CheckpointRef(job, "model", step), rank=0, world_size=1, config=manifest_pb2.Config(name="x"),
                       keys={}, extra={}, entries=[SaveEntry("w", whole_layout(tensor), TensorSource(tensor))])


def _services(store_url: str, tmp_path, grace: float, coordinator_grace: float = 30,
              agent_args: tuple[str, ...] = (), agent_env: dict | None = None) -> tuple[ServiceProcess, ServiceProcess]:
    coordinator = ServiceProcess(["coordinator", "--storage", store_url, "--host", "127.0.0.1", "--port", "0",
                                  "--grace", str(coordinator_grace)], tmp_path, "coordinator")
    agent = ServiceProcess(["agent", "--coordinator", coordinator.info["coordinator"], "--storage", store_url,
                            "--socket", str(tmp_path / "agent.sock"), "--staging-mib", "256", "--grace", str(grace),
                            *agent_args], tmp_path, "agent", env=agent_env)
    return coordinator, agent


def _stalled_handoff(agent: ServiceProcess, job: str, rank: int = 0, world_size: int = 1) -> subprocess.Popen:
    """A rank process that began its save on ``agent`` and stalls mid-hand-off (tests/one_rank_save.py)."""
    victim = subprocess.Popen([sys.executable, str(ONE_RANK_SAVE), agent.info["agent"], job, "1", "slow",
                               str(rank), str(world_size)], stdout=subprocess.PIPE, text=True)
    if victim.stdout.readline().strip() != "staging":
        victim.kill()
        raise AssertionError(f"the stalling rank did not begin its save (exit {victim.wait(10)})")
    return victim


def _health(address: str, service: str = "") -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_sigterm_lets_handed_off_uploads_finish_and_commit(store_url, tmp_path):
    coordinator, agent = _services(store_url, tmp_path, grace=60)
    try:
        _one_rank_save(agent.info["agent"], "drain", 1, 96 << 20)  # returns after the hand-off
        agent.proc.send_signal(signal.SIGTERM)  # uploads of 96 MiB are still running
        assert agent.proc.wait(90) == 0
        assert _committed_steps(store_url, "drain") == [1]
        assert "shutting down" in agent.log_path.read_text()
    finally:
        agent.stop()
        coordinator.stop()


def test_sigterm_aborts_a_stalled_handoff_after_the_grace_period(store_url, tmp_path):
    coordinator, agent = _services(store_url, tmp_path, grace=2)
    victim = _stalled_handoff(agent, "stalled")
    try:
        started = time.monotonic()
        agent.proc.send_signal(signal.SIGTERM)
        assert agent.proc.wait(30) == 0
        assert time.monotonic() - started < 20
        time.sleep(0.5)
        assert _committed_steps(store_url, "stalled") == []
    finally:
        victim.kill()
        agent.stop()
        coordinator.stop()


def test_sigterm_refuses_new_saves_while_the_agent_drains(store_url, tmp_path):
    """While a stalled hand-off keeps the agent draining, it answers: NOT_SERVING, and a new
    save gets UNAVAILABLE saying the agent is shutting down (not a refused connection)."""
    coordinator, agent = _services(store_url, tmp_path, grace=6)
    victim = _stalled_handoff(agent, "draining")
    try:
        agent.proc.send_signal(signal.SIGTERM)
        eventually(lambda: _health(agent.info["tcp"]) == health_pb2.HealthCheckResponse.NOT_SERVING,
                   "the agent reports NOT_SERVING", timeout=10)
        assert _health(agent.info["tcp"], "layervault.v1.Agent") == health_pb2.HealthCheckResponse.NOT_SERVING
        opened = agent_pb2.SaveRequest(open=agent_pb2.SaveOpen(id=common_pb2.CheckpointId(job="refused", kind="model", step=1),
                                                               rank=0, world_size=1, config=manifest_pb2.Config(name="x")))
        with grpc.insecure_channel(agent.info["tcp"]) as channel, pytest.raises(grpc.RpcError) as refused:
            list(agent_pb2_grpc.AgentStub(channel).Save(iter([opened]), timeout=10))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "is shutting down" in refused.value.details() and "another agent or retry" in refused.value.details()
        with pytest.raises(UnavailableError, match="is shutting down"):  # what a rank sees, over its unix socket
            _one_rank_save(agent.info["agent"], "refused", 1, 4096)
        assert agent.proc.poll() is None  # still draining the stalled hand-off
        assert agent.proc.wait(30) == 0
        assert _committed_steps(store_url, "refused") == [] and _committed_steps(store_url, "draining") == []
        eventually(lambda: "draining/model/step 1 failed" in coordinator.log_path.read_text(),
                   "the coordinator failed the aborted attempt on the agent's goodbye", timeout=10)
    finally:
        victim.kill()
        agent.stop()
        coordinator.stop()


@pytest.fixture
def stalling_proxy(s3_server) -> Iterator[BytesBudgetProxy]:
    endpoint = urllib.parse.urlsplit(s3_server.endpoint)
    proxy = BytesBudgetProxy(endpoint.hostname, endpoint.port)
    try:
        yield proxy
    finally:
        proxy.close()


def _bucket_keys(s3_server, bucket: str, prefix: str) -> list[str]:
    """Straight from the server, not through any proxy."""
    pages = s3_server.admin.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [obj["Key"] for page in pages for obj in page.get("Contents", ())]


def _open_uploads(s3_server, bucket: str, prefix: str) -> list[str]:
    return [u["Key"] for u in s3_server.admin.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", ())]


@pytest.mark.s3
def test_sigterm_aborts_uploads_still_stalled_when_the_grace_period_ends(s3_server, s3_bucket, stalling_proxy, tmp_path):
    """The agent's S3 traffic goes through a proxy that stops forwarding mid-upload: a 72 MiB
    chunk (multipart) and an 8 MiB one hang. SIGTERM with --grace 3: the agent exits 0 within
    the grace period plus the exit bound, and the attempt leaves no manifest, no chunk object
    and no open multipart upload; the step committed before still loads bit-identically."""
    grace, prefix, job = 3, "lv", "stalled-upload"
    url = f"s3://{s3_bucket}/{prefix}"
    coordinator, agent = _services(url, tmp_path, grace=grace, agent_args=("--chunk-mib", "72"),
                                   agent_env={"AWS_ENDPOINT_URL": stalling_proxy.endpoint})
    step2 = f"{prefix}/{keys.step_prefix(job, 'model', 2)}"
    try:
        generator = torch.Generator().manual_seed(7)  # random bytes: no codec pays, chunks go up raw
        first = torch.randint(0, 256, (1 << 20,), dtype=torch.uint8, generator=generator)
        mm = ModelManager(lv.ModelConfig(job=job, name="m"), agent=AgentClient(agent.info["agent"]))
        mm.save({"w": first}, step=1).wait(60)

        stalling_proxy.limit(76 << 20)  # of ~80 MiB of requests: some parts and objects land, the rest hangs
        mm.save({"w": torch.randint(0, 256, (80 << 20,), dtype=torch.uint8, generator=generator)}, step=2)
        eventually(lambda: _open_uploads(s3_server, s3_bucket, step2) and _bucket_keys(s3_server, s3_bucket, step2),
                   "an open multipart upload and a stored chunk of step 2, the rest stalled", timeout=30)

        started = time.monotonic()
        agent.proc.send_signal(signal.SIGTERM)
        assert agent.proc.wait(grace + EXIT_BOUND_S + 20) == 0
        took = time.monotonic() - started
        assert took < grace + EXIT_BOUND_S + 4, f"the agent took {took:.1f}s to exit after SIGTERM"
        assert "uploads not finished within the 3s shutdown grace" in agent.log_path.read_text()
        stalling_proxy.close()  # drop what it still holds: nothing of the dead agent arrives late

        eventually(lambda: not _bucket_keys(s3_server, s3_bucket, step2) and not _open_uploads(s3_server, s3_bucket, step2),
                   "no chunk object and no open multipart upload of the aborted attempt", timeout=15)
        assert "stalled-upload/model/step 2 failed" in coordinator.log_path.read_text()
        assert _committed_steps(url, job) == [1]
        assert not [k for k in _bucket_keys(s3_server, s3_bucket, f"{prefix}/{keys.manifests_prefix(job, 'model')}")
                    if "0000000002" in k]
    finally:
        agent.stop()
        coordinator.stop()
    services = start_in_process(url)  # straight to the S3 server
    try:
        loaded = ModelManager(lv.ModelConfig(job=job, name="m"), agent=AgentClient(services.agent_address))
        assert torch.equal(loaded.load_layer("w", step=1), first)
    finally:
        services.stop()


def test_sigterm_on_the_coordinator_commits_nothing_still_pending(store_url, tmp_path):
    """Rank 0 of 2 reported, rank 1 never will; its wait is in flight at the coordinator.
    SIGTERM with --grace 30: the coordinator exits 0 at once (the waiter does not hold it up),
    fails the attempt with its reason, writes no manifest and removes the attempt's objects."""
    coordinator, agent = _services(store_url, tmp_path, grace=30, coordinator_grace=30)
    outcome: list[BaseException] = []
    try:
        tensor = torch.arange(1 << 16, dtype=torch.float32)
        handle = AgentClient(agent.info["agent"]).save(
            CheckpointRef("pending", "model", 1), rank=0, world_size=2, config=manifest_pb2.Config(name="x"),
            keys={}, extra={}, entries=[SaveEntry("w", whole_layout(tensor), TensorSource(tensor))])
        eventually(lambda: "rank 0 reported durable shards (1 of 2 ranks)" in coordinator.log_path.read_text(),
                   "rank 0's shards are reported", timeout=30)

        def wait() -> None:
            try:
                handle.wait(timeout=60)
            except BaseException as exc:  # noqa: BLE001 - the test inspects it
                outcome.append(exc)

        waiter = threading.Thread(target=wait, daemon=True)
        waiter.start()
        time.sleep(1.0)  # the wait reaches the coordinator (agent WaitSave -> coordinator WaitCommit)
        started = time.monotonic()
        coordinator.proc.send_signal(signal.SIGTERM)
        assert coordinator.proc.wait(30) == 0
        took = time.monotonic() - started
        assert took < 5, f"the coordinator took {took:.1f}s to exit (grace 30s)"
        waiter.join(30)
        assert len(outcome) == 1 and isinstance(outcome[0], LayervaultError), outcome
        assert "the coordinator shut down before the save could commit" in str(outcome[0])
        assert "ranks [1] did not report" in str(outcome[0])
        assert _committed_steps(store_url, "pending") == []
        store = open_store(store_url)
        try:
            assert list(store.list("pending/")) == []  # no manifest, no latest, no chunk of the attempt
        finally:
            store.close()
        assert agent.proc.poll() is None  # the agent lives on, waiting for a coordinator
    finally:
        agent.stop()
        coordinator.stop()


# -- guarantee 8: startup with unusable storage -------------------------------------------------

READ_ONLY = {"name": "reader", "credentials": [{"accessKey": "lv-reader", "secretKey": "lv-reader-secret"}],
             "actions": ["Read", "List"]}
ADMIN = {"name": "admin", "credentials": [{"accessKey": "lv-admin", "secretKey": "lv-admin-secret"}],
         "actions": ["Admin", "Read", "List", "Tagging", "Write"]}


@pytest.fixture(scope="module")
def locked_s3() -> Iterator[tuple[S3Server, str]]:
    """A second S3 server that enforces credentials (an admin and a read-only identity), with one bucket."""
    server = S3Server(identities=[ADMIN, READ_ONLY])
    server.start()
    try:
        server.admin.create_bucket(Bucket="locked-bucket")
        yield server, "locked-bucket"
    finally:
        server.stop()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


#: case -> (storage URL, environment, the operation that must be named, what else must be named)
STARTUP_CASES = {
    "missing bucket": ("s3://no-such-bucket-here/team-a", {}, "HeadBucket", ["does not exist"]),
    "unreachable endpoint": ("s3://bucket/team-b", {"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}, "HeadBucket",
                             ["127.0.0.1:9"]),
    "unknown credentials": ("s3://locked-bucket/team-c", {"AWS_ACCESS_KEY_ID": "nobody", "AWS_SECRET_ACCESS_KEY": "x"},
                            "HeadBucket", ["access denied"]),
    "read-only credentials": ("s3://locked-bucket/team-d", {"AWS_ACCESS_KEY_ID": "lv-reader",
                                                            "AWS_SECRET_ACCESS_KEY": "lv-reader-secret"},
                              "PutObject", ["AccessDenied"]),
}


@pytest.mark.s3
@pytest.mark.parametrize("role", ["agent", "coordinator"])
@pytest.mark.parametrize("case", list(STARTUP_CASES))
def test_unusable_storage_stops_the_daemon_before_it_serves(s3_server, role, case, request, tmp_path):
    url, env, operation, named = STARTUP_CASES[case]
    if url.startswith("s3://locked-bucket/"):
        locked, _ = request.getfixturevalue("locked_s3")
        env = {**env, "AWS_ENDPOINT_URL": locked.endpoint}
    bucket, prefix = urllib.parse.urlsplit(url).netloc, urllib.parse.urlsplit(url).path.strip("/")
    port, ready = _free_port(), tmp_path / "ready.json"
    args = ["--storage", url, "--host", "127.0.0.1", "--port", str(port), "--ready-file", str(ready)]
    if role == "agent":
        args += ["--coordinator", "127.0.0.1:9", "--socket", str(tmp_path / "agent.sock")]
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "layervault.cli", role, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **env})
    answered = []  # health answers on the port it would serve on, polled until it exits
    while proc.poll() is None and time.monotonic() - started < 60:
        try:
            answered.append(_health(f"127.0.0.1:{port}"))
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
        time.sleep(0.1)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode not in (0, None), (case, role, out, err)
    assert time.monotonic() - started < 60
    assert answered == [] and not ready.exists() and "layervault ready" not in out, (case, role, answered, out)
    assert "Traceback" not in err, err
    for expected in [f"bucket {bucket!r}", f"prefix {prefix!r}", operation, *named]:
        assert expected in err, (case, role, expected, err)


def test_commit_deadline_names_the_missing_ranks_and_the_agents_of_those_that_began(tmp_path):
    """World size 3: rank 1 began its save on the agent (a real process, stalled mid-hand-off)
    but never reports, rank 2 never starts, rank 0 reports. The deadline error names ranks 1
    and 2, says rank 2 never started, and names rank 1's agent with its addresses."""
    services = start_in_process((tmp_path / "store").as_uri(), commit_timeout=6)
    address = services.agent_address
    victim = subprocess.Popen([sys.executable, str(ONE_RANK_SAVE), address, "partial", "1", "slow", "1", "3"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert victim.stdout.readline().strip() == "staging"  # rank 1 began: the deadline runs from here
        tensor = torch.ones(16)
        client = AgentClient(address)
        handle = client.save(CheckpointRef("partial", "model", 1), rank=0, world_size=3, config=manifest_pb2.Config(name="x"),
                             keys={}, extra={}, entries=[SaveEntry("w", whole_layout(tensor), TensorSource(tensor))])
        with pytest.raises(lv.SaveFailedError) as failed:
            handle.wait(timeout=30)
        message = str(failed.value)
        assert "ranks [1, 2] did not report durable shards (ranks [2] never started saving)" in message, message
        agent = services.agent.service.agent_id
        assert f"began on agent {agent} at {address}, {services.agent.tcp_address} (rank 1)" in message, message
        assert [c.step for c in client.list("partial")] == []
    finally:
        victim.kill()
        services.stop()
