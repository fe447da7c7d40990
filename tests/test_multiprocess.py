"""The whole system as separate processes: a coordinator, two agents ("nodes") and four
gloo ranks (two per agent), on the real S3 server and on a local folder."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from layervault.demo import RankJob, free_port, run_ranks

from services import ServiceProcess

pytestmark = pytest.mark.slow

ONE_RANK_SAVE = pathlib.Path(__file__).with_name("one_rank_save.py")


class Cluster:
    """A coordinator and two agents as `layervault` processes."""

    def __init__(self, storage: str, workdir: pathlib.Path, staging_mib: int = 64) -> None:
        self.storage, self.workdir, self.staging_mib = storage, workdir, staging_mib
        self.start()

    def start(self) -> None:
        self.coordinator = ServiceProcess(["coordinator", "--storage", self.storage, "--host", "127.0.0.1", "--port", "0"],
                                          self.workdir, "coordinator")
        self.agents = [
            ServiceProcess(["agent", "--coordinator", self.coordinator.info["coordinator"], "--storage", self.storage,
                            "--socket", str(self.workdir / f"node{n}.sock"), "--staging-mib", str(self.staging_mib),
                            "--chunk-mib", "1"], self.workdir, f"agent{n}")
            for n in range(2)
        ]

    def restart_agent(self, n: int, kill: bool = True) -> None:
        old = self.agents[n]
        old.kill() if kill else old.stop()
        self.agents[n] = ServiceProcess(["agent", "--coordinator", self.coordinator.info["coordinator"], "--storage",
                                         self.storage, "--socket", str(self.workdir / f"node{n}.sock"),
                                         "--staging-mib", str(self.staging_mib), "--chunk-mib", "1"], self.workdir, f"agent{n}")

    def rank_agents(self, world_size: int) -> list[str]:
        return [self.agents[rank * 2 // world_size].info["agent"] for rank in range(world_size)]

    def kill(self) -> None:
        for proc in (*self.agents, self.coordinator):
            proc.kill()

    def stop(self) -> None:
        for proc in (*self.agents, self.coordinator):
            proc.stop()


def _cli(*args: str, agent: str) -> str:
    env = {**os.environ, "LAYERVAULT_AGENT": agent}
    return subprocess.run([sys.executable, "-m", "layervault.cli", *args], env=env, check=True,
                          capture_output=True, text=True).stdout


def test_four_ranks_two_agents_kill_everything_and_resume(store_url, tmp_path):
    cluster = Cluster(store_url, tmp_path)
    try:
        spec = RankJob("run-42", 4, free_port(), cluster.rank_agents(4), str(tmp_path), "train", save_steps=(3, 6))
        reference = run_ranks(spec)
        cluster.kill()  # SIGKILL: no graceful anything
        cluster.start()
        resumed = run_ranks(dataclasses.replace(spec, mode="resume", master_port=free_port(), agents=cluster.rank_agents(4)))
        for ref, res in zip(reference, resumed):
            assert res["resumed_from"] == 6
            assert res["losses"] == {step: ref["losses"][step] for step in res["losses"]}
            assert list(res["losses"]) == ["7", "8", "9", "10"]

        listing = json.loads(_cli("ls", "run-42", "--json", agent=cluster.agents[1].info["agent"]))
        assert [(c["id"]["kind"], int(c["id"]["step"])) for c in listing] == [
            ("model", 3), ("model", 6), ("optimizer", 3), ("optimizer", 6)]
        assert all(c["world_size"] == 4 for c in listing)

        # Replicated (DDP) tensors are stored once, spread over all four ranks and both agents.
        manifest = json.loads(_cli("show", "run-42", "6", "--json", agent=cluster.agents[0].info["agent"]))
        names = [s["name"] for s in manifest["shards"]]
        assert len(names) == len(set(names))
        assert {s.get("rank", 0) for s in manifest["shards"]} == {0, 1, 2, 3}
        assert manifest["config"]["additional"] == {"creator": "layervault-demo", "version": "1.0"}
    finally:
        cluster.stop()


def _model_steps(cluster: Cluster, job: str) -> list[int]:
    out = _cli("ls", job, "--kind", "model", "--json", agent=cluster.agents[0].info["agent"])
    return [int(c["id"]["step"]) for c in json.loads(out)]


@pytest.mark.parametrize("killed", ["rank", "agent"])
def test_killed_mid_handoff_never_commits_and_the_step_can_be_saved_again(store_url, tmp_path, killed):
    """SIGKILL a rank (or its agent) while it hands off step 4: step 4 is never listed, step 3
    still restores, and a new attempt at step 4 commits."""
    cluster = Cluster(store_url, tmp_path)
    try:
        spec = RankJob("crashy", 2, free_port(), cluster.rank_agents(2), str(tmp_path), "train", save_steps=(3,), extra_steps=0)
        run_ranks(spec)
        victim = subprocess.Popen([sys.executable, str(ONE_RANK_SAVE), cluster.agents[0].info["agent"], "crashy", "4", "slow"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert victim.stdout.readline().strip() == "staging"
        if killed == "rank":
            victim.send_signal(signal.SIGKILL)
        else:
            cluster.restart_agent(0)  # SIGKILL the agent mid hand-off, then start a new one
            victim.kill()
        victim.wait(10)
        time.sleep(1.0)
        assert _model_steps(cluster, "crashy") == [3]
        resumed = run_ranks(dataclasses.replace(spec, mode="resume", master_port=free_port(), extra_steps=1,
                                                agents=cluster.rank_agents(2)))
        assert all(r["resumed_from"] == 3 for r in resumed)
        redo = subprocess.run([sys.executable, str(ONE_RANK_SAVE), cluster.agents[0].info["agent"], "crashy", "4", "fast"],
                              capture_output=True, text=True, timeout=120)
        assert redo.returncode == 0, redo.stderr
        assert _model_steps(cluster, "crashy") == [3, 4]
    finally:
        cluster.stop()
