"""layervault on a local multi-node Ray cluster (``ray.cluster_utils.Cluster``).

Topology: a head node (no CPUs: coordinator actor + one agent actor) and two worker nodes
(2 CPUs each: one agent actor + two rank actors each). The four rank actors form one gloo
group, name no agent, and must reach the agent of their own node through ``layervault.ray``.
Storage is the real S3 server of the session (credentials handed to the service actors
through ``up(env=...)``), or a local folder for the cheaper checks.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np
import pytest
import ray
from ray.cluster_utils import Cluster
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

import layervault.ray as lvray
from layervault.errors import InvalidArgumentError, UnavailableError
from layervault.ray.cli import passed_env
from layervault.ray.naming import agent_socket_path

from polling import eventually

pytestmark = pytest.mark.slow

TESTS_DIR = str(pathlib.Path(__file__).parent)
NODE_ARGS = dict(object_store_memory=100 << 20)  # the smallest store Ray accepts without complaint
SERVICE_ARGS = dict(staging_mib=16, chunk_mib=1, cache_mib=16, coordinator_host="127.0.0.1", coordinator_port=0)
# The knobs the plain daemons have besides, as `layervault ray up` takes them (metrics on any free port).
KNOB_ARGS = dict(SERVICE_ARGS, agent_metrics_port=0, coordinator_metrics_port=0, handoff_wait_ms=100,
                 store_write_gbps=0.5, store_read_gbps=2.0, retention="keep_every=100", log_format="json")


def _start_head() -> Cluster:
    """The head node, with one more try: once in many CI runs its raylet never registered
    within Ray's fixed 30 s (no raylet log at all), which is Ray's start-up, not layervault."""
    for attempt in (1, 2):
        local = Cluster()
        try:
            local.add_node(num_cpus=0, include_dashboard=False, **NODE_ARGS)
            return local
        except Exception as exc:  # noqa: BLE001 - Ray raises a bare Exception for this
            if attempt == 2 or "timed out during startup" not in str(exc):
                raise
            print(f"Ray head did not start ({exc}); trying once more", file=sys.stderr)
            local.shutdown()
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def cluster():
    """Head + 2 worker nodes on this machine; the driver is connected to it."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"   # tests talk to loopback only
    local = _start_head()
    for _ in range(2):
        local.add_node(num_cpus=2, **NODE_ARGS)
    local.wait_for_nodes()
    # The rank actor's module lives next to this file; Ray workers import it from there.
    ray.init(address=local.address, runtime_env={"env_vars": {"PYTHONPATH": TESTS_DIR}}, log_to_driver=False)
    try:
        yield local
    finally:
        ray.shutdown()
        local.shutdown()


