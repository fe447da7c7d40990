"""Per-job bearer tokens: who may save, restore and list which job's checkpoints.

Token file (``--tokens FILE``), one token per line, ``#`` starts a comment::

    # token                              jobs it may act for
    3f9c2a5e0d7b4c1e8a6f2b9d0c4e7a1f     run-42,run-43
    b61d0e4f2a7c9358e1d4a6b0f3c8e2d7     team-a-*
    0a8e5c3d1f7b2946c0e8a4d2b6f1c9e3     *

Jobs are exact names or ``fnmatch`` patterns (job names are ``[A-Za-z0-9._-]``, so ``*``
is always a wildcard); a token whose patterns include the bare ``*`` is an operator token
that may act for every job. Tokens are at least 16 characters, kept in memory only as
SHA-256 digests, compared with :func:`hmac.compare_digest` against every entry (the time a
lookup takes says nothing about which token, or how much of one, matched), and never logged:
logs and messages name a token by its file and line. An agent's save journals keep a token's
SHA-256 (:func:`token_digest`), never the token: a restarted agent finds it again in its file.

Two checks, two places:

* :class:`AccessControl.interceptor` authenticates every call (health checks excepted):
  no ``authorization: Bearer <token>`` metadata, or an unknown token -> UNAUTHENTICATED.
* The job is inside the request - for Save and Restore inside the *first message of the
  stream* - so the services authorize it themselves (:meth:`AccessControl.require`), before
  any work: a token for job A on job B -> PERMISSION_DENIED. A List without a job returns
  only the jobs the token covers (everything for an operator token).

The agent forwards the rank's own ``authorization`` metadata on the coordinator calls it
makes for that rank (BeginSave, ReportShards, AbortSave, Seal, WaitCommit, Resolve, List).
So the coordinator applies the same per-job rule to the agent as to the rank: an agent can
only act for jobs whose ranks handed it a token, and no agent holds a key to every job.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import hmac
import logging
import os
import pathlib
import stat
from typing import Any, Callable, Iterable, Sequence

import grpc

from layervault.errors import InvalidArgumentError, PermissionDeniedError, UnauthenticatedError

log = logging.getLogger("layervault.auth")

METADATA_KEY = "authorization"
SCHEME = "Bearer "
ENV_TOKEN = "LAYERVAULT_TOKEN"
MIN_TOKEN_LENGTH = 16
ALL_JOBS = "*"
#: gRPC metadata as a call passes it on: ``(("authorization", "Bearer ..."),)`` or empty.
Metadata = tuple[tuple[str, str], ...]
#: Methods that need no token: liveness probes (Kubernetes, systemd, load balancers), the
#: schema (reflection, for grpcurl), and agents' heartbeats, which act for no job (an agent
#: holds no token of its own; with --tls-ca only agents with a client certificate get here).
PUBLIC_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.", "/layervault.v1.Coordinator/AgentHeartbeat")


class TokenFileError(InvalidArgumentError):
    """The token file is missing, unreadable or has a malformed line."""


@dataclasses.dataclass(frozen=True)
class Grant:
    """The jobs one token may act for; ``source`` (file:line) names it in logs and messages."""

    source: str
    jobs: tuple[str, ...]

    @property
    def all_jobs(self) -> bool:
        return ALL_JOBS in self.jobs

    def covers(self, job: str) -> bool:
        return any(fnmatch.fnmatchcase(job, pattern) for pattern in self.jobs)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


class TokenTable:
    """Token digests -> grants. Build with :meth:`load` (a file) or :meth:`from_pairs` (code)."""

    def __init__(self, grants: Iterable[tuple[str, Grant]], path: pathlib.Path | None = None) -> None:
        self.path = path  # the token file, read again only by :meth:`metadata_for`
        self._entries: list[tuple[bytes, Grant]] = []
        seen: dict[bytes, str] = {}
        for token, grant in grants:
            if len(token) < MIN_TOKEN_LENGTH:
                raise TokenFileError(f"token at {grant.source} is shorter than {MIN_TOKEN_LENGTH} characters")
            digest = _digest(token)
            if digest in seen:
                raise TokenFileError(f"token at {grant.source} repeats the token at {seen[digest]}")
            seen[digest] = grant.source
            self._entries.append((digest, grant))
        if not self._entries:
            raise TokenFileError("a token table needs at least one token")

    def __len__(self) -> int:
        return len(self._entries)

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[str, Sequence[str]]]) -> "TokenTable":
        """``[(token, [job pattern, ...]), ...]``; sources are ``token #1``, ``token #2``..."""
        return cls((token, Grant(f"token #{n}", tuple(jobs))) for n, (token, jobs) in enumerate(pairs, 1))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TokenTable":
        path = pathlib.Path(path)
        return cls(_read_token_file(path), path)

    def metadata_for(self, digest: str) -> Metadata | None:
        """The ``authorization`` metadata of the token whose :func:`token_digest` is ``digest``,
        read again from the token file (in memory tokens are digests only); None when no token
        of the file has it (it was removed, or the table was built in code)."""
        if self.path is None or not digest:
            return None
        found = None
        for token, _ in _read_token_file(self.path):
            if hmac.compare_digest(_digest(token).hex(), digest):
                found = ((METADATA_KEY, SCHEME + token),)
        return found

    def lookup(self, token: str) -> Grant | None:
        """The grant of ``token``, comparing against every entry in constant time."""
        presented = _digest(token)
        found = None
        for digest, grant in self._entries:
            if hmac.compare_digest(digest, presented):
                found = grant
        return found


