"""The `layervault` command line: ls/show through an agent and straight from storage."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import torch

import layervault as lv
from layervault.agent import keys
from layervault.agent.storage import open_store
from layervault.client import AgentClient
from layervault.torch import ModelManager

from services import start_in_process


def cli(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "layervault.cli", *args], capture_output=True, text=True,
                            env={**os.environ, **(env or {})}, timeout=60)
    if check:
        assert result.returncode == 0, result.stderr
    return result


@pytest.fixture
def saved(store_url):
    services = start_in_process(store_url)
    mm = ModelManager(lv.ModelConfig(job="cli-job", name="gpt-small", additional={"creator": "me", "version": "1.0"}),
                      agent=AgentClient(services.agent_address))
    state = {"encoder.weight": torch.zeros(256, 256), "encoder.bias": torch.arange(256, dtype=torch.int64)}
    mm.save(state, step=100, epoch=3).wait(60)
    yield services, store_url
    services.stop()


def test_ls_and_show_through_the_agent(saved):
    services, _ = saved
    env = {"LAYERVAULT_AGENT": services.agent_address}
    out = cli("ls", env=env).stdout
    assert "cli-job" in out and "gpt-small" in out and "epoch=3" in out
    show = cli("show", "cli-job", "100", env=env).stdout
    assert "name=gpt-small" in show and "creator=me" in show and "version=1.0" in show and "compressor=lz4" in show
    assert "encoder.weight" in show and "256x256" in show and "float32" in show and "lz4/1" in show
    assert "encoder.bias" in show and "int64" in show


def test_show_reads_storage_without_any_service(saved):
    services, store_url = saved
    services.stop()
    manifest = json.loads(cli("show", "cli-job", "100", "--storage", store_url, "--json").stdout)
    assert manifest["format_version"] == 1 and manifest["keys"] == {"epoch": "3", "step": "100"}
    assert {s["name"] for s in manifest["shards"]} == {"encoder.weight", "encoder.bias"}
    listing = json.loads(cli("ls", "--storage", store_url, "--json").stdout)
    assert [(c["id"]["job"], c["id"]["step"]) for c in listing] == [("cli-job", "100")]


def test_cli_errors_are_messages_not_tracebacks(saved):
    services, store_url = saved
    missing = cli("show", "cli-job", "7", "--storage", store_url, check=False)
    assert missing.returncode == 1 and "step=7" in missing.stderr and "Traceback" not in missing.stderr
    down = cli("ls", env={"LAYERVAULT_AGENT": "unix:///nonexistent/agent.sock"}, check=False)
    assert down.returncode == 1 and "unavailable" in down.stderr and "Traceback" not in down.stderr
    bad = cli("ls", "--storage", "ftp://x/y", check=False)
    assert bad.returncode == 1 and "unsupported storage URL" in bad.stderr and "Traceback" not in bad.stderr
    for flag in ("-3", "soon"):
        wait = cli("agent", "--coordinator", services.coordinator.address, "--handoff-wait-ms", flag, check=False)
        assert wait.returncode == 2 and "--handoff-wait-ms" in wait.stderr and "milliseconds >= 0" in wait.stderr
    for flag, value in (("--store-write-gbps", "0"), ("--store-read-gbps", "-1"), ("--store-write-gbps", "fast"),
                        ("--store-read-gbps", "inf")):
        rate = cli("up", flag, value, check=False)
        assert rate.returncode == 2 and flag in rate.stderr and "GB/s > 0" in rate.stderr and "Traceback" not in rate.stderr


def test_second_agent_on_the_same_socket_is_refused(saved, tmp_path):
    services, store_url = saved
    socket_path = services.agent_address[len("unix://"):]
    result = subprocess.run([sys.executable, "-m", "layervault.cli", "agent", "--coordinator", services.coordinator.address,
                             "--storage", store_url, "--socket", socket_path, "--staging-mib", "16"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "already listening" in result.stderr and "Traceback" not in result.stderr
    assert cli("ls", env={"LAYERVAULT_AGENT": services.agent_address}).returncode == 0  # the first one still serves


def test_a_damaged_manifest_is_named_and_hides_no_other_checkpoint(saved, caplog):
    services, store_url = saved
    mm = ModelManager(lv.ModelConfig(job="cli-job", name="gpt-small"), agent=AgentClient(services.agent_address))
    mm.save({"encoder.weight": torch.ones(256, 256), "encoder.bias": torch.arange(256, dtype=torch.int64)},
            step=200, epoch=4).wait(60)
    key = keys.manifest_key("cli-job", "model", 100)
    open_store(store_url).put(key, b'{"format_version": 1, "job": ')  # cut short, as by a bad copy
    services.coordinator.service.catalog.forget(key)  # the coordinator had it cached from the commit

    for where, env in ((["--storage", store_url], None), ([], {"LAYERVAULT_AGENT": services.agent_address})):
        listed = cli("ls", *where, env=env, check=False)
        assert listed.returncode == 1 and "Traceback" not in listed.stderr, listed.stderr
        assert f"damaged manifest {key} (cli-job/model step 100)" in listed.stderr and "not valid JSON" in listed.stderr
        steps = [line.split()[2] for line in listed.stdout.splitlines() if line.startswith("cli-job")]
        assert steps == ["200"], listed.stdout

    with caplog.at_level(logging.WARNING, logger="layervault.sdk"):
        assert [c.step for c in mm.checkpoints()] == [200]
    assert "cli-job/model step 100 is damaged" in caplog.text


def test_ls_lists_every_job_unless_one_is_named(saved):
    services, store_url = saved
    mm = ModelManager(lv.ModelConfig(job="other-job", name="tiny"), agent=AgentClient(services.agent_address))
    mm.save({"w": torch.ones(64)}, step=5).wait(60)
    env = {"LAYERVAULT_AGENT": services.agent_address}

    def rows(out: str) -> list[tuple[str, str]]:
        return [tuple(line.split()[0:3:2]) for line in out.splitlines()[1:]]  # (JOB, STEP) below the header

    assert rows(cli("ls", env=env).stdout) == [("cli-job", "100"), ("other-job", "5")]
    for where, where_env in (([], env), (["--storage", store_url], None)):  # the agent's catalog and the bucket's
        listing = json.loads(cli("ls", *where, "--json", env=where_env).stdout)
        assert [(c["id"]["job"], c["id"]["step"], c["config_name"]) for c in listing] == [
            ("cli-job", "100", "gpt-small"), ("other-job", "5", "tiny")]
    assert rows(cli("ls", "other-job", env=env).stdout) == [("other-job", "5")]
    assert [c["id"]["job"] for c in json.loads(cli("ls", "cli-job", "--json", env=env).stdout)] == ["cli-job"]
    assert cli("ls", "no-such-job", env=env).stdout.strip() == "no committed checkpoints for job 'no-such-job'"