@pytest.fixture
def socket_dir():
    """A short directory for the agents' sockets (unix socket paths are limited to 107 bytes)."""
    path = tempfile.mkdtemp(prefix="lvray-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def deployed():
    """Whatever a test brought up is taken down again, and the cluster is left without layervault."""
    yield
    lvray.down(grace=0)
    assert not lvray.status().deployed


def _worker_nodes(cluster: Cluster) -> list[str]:
    return [node.node_id for node in cluster.worker_nodes]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ranks(job: str, nodes: list[str]) -> list[ray.actor.ActorHandle]:
    """Four rank actors, two on each of ``nodes``, in one gloo group."""
    from ray_ranks import RankActor

    master = f"127.0.0.1:{_free_port()}"
    rank_cls = ray.remote(RankActor)
    # Half a CPU each: a node's two savers and two fresh loaders fit at once.
    return [rank_cls.options(num_cpus=0.5, scheduling_strategy=NodeAffinitySchedulingStrategy(nodes[rank // 2], soft=False))
            .remote(job, rank, 4, master) for rank in range(4)]


def _all(refs: list[ray.ObjectRef]) -> list:
    """The results of rank calls, with a bound: a stuck collective fails the test instead of hanging it."""
    return ray.get(refs, timeout=180)


def _assert_identical(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert got[name].tobytes() == want[name].tobytes(), name


def _wait_for_new_incarnation(actor: ray.actor.ActorHandle, old_pid: int) -> lvray.AgentInfo:
    """``ray.kill`` returns at once and the old process may answer a little longer: poll."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        info = ray.get(actor.info.remote(), timeout=120)
        if info.pid != old_pid:
            return info
        time.sleep(0.2)
    raise AssertionError("Ray did not restart the killed agent actor within 120 s")


def _wait_node_dead(node_id: str, timeout: float = 120) -> None:
    eventually(lambda: not any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes()),
               f"Ray lists the removed node {node_id} as dead", timeout)


def test_four_ranks_save_restore_and_survive_an_agent_kill(cluster, s3_bucket, socket_dir, deployed):
    aws = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    settings = dict(SERVICE_ARGS, retention="keep_last=2")   # the coordinator's default, for saves that set none
    state = lvray.up(f"s3://{s3_bucket}/ray", socket_dir=socket_dir, env=aws, **settings)
    assert state.healthy
    agents = {a.node_id: a.info for a in state.agents}
    assert set(agents) == {n["NodeID"] for n in ray.nodes()}
    assert len({info.address for info in agents.values()}) == 3   # one socket per node, although one machine

    again = lvray.up(f"s3://{s3_bucket}/ray", socket_dir=socket_dir, env=aws, **settings)  # idempotent
    assert again.coordinator.address == state.coordinator.address
    assert {a.node_id: a.info.pid for a in again.agents} == {n: i.pid for n, i in agents.items()}

    nodes = _worker_nodes(cluster)
    ranks = _ranks("ray-job", nodes)
    for rank, (node_id, address) in enumerate(_all([r.where.remote() for r in ranks])):
        assert node_id == nodes[rank // 2]
        assert address == agents[node_id].address   # found by itself: no agent= and no LAYERVAULT_AGENT

    def node_and_agent() -> tuple[str, str, str]:
        """In a plain Ray task: (its node, the address a client naming none dials, ``agent_address()``)."""
        import layervault.ray
        from layervault.client import AgentClient

        client = AgentClient()
        try:
            return ray.get_runtime_context().get_node_id(), client.address, layervault.ray.agent_address()
        finally:
            client.close()

    # Plain tasks (not actors) find their node's agent too (the function travels by value: it is local).
    task = ray.remote(node_and_agent)
    found = ray.get([task.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))
                     .remote() for node_id in nodes], timeout=120)
    assert found == [(node_id, agents[node_id].address, agents[node_id].address) for node_id in nodes]

    _all([r.train_and_save.remote(1) for r in ranks])
    saved = _all([r.train_and_save.remote(2) for r in ranks])

    fresh = _ranks("ray-job", nodes)
    for got, want in zip(_all([r.load_fresh.remote(2) for r in fresh]), saved):
        _assert_identical(got, want)
    _all([r.close.remote() for r in fresh])
    for r in fresh:
        ray.kill(r)

    victim = ray.get_actor(lvray.agent_actor_name(nodes[1]), namespace=lvray.NAMESPACE)
    before = ray.get(victim.info.remote())
    ray.kill(victim, no_restart=False)
    after = _wait_for_new_incarnation(victim, before.pid)
    assert after.agent_id != before.agent_id
    assert after.address == before.address                 # same socket: the ranks' channels reconnect
    assert after.coordinator == state.coordinator.address  # read afresh from the coordinator actor

    saved = _all([r.train_and_save.remote(3) for r in ranks])  # ranks 2, 3 go through the new agent
    for got, want in zip(_all([r.load_fresh.remote(3) for r in ranks]), saved):
        _assert_identical(got, want)
    # keep_last=2, applied by the coordinator after each commit (in the background): step 1 goes.
    kept = [("model", 2, 4), ("model", 3, 4), ("optimizer", 2, 4), ("optimizer", 3, 4)]
    eventually(lambda: sorted(ray.get(ranks[0].checkpoints.remote(), timeout=60)) == kept,
               f"only {kept} are listed", timeout=60)
    assert lvray.status().healthy
    _all([r.close.remote() for r in ranks])


def _cli(cluster: Cluster, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "layervault.cli", "ray", *args, "--address", cluster.address],
                          capture_output=True, text=True, timeout=120)


def _flags(settings: dict) -> list[str]:
    """``up()`` keyword settings as the flags of ``layervault ray up``."""
    return [text for name, value in settings.items() for text in (f"--{name.replace('_', '-')}", str(value))]


def _scrape(address: str) -> dict[str, float]:
    """The unlabelled samples of a /metrics endpoint, by name."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{address}/metrics", timeout=30) as reply:
        text = reply.read().decode()
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples if not s.labels}


def test_up_again_adds_agents_for_new_nodes_and_the_cli_reports_it(cluster, tmp_path, socket_dir, deployed):
    storage = (tmp_path / "store").as_uri()
    started = _cli(cluster, "up", "--storage", storage, "--socket-dir", socket_dir, *_flags(KNOB_ARGS))
    assert started.returncode == 0, started.stderr
    state = lvray.status()
    assert state.healthy and len(state.agents) == 3
    assert state.coordinator.options == lvray.ServiceOptions(storage, socket_dir=socket_dir, **KNOB_ARGS)
    assert state.coordinator.address in started.stdout and started.stdout.count("serving") == 3
    for agent in state.agents:   # the printed status lists each agent with its metrics endpoint
        assert f"{agent.info.address} " in started.stdout and f" {agent.info.metrics_address} " in started.stdout
        assert _scrape(agent.info.metrics_address)["layervault_agent_staging_budget_bytes"] == 16 << 20
    assert f"http://{state.coordinator.metrics_address}/metrics" in started.stdout
    assert "layervault_coordinator_saves_pending" in _scrape(state.coordinator.metrics_address)

    late = cluster.add_node(num_cpus=1, **NODE_ARGS)
    try:
        cluster.wait_for_nodes()
        state = lvray.status()
        assert state.nodes_without_agent == (late.node_id,) and not state.healthy
        listed = _cli(cluster, "status", "--json")
        assert listed.returncode == 1, listed.stderr   # not healthy: a node has no agent
        assert json.loads(listed.stdout)["nodes_without_agent"] == [late.node_id]

        state = lvray.up(storage, socket_dir=socket_dir, **KNOB_ARGS)   # the same settings as the CLI's up
        assert state.healthy and late.node_id in {a.node_id for a in state.agents}
        listed = _cli(cluster, "status")
        assert listed.returncode == 0, listed.stderr
        assert listed.stdout.count("serving") == 4 and state.coordinator.address in listed.stdout
    finally:
        cluster.remove_node(late)

    # Ray notices a removed node only after its health checks fail (seconds): an up() meanwhile
    # must not fail on the agent it cannot reach or re-create there.
    lvray.up(storage, socket_dir=socket_dir, **KNOB_ARGS)
    _wait_node_dead(late.node_id)
    state = lvray.up(storage, socket_dir=socket_dir, **KNOB_ARGS)   # the agent of the removed node goes
    assert late.node_id not in {a.node_id for a in state.agents} and len(state.agents) == 3
    assert state.healthy

    stopped = _cli(cluster, "down")
    assert stopped.returncode == 0 and "stopped 4 layervault actors" in stopped.stdout, stopped.stderr


def test_errors_name_what_is_wrong(cluster, tmp_path, socket_dir, deployed, monkeypatch):
    monkeypatch.delenv("LAYERVAULT_AGENT", raising=False)
    with pytest.raises(UnavailableError, match=r"no layervault agent on Ray node [0-9a-f]+: run `layervault ray up"):
        lvray.agent_address()
    from layervault.client import AgentClient

    assert AgentClient().address.startswith("unix:///") and "/ray/" not in AgentClient().address  # not deployed: usual default

    with pytest.raises(InvalidArgumentError, match="ftp://x"):
        lvray.up("ftp://x")
    with pytest.raises(InvalidArgumentError, match="staging-mib must be at least 1"):
        lvray.up("file:///tmp/x", staging_mib=0)
    with pytest.raises(InvalidArgumentError, match="bad retention rule 'keep_last=two'"):
        lvray.up("file:///tmp/x", retention="keep_last=two")
    with pytest.raises(InvalidArgumentError, match="log-format must be one of text, json, got 'xml'"):
        lvray.up("file:///tmp/x", log_format="xml")
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['metrics_port'\]"):
        lvray.up("file:///tmp/x", metrics_port=9464)
    with pytest.raises(ValueError, match="longer than the 107 bytes"):
        agent_socket_path("/tmp/" + "d" * 90, "ab" * 28)
    with pytest.raises(InvalidArgumentError, match="--pass-env NOPE_\\*: no such variable"):
        passed_env(["AWS_*", "NOPE_*"], {"AWS_REGION": "x"})
    assert passed_env(["AWS_*"], {"AWS_REGION": "x", "HOME": "/root"}) == {"AWS_REGION": "x"}
    with pytest.raises(UnavailableError, match=r"coordinator .* did not start: .*/proc/no-such-dir"):
        lvray.up("file:///proc/no-such-dir/store", socket_dir=socket_dir, **SERVICE_ARGS)
    assert not lvray.status().deployed   # nothing half-started is left behind

    storage = (tmp_path / "store").as_uri()
    lvray.up(storage, socket_dir=socket_dir, **SERVICE_ARGS)
    with pytest.raises(InvalidArgumentError, match=r"already up .*staging_mib: 16 -> 32.*ray down"):
        lvray.up(storage, socket_dir=socket_dir, **{**SERVICE_ARGS, "staging_mib": 32})
    head = next(n["NodeID"] for n in ray.nodes() if "node:__internal_head__" in n["Resources"])
    assert ray.get_runtime_context().get_node_id() == head
    assert AgentClient().address == lvray.agent_address() == f"unix://{socket_dir}/agent-{head[:16]}.sock"


@pytest.mark.parametrize("knob, value, message", [
    ("handoff_wait_ms", -1, "handoff-wait-ms must be a whole number of milliseconds >= 0"),
    ("store_write_gbps", 0, "store-write-gbps must be a rate in GB/s > 0"),
    ("store_read_gbps", float("inf"), "store-read-gbps must be a rate in GB/s > 0"),
    ("agent_metrics_port", 70000, "agent-metrics-port 70000 is not a TCP port"),
    ("coordinator_metrics_port", -1, "coordinator-metrics-port -1 is not a TCP port"),
])
def test_service_options_name_the_bad_knob(knob, value, message):
    with pytest.raises(InvalidArgumentError, match=message):
        lvray.ServiceOptions("file:///tmp/x", **{knob: value})
