"""The settings of one layervault deployment on a Ray cluster.

They travel to every service actor as constructor arguments, so a restarted actor comes
back with exactly the settings it was created with; the coordinator actor keeps the copy
that a later ``up()`` compares against.
"""

from __future__ import annotations

import dataclasses

from layervault.errors import InvalidArgumentError

_STORAGE_FORMS = ("s3://", "file:///")


@dataclasses.dataclass(frozen=True)
class ServiceOptions:
    """What ``layervault ray up`` was asked for (the flags of ``layervault agent`` / ``coordinator``)."""

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

    def security(self):  # -> ServerSecurity; built on the node, where the files are
        from layervault.agent.security import ServerSecurity

        return ServerSecurity.from_flags(self.tls_cert, self.tls_key, self.tls_ca, self.insecure, self.tokens,
                                         self.socket_group, self.tls_server_name)

    def differences(self, other: "ServiceOptions") -> list[str]:
        """``field: mine -> other`` for every setting that differs."""
        return [f"{f.name}: {getattr(self, f.name)!r} -> {getattr(other, f.name)!r}"
                for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(other, f.name)]
