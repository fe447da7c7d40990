"""Observability of real servers: Prometheus metrics over HTTP, gRPC health and reflection,
JSON log lines with the save's context, and `layervault status` through the coordinator."""

from __future__ import annotations

import collections
import io
import json
import logging
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import urllib.request

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from prometheus_client.parser import text_string_to_metric_families

import layervault as lv
from layervault.agent.handoff_gate import DEFAULT_MAX_WAIT as HANDOFF_MAX_WAIT
from layervault import cli
from layervault.agent.agent_registry import AgentRegistry
from layervault.agent.logs import JsonFormatter
from layervault.agent.server import RunningServer, start_agent, start_coordinator
from layervault.agent.storage import open_store
from layervault.arrays import shard_sinks
from layervault.client import AgentClient, CheckpointRef, SaveEntry
from layervault.proto import coordinator_pb2, manifest_pb2
from layervault.torch.tensors import TensorSource, whole_layout

from polling import eventually
from services import ServiceProcess

CHUNK = 64 << 10
STAGING = 16 << 20


def scrape(address: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} from a /metrics endpoint."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(samples: dict, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


class Cluster:
    """A coordinator and agents in this process, each serving metrics on a free port."""

    def __init__(self, store_url: str) -> None:
        self.store_url = store_url
        self.coordinator = start_coordinator(open_store(store_url), commit_timeout=60, metrics_port=0)
        self.agents: list[RunningServer] = []

    def agent(self, store_url: str | None = None) -> RunningServer:
        socket_dir = tempfile.mkdtemp(prefix="lv-obs-", dir="/tmp")
        agent = start_agent(open_store(store_url or self.store_url), self.coordinator.address,
                            socket_path=f"{socket_dir}/agent.sock", staging_bytes=STAGING, chunk_size=CHUNK,
                            staging_timeout=30, metrics_port=0, heartbeat_interval=0.5)
        self.agents.append(agent)
        return agent

    def agent_status(self, agent: RunningServer) -> coordinator_pb2.AgentStatus | None:
        found = [a for a in self.coordinator.service.agents.list() if a.state.agent_id == agent.service.agent_id]
        return found[0] if found else None

    def stop(self) -> None:
        for agent in self.agents:
            agent.stop(grace=0)
        self.coordinator.stop(grace=0)


@pytest.fixture
def cluster(tmp_path):
    running = Cluster((tmp_path / "store").as_uri())
    yield running
    running.stop()


def save(agent: RunningServer, job: str, step: int, tensors: dict[str, torch.Tensor]):
    client = AgentClient(agent.address)
    entries = [SaveEntry(name, whole_layout(t), TensorSource(t)) for name, t in tensors.items()]
    return client.save(CheckpointRef(job, "model", step), rank=0, world_size=1, config=manifest_pb2.Config(name="net"),
                       keys={}, extra={}, entries=entries)


def restore(agent: RunningServer, job: str, step: int, names: list[str]) -> None:
    client = AgentClient(agent.address)
    manifest = client.resolve(job, "model", {"step": str(step)})
    indices = [i for i, s in enumerate(manifest.shards) if s.name in names]
    client.restore(manifest, names, shard_sinks(manifest, indices))


