"""The coordinator's view of its agents, built from their heartbeats (``layervault status``).

Each agent reports its state every few seconds and on every change (a save opened or
done, draining, stopped). The coordinator keeps only the latest report per agent, in
memory: a restarted coordinator knows every live agent again after one interval. An
agent whose reports stop for :data:`STALE_AFTER_BEATS` intervals is listed as stale (its
node may be gone); one that said goodbye is listed as stopped. Both are forgotten after
:data:`FORGET_AFTER_S`, so restarted agents (new ids) do not pile up.
"""

from __future__ import annotations

import dataclasses
import datetime
import threading
import time

from layervault.errors import InvalidArgumentError
from layervault.proto import coordinator_pb2

STALE_AFTER_BEATS = 3
FORGET_AFTER_S = 600.0
DEFAULT_INTERVAL_S = 2.0

_PHASE_NAMES = {
    coordinator_pb2.AGENT_PHASE_SERVING: "serving",
    coordinator_pb2.AGENT_PHASE_DRAINING: "draining",
    coordinator_pb2.AGENT_PHASE_STOPPED: "stopped",
    coordinator_pb2.AGENT_PHASE_STALE: "stale",
    coordinator_pb2.AGENT_PHASE_UNSPECIFIED: "unknown",
}


def phase_name(phase: int) -> str:
    return _PHASE_NAMES.get(phase, "unknown")


def rfc3339(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclasses.dataclass
class _Report:
    state: coordinator_pb2.AgentState
    received: float       # time.monotonic() of arrival
    received_wall: float  # time.time() of arrival, for display


class AgentRegistry:
    """Latest heartbeat per agent id; thread-safe."""

    def __init__(self, clock=time.monotonic) -> None:
        self._clock = clock
        self._reports: dict[str, _Report] = {}
        self._lock = threading.Lock()

    def record(self, state: coordinator_pb2.AgentState) -> None:
        if not state.agent_id:
            raise InvalidArgumentError("a heartbeat must name its agent (agent_id is empty)")
        if state.phase == coordinator_pb2.AGENT_PHASE_STALE:
            raise InvalidArgumentError(f"agent {state.agent_id}: phase STALE is the coordinator's to set, not an agent's")
        report = _Report(coordinator_pb2.AgentState(), self._clock(), time.time())
        report.state.CopyFrom(state)
        with self._lock:
            self._reports[state.agent_id] = report

    def describe(self, agent_id: str) -> str:
        """``agent_id``, with the addresses of its latest report when there is one (for errors)."""
        with self._lock:
            report = self._reports.get(agent_id)
        if report is None:
            return agent_id
        addresses = [a for a in (report.state.address, report.state.tcp_address) if a]
        return f"{agent_id} at {', '.join(dict.fromkeys(addresses))}" if addresses else agent_id

    def list(self) -> list[coordinator_pb2.AgentStatus]:
        """Every known agent, sorted by id, stale ones marked so."""
        now = self._clock()
        out = []
        with self._lock:
            for agent_id in sorted(self._reports):
                report = self._reports[agent_id]
                age = now - report.received
                stale = age > STALE_AFTER_BEATS * (report.state.heartbeat_interval_s or DEFAULT_INTERVAL_S)
                quiet = stale or report.state.phase == coordinator_pb2.AGENT_PHASE_STOPPED
                if quiet and age > FORGET_AFTER_S:
                    del self._reports[agent_id]
                    continue
                status = coordinator_pb2.AgentStatus(last_seen_at=rfc3339(report.received_wall), seconds_since_report=age)
                status.state.CopyFrom(report.state)
                if stale and report.state.phase != coordinator_pb2.AGENT_PHASE_STOPPED:
                    status.state.phase = coordinator_pb2.AGENT_PHASE_STALE
                out.append(status)
        return out

    def count_by_phase(self) -> dict[str, int]:
        counts = {name: 0 for name in ("serving", "draining", "stopped", "stale")}
        for status in self.list():
            name = phase_name(status.state.phase)
            counts[name] = counts.get(name, 0) + 1
        return counts
