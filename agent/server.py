"""Starting and stopping the coordinator and agent gRPC servers.

Servers bind port 0 when asked, and report the port they got, so tests and ``layervault up``
never collide. The agent listens on a unix socket (ranks of its node) and on TCP (ranks
without shared memory, other nodes, tools).

Graceful stop (:meth:`RunningServer.stop`, on SIGTERM) within a grace period:

* the health check turns NOT_SERVING at once, while the listeners stay open, so callers get
  an answer rather than a refused connection;
* an agent refuses new saves (UNAVAILABLE, naming the agent) and gives the saves handed off
  to it the grace period to become durable and report; it aborts the rest, and its goodbye
  heartbeat fails their attempts at the coordinator, which removes their objects and open
  multipart uploads (see :meth:`~layervault.agent.commit.CommitCoordinator.agent_stopped`);
* a coordinator fails the attempts that are not writing their manifest, so none is written
  for them and their waiters are answered at once, and removes their objects;
* then the listeners close; calls still running get what is left of the grace period.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from layervault.agent.agent_service import AgentService
from layervault.agent.codecs import StoreRates
from layervault.agent.handoff_gate import DEFAULT_MAX_WAIT
from layervault.agent.heap import keep_buffers_in_heap
from layervault.agent.journal import default_state_dir
from layervault.agent.coordinator_service import CoordinatorService
from layervault.agent.retention import Retention
from layervault.agent.metrics import AgentMetrics, CoordinatorMetrics, MetricsEndpoint, serve_metrics
from layervault.agent.rpc import SERVER_OPTIONS, add_servicer
from layervault.agent.security import ServerSecurity
from layervault.agent.storage import ObjectStore
from layervault.errors import LayervaultError
from layervault.proto import agent_pb2, coordinator_pb2, coordinator_pb2_grpc
from layervault.stream_frames import decode_save_request, encode_restore_reply

log = logging.getLogger("layervault.server")


def default_socket_path() -> str:
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/layervault-{os.getuid()}"
    return str(pathlib.Path(base) / "layervault-agent.sock")


def default_agent_address() -> str:
    """Where ranks look for their node's agent: ``LAYERVAULT_AGENT``; else, in a Ray process
    with ``layervault ray up`` done, the agent of its Ray node; else the default socket."""
    return os.environ.get("LAYERVAULT_AGENT") or _ray_agent_address() or f"unix://{default_socket_path()}"


def _ray_agent_address() -> str | None:
    # Only a process that already imported and initialized Ray can be a Ray worker: never
    # import Ray here (it costs seconds, and most ranks do not use it).
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    from layervault.ray.discovery import deployed_agent_address

    return deployed_agent_address()


@dataclasses.dataclass
class RunningServer:
    server: grpc.Server
    address: str            # what clients dial: "unix:///path" or "127.0.0.1:PORT"
    tcp_address: str
    service: object
    health: health.HealthServicer
    metrics: MetricsEndpoint | None = None  # the /metrics HTTP server, when this server runs one

    @property
    def metrics_address(self) -> str:
        """host:port of the Prometheus endpoint, or empty when metrics are not served."""
        return self.metrics.address if self.metrics else ""

    def stop(self, grace: float | None = 5.0) -> None:
        """Graceful stop (see the module docstring): refuse new work, give in-flight saves and
        calls ``grace`` seconds in all, abort what is left, then release everything."""
        deadline = time.monotonic() + (grace or 0.0)
        agent = isinstance(self.service, AgentService)
        if agent:
            self.service.start_draining()  # first: whoever sees NOT_SERVING also finds new saves refused
        self.health.enter_graceful_shutdown()  # NOT_SERVING; later set() calls are ignored
        if agent:
            self.service.drain(grace or 0.0)  # still listening: new saves get UNAVAILABLE with the reason
        elif isinstance(self.service, CoordinatorService):
            self.service.commits.shut_down()
        self.server.stop(max(0.0, deadline - time.monotonic())).wait()
        if isinstance(self.service, CoordinatorService):
            self.service.commits.join_sweeps(max(0.0, deadline - time.monotonic()))
        close = getattr(self.service, "close", None)
        if close:
            close()
        if self.metrics:
            self.metrics.close()


def _new_server(workers: int, interceptors: Sequence[grpc.ServerInterceptor] = ()) -> tuple[grpc.Server, health.HealthServicer]:
    server = grpc.server(ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lv-rpc"), options=SERVER_OPTIONS,
                         interceptors=list(interceptors))
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    return server, health_servicer


def _enable_reflection(server: grpc.Server, service_name: str) -> None:
    """Let grpcurl and other tools list and call the services without the .proto files."""
    health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
    reflection.enable_server_reflection((service_name, health_name, reflection.SERVICE_NAME), server)


def _start_metrics(server: grpc.Server, service: object, registry: CollectorRegistry, host: str,
                   port: int | None, security: ServerSecurity) -> MetricsEndpoint | None:
    """Serve ``registry`` on ``host:port`` (``None``: not at all) under the listeners' TLS rule;
    on failure release the gRPC server."""
    if port is None:
        return None
    try:
        return serve_metrics(registry, host, port, security.tls, security.insecure)
    except (OSError, LayervaultError):
        server.stop(0)
        close = getattr(service, "close", None)
        if close:
            close()
        raise


def _socket_in_use(path: pathlib.Path) -> bool:
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
            return True
        except OSError:
            return False


def start_coordinator(store: ObjectStore, host: str = "127.0.0.1", port: int = 0, commit_timeout: float = 600.0,
                      security: ServerSecurity = ServerSecurity(), metrics_port: int | None = None,
                      metrics_registry: CollectorRegistry | None = None, retention: Retention | None = None) -> RunningServer:
    """``security``: TLS, job tokens, ``insecure`` (see :mod:`layervault.agent.security`).
    ``retention``: the policy for jobs whose saves bring none (see :mod:`layervault.agent.retention`).
    ``metrics_port``: serve Prometheus metrics there (0: any free port; None: not served);
    ``metrics_registry``: record into this registry (``layervault up`` shares one for both roles)."""
    security.check_listen(host)
    access = security.access("coordinator")
    server, health_servicer = _new_server(64, access.interceptors())
    metrics = CoordinatorMetrics(metrics_registry)
    service = CoordinatorService(store, commit_timeout, metrics, retention=retention)
    service.access = access
    coordinator_pb2_grpc.add_CoordinatorServicer_to_server(service, server)
    _enable_reflection(server, coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"].full_name)
    address = security.bind_tcp(server, host, port)
    endpoint = _start_metrics(server, service, metrics.registry, host, metrics_port, security)
    server.start()
    health_servicer.set("layervault.v1.Coordinator", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    log.info("coordinator listening on %s, storage %s%s", address, store.url,
             f", metrics on {endpoint.url}" if endpoint else "")
    return RunningServer(server, address, address, service, health_servicer, endpoint)


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
    security: ServerSecurity = ServerSecurity(),
    metrics_port: int | None = None,
    metrics_registry: CollectorRegistry | None = None,
    heartbeat_interval: float = 2.0,
    state_dir: str | None = None,
    handoff_wait: float = DEFAULT_MAX_WAIT,
    store_rates: StoreRates = StoreRates(),
) -> RunningServer:
    """``security``: TLS for TCP (also the client certificate shown to the coordinator), job
    tokens, ``insecure``, the unix socket's group (see :mod:`layervault.agent.security`).
    ``state_dir``: where handed-off saves are journaled so that a restarted agent finishes them
    (default: beside the socket, see :mod:`layervault.agent.journal`; ``""``: no journals).
    ``handoff_wait``: seconds an upload defers one chunk to ranks handing off (see
    :mod:`layervault.agent.handoff_gate`; 0: never). ``store_rates``: the storage's write and
    read rates, against which each layer's codec is chosen (see :mod:`layervault.agent.codecs.select`)."""
    if state_dir is None and socket_path:
        state_dir = str(default_state_dir(socket_path))
    security.check_listen(host)
    security.check_dial(coordinator)
    if socket_path:  # before the journal puts its folder beside the socket
        security.prepare_socket_dir(pathlib.Path(socket_path))
    access = security.access("agent")
    keep_buffers_in_heap()  # chunk buffers reuse warm pages: codecs 3-7x faster (see agent/heap.py)
    server, health_servicer = _new_server(128, access.interceptors())
    service = AgentService(store, coordinator, staging_bytes, chunk_size, upload_workers, staging_timeout,
                           cache_bytes=cache_bytes, security=security, metrics=AgentMetrics(metrics_registry),
                           heartbeat_interval=heartbeat_interval, state_dir=state_dir or None,
                           handoff_wait=handoff_wait, store_rates=store_rates)
    security.share_pool(service.pool.path)
    add_servicer(service, server, agent_pb2.DESCRIPTOR.services_by_name["Agent"],
                 deserializers={"Save": decode_save_request}, serializers={"Restore": encode_restore_reply})
    _enable_reflection(server, agent_pb2.DESCRIPTOR.services_by_name["Agent"].full_name)
    tcp = security.bind_tcp(server, host, port)
    address = tcp
    if socket_path:
        path = pathlib.Path(socket_path)
        if _socket_in_use(path):
            server.stop(0)
            service.close()
            raise OSError(f"another agent is already listening on {path}; pass --socket to run a second one")
        path.unlink(missing_ok=True)  # a stale socket of a dead agent
        security.bind_unix(server, path)
        address = f"unix://{path}"
    service.resume_saves()  # only now: a second agent on a socket in use must not adopt the first one's saves
    endpoint = _start_metrics(server, service, service.metrics.registry, host, metrics_port, security)
    server.start()
    health_servicer.set("layervault.v1.Agent", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    service.start_heartbeat(address, tcp, endpoint.address if endpoint else "")
    log.info("agent %s listening on %s and %s, staging %d MiB, storage %s%s",
             service.agent_id, address, tcp, staging_bytes >> 20, store.url,
             f", metrics on {endpoint.url}" if endpoint else "", extra={"agent": service.agent_id})
    return RunningServer(server, address, tcp, service, health_servicer, endpoint)