def test_metrics_count_a_save_and_two_restores(store_url):
    running = Cluster(store_url)
    try:
        agent = running.agent()
        tensors = {"w": torch.randn(256, 256), "steps": torch.arange(1024, dtype=torch.int64)}  # 256 KiB + 8 KiB
        handle = save(agent, "metered", 1, tensors)
        info = handle.wait(60)
        eventually(lambda: total(scrape(agent.metrics_address), "layervault_agent_saves_durable_total") == 1,
                   "the agent to count its save as durable")
        a = scrape(agent.metrics_address)
        manifest = AgentClient(agent.address).resolve("metered", "model", {"step": "1"})
        handed_off = sum(t.numel() * t.element_size() for t in tensors.values())
        assert handle.staged_bytes == handed_off
        assert total(a, "layervault_agent_received_bytes_total") == handed_off
        assert total(a, "layervault_agent_chunk_raw_bytes_total") == handed_off
        chunks = sum(len(s.chunks) for s in manifest.shards)
        assert total(a, "layervault_agent_chunks_stored_total") == chunks == 4 + 1
        assert total(a, "layervault_agent_chunk_upload_seconds_count") == chunks
        per_codec = collections.Counter()  # bytes per codec chain are the manifest's own numbers
        for shard in manifest.shards:
            per_codec["+".join(shard.codec) or "none"] += shard.stored_bytes
        for codec, stored in per_codec.items():
            assert total(a, "layervault_agent_stored_bytes_total", codec=codec) == stored
        assert total(a, "layervault_agent_stored_bytes_total") == info.stored_bytes
        assert total(a, "layervault_agent_saves_started_total") == 1
        assert total(a, "layervault_agent_saves_failed_total") == 0
        # One rank's hand-off, then its uploads: whatever they deferred is bounded by the gate's cap per chunk.
        assert any(n == "layervault_agent_upload_deferred_seconds_total" for n, _ in a)
        assert 0 <= total(a, "layervault_agent_upload_deferred_seconds_total") <= chunks * HANDOFF_MAX_WAIT + 0.1
        assert total(a, "layervault_agent_staging_budget_bytes") == STAGING
        assert total(a, "layervault_storage_requests_total", role="agent", op="put") == chunks
        assert total(a, "layervault_storage_bytes_total", role="agent", direction="put") == info.stored_bytes
        assert ("layervault_storage_retries_total", (("role", "agent"),)) in a  # read from StoreStats.retries
        eventually(lambda: total(scrape(agent.metrics_address), "layervault_agent_staging_used_bytes") == 0,
                   "staging memory to be released")

        c = scrape(running.coordinator.metrics_address)
        assert total(c, "layervault_coordinator_commit_seconds_count") == 1
        assert total(c, "layervault_coordinator_saves_started_total") == 1
        assert total(c, "layervault_coordinator_saves_committed_total") == 1
        assert total(c, "layervault_coordinator_saves_failed_total") == 0
        assert total(c, "layervault_coordinator_saves_pending") == 0
        assert total(c, "layervault_coordinator_agents", phase="serving") == 1

        w_bytes = 256 * 256 * 4
        restore(agent, "metered", 1, ["w"])
        first = scrape(agent.metrics_address)
        assert total(first, "layervault_agent_restore_bytes_total") == w_bytes
        assert total(first, "layervault_agent_restore_cache_total", result="miss") == 4
        assert total(first, "layervault_agent_restore_cache_total", result="hit") == 0
        restore(agent, "metered", 1, ["w"])  # the same layer again: served by the node-local cache
        second = scrape(agent.metrics_address)
        assert total(second, "layervault_agent_restore_bytes_total") == 2 * w_bytes
        assert total(second, "layervault_agent_restore_cache_total", result="hit") == 4
        assert total(second, "layervault_agent_restore_cache_total", result="miss") == 4
        fetched = ("layervault_storage_bytes_total", (("direction", "get"), ("role", "agent")))
        assert second[fetched] == first[fetched]  # nothing fetched from storage the second time
    finally:
        running.stop()


def test_reflection_lists_the_services_and_health_turns_not_serving_on_shutdown(cluster):
    agent = cluster.agent()
    servers = {"layervault.v1.Agent": agent, "layervault.v1.Coordinator": cluster.coordinator}
    for name, server in servers.items():
        with grpc.insecure_channel(server.tcp_address) as channel:
            services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
            assert services == {name, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}
            check = health_pb2_grpc.HealthStub(channel).Check
            for service in (name, ""):
                assert check(health_pb2.HealthCheckRequest(service=service), timeout=10).status == health_pb2.HealthCheckResponse.SERVING

    for name, server in servers.items():  # agent first, as in a real shutdown
        with grpc.insecure_channel(server.tcp_address) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=name), timeout=30)
            seen = [next(watch).status]
            stopper = threading.Thread(target=server.stop, kwargs={"grace": 2.0})
            stopper.start()
            seen.append(next(watch).status)
            watch.cancel()
            stopper.join(30)
        assert seen == [health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING], name
    cluster.agents.clear()


def test_json_log_lines_carry_job_step_and_rank(cluster):
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("layervault")
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        agent = cluster.agent()
        save(agent, "logged", 7, {"w": torch.ones(1000)}).wait(60)

        def lines() -> list[dict]:
            return [json.loads(line) for line in stream.getvalue().splitlines()]

        durable = eventually(lambda: [r for r in lines() if "shards durable" in r["message"]], "the agent's log line")[0]
        committed = [r for r in lines() if r["message"].startswith("committed logged/model/step 7")][0]
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    assert {"time", "level", "logger", "message"} <= durable.keys()
    assert (durable["logger"], durable["level"]) == ("layervault.agent", "INFO")
    assert (durable["job"], durable["kind"], durable["step"], durable["rank"]) == ("logged", "model", 7, 0)
    assert durable["agent"] == agent.service.agent_id and durable["save_id"]
    assert (committed["job"], committed["step"], committed["save_id"]) == ("logged", 7, durable["save_id"])


def _make_unusable(store_url: str) -> None:
    """Replace the store's folder by a plain file: every later write fails (also for root)."""
    root = pathlib.Path(store_url[len("file://"):])
    shutil.rmtree(root)
    root.write_text("not a folder")


