"""Real coordinator and agent servers for tests: in this process, or as `layervault` processes."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time

from layervault.agent.codecs import StoreRates
from layervault.agent.server import RunningServer, start_agent, start_coordinator
from layervault.agent.storage import ObjectStore, open_store


@dataclasses.dataclass
class InProcessServices:
    store: ObjectStore
    coordinator: RunningServer
    agent: RunningServer

    @property
    def agent_address(self) -> str:
        return self.agent.address

    def stop(self) -> None:
        self.agent.stop(grace=0)
        self.coordinator.stop(grace=0)


def start_in_process(store_url: str, staging_bytes: int = 64 << 20, chunk_size: int = 1 << 20,
                     commit_timeout: float = 60.0, staging_timeout: float = 60.0,
                     store_rates: StoreRates = StoreRates(), metrics_port: int | None = None) -> InProcessServices:
    """``metrics_port``: 0 serves each server's Prometheus metrics on a free port (``metrics_address``)."""
    socket_dir = tempfile.mkdtemp(prefix="lv-", dir="/tmp")
    coordinator = start_coordinator(open_store(store_url), commit_timeout=commit_timeout, metrics_port=metrics_port)
    agent = start_agent(open_store(store_url), coordinator.address, socket_path=f"{socket_dir}/agent.sock",
                        staging_bytes=staging_bytes, chunk_size=chunk_size, staging_timeout=staging_timeout,
                        store_rates=store_rates, metrics_port=metrics_port)
    return InProcessServices(agent.service.store, coordinator, agent)


class ServiceProcess:
    """One `layervault coordinator|agent|up` process; its bound addresses come from --ready-file."""

    def __init__(self, args: list[str], log_dir: pathlib.Path, name: str, env: dict | None = None) -> None:
        self.name = name
        self.ready_file = log_dir / f"{name}.ready.json"
        self.ready_file.unlink(missing_ok=True)
        self.log_path = log_dir / f"{name}.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "layervault.cli", *args, "--ready-file", str(self.ready_file)],
            stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
        )
        self.info = self._wait_ready()

    def _wait_ready(self, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready_file.exists():
                return json.loads(self.ready_file.read_text())
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not start (exit {self.proc.poll()}):\n{self.log_path.read_text()[-3000:]}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()


@dataclasses.dataclass
class InProcessCluster:
    """One coordinator and several agents ("nodes") in this process, sharing one store URL."""

    coordinator: RunningServer
    agents: list[RunningServer]

    def stop(self) -> None:
        for agent in self.agents:
            agent.stop(grace=0)
        self.coordinator.stop(grace=0)


def start_cluster_in_process(store_url: str, agents: int = 2, chunk_size: int = 64 << 10,
                             staging_bytes: int = 64 << 20, cache_bytes: int = 64 << 20) -> InProcessCluster:
    coordinator = start_coordinator(open_store(store_url), commit_timeout=120)
    started = []
    for n in range(agents):
        socket_dir = tempfile.mkdtemp(prefix=f"lv{n}-", dir="/tmp")
        started.append(start_agent(open_store(store_url), coordinator.address, socket_path=f"{socket_dir}/agent.sock",
                                   staging_bytes=staging_bytes, chunk_size=chunk_size, cache_bytes=cache_bytes))
    return InProcessCluster(coordinator, started)
