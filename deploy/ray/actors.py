"""The two service actors: one coordinator per cluster, one agent per Ray node.

Both wrap the ordinary servers of :mod:`layervault.agent.server`; Ray only places them and
restarts them. The agent actor reads the coordinator's address from the coordinator actor
each time it starts, so an agent that Ray restarts after a crash reports to the coordinator
of the moment. A service that cannot start stays alive and answers every call with the
reason, so that ``up()`` and the ranks of that node see it instead of a bare "actor died".
"""

from __future__ import annotations

import dataclasses
import logging
import os

import ray

from layervault.errors import InvalidArgumentError, LayervaultError, UnavailableError
from layervault.ray.naming import COORDINATOR_NAME, NAMESPACE, agent_socket_path, default_socket_dir
from layervault.ray.options import ServiceOptions

log = logging.getLogger("layervault.ray")

_COORDINATOR_LOOKUP_S = 120.0


@dataclasses.dataclass(frozen=True)
class CoordinatorInfo:
    address: str        # host:port the agents dial
    node_id: str
    pid: int
    options: ServiceOptions
    metrics_address: str = ""   # host:port of its /metrics; "" when not served


@dataclasses.dataclass(frozen=True)
class AgentInfo:
    node_id: str
    address: str        # unix:///... for the ranks of this node
    tcp_address: str
    coordinator: str    # the coordinator address this agent reports to
    agent_id: str
    pid: int
    metrics_address: str = ""   # host:port of its /metrics; "" when not served


def _as_layervault_error(exc: Exception, what: str) -> LayervaultError:
    """A picklable error with ``what`` in front; the class says what kind of problem it is."""
    if isinstance(exc, LayervaultError):
        cls: type[LayervaultError] = type(exc)
    elif isinstance(exc, ValueError):
        cls = InvalidArgumentError
    else:  # storage not reachable, port taken, socket directory not writable, ...
        cls = UnavailableError
    return cls(f"{what}: {exc}")


def _open_checked_store(url: str):  # -> ObjectStore
    from layervault.agent.storage import open_store

    store = open_store(url)
    store.check()
    return store


def _log_to_stderr(options: ServiceOptions) -> None:
    """The actor's log lines, as ``--log-format`` would make them (a no-op where logging is set up)."""
    from layervault.agent.logs import configure_logging

    level = os.environ.get("LAYERVAULT_LOG_LEVEL", "INFO").upper()
    if not isinstance(logging.getLevelName(level), int):  # unknown: logging at INFO beats not starting
        level = "INFO"
    configure_logging(level, options.log_format)


def _reachable(address: str) -> str:
    """``host:port`` as other nodes dial it: a wildcard host becomes this node's IP address."""
    host, _, port = address.rpartition(":")
    if host in ("0.0.0.0", "[::]", "::", ""):
        host = ray.util.get_node_ip_address()
    return f"{host}:{port}"


def _coordinator_address(what: str) -> str:
    """The current coordinator's address, asked of the coordinator actor (waits while Ray restarts it)."""
    try:
        coordinator = ray.get_actor(COORDINATOR_NAME, namespace=NAMESPACE)
        return ray.get(coordinator.address.remote(), timeout=_COORDINATOR_LOOKUP_S)
    except ray.exceptions.RayTaskError as exc:  # the coordinator actor said why it is not serving
        cause = exc.cause if isinstance(exc.cause, Exception) else exc
        raise _as_layervault_error(cause, what) from None
    except (ray.exceptions.RayError, ValueError) as exc:  # ValueError: no actor of that name
        raise UnavailableError(f"{what}: no layervault coordinator actor is serving ({exc}); "
                               "run `layervault ray up` again") from None


class _ServiceActor:
    """What both actors answer: their info once serving (else the reason they are not), and a
    stop that drains in-flight hand-offs and uploads for up to ``grace`` seconds."""

    role = ""  # "coordinator" / "agent", for the message after a stop
    _server = None
    _failure: LayervaultError | None = None
    _info: CoordinatorInfo | AgentInfo

    def info(self) -> CoordinatorInfo | AgentInfo:
        if self._failure is not None:
            raise self._failure
        return self._info

    def address(self) -> str:
        return self.info().address

    def stop(self, grace: float) -> None:
        if self._server is not None:
            self._server.stop(grace)
            self._server = None
        self._failure = UnavailableError(f"layervault {self.role} actor was stopped (layervault ray down)")


class CoordinatorActor(_ServiceActor):
    """The cluster's coordinator (named ``layervault-coordinator``, detached)."""

    role = "coordinator"

    def __init__(self, options: ServiceOptions) -> None:
        _log_to_stderr(options)
        self._options = options
        node_id = ray.get_runtime_context().get_node_id()
        try:
            from layervault.agent.server import start_coordinator

            security = options.security()  # bad TLS/token files fail before storage is touched
            self._server = start_coordinator(_open_checked_store(options.storage), options.coordinator_host,
                                             options.coordinator_port, options.commit_timeout, security=security,
                                             metrics_port=options.coordinator_metrics_port,
                                             retention=options.retention_policy())
        except Exception as exc:  # noqa: BLE001 - reported by info(), see the module docstring
            self._failure = _as_layervault_error(exc, f"layervault coordinator on Ray node {node_id} did not start")
            log.error("%s", self._failure)
            return
        # Listening everywhere: agents (and Prometheus) dial this node's address.
        port = self._server.address.rsplit(":", 1)[1]
        self._info = CoordinatorInfo(_reachable(f"{options.coordinator_host}:{port}"), node_id, os.getpid(), options,
                                     _reachable(self._server.metrics_address) if self._server.metrics_address else "")


class AgentActor(_ServiceActor):
    """One Ray node's agent (named ``layervault-agent-<node id>``, detached, pinned to the node)."""

    role = "agent"

    def __init__(self, node_id: str, options: ServiceOptions) -> None:
        _log_to_stderr(options)
        what = f"layervault agent on Ray node {node_id} did not start"
        try:
            here = ray.get_runtime_context().get_node_id()
            if here != node_id:  # hard node affinity makes this impossible; a wrong socket would be worse
                raise RuntimeError(f"scheduled on node {here} instead")
            coordinator_address = _coordinator_address(what)
            from layervault.agent.server import start_agent

            socket_path = agent_socket_path(options.socket_dir or default_socket_dir(), node_id)
            security = options.security()
            self._server = start_agent(
                _open_checked_store(options.storage), coordinator_address, socket_path=socket_path,
                host=options.agent_host, port=0, staging_bytes=options.staging_mib << 20,
                chunk_size=options.chunk_mib << 20, upload_workers=options.upload_workers,
                cache_bytes=options.cache_mib << 20, handoff_wait=options.handoff_wait_ms / 1000,
                store_rates=options.store_rates(), metrics_port=options.agent_metrics_port, security=security)
        except LayervaultError as exc:
            self._failure = exc
        except Exception as exc:  # noqa: BLE001 - reported by info(), see the module docstring
            self._failure = _as_layervault_error(exc, what)
        if self._failure is not None:
            log.error("%s", self._failure)
            return
        metrics = self._server.metrics_address
        self._info = AgentInfo(node_id, self._server.address, self._server.tcp_address, coordinator_address,
                               self._server.service.agent_id, os.getpid(), _reachable(metrics) if metrics else "")