def status_json(capsys, coordinator: str) -> list[dict]:
    capsys.readouterr()
    assert cli.main(["status", "--coordinator", coordinator, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_status_shows_each_agent_in_flight_memory_and_last_error(cluster, tmp_path, capsys):
    healthy = cluster.agent()
    broken_url = (tmp_path / "broken").as_uri()
    broken = cluster.agent(broken_url)
    save(healthy, "fine", 1, {"w": torch.ones(4096)}).wait(60)
    _make_unusable(broken_url)
    with pytest.raises(lv.SaveFailedError, match="upload of layer 'w' failed"):
        save(broken, "doomed", 1, {"w": torch.ones(4096)}).wait(60)

    def settled() -> list[dict] | None:
        rows = {r["state"]["agent_id"]: r["state"] for r in status_json(capsys, cluster.coordinator.address)}
        ok, bad = rows.get(healthy.service.agent_id), rows.get(broken.service.agent_id)
        done = ok and bad and ok["saves_in_flight"] == 0 and bad["saves_in_flight"] == 0 and bad["last_error"]
        return (ok, bad) if done else None

    ok, bad = eventually(settled, "both agents' reports after their saves")
    assert ok["phase"] == "serving" and ok["last_error"] == "" and ok["address"] == healthy.address
    assert ok["staging_budget_bytes"] == STAGING and ok["peak_rss_bytes"] > 0 and ok["version"] == lv.__version__
    assert "doomed/model/step 1 rank 0: upload of layer 'w' failed" in bad["last_error"] and bad["last_error_at"]

    capsys.readouterr()
    assert cli.main(["status", "--coordinator", cluster.coordinator.address]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:4] == ["AGENT", "STATE", "IN", "FLIGHT"]
    row = [line for line in table if line.startswith(broken.service.agent_id)][0]
    assert " serving " in row and "upload of layer 'w' failed" in row

    healthy.stop(grace=0)  # a clean shutdown says goodbye
    cluster.agents.remove(healthy)
    assert cluster.agent_status(healthy).state.phase == coordinator_pb2.AGENT_PHASE_STOPPED


def test_status_names_an_unreachable_coordinator(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"  # bound, never listening
        assert cli.main(["status", "--coordinator", address, "--timeout", "5"]) == 1
    assert f"coordinator {address} is unavailable" in capsys.readouterr().err


def test_an_agent_that_stops_beating_is_listed_as_stale():
    now = [100.0]
    registry = AgentRegistry(clock=lambda: now[0])
    registry.record(coordinator_pb2.AgentState(agent_id="node-1:42", phase=coordinator_pb2.AGENT_PHASE_SERVING,
                                               heartbeat_interval_s=2.0))
    now[0] += 5.9  # under 3 intervals
    assert [a.state.phase for a in registry.list()] == [coordinator_pb2.AGENT_PHASE_SERVING]
    now[0] += 0.2
    assert [a.state.phase for a in registry.list()] == [coordinator_pb2.AGENT_PHASE_STALE]
    assert registry.count_by_phase()["stale"] == 1
    now[0] += 3600  # long gone: forgotten
    assert registry.list() == []
    with pytest.raises(lv.InvalidArgumentError, match="agent_id is empty"):
        registry.record(coordinator_pb2.AgentState())


def test_a_busy_metrics_port_is_a_clear_error(tmp_path):
    coordinator = start_coordinator(open_store((tmp_path / "store").as_uri()), metrics_port=0)
    try:
        port = int(coordinator.metrics_address.rsplit(":", 1)[1])
        with pytest.raises(OSError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            start_agent(open_store((tmp_path / "store").as_uri()), coordinator.address, staging_bytes=1 << 20,
                        metrics_port=port)
    finally:
        coordinator.stop(grace=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_layervault_up_serves_metrics_json_logs_and_status(tmp_path):
    port = _free_port()
    up = ServiceProcess(["up", "--storage", (tmp_path / "store").as_uri(), "--socket", str(tmp_path / "agent.sock"),
                         "--staging-mib", "16", "--metrics-port", str(port), "--log-format", "json"], tmp_path, "up")
    try:
        assert up.info["metrics"] == f"127.0.0.1:{port}"
        save_ = subprocess.run([sys.executable, "-c", (
            "import torch, layervault as lv; from layervault.torch import ModelManager; from layervault.client import AgentClient; "
            f"mm = ModelManager(lv.ModelConfig(job='up-job', name='m'), agent=AgentClient({up.info['agent']!r})); "
            "mm.save({'w': torch.ones(1000)}, step=3).wait(60)")], capture_output=True, text=True, timeout=120)
        assert save_.returncode == 0, save_.stderr
        samples = scrape(up.info["metrics"])  # one endpoint, both roles
        assert total(samples, "layervault_coordinator_saves_committed_total") == 1
        assert total(samples, "layervault_agent_received_bytes_total") == 4000
        assert total(samples, "process_resident_memory_bytes") > 0
        status = subprocess.run([sys.executable, "-m", "layervault.cli", "status", "--coordinator", up.info["coordinator"]],
                                capture_output=True, text=True, timeout=60)
        assert status.returncode == 0 and " serving " in status.stdout, status.stderr
        up.stop()
        records = [json.loads(line) for line in up.log_path.read_text().splitlines() if line.startswith("{")]
        committed = [r for r in records if r["message"].startswith("committed up-job/model/step 3")]
        assert committed and committed[0]["job"] == "up-job" and committed[0]["step"] == 3
        assert any(r.get("rank") == 0 and r.get("job") == "up-job" for r in records)
    finally:
        up.stop()
