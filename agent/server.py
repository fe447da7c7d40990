"""Starting and stopping the coordinator and agent gRPC servers.

Servers bind port 0 when asked, and report the port they got, so tests and ``layervault up``
never collide. The agent listens on a unix socket (ranks of its node) and on TCP (ranks
without shared memory, other nodes, tools).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from layervault.agent.agent_service import AgentService
from layervault.agent.coordinator_service import CoordinatorService
from layervault.agent.rpc import SERVER_OPTIONS
from layervault.agent.storage import ObjectStore
from layervault.proto import agent_pb2_grpc, coordinator_pb2_grpc

log = logging.getLogger("layervault.server")


def default_socket_path() -> str:
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/layervault-{os.getuid()}"
    return str(pathlib.Path(base) / "layervault-agent.sock")


def default_agent_address() -> str:
    """Where ranks look for their node's agent: ``LAYERVAULT_AGENT``, else the default socket."""
    return os.environ.get("LAYERVAULT_AGENT") or f"unix://{default_socket_path()}"


@dataclasses.dataclass
class RunningServer:
    server: grpc.Server
    address: str            # what clients dial: "unix:///path" or "127.0.0.1:PORT"
    tcp_address: str
    service: object
    health: health.HealthServicer

    def stop(self, grace: float | None = 5.0) -> None:
        """Graceful stop: refuse new work, give in-flight calls and (for an agent) uploads
        ``grace`` seconds, abort what is left, then release everything."""
        self.health.enter_graceful_shutdown()
        draining = isinstance(self.service, AgentService)
        if draining:
            self.service.start_draining()
        started = time.monotonic()
        self.server.stop(grace).wait()
        if draining:
            self.service.drain(max(0.0, (grace or 0.0) - (time.monotonic() - started)))
        close = getattr(self.service, "close", None)
        if close:
            close()


def _new_server(workers: int) -> tuple[grpc.Server, health.HealthServicer]:
    server = grpc.server(ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lv-rpc"), options=SERVER_OPTIONS)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    return server, health_servicer


def _bind_tcp(server: grpc.Server, host: str, port: int) -> str:
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    return f"{host}:{bound}"


def _socket_in_use(path: pathlib.Path) -> bool:
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
            return True
        except OSError:
            return False


def start_coordinator(store: ObjectStore, host: str = "127.0.0.1", port: int = 0, commit_timeout: float = 600.0) -> RunningServer:
    server, health_servicer = _new_server(64)
    service = CoordinatorService(store, commit_timeout)
    coordinator_pb2_grpc.add_CoordinatorServicer_to_server(service, server)
    address = _bind_tcp(server, host, port)
    server.start()
    health_servicer.set("layervault.v1.Coordinator", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    log.info("coordinator listening on %s, storage %s", address, store.url)
    return RunningServer(server, address, address, service, health_servicer)


def start_agent(
    store: ObjectStore,
    coordinator: str,
    socket_path: str | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    staging_bytes: int = 1 << 30,
    chunk_size: int = 4 << 20,
    upload_workers: int = 8,
    staging_timeout: float = 600.0,
    cache_bytes: int = 256 << 20,
) -> RunningServer:
    server, health_servicer = _new_server(128)
    service = AgentService(store, coordinator, staging_bytes, chunk_size, upload_workers, staging_timeout,
                           cache_bytes=cache_bytes)
    agent_pb2_grpc.add_AgentServicer_to_server(service, server)
    tcp = _bind_tcp(server, host, port)
    address = tcp
    if socket_path:
        path = pathlib.Path(socket_path)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if _socket_in_use(path):
            server.stop(0)
            service.close()
            raise OSError(f"another agent is already listening on {path}; pass --socket to run a second one")
        path.unlink(missing_ok=True)  # a stale socket of a dead agent
        if server.add_insecure_port(f"unix://{path}") == 0:
            raise OSError(f"cannot listen on unix socket {path}")
        address = f"unix://{path}"
    server.start()
    health_servicer.set("layervault.v1.Agent", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    log.info("agent %s listening on %s and %s, staging %d MiB, storage %s",
             service.agent_id, address, tcp, staging_bytes >> 20, store.url)
    return RunningServer(server, address, tcp, service, health_servicer)
