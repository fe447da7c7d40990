"""Storage faults: the agent and coordinator talk to the real S3 server through a proxy
that throttles, fails, resets or stalls chosen requests (tests/s3_fault_proxy.py).

Transient failures are retried and the save commits bit-identically; failures that last
past the retry deadline fail the save with an error naming job, step and layer, and leave
the last committed checkpoint as it was; an ambiguous manifest write commits exactly once;
a failing LIST is an error everywhere, never "no checkpoints"; a failed attempt's objects
and open multipart uploads are removed; the retries and failed saves show in the metrics
scraped from the agent and the coordinator.
"""

from __future__ import annotations

import json
import os
import queue
import time
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

import layervault as lv
from layervault.agent.checksum import crc32c
from layervault.agent import keys
from layervault.agent.storage import ObjectNotFound, StorageError, open_store
from layervault.agent.storage.retry import RetryPolicy
from layervault.agent.storage.s3 import S3Store
from layervault.cli import main as cli_main
from layervault.errors import DeadlineError, UnavailableError
from layervault.client import AgentClient, CheckpointRef, SaveEntry
from layervault.torch.tensors import TensorSource, whole_layout
from layervault.proto import agent_pb2, agent_pb2_grpc
from layervault.torch import ModelManager

from s3_fault_proxy import Fault, S3FaultProxy
from polling import eventually
from services import InProcessServices, start_in_process

pytestmark = pytest.mark.s3

READ_TIMEOUT = 1.5          # the client's read timeout; HANG outlasts it
PREFIX = "lv"
CHUNK_PUTS = r"/layers/"


@pytest.fixture
def proxy(s3_server) -> Iterator[S3FaultProxy]:
    with S3FaultProxy(s3_server.endpoint, hang_s=3 * READ_TIMEOUT) as running:
        yield running


