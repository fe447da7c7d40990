"""Shutdown, startup and commit deadlines of the real `layervault` processes."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import torch

import layervault as lv
from layervault.client import AgentClient, CheckpointRef, SaveEntry
from layervault.proto import manifest_pb2
from layervault.torch.tensors import TensorSource, whole_layout

from services import ServiceProcess, start_in_process

pytestmark = pytest.mark.slow


def _committed_steps(store_url: str, job: str) -> list[int]:
    out = subprocess.run([sys.executable, "-m", "layervault.cli", "ls", job, "--storage", store_url, "--json"],
                         capture_output=True, text=True, check=True).stdout
    return [int(c["id"]["step"]) for c in json.loads(out)]


def _one_rank_save(address: str, job: str, step: int, nbytes: int):
    tensor = torch.arange(nbytes // 4, dtype=torch.float32)
    client = AgentClient(address)
    return client.save(CheckpointRef(job, "model", step), rank=0, world_size=1, config=manifest_pb2.Config(name="x"),
                       keys={}, extra={}, entries=[SaveEntry("w", whole_layout(tensor), TensorSource(tensor))])


def _services(store_url: str, tmp_path, grace: float) -> tuple[ServiceProcess, ServiceProcess]:
    coordinator = ServiceProcess(["coordinator", "--storage", store_url, "--host", "127.0.0.1", "--port", "0"],
                                 tmp_path, "coordinator")
    agent = ServiceProcess(["agent", "--coordinator", coordinator.info["coordinator"], "--storage", store_url,
                            "--socket", str(tmp_path / "agent.sock"), "--staging-mib", "256", "--grace", str(grace)],
                           tmp_path, "agent")
    return coordinator, agent


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
    victim = subprocess.Popen([sys.executable, str(pathlib.Path(__file__).with_name("one_rank_save.py")),
                               agent.info["agent"], "stalled", "1", "slow"], stdout=subprocess.PIPE, text=True)
    try:
        assert victim.stdout.readline().strip() == "staging"
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


@pytest.mark.s3
def test_agent_with_unusable_storage_exits_with_a_message(s3_server, tmp_path):
    cases = {
        "missing bucket": ({}, "s3://no-such-bucket-here/prefix", "no-such-bucket-here"),
        "unreachable endpoint": ({"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}, "s3://bucket/prefix", "127.0.0.1:9"),
    }
    for name, (env, url, expected) in cases.items():
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "layervault.cli", "agent", "--coordinator", "127.0.0.1:9", "--storage", url,
             "--socket", str(tmp_path / f"{len(name)}.sock")],
            capture_output=True, text=True, timeout=120, env={**os.environ, **env})
        assert result.returncode != 0, name
        assert expected in result.stderr and "Traceback" not in result.stderr, (name, result.stderr)
        assert time.monotonic() - started < 60, name


def test_commit_deadline_names_the_ranks_that_never_reported(tmp_path):
    services = start_in_process((tmp_path / "store").as_uri(), commit_timeout=2)
    try:
        tensor = torch.ones(16)
        client = AgentClient(services.agent_address)
        handle = client.save(CheckpointRef("partial", "model", 1), rank=0, world_size=3, config=manifest_pb2.Config(name="x"),
                             keys={}, extra={}, entries=[SaveEntry("w", whole_layout(tensor), TensorSource(tensor))])
        with pytest.raises(lv.SaveFailedError, match=r"ranks \[1, 2\] did not report.*never started saving"):
            handle.wait(timeout=30)
        assert [c.step for c in client.list("partial")] == []
    finally:
        services.stop()
