"""How a daemon (agent or coordinator) protects its listeners: the settings, gathered once.

Three layers, each guarding what the others cannot:

* **TCP listeners** use TLS (``--tls-cert/--tls-key``; with ``--tls-ca`` clients must show
  a certificate that CA signed). Plaintext is allowed on loopback only, unless the operator
  passes ``--insecure`` (see :func:`layervault.agent.tls.check_plaintext`).
* **The node's unix socket** is protected by file permissions, not TLS: it is created
  mode 0600 (owner only) or, with ``--socket-group``, 0660 and owned by that group, and a
  directory layervault creates for it is 0700 (0750). The shared-memory pool behind it is
  0600 likewise, so a user who cannot connect cannot map it either.
* **Job tokens** (``--tokens FILE``, :mod:`layervault.agent.auth`) decide which job a
  caller may save, restore and list, on every listener.
"""

from __future__ import annotations

import dataclasses
import grp
import os
import pathlib
from typing import Sequence

import grpc

from layervault.agent.auth import AccessControl, TokenTable
from layervault.agent.tls import TlsConfig, check_plaintext, open_channel
from layervault.errors import InvalidArgumentError


@dataclasses.dataclass(frozen=True)
class ServerSecurity:
    """What one daemon was told: TLS files, token table, ``--insecure``, the socket's group."""

    tls: TlsConfig | None = None
    tokens: TokenTable | None = None
    insecure: bool = False
    socket_group: int | None = None

    @classmethod
    def from_flags(cls, cert: str | None = None, key: str | None = None, ca: str | None = None,
                   insecure: bool = False, tokens: str | None = None, socket_group: str | None = None,
                   server_name: str = "") -> "ServerSecurity":
        """From the command line; errors name the flag's file or group."""
        tls = TlsConfig.load(cert, key, ca, server_name) if (cert or key or ca) else None
        if tls is not None and not tls.has_identity:
            raise InvalidArgumentError("--tls-ca needs --tls-cert and --tls-key: a daemon listens with its own certificate")
        return cls(tls, TokenTable.load(tokens) if tokens else None, insecure, resolve_group(socket_group))

    def access(self, service: str) -> AccessControl:
        return AccessControl(self.tokens, service)

    def check_listen(self, host: str) -> None:
        """Before anything is allocated: may we listen on ``host``?"""
        if self.tls is None:
            check_plaintext(_tcp_address(host, 0), "listen on", self.insecure)

    def check_dial(self, address: str) -> None:
        """Before anything is allocated: may we dial the coordinator at ``address``?"""
        if self.tls is None:
            check_plaintext(address, "dial the coordinator at", self.insecure)

    def share_pool(self, path: pathlib.Path) -> None:
        """Give the staging pool to ``socket_group`` too: whoever may connect must be able to map it."""
        if self.socket_group is not None:
            os.chown(path, -1, self.socket_group)
            os.chmod(path, 0o660)

    def bind_tcp(self, server: grpc.Server, host: str, port: int) -> str:
        """Listen on ``host:port`` with TLS, or in plaintext where the policy allows it."""
        address = _tcp_address(host, port)
        if self.tls is not None:
            bound = server.add_secure_port(address, self.tls.server_credentials())
        else:
            check_plaintext(address, "listen on", self.insecure)
            bound = server.add_insecure_port(address)
        if bound == 0:
            raise OSError(f"cannot listen on {address}")
        return f"{address.rsplit(':', 1)[0]}:{bound}"

    def dial(self, address: str, options: Sequence[tuple[str, object]]) -> grpc.Channel:
        """A channel to the coordinator: TLS with our certificate as the client's (mTLS)."""
        self.check_dial(address)
        return open_channel(address, self.tls, options)

    def prepare_socket_dir(self, socket_path: pathlib.Path) -> None:
        """Create the socket's directory, if missing, as 0700 (0750 and group-owned with
        ``socket_group``). Call it before anything else puts files there; an existing
        directory (``$XDG_RUNTIME_DIR``, ``/tmp``) is left as it is."""
        folder = socket_path.parent
        if folder.exists():
            return
        folder.mkdir(parents=True, mode=0o700)
        if self.socket_group is not None:
            os.chown(folder, -1, self.socket_group)
        os.chmod(folder, 0o700 if self.socket_group is None else 0o750)  # mkdir's mode is subject to the umask

    def bind_unix(self, server: grpc.Server, path: pathlib.Path) -> None:
        """Listen on the socket ``path``, reachable only by this user (or ``socket_group``)."""
        group = self.socket_group
        mode = 0o600 if group is None else 0o660
        self.prepare_socket_dir(path)
        previous = os.umask(0o777 & ~mode)  # the socket is born with its final mode: no window
        try:
            bound = server.add_insecure_port(f"unix://{path}")
        finally:
            os.umask(previous)
        if bound == 0:
            raise OSError(f"cannot listen on unix socket {path}")
        if group is not None:
            os.chown(path, -1, group)
        os.chmod(path, mode)


def _tcp_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def resolve_group(name: str | None) -> int | None:
    """A group name or number (``--socket-group``) as a gid that this process may hand files to."""
    if name is None or name == "":
        return None
    try:
        gid = int(name) if name.isdigit() else grp.getgrnam(name).gr_gid
    except KeyError:
        raise InvalidArgumentError(f"--socket-group {name!r}: no such group") from None
    if os.geteuid() != 0 and gid != os.getegid() and gid not in os.getgroups():
        raise InvalidArgumentError(f"--socket-group {name!r}: this user is not a member, so cannot give the socket to it")
    return gid