def _read_token_file(path: pathlib.Path) -> list[tuple[str, Grant]]:
    """``(token, grant)`` per line of a token file (see the module docstring)."""
    try:
        text = path.read_text(encoding="utf-8")
        mode = path.stat().st_mode
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenFileError(f"cannot read token file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO) & ~stat.S_IRGRP:
        log.warning("token file %s is readable by other users (mode %o); chmod 600 or 640 it", path, mode & 0o777)
    entries = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        where = f"{path.name}:{lineno}"
        if len(parts) != 2:
            raise TokenFileError(f"{path} line {lineno}: expected 'TOKEN JOB[,JOB...]', got {len(parts)} fields")
        jobs = tuple(j for j in parts[1].split(",") if j)
        if not jobs:
            raise TokenFileError(f"{path} line {lineno}: no job after the token")
        entries.append((parts[0], Grant(where, jobs)))
    if not entries:
        raise TokenFileError(f"token file {path} holds no tokens")
    return entries


def token_digest(metadata: Iterable[tuple[str, Any]] | None) -> str:
    """Hex SHA-256 of the bearer token in ``metadata`` ("" without one): what an agent's save
    journal keeps instead of the token, to find it again in its token file after a restart."""
    token = bearer_token(metadata)
    return _digest(token).hex() if token else ""


def bearer_token(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    """The token of an ``authorization: Bearer <token>`` entry, if any."""
    for key, value in metadata or ():
        if key == METADATA_KEY:
            value = value.decode() if isinstance(value, bytes) else value
            return value[len(SCHEME):].strip() if value.startswith(SCHEME) else ""
    return None


def forwarded(context: grpc.ServicerContext) -> Metadata:
    """The caller's ``authorization`` metadata, to pass on to the coordinator for the same job."""
    return tuple((k, v) for k, v in (context.invocation_metadata() or ()) if k == METADATA_KEY)


def _abort_handler(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    def abort(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(code, message)

    kwargs = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort, **kwargs)
    return grpc.unary_unary_rpc_method_handler(abort, **kwargs)


class _AuthenticatingInterceptor(grpc.ServerInterceptor):
    def __init__(self, table: TokenTable, service: str) -> None:
        self.table, self.service = table, service

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler],
                          details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = continuation(details)
        if handler is None or details.method.startswith(PUBLIC_METHOD_PREFIXES):
            return handler
        token = bearer_token(details.invocation_metadata)
        if token is None:
            message = (f"{details.method} on the layervault {self.service} needs a job token: "
                       f"set {ENV_TOKEN} (sent as 'authorization: Bearer <token>')")
        elif not token or self.table.lookup(token) is None:
            message = f"{details.method}: the {self.service} does not know this token"
        else:
            return handler
        log.warning("%s refused: %s", details.method, "no token" if token is None else "unknown token")
        return _abort_handler(handler, grpc.StatusCode.UNAUTHENTICATED, message)


class AccessControl:
    """The per-call rule of one service: who may act for which job.

    Without a token table everything is allowed (a loopback-only or single-user setup);
    with one, every call must carry a known token and may touch only its grant's jobs.
    """

    def __init__(self, table: TokenTable | None, service: str) -> None:
        self.table, self.service = table, service

    @property
    def enabled(self) -> bool:
        return self.table is not None

    def interceptors(self) -> list[grpc.ServerInterceptor]:
        return [_AuthenticatingInterceptor(self.table, self.service)] if self.table is not None else []

    def metadata_for(self, digest: str) -> Metadata | None:
        """See :meth:`TokenTable.metadata_for`; None without tokens."""
        return self.table.metadata_for(digest) if self.table is not None else None

    def grant(self, context: grpc.ServicerContext) -> Grant | None:
        """The caller's grant; None when tokens are off. Raises if tokens are on and it has none."""
        if self.table is None:
            return None
        token = bearer_token(context.invocation_metadata())
        grant = self.table.lookup(token) if token else None
        if grant is None:  # the interceptor lets no such call through; a second line of defence
            raise UnauthenticatedError(f"the {self.service} needs a known job token ({ENV_TOKEN})")
        return grant

    def require(self, context: grpc.ServicerContext, job: str, action: str) -> None:
        """Raise PermissionDeniedError unless the caller's token covers ``job``."""
        grant = self.grant(context)
        if grant is not None and not grant.covers(job):
            log.warning("%s of job %r refused to the token at %s (peer %s)", action, job, grant.source, context.peer())
            raise PermissionDeniedError(f"this token may not {action} job {job!r}; it covers {', '.join(grant.jobs)}")

    def require_all_jobs(self, context: grpc.ServicerContext, action: str) -> None:
        """Raise PermissionDeniedError unless the caller holds an operator (``*``) token."""
        grant = self.grant(context)
        if grant is not None and not grant.all_jobs:
            log.warning("%s refused to the token at %s (peer %s)", action, grant.source, context.peer())
            raise PermissionDeniedError(f"only an operator token ('*' in the token file) may {action}")

    def visible(self, context: grpc.ServicerContext) -> Callable[[str], bool]:
        """For a List without a job: a predicate telling which jobs the caller may see."""
        grant = self.grant(context)
        if grant is None or grant.all_jobs:
            return lambda job: True
        return grant.covers


class BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                  grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Client side: adds ``authorization: Bearer <token>`` to every call of a channel."""

    def __init__(self, token: str) -> None:
        self._entry = (METADATA_KEY, SCHEME + token)

    def __repr__(self) -> str:  # never the token itself
        return "BearerToken(<redacted>)"

    def _with_token(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = [m for m in (details.metadata or ()) if m[0] != METADATA_KEY] + [self._entry]
        return _CallDetails(details.method, details.timeout, metadata, details.credentials,
                            details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return continuation(self._with_token(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):  # type: ignore[no-untyped-def]
        return continuation(self._with_token(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):  # type: ignore[no-untyped-def]
        return continuation(self._with_token(details), request_iterator)


@dataclasses.dataclass(frozen=True)
class _CallDetails(grpc.ClientCallDetails):
    method: str
    timeout: float | None
    metadata: Sequence[tuple[str, str]] | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None
