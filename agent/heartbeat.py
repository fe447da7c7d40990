"""The agent's heartbeat: its state, sent to the coordinator every interval and on every change.

One daemon thread sends; :meth:`Heartbeat.poke` (a save opened or finished, draining)
wakes it early, so ``layervault status`` follows changes without waiting for the next
beat, and many pokes in a row cost one report. A coordinator that cannot be reached only
delays the reports: it is logged once when it goes and once when it comes back, never on
every beat, and saves do not depend on heartbeats at all.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

import grpc

from layervault.proto import coordinator_pb2, coordinator_pb2_grpc

log = logging.getLogger("layervault.agent")


class Heartbeat:
    def __init__(self, coordinator: coordinator_pb2_grpc.CoordinatorStub,
                 state: Callable[[], coordinator_pb2.AgentState], interval: float = 2.0) -> None:
        if interval <= 0:
            raise ValueError(f"heartbeat interval must be positive, got {interval}")
        self.coordinator = coordinator
        self.state = state
        self.interval = interval
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._reachable = True

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True, name="lv-heartbeat")
        self._thread.start()

    def poke(self) -> None:
        """Report soon: the state changed."""
        self._wake.set()

    def stop(self, final: coordinator_pb2.AgentState | None = None, timeout: float = 2.0) -> None:
        """Stop beating; send ``final`` (the goodbye) once, if given and the thread ran. Idempotent."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._wake.set()
        if self._thread is None:
            return
        self._thread.join(timeout)
        if final is not None:
            self._send(final, timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()  # before reading the state: a change during the send causes another send
            self._send(self.state(), timeout=max(1.0, self.interval))
            self._wake.wait(self.interval)

    def _send(self, state: coordinator_pb2.AgentState, timeout: float) -> None:
        state.heartbeat_interval_s = self.interval
        try:
            self.coordinator.AgentHeartbeat(coordinator_pb2.AgentHeartbeatRequest(state=state), timeout=timeout)
        except grpc.RpcError as exc:
            if self._reachable:
                log.warning("agent %s: heartbeat to the coordinator failed (%s: %s); retrying every %.0fs",
                            state.agent_id, exc.code().name if hasattr(exc, "code") else "?",
                            exc.details() if hasattr(exc, "details") else exc, self.interval,
                            extra={"agent": state.agent_id})
            self._reachable = False
            return
        if not self._reachable:
            log.info("agent %s: heartbeats reach the coordinator again", state.agent_id, extra={"agent": state.agent_id})
        self._reachable = True