@pytest.fixture
def through_proxy(proxy: S3FaultProxy, monkeypatch: pytest.MonkeyPatch) -> S3FaultProxy:
    """Every store opened from now on goes through the proxy, with short retry limits."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    monkeypatch.setenv("LAYERVAULT_S3_READ_TIMEOUT", str(READ_TIMEOUT))
    monkeypatch.setenv("LAYERVAULT_S3_CONNECT_TIMEOUT", "2")
    monkeypatch.setenv("LAYERVAULT_S3_RETRY_ATTEMPTS", "6")
    monkeypatch.setenv("LAYERVAULT_S3_RETRY_BASE_DELAY", "0.02")
    monkeypatch.setenv("LAYERVAULT_S3_RETRY_MAX_DELAY", "0.1")
    monkeypatch.setenv("LAYERVAULT_S3_RETRY_DEADLINE", "10")
    return proxy


@pytest.fixture
def services(through_proxy: S3FaultProxy, s3_bucket: str) -> Iterator[InProcessServices]:
    running = start_in_process(f"s3://{s3_bucket}/{PREFIX}", chunk_size=256 << 10)
    try:
        yield running
    finally:
        running.stop()


def _manager(services: InProcessServices, job: str) -> ModelManager:
    return ModelManager(lv.ModelConfig(job=job, name="m"), agent=AgentClient(services.agent_address))


def _tensor(seed: int, n: int = 1 << 18) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def _objects(s3_server, bucket: str, prefix: str) -> list[str]:
    """Keys straight from the server (not through the proxy)."""
    pages = s3_server.admin.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{PREFIX}/{prefix}")
    return [obj["Key"] for page in pages for obj in page.get("Contents", ())]


def _open_uploads(s3_server, bucket: str, prefix: str) -> list[str]:
    reply = s3_server.admin.list_multipart_uploads(Bucket=bucket, Prefix=f"{PREFIX}/{prefix}")
    return [upload["Key"] for upload in reply.get("Uploads", ())]


# -- (a) transient failures are retried ---------------------------------------------------------


@pytest.mark.parametrize("fault", [Fault.SLOW_DOWN, Fault.INTERNAL, Fault.RESET, Fault.HANG, Fault.CORRUPT])
def test_transient_chunk_put_failures_are_retried_and_the_save_commits(services, through_proxy, fault):
    failures = 1 if fault is Fault.HANG else 3  # a hang costs one read timeout
    mm = _manager(services, "transient")
    state = {"a": _tensor(1), "b": _tensor(2, 1000).to(torch.bfloat16)}
    through_proxy.fail("PUT", CHUNK_PUTS, fault, times=failures)

    info = mm.save(state, step=7).wait(60)

    assert info.id.step == 7
    assert through_proxy.count("PUT", CHUNK_PUTS, faulted=True) == failures
    assert services.store.stats.retries >= failures
    assert [c.step for c in mm.checkpoints()] == [7]
    for name, tensor in state.items():
        assert torch.equal(mm.load_layer(name, step=7), tensor), name


def test_transient_get_and_list_failures_are_retried_on_load(services, through_proxy):
    mm = _manager(services, "reads")
    state = {"w": _tensor(3)}
    mm.save(state, step=1).wait(60)
    through_proxy.fail("GET", CHUNK_PUTS, Fault.RESET, times=2)
    through_proxy.fail("GET", r"[?&]list-type=2", Fault.SLOW_DOWN, times=2)
    target = {"w": torch.zeros_like(state["w"])}

    mm.load(target)  # latest: lists manifests, then fetches the chunks

    assert torch.equal(target["w"], state["w"])
    assert through_proxy.count("GET", CHUNK_PUTS, faulted=True) == 2
    assert through_proxy.count("GET", r"[?&]list-type=2", faulted=True) == 2


# -- (b) failures past the deadline fail the save, cleanly ---------------------------------------


def test_permanent_chunk_failure_fails_the_save_naming_job_step_and_layer(services, through_proxy, s3_bucket,
                                                                          monkeypatch):
    mm = _manager(services, "perm")
    first = {"encoder.weight": _tensor(4)}
    mm.save(first, step=1).wait(60)
    store = services.store
    latest_before = store.get(keys.latest_key("perm", "model"))
    # Limited by time, not by count: the agent's store reads its policy when opened, so set it directly.
    store.retry = RetryPolicy(attempts=10_000, base_delay=0.02, max_delay=0.1, deadline=2.0)
    through_proxy.fail("PUT", r"/layers/encoder\.weight/", Fault.SLOW_DOWN)

    started = time.monotonic()
    with pytest.raises(lv.SaveFailedError) as info:
        mm.save({"encoder.weight": _tensor(5)}, step=2).wait(60)
    elapsed = time.monotonic() - started

    message = str(info.value)
    for part in ("perm/model/step 2", "layer 'encoder.weight'", s3_bucket, "SlowDown", "gave up after",
                 "retry limits: 10000 attempts, 2s"):
        assert part in message, (part, message)
    assert elapsed < 30, "ended by the 2 s retry deadline, well before the 60 s commit deadline"
    through_proxy.clear()
    assert [c.step for c in mm.checkpoints()] == [1]
    assert not store.exists(keys.manifest_key("perm", "model", 2))
    assert store.get(keys.latest_key("perm", "model")) == latest_before
    assert torch.equal(mm.load_layer("encoder.weight"), first["encoder.weight"])


def test_a_body_damaged_on_the_way_is_refused_by_the_server_and_sent_again(through_proxy, s3_bucket):
    """Each PUT carries the body's CRC32C: the server refuses a damaged copy (BadDigest), and
    the retry sends the bytes the agent still holds, so what is stored is what was meant."""
    store = open_store(f"s3://{s3_bucket}/{PREFIX}")
    body = bytes(range(256)) * 4096
    through_proxy.fail("PUT", r"/damaged$", Fault.CORRUPT, times=1)
    store.put("damaged", body)
    assert through_proxy.count("PUT", r"/damaged$") == 2 and store.stats.retries == 1
    assert store.get("damaged") == body


def test_errors_that_cannot_heal_are_not_retried(through_proxy, s3_bucket):
    store = open_store(f"s3://{s3_bucket}/{PREFIX}")
    with pytest.raises(ObjectNotFound, match="no such object"):
        store.get("missing/key")
    assert store.stats.retries == 0
    assert through_proxy.count("GET", "missing/key") == 1


# -- (c) an ambiguous manifest write commits exactly once ----------------------------------------


def test_manifest_put_whose_reply_is_lost_commits_exactly_once(services, through_proxy):
    mm = _manager(services, "ambiguous")
    state = {"w": _tensor(6)}
    through_proxy.fail("PUT", r"/manifests/\d+\.json$", Fault.FORWARD_THEN_RESET, times=1)

    info = mm.save(state, step=3).wait(60)

    assert info.id.step == 3
    assert through_proxy.count("PUT", r"/manifests/\d+\.json$") == 2  # the lost one, and the retry that got 412
    assert services.coordinator.service.store.stats.retries >= 1
    assert [c.step for c in mm.checkpoints()] == [3]
    manifest = json.loads(services.store.get(keys.manifest_key("ambiguous", "model", 3)))
    assert manifest["save_id"] == info.save_id
    assert torch.equal(mm.load_layer("w", step=3), state["w"])


def test_create_only_put_settles_a_lost_reply_by_reading_back(through_proxy, s3_bucket):
    store = open_store(f"s3://{s3_bucket}/{PREFIX}")
    assert store.supports_conditional_put  # probed before the fault is armed
    through_proxy.fail("PUT", r"/m/0\.json$", Fault.FORWARD_THEN_RESET, times=1)
    assert store.put_if_absent("m/0.json", b"ours") is True        # landed, reply lost, 412 on retry: ours
    assert store.put_if_absent("m/0.json", b"ours") is False       # a genuine second create
    through_proxy.fail("PUT", r"/m/0\.json$", Fault.RESET, times=1)
    assert store.put_if_absent("m/0.json", b"theirs") is False     # ambiguous, 412, other bytes: not ours
    assert store.get("m/0.json") == b"ours"


# -- (d) a failing LIST is an error, never "no checkpoints" --------------------------------------


def test_failing_list_is_an_error_everywhere(services, through_proxy, s3_bucket, capsys):
    mm = _manager(services, "listing")
    mm.save({"w": _tensor(7)}, step=1).wait(60)
    through_proxy.fail("GET", r"[?&]list-type=2", Fault.INTERNAL)
    client = AgentClient(services.agent_address)

    with pytest.raises(UnavailableError, match="InternalError"):
        mm.checkpoints()
    with pytest.raises(UnavailableError, match="InternalError"):
        mm.load({"w": torch.zeros(1 << 18)})                      # latest: needs the listing
    with pytest.raises(UnavailableError, match="InternalError"):
        client.resolve("listing", "model", {"epoch": "1"})        # any selector but a bare step lists
    with pytest.raises(UnavailableError, match="InternalError"):
        client.list()
    assert cli_main(["ls", "listing", "--agent", services.agent_address]) == 1
    assert "InternalError" in capsys.readouterr().err
    assert cli_main(["ls", "listing", "--storage", f"s3://{s3_bucket}/{PREFIX}"]) == 1
    err = capsys.readouterr().err
    assert "list s3://" in err and "gave up after 6 attempts" in err and "no committed checkpoints" not in err
    through_proxy.clear()
    assert [c.step for c in mm.checkpoints()] == [1]


# -- (e) a failed attempt leaves nothing behind ---------------------------------------------------


def test_failed_attempt_objects_are_deleted(services, through_proxy, s3_server, s3_bucket):
    mm = _manager(services, "sweep")
    through_proxy.fail("PUT", r"/layers/b/", Fault.SLOW_DOWN)  # "a" uploads fine, "b" never does
    with pytest.raises(lv.SaveFailedError, match="layer 'b'"):
        mm.save({"a": _tensor(8), "b": _tensor(9)}, step=5).wait(60)
    assert through_proxy.count("PUT", r"/layers/a/", faulted=False) >= 4  # a's chunks were stored
    step_prefix = keys.step_prefix("sweep", "model", 5)
    eventually(lambda: _objects(s3_server, s3_bucket, step_prefix) == [], f"objects below {step_prefix}", timeout=20.0)
    through_proxy.clear()
    assert mm.checkpoints() == []


def test_chunks_stored_after_the_attempt_failed_are_swept_by_their_agent(services, through_proxy, s3_server,
                                                                         s3_bucket):
    ref = CheckpointRef("straggler", "model", 1)
    step_prefix = keys.step_prefix(ref.job, ref.kind, ref.step)
    late = _tensor(11)
    requests: queue.Queue = queue.Queue()
    stub = agent_pb2_grpc.AgentStub(grpc.insecure_channel(services.agent.tcp_address))
    replies = stub.Save(iter(requests.get, None))
    requests.put(agent_pb2.SaveRequest(open=agent_pb2.SaveOpen(
        id=ref.proto(), rank=1, world_size=2, shared_memory=False,
        entries=[agent_pb2.EntrySpec(name="late", layout=whole_layout(late), nbytes=late.numel() * 4)])))
    assert next(replies).WhichOneof("kind") == "opened"  # rank 1 has joined the attempt, sent nothing yet
    # Rank 0 fails ("early" never uploads); the coordinator fails the attempt and sweeps what is there.
    through_proxy.fail("PUT", r"/layers/early/", Fault.SLOW_DOWN)
    client = AgentClient(services.agent_address)
    handle = client.save(ref, rank=0, world_size=2, config=_manager(services, ref.job)._config_proto(), keys={},
                         extra={}, entries=_entries({"early": _tensor(12), "fine": _tensor(13)}))
    with pytest.raises(lv.SaveFailedError, match="layer 'early'"):
        handle.wait(timeout=30)
    assert through_proxy.count("PUT", r"/layers/fine/", faulted=False) == 4
    eventually(lambda: _objects(s3_server, s3_bucket, step_prefix) == [], "the coordinator's sweep", timeout=20.0)
    through_proxy.clear()

    # Only now do rank 1's chunks reach storage: its agent's report is refused, and it sweeps them.
    body = late.numpy().tobytes()
    crcs = [crc32c(body[at:at + (256 << 10)]) for at in range(0, len(body), 256 << 10)]  # one per 256 KiB chunk
    requests.put(agent_pb2.SaveRequest(data=agent_pb2.DataPiece(entry=0, entry_offset=0, data=body, chunk_crc32c=crcs)))
    requests.put(agent_pb2.SaveRequest(finish=True))
    requests.put(None)
    assert next(replies).WhichOneof("kind") == "finished"
    eventually(lambda: through_proxy.count("PUT", r"/layers/late/", faulted=False) == 4, "rank 1's chunks stored", timeout=20.0)
    eventually(lambda: _objects(s3_server, s3_bucket, step_prefix) == [], "the agent's sweep of rank 1's chunks", timeout=20.0)
    assert client.list(ref.job) == []


def test_commit_deadline_removes_objects_and_open_multipart_uploads(through_proxy, s3_server, s3_bucket):
    services = start_in_process(f"s3://{s3_bucket}/{PREFIX}", chunk_size=256 << 10, commit_timeout=2)
    try:
        client = AgentClient(services.agent_address)
        mm = ModelManager(lv.ModelConfig(job="expire", name="m"), agent=client)
        handle = client.save(CheckpointRef("expire", "model", 1), rank=0, world_size=2,
                             config=mm._config_proto(), keys={}, extra={}, entries=_entries({"w": _tensor(10)}))
        step_prefix = keys.step_prefix("expire", "model", 1)
        eventually(lambda: len(_objects(s3_server, s3_bucket, step_prefix)) == 4, "rank 0's 4 chunks", timeout=20.0)
        save_id = _objects(s3_server, s3_bucket, step_prefix)[0].rsplit("/", 1)[-1].split(".")[0]
        # Rank 1's agent died in the middle of a multipart upload of its chunk.
        key = f"{PREFIX}/{step_prefix}layers/w/{save_id}.r1.c00000"
        upload = s3_server.admin.create_multipart_upload(Bucket=s3_bucket, Key=key)["UploadId"]
        s3_server.admin.upload_part(Bucket=s3_bucket, Key=key, UploadId=upload, PartNumber=1, Body=b"x" * 1024)
        assert _open_uploads(s3_server, s3_bucket, step_prefix) == [key]

        with pytest.raises(DeadlineError, match=r"ranks \[1\] did not report"):
            handle.wait(timeout=30)  # the coordinator expires the attempt while this waits

        eventually(lambda: _objects(s3_server, s3_bucket, step_prefix) == [], f"objects below {step_prefix}", timeout=20.0)
        eventually(lambda: _open_uploads(s3_server, s3_bucket, step_prefix) == [], "open multipart uploads", timeout=20.0)
    finally:
        services.stop()


def test_failed_multipart_put_aborts_its_upload(through_proxy, s3_server, s3_bucket, monkeypatch):
    import layervault.agent.storage.s3 as s3_module

    monkeypatch.setattr(s3_module, "MULTIPART_THRESHOLD", 5 << 20)
    store = S3Store(s3_bucket, PREFIX, multipart_part_size=5 << 20,
                    retry=RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.05, deadline=10))
    data = os.urandom(11 << 20)
    through_proxy.fail("PUT", r"/big\?.*partNumber=2", Fault.INTERNAL, times=2)  # one part, retried, recovers
    store.put("big", data)
    assert store.get("big") == data and store.stats.retries >= 2
    through_proxy.fail("PUT", r"/big2\?.*partNumber=3", Fault.SLOW_DOWN)          # this one never does
    with pytest.raises(StorageError, match=r"put part 3 of 3 of s3://.*/big2.*gave up after 3 attempts"):
        store.put("big2", data)
    assert _open_uploads(s3_server, s3_bucket, "big2") == []
    assert _objects(s3_server, s3_bucket, "big2") == []


# -- (f) retries and failed saves reach the scraped metrics --------------------------------------


def _scraped(address: str, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels``, read over HTTP."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == name and labels.items() <= s.labels.items())


def test_retries_and_failed_saves_are_counted_in_the_scraped_metrics(through_proxy, s3_bucket):
    services = start_in_process(f"s3://{s3_bucket}/{PREFIX}", chunk_size=256 << 10, metrics_port=0)
    agent, coordinator = services.agent.metrics_address, services.coordinator.metrics_address
    retries = "layervault_storage_retries_total"
    agent_failed, coordinator_failed = "layervault_agent_saves_failed_total", "layervault_coordinator_saves_failed_total"
    try:
        mm = _manager(services, "scraped")
        retries_before = _scraped(agent, retries, role="agent")
        through_proxy.fail("PUT", CHUNK_PUTS, Fault.INTERNAL, times=3)
        mm.save({"w": _tensor(14)}, step=1).wait(60)
        assert through_proxy.count("PUT", CHUNK_PUTS, faulted=True) == 3
        assert _scraped(agent, retries, role="agent") >= retries_before + 3
        assert _scraped(coordinator, "layervault_coordinator_saves_committed_total") == 1
        assert [c.step for c in mm.checkpoints()] == [1]
        assert _scraped(agent, agent_failed) == 0 and _scraped(coordinator, coordinator_failed) == 0

        through_proxy.fail("PUT", CHUNK_PUTS, Fault.SLOW_DOWN)  # every attempt, past the 6 the store makes
        with pytest.raises(lv.SaveFailedError, match="layer 'w'"):
            mm.save({"w": _tensor(15)}, step=2).wait(60)
        eventually(lambda: _scraped(agent, agent_failed) == 1, "the agent counts its failed rank save", timeout=10.0)
        eventually(lambda: _scraped(coordinator, coordinator_failed) == 1, "the coordinator counts the failed attempt",
                   timeout=10.0)
        assert _scraped(coordinator, "layervault_coordinator_saves_committed_total") == 1
    finally:
        services.stop()


def _entries(state: dict[str, torch.Tensor]) -> list[SaveEntry]:
    return [SaveEntry(name, whole_layout(t), TensorSource(t)) for name, t in state.items()]
