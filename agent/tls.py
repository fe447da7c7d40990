"""TLS for layervault's TCP listeners and channels, and the rule for when it is required.

One :class:`TlsConfig` serves both sides of a daemon: the certificate and key it listens
with are also the client certificate it presents to the coordinator, and the CA bundle
that verifies the coordinator's certificate also verifies its own clients (mTLS). Files
are read and checked once, at start, so a missing file, a PEM that is not a certificate,
or a key that does not belong to the certificate stops the daemon with a message naming
the file - not a handshake failure on the first rank's call.

The listen/dial rule (:func:`check_plaintext`): plaintext is fine on loopback, where no
one else on the network can see or reach the traffic; anywhere else it needs TLS, or the
operator's explicit ``--insecure``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import pathlib
import ssl
from typing import Mapping, Sequence

import grpc

from layervault.errors import InvalidArgumentError

#: Environment of a rank (or any client): TLS settings for dialing an agent over TCP.
ENV_CA = "LAYERVAULT_TLS_CA"
ENV_CERT = "LAYERVAULT_TLS_CERT"
ENV_KEY = "LAYERVAULT_TLS_KEY"
ENV_SERVER_NAME = "LAYERVAULT_TLS_SERVER_NAME"


class TlsConfigError(InvalidArgumentError):
    """A TLS file is missing, unreadable or not what its flag says it is."""


def _read(path: pathlib.Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TlsConfigError(f"cannot read TLS {what} {path}: {exc.strerror or exc}") from None


@dataclasses.dataclass(frozen=True)
class TlsConfig:
    """PEM files: ``cert`` + ``key`` (server identity, and client identity when dialing),
    ``ca`` (roots that verify the peer; on a server it also makes client certificates required).

    ``server_name``: the name to verify in the server's certificate when it differs from the
    dialed host (e.g. dialing an IP address whose certificate names the host).
    """

    cert: pathlib.Path | None = None
    key: pathlib.Path | None = None
    ca: pathlib.Path | None = None
    server_name: str = ""
    cert_pem: bytes = dataclasses.field(default=b"", repr=False, compare=False)
    key_pem: bytes = dataclasses.field(default=b"", repr=False, compare=False)
    ca_pem: bytes = dataclasses.field(default=b"", repr=False, compare=False)

    @classmethod
    def load(cls, cert: str | os.PathLike | None = None, key: str | os.PathLike | None = None,
             ca: str | os.PathLike | None = None, server_name: str = "") -> "TlsConfig":
        """Read and check the files; raises :class:`TlsConfigError` naming the file at fault."""
        cert_path, key_path, ca_path = (pathlib.Path(p) if p else None for p in (cert, key, ca))
        if (cert_path is None) != (key_path is None):
            raise TlsConfigError("--tls-cert and --tls-key go together: give both, or neither")
        cert_pem = key_pem = ca_pem = b""
        if cert_path is not None and key_path is not None:
            cert_pem, key_pem = _read(cert_path, "certificate"), _read(key_path, "key")
            if b"-----BEGIN CERTIFICATE-----" not in cert_pem:
                raise TlsConfigError(f"TLS certificate {cert_path} holds no PEM certificate")
            if b"PRIVATE KEY-----" not in key_pem:
                raise TlsConfigError(f"TLS key {key_path} holds no PEM private key")
            try:  # parses both and checks that the key belongs to the certificate
                ssl.create_default_context().load_cert_chain(str(cert_path), str(key_path))
            except ssl.SSLError as exc:
                raise TlsConfigError(f"TLS key {key_path} does not match certificate {cert_path}, "
                                     f"or one of them is malformed: {exc.reason or exc}") from None
        if ca_path is not None:
            ca_pem = _read(ca_path, "CA bundle")
            try:
                ssl.create_default_context(cadata=ca_pem.decode("ascii", "replace"))
            except (ssl.SSLError, ValueError) as exc:
                raise TlsConfigError(f"TLS CA bundle {ca_path} holds no usable PEM certificate: {exc}") from None
        return cls(cert_path, key_path, ca_path, server_name, cert_pem, key_pem, ca_pem)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "TlsConfig | None":
        """A client's TLS settings from ``LAYERVAULT_TLS_CA/_CERT/_KEY/_SERVER_NAME``; None if unset."""
        env = os.environ if env is None else env
        ca, cert, key = env.get(ENV_CA), env.get(ENV_CERT), env.get(ENV_KEY)
        if not (ca or cert or key):
            return None
        try:
            return cls.load(cert, key, ca, env.get(ENV_SERVER_NAME, ""))
        except TlsConfigError as exc:
            raise TlsConfigError(f"{exc} (from {ENV_CA}/{ENV_CERT}/{ENV_KEY})") from None

    @property
    def has_identity(self) -> bool:
        return bool(self.cert_pem)

    @property
    def verifies_peer_certificates(self) -> bool:
        return bool(self.ca_pem)

    def server_credentials(self) -> grpc.ServerCredentials:
        """Listen with our certificate; with a CA, require and verify client certificates."""
        if not self.has_identity:
            raise TlsConfigError("a TLS listener needs --tls-cert and --tls-key")
        return grpc.ssl_server_credentials([(self.key_pem, self.cert_pem)], root_certificates=self.ca_pem or None,
                                           require_client_auth=self.verifies_peer_certificates)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Verify the server with our CA (else the system roots); present our certificate if we have one."""
        return grpc.ssl_channel_credentials(root_certificates=self.ca_pem or None,
                                            private_key=self.key_pem or None, certificate_chain=self.cert_pem or None)

    def channel_options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def host_of(address: str) -> str:
    """The host part of ``host:port``, ``[v6]:port`` or ``dns:///host:port``."""
    address = address.split("///", 1)[-1] if "///" in address else address
    if address.startswith("["):
        return address[1:address.index("]")]
    return address.rsplit(":", 1)[0] if ":" in address else address


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and ``localhost``: traffic that never leaves the machine."""
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_plaintext(address: str, role: str, insecure: bool, exposed: str = "tokens and checkpoint bytes") -> None:
    """Refuse plaintext to or from a non-loopback ``address`` unless ``insecure`` was asked for.

    ``role`` says what the address is, for the message ("listen on", "dial the coordinator at",
    "serve metrics on"); ``exposed``, what would cross the network in clear.
    """
    if address.startswith("unix:") or insecure or is_loopback(host_of(address)):
        return
    raise TlsConfigError(
        f"refusing to {role} {address} without TLS: {exposed} would cross the network "
        "in clear. Give --tls-cert and --tls-key (and --tls-ca for mutual TLS), or --insecure to accept plaintext")


def open_channel(address: str, tls: TlsConfig | None, options: Sequence[tuple[str, object]] = (),
                 interceptors: Sequence[grpc.UnaryUnaryClientInterceptor] = ()) -> grpc.Channel:
    """A channel to ``address``: TLS when ``tls`` is given and the address is TCP, else plaintext.

    Unix sockets never use TLS: the socket's file permissions are their protection.
    """
    opts = list(options)
    if tls is not None and not address.startswith("unix:"):
        channel = grpc.secure_channel(address, tls.channel_credentials(), options=opts + tls.channel_options())
    else:
        channel = grpc.insecure_channel(address, options=opts)
    return grpc.intercept_channel(channel, *interceptors) if interceptors else channel
