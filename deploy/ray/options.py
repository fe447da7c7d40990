"""The settings of one layervault deployment on a Ray cluster.

They travel to every service actor as constructor arguments, so a restarted actor comes
back with exactly the settings it was created with; the coordinator actor keeps the copy
that a later ``up()`` compares against.
"""

from __future__ import annotations

import dataclasses
import math

from layervault.agent.codecs import StoreRates
from layervault.agent.logs import FORMATS as LOG_FORMATS
from layervault.agent.retention import Retention
from layervault.errors import InvalidArgumentError

_STORAGE_FORMS = ("s3://", "file:///")


@dataclasses.dataclass(frozen=True)
class ServiceOptions:
    """What ``layervault ray up`` was asked for (the flags of ``layervault agent`` / ``coordinator``).

    Daemon flags not here: ``--host``/``--port`` (``coordinator_host``/``_port``, ``agent_host``;
    agents take any free port), ``--socket`` (one per node under ``socket_dir``), ``--state-dir``
    (always beside the node's socket), ``--metrics-port`` (one per role), ``--ready-file`` and
    ``--grace`` (``down(grace=)``), ``--log-level`` (``LAYERVAULT_LOG_LEVEL`` passed with ``env``).
    """

    storage: str
    staging_mib: int = 1024
    chunk_mib: int = 4
    upload_workers: int = 8
    cache_mib: int = 256
    commit_timeout: float = 600.0
    coordinator_host: str = "0.0.0.0"
    coordinator_port: int = 7070
    agent_host: str = "127.0.0.1"
    socket_dir: str | None = None
    handoff_wait_ms: int = 250
    store_write_gbps: float = StoreRates.write_gbps
    store_read_gbps: float = StoreRates.read_gbps
    retention: str = ""     # coordinator: policy for jobs whose saves set none ("": keep all); or a Retention
    # Metrics ports, on each service's listening host: None serves none, 0 any free port. A fixed
    # port (9464 agents, 9465 coordinator) suits a cluster with one Ray node per machine.
    agent_metrics_port: int | None = None
    coordinator_metrics_port: int | None = None
    log_format: str = "text"
    # Security, as the daemons' flags of the same names; files are paths on every node.
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    tls_server_name: str = ""
    insecure: bool = False
    tokens: str | None = None
    socket_group: str | None = None
    env_names: tuple[str, ...] = ()  # variables handed to the service actors (values are not kept here)

    def __post_init__(self) -> None:
        if not isinstance(self.storage, str) or not self.storage.startswith(_STORAGE_FORMS):
            raise InvalidArgumentError(f"storage URL {self.storage!r}: expected s3://bucket[/prefix] or "
                                       "file:///absolute/path (every Ray node must reach it)")
        for name in ("staging_mib", "chunk_mib", "upload_workers"):
            if getattr(self, name) < 1:
                raise InvalidArgumentError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.cache_mib < 0:
            raise InvalidArgumentError(f"cache-mib must be >= 0, got {self.cache_mib}")
        if self.commit_timeout <= 0:
            raise InvalidArgumentError(f"commit-timeout must be positive, got {self.commit_timeout}")
        if not 0 <= self.coordinator_port <= 65535:
            raise InvalidArgumentError(f"coordinator port {self.coordinator_port} is not a TCP port")
        if self.socket_dir is not None and not self.socket_dir.startswith("/"):
            raise InvalidArgumentError(f"socket directory {self.socket_dir!r} must be an absolute path")
        if not isinstance(self.handoff_wait_ms, int) or self.handoff_wait_ms < 0:
            raise InvalidArgumentError(f"handoff-wait-ms must be a whole number of milliseconds >= 0, "
                                       f"got {self.handoff_wait_ms!r}")
        for name in ("store_write_gbps", "store_read_gbps"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 < value and math.isfinite(value)):
                raise InvalidArgumentError(f"{name.replace('_', '-')} must be a rate in GB/s > 0, got {value!r}")
        for name in ("agent_metrics_port", "coordinator_metrics_port"):
            port = getattr(self, name)
            if port is not None and not 0 <= port <= 65535:
                raise InvalidArgumentError(f"{name.replace('_', '-')} {port} is not a TCP port (None: no metrics)")
        if self.log_format not in LOG_FORMATS:
            raise InvalidArgumentError(f"log-format must be one of {', '.join(LOG_FORMATS)}, got {self.log_format!r}")
        # Kept as the policy's own text, so that the same policy compares equal however it was
        # written; a bad one fails here, not in the coordinator actor.
        policy = self.retention
        if isinstance(policy, str):
            policy = Retention.parse(policy) if policy.strip() else Retention()
        if not isinstance(policy, Retention):
            raise InvalidArgumentError(f"retention must be a policy such as 'keep_last=3,keep_every=1000' or a "
                                       f"layervault.Retention, got {type(policy).__name__}")
        object.__setattr__(self, "retention", str(policy) if policy.active else "")

    def retention_policy(self) -> Retention | None:
        """``retention`` parsed (its text as ``--retention`` takes it); None when it is empty."""
        return Retention.parse(self.retention) if self.retention else None

    def store_rates(self) -> StoreRates:
        return StoreRates(self.store_write_gbps, self.store_read_gbps)

    def security(self):  # -> ServerSecurity; built on the node, where the files are
        from layervault.agent.security import ServerSecurity

        return ServerSecurity.from_flags(self.tls_cert, self.tls_key, self.tls_ca, self.insecure, self.tokens,
                                         self.socket_group, self.tls_server_name)

    def differences(self, other: "ServiceOptions") -> list[str]:
        """``field: mine -> other`` for every setting that differs."""
        return [f"{f.name}: {getattr(self, f.name)!r} -> {getattr(other, f.name)!r}"
                for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(other, f.name)]
