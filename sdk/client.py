"""The rank's connection to its node agent.

Framework adapters (``layervault.torch``, ``layervault.tensorflow``) turn tensors into
:class:`ByteSource` / :class:`ByteSink` objects; this module moves their bytes. Same node:
bytes are copied once into the agent's pre-faulted shared-memory pool and only offsets
travel over gRPC. Otherwise (or with ``shared_memory=False``) they stream in
``chunk_size`` messages over the Save stream.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING, Iterator, Mapping, Protocol, Sequence

import grpc

from layervault.agent.checksum import crc32c
from layervault.errors import (DeadlineError, InvalidArgumentError, LayervaultError, StagedWhileChangingError,
                               UnavailableError, error_from_rpc)
from layervault.proto import agent_pb2, agent_pb2_grpc, common_pb2, manifest_pb2
from layervault.stream_frames import DataFrame, RestoreFrame, decode_restore_reply, encode_save_request

if TYPE_CHECKING:
    from layervault.agent.tls import TlsConfig

_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.max_reconnect_backoff_ms", 1000),  # a restarted agent is dialed again within a second
]
_STREAM_PIECE = 4 << 20
_SAVE_METHOD = "/" + agent_pb2.DESCRIPTOR.services_by_name["Agent"].full_name + "/Save"
_RESTORE_METHOD = "/" + agent_pb2.DESCRIPTOR.services_by_name["Agent"].full_name + "/Restore"
#: ``SaveHandle.wait()`` without a timeout waits this long for an unreachable agent to come back.
AGENT_RESTART_WINDOW = 120.0


class ByteSource(Protocol):
    """Raw bytes of one tensor (or local shard) to save."""

    nbytes: int

    def copy_to(self, offset: int, dst: memoryview) -> None:
        """Copy bytes ``[offset, offset + len(dst))`` into ``dst``."""

    def read(self, offset: int, length: int) -> bytes | memoryview:
        """Bytes ``[offset, offset + length)`` for the streaming path; a view is best (the
        stream copies it once into its message, before the bytes count as staged)."""

    def modified(self) -> bool:
        """Whether the bytes changed since this source was made: the save is then refused
        rather than committing a torn state. ``False`` where it cannot be known (a snapshot)."""


class ByteSink(Protocol):
    """Where the bytes of one restored shard go."""

    def write(self, offset: int, src: memoryview) -> None: ...


@dataclasses.dataclass(frozen=True)
class SaveEntry:
    name: str
    layout: manifest_pb2.TensorLayout
    source: ByteSource


@dataclasses.dataclass(frozen=True)
class CheckpointRef:
    job: str
    kind: str
    step: int

    def proto(self) -> common_pb2.CheckpointId:
        return common_pb2.CheckpointId(job=self.job, kind=self.kind, step=self.step)


class SaveHandle:
    """Returned by ``save()``; ``wait_staged()`` for the hand-off, ``wait()`` for the commit.

    A blocking save returns it with the bytes already staged. A background save returns at
    once and stages on a thread of its own: the caller must not change the tensors until
    ``wait_staged()`` returns (before the next optimizer step; forward and backward may run).
    """

    def __init__(self, client: "AgentClient", ref: CheckpointRef, rank: int, staging: Future[int]) -> None:
        self.client, self.ref, self.rank = client, ref, rank
        self._staging = staging
        self._info: common_pb2.CheckpointInfo | None = None

    @property
    def staged(self) -> bool:
        """Whether the hand-off has ended (successfully or not); never blocks."""
        return self._staging.done()

    @property
    def staged_bytes(self) -> int:
        return self.wait_staged()

    def wait_staged(self, timeout: float | None = None) -> int:
        """Block until the agent holds every byte of this rank's state; returns the byte count.
        Raises the hand-off's error (e.g. :class:`StagedWhileChangingError`)."""
        try:
            return self._staging.result(timeout)
        except FutureTimeout:
            raise DeadlineError(f"{self}: not staged within {timeout} s") from None

    def wait(self, timeout: float | None = None) -> common_pb2.CheckpointInfo:
        """Block until the checkpoint is committed; raises SaveFailedError/DeadlineError otherwise."""
        if self._info is None:
            deadline = None if timeout is None else time.monotonic() + timeout
            self.wait_staged(timeout)
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            self._info = self.client.wait_save(self.ref, self.rank, remaining)
        return self._info

    def __repr__(self) -> str:
        return f"SaveHandle({self.ref.job}/{self.ref.kind} step {self.ref.step}, rank {self.rank})"


class _Requests:
    """A request iterator for a bidi stream that the caller feeds one message at a time.

    At most ``_QUEUED`` messages wait for gRPC to send them: a rank streaming its state
    (no shared memory) is held back to the pace of the agent instead of queueing a copy of
    the whole state in its own memory.
    """

    _END = object()
    _QUEUED = 4

    def __init__(self) -> None:
        self._queue: queue.Queue = queue.Queue(self._QUEUED)
        self.call: grpc.Future | None = None  # set once the RPC is started

    def send(self, message: object) -> None:
        while True:
            try:
                self._queue.put(message, timeout=0.2)
                return
            except queue.Full:
                if self.call is not None and self.call.done():
                    return  # the RPC ended (or was cancelled): nothing takes messages any more

    def close(self) -> None:
        self.send(self._END)

    def __iter__(self) -> Iterator[object]:
        while True:
            item = self._queue.get()
            if item is self._END:
                return
            yield item


class _PoolMapping:
    def __init__(self, path: str, size: int) -> None:
        from layervault.agent.staging import map_pool

        self.mmap, self.view = map_pool(path, size)
        self.path, self.size = path, size

    def close(self) -> bool:
        """Unmap; False while a slice of it is still in use (it is then kept)."""
        try:
            self.view.release()
            self.mmap.close()
            return True
        except BufferError:
            return False


def agent_client(agent: str | AgentClient | None, shared_memory: bool | None = None) -> AgentClient:
    """The given client, or a new one for the address (default: LAYERVAULT_AGENT), with its pool mapped."""
    client = agent if isinstance(agent, AgentClient) else AgentClient(agent, shared_memory=shared_memory)
    client.prepare()
    return client


#: Copied and checksummed at a time: still in the cache when checksummed. The 1.1 GB bench state
#: into the pool, copy + CRC32C: 0.190 s in 4 MiB steps, 0.170 s in 1 MiB, 0.162 s in 512 KiB,
#: 0.171 s in 256 KiB (Python's per-step cost); the copy alone 0.108 s on that run.
_CHECKSUM_STEP = 512 << 10


def _copy_and_checksum(source: ByteSource, offset: int, dst: memoryview, chunk_size: int) -> list[int]:
    """Copy ``source[offset:]`` into ``dst`` and return the CRC32C of each chunk-size span: the
    checksums the agent checks before it uploads (see agent.proto Piece)."""
    crcs = []
    for chunk in range(0, len(dst), chunk_size):
        end = min(len(dst), chunk + chunk_size)
        crc = 0
        for start in range(chunk, end, _CHECKSUM_STEP):
            span = dst[start:min(end, start + _CHECKSUM_STEP)]
            source.copy_to(offset + start, span)
            crc = crc32c(span, crc)
        crcs.append(crc)
    return crcs


def _packed(length: int) -> int:
    """Room a piece takes in a reservation: pieces are packed at cache-line alignment."""
    return (length + 63) // 64 * 64


def _same_host(address: str) -> bool:
    return address.startswith("unix:") or address.split(":")[0] in ("127.0.0.1", "localhost", "[::1]")


class AgentClient:
    """A connection to one node agent (address like ``unix:///run/lv.sock`` or ``host:port``).

    ``token``: the job token sent with every call (default: ``LAYERVAULT_TOKEN``). ``tls``:
    for a TCP address, TLS settings (default: ``LAYERVAULT_TLS_CA``, plus ``LAYERVAULT_TLS_CERT``
    and ``LAYERVAULT_TLS_KEY`` when the agent wants client certificates); a unix socket is
    always plaintext, its file permissions being the protection.
    """

    def __init__(self, address: str | None = None, shared_memory: bool | None = None, *,
                 token: str | None = None, tls: "TlsConfig | None" = None) -> None:
        from layervault.agent.auth import ENV_TOKEN, BearerToken
        from layervault.agent.server import default_agent_address
        from layervault.agent.tls import TlsConfig, open_channel

        self.address = address or default_agent_address()
        if shared_memory is None:
            shared_memory = os.environ.get("LAYERVAULT_SHARED_MEMORY", "1") != "0" and _same_host(self.address)
        self.shared_memory = shared_memory
        token = token if token is not None else os.environ.get(ENV_TOKEN, "")
        tls = tls if tls is not None else TlsConfig.from_env()
        self._channel = open_channel(self.address, tls, _CHANNEL_OPTIONS, [BearerToken(token)] if token else [])
        self._stub = agent_pb2_grpc.AgentStub(self._channel)
        # Save and Restore with their data messages written / read by hand (layervault.stream_frames).
        self._save = self._channel.stream_stream(_SAVE_METHOD, request_serializer=encode_save_request,
                                                 response_deserializer=agent_pb2.SaveReply.FromString)
        self._restore = self._channel.stream_stream(_RESTORE_METHOD,
                                                    request_serializer=agent_pb2.RestoreRequest.SerializeToString,
                                                    response_deserializer=decode_restore_reply)
        self._pools: dict[str, _PoolMapping] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        self._channel.close()

    def _pool(self, path: str, size: int) -> _PoolMapping:
        with self._lock:
            pool = self._pools.get(path)
            if pool is None:
                # A new pool means the agent restarted: unmap the old one, whose deleted file
                # otherwise keeps its memory alive as long as this process maps it.
                for old_path, old in list(self._pools.items()):
                    if old.close():
                        del self._pools[old_path]
                pool = self._pools[path] = _PoolMapping(path, size)
            return pool

    def _try_pool(self, path: str, size: int) -> _PoolMapping | None:
        try:
            return self._pool(path, size)
        except OSError:
            return None

    def prepare(self, timeout: float = 5.0) -> bool:
        """Map the agent's staging pool now, so the first save() pays no page-table set-up.

        Best effort: False if the agent is not reachable yet (the first save maps it then).
        """
        if not self.shared_memory:
            return False
        try:
            stats = self._stub.Stats(common_pb2.Empty(), timeout=timeout)
            if stats.pool_path:
                return self._try_pool(stats.pool_path, stats.pool_size) is not None
        except grpc.RpcError:
            pass
        return False

    def _call(self, method: str, request: object, timeout: float | None = 60.0) -> object:
        try:
            return getattr(self._stub, method)(request, timeout=timeout)
        except grpc.RpcError as exc:
            raise _translate(exc, self.address) from None

    # -- save ------------------------------------------------------------------------------------

    def save(
        self,
        ref: CheckpointRef,
        rank: int,
        world_size: int,
        config: manifest_pb2.Config,
        keys: Mapping[str, str],
        extra: Mapping[str, str],
        entries: Sequence[SaveEntry],
        overwrite: bool = False,
        needs_seal: bool = False,
        incremental: bool = False,
        retention: common_pb2.RetentionPolicy | None = None,
        incarnation: str = "",
        background: bool = False,
    ) -> SaveHandle:
        """Hand the entries' bytes to the agent; returns when the agent holds all of them, or
        at once with ``background`` (the hand-off then runs on its own thread, see :class:`SaveHandle`).

        ``needs_seal``: the checkpoint commits only after :meth:`seal` (DCP's finish).
        ``incremental``: reference unchanged chunks of the job's newest checkpoint;
        ``retention``: the job's policy, applied by the coordinator after the commit;
        ``incarnation``: the run of the job (equal on all its ranks, new after a restart, see
        :mod:`layervault.incarnation`), so a dead run's open attempt never captures this one.
        """
        open_msg = agent_pb2.SaveOpen(
            id=ref.proto(), rank=rank, world_size=world_size, config=config, keys=dict(keys), extra=dict(extra),
            entries=[agent_pb2.EntrySpec(name=e.name, layout=e.layout, nbytes=e.source.nbytes) for e in entries],
            overwrite=overwrite, shared_memory=self.shared_memory, needs_seal=needs_seal, incremental=incremental,
            retention=retention, incarnation=incarnation)
        staging: Future[int] = Future()
        if not background:
            staging.set_result(self._hand_off(ref, open_msg, entries))
            return SaveHandle(self, ref, rank, staging)

        def stage() -> None:
            try:
                staging.set_result(self._hand_off(ref, open_msg, entries))
            except BaseException as exc:  # noqa: BLE001 - re-raised by wait_staged()/wait()
                staging.set_exception(exc)

        threading.Thread(target=stage, name=f"layervault-stage-{ref.kind}-{ref.step}", daemon=True).start()
        return SaveHandle(self, ref, rank, staging)

    def _hand_off(self, ref: CheckpointRef, open_msg: agent_pb2.SaveOpen, entries: Sequence[SaveEntry]) -> int:
        """One Save stream: open, the bytes (shared memory or gRPC), finish; the staged byte count."""
        requests = _Requests()
        requests.send(agent_pb2.SaveRequest(open=open_msg))
        replies = requests.call = self._save(iter(requests))
        try:
            opened = next(replies).opened
            pool = self._try_pool(opened.pool_path, opened.pool_size) if opened.pool_path else None
            if pool is not None:
                self._handoff_shared(requests, replies, entries, pool, opened.chunk_size)
            else:  # no shared memory, or the agent's pool is not on this host: bytes over gRPC
                self._handoff_stream(requests, entries, opened.chunk_size)
            changed = [e.name for e in entries if e.source.modified()]
            if changed:  # checked before finish: a cancelled stream aborts the attempt, nothing commits
                raise StagedWhileChangingError(
                    f"{ref.job}/{ref.kind} step {ref.step} was not saved: {len(changed)} tensor(s) changed while "
                    f"being staged ({', '.join(changed[:5])}{', ...' if len(changed) > 5 else ''}); with a "
                    f"background save, call wait_staged() before the next optimizer step")
            requests.send(agent_pb2.SaveRequest(finish=True))
            finished = next(replies).finished
            requests.close()
        except grpc.RpcError as exc:
            requests.close()
            raise _translate(exc, self.address) from None
        except BaseException:
            replies.cancel()  # first: a full send queue then no longer waits for the agent
            requests.close()
            raise
        return finished.staged_bytes

    def _handoff_shared(self, requests: _Requests, replies: Iterator[agent_pb2.SaveReply],
                        entries: Sequence[SaveEntry], pool: _PoolMapping, chunk_size: int) -> None:
        todo = [(i, 0, e.source.nbytes) for i, e in enumerate(entries) if e.source.nbytes]
        todo.reverse()
        while todo:
            want = sum(_packed(length) for _, _, length in todo)
            requests.send(agent_pb2.SaveRequest(reserve=min(want, pool.size)))
            reserved = next(replies).reserved
            cursor, end = reserved.offset, reserved.offset + reserved.length
            pieces = []
            while todo and cursor < end:
                index, offset, length = todo.pop()
                room = end - cursor
                if length > room:  # split on a chunk boundary; the rest waits for the next reservation
                    take = room - room % chunk_size if room >= chunk_size else room
                    todo.append((index, offset + take, length - take))
                    length = take
                if length == 0:
                    break
                crcs = _copy_and_checksum(entries[index].source, offset, pool.view[cursor:cursor + length], chunk_size)
                pieces.append(agent_pb2.Piece(entry=index, entry_offset=offset, pool_offset=cursor, length=length,
                                              chunk_crc32c=crcs))
                cursor += _packed(length)
            requests.send(agent_pb2.SaveRequest(stage=agent_pb2.StagePieces(pieces=pieces)))

    def _handoff_stream(self, requests: _Requests, entries: Sequence[SaveEntry], chunk_size: int) -> None:
        piece = min(chunk_size, _STREAM_PIECE)
        for index, entry in enumerate(entries):
            for offset in range(0, entry.source.nbytes, piece):
                # Encoded by hand on the way out (layervault.stream_frames): one copy of the bytes.
                data = entry.source.read(offset, min(piece, entry.source.nbytes - offset))
                requests.send(DataFrame(index, offset, data, (crc32c(data),)))

    def seal(self, ref: CheckpointRef, world_size: int, keys: Mapping[str, str], extra: Mapping[str, str]) -> None:
        """Complete a ``needs_seal`` save with metadata known only after every rank wrote."""
        self._call("Seal", agent_pb2.SealRequest(id=ref.proto(), world_size=world_size, keys=dict(keys), extra=dict(extra)))

    def wait_save(self, ref: CheckpointRef, rank: int, timeout: float | None = None) -> common_pb2.CheckpointInfo:
        """Wait for the commit. An agent restarted meanwhile finishes the save from its journal,
        so an unreachable agent is dialed again until ``timeout`` (without one: for
        ``AGENT_RESTART_WINDOW`` seconds of being unreachable)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        unreachable_since: float | None = None
        pause = 0.1
        while True:
            remaining = None if deadline is None else max(0.001, deadline - time.monotonic())
            request = agent_pb2.WaitSaveRequest(id=ref.proto(), rank=rank, timeout_s=remaining or 0)
            try:
                return self._stub.WaitSave(request, timeout=None if remaining is None else remaining + 10).info
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise _translate(exc, self.address) from None
                now = time.monotonic()
                unreachable_since = unreachable_since if unreachable_since is not None else now
                give_up = deadline if deadline is not None else unreachable_since + AGENT_RESTART_WINDOW
                if now + pause >= give_up:
                    raise _translate(exc, self.address) from None
                time.sleep(pause)
                pause = min(pause * 2, 1.0)

    # -- restore and catalog -------------------------------------------------------------------------

    def resolve(self, job: str, kind: str, selector: Mapping[str, str]) -> manifest_pb2.Manifest:
        request = common_pb2.ResolveRequest(job=job, kind=kind, selector=common_pb2.Selector(keys=dict(selector)))
        return self._call("Resolve", request)

    def list(self, job: str = "", kind: str = "") -> list[common_pb2.CheckpointInfo]:
        """Readable committed checkpoints; :meth:`listing` also names damaged manifests."""
        return list(self.listing(job, kind).checkpoints)

    def listing(self, job: str = "", kind: str = "") -> common_pb2.ListReply:
        return self._call("List", common_pb2.ListRequest(job=job, kind=kind))

    def stats(self) -> agent_pb2.AgentStats:
        return self._call("Stats", common_pb2.Empty())

    def restore(self, manifest: manifest_pb2.Manifest, names: Sequence[str], sinks: Mapping[int, ByteSink],
                ranges: Sequence[tuple[int, int, int]] = (), hold: bool = False) -> None:
        """Fetch the shards of ``names`` (or the byte ``ranges`` (shard, start, stop)) into ``sinks[shard index]``.

        With ranges, whole chunks overlapping them arrive; sinks must clip what they keep.
        ``hold``: write nothing into the sinks until every chunk arrived verified, so a failed
        restore leaves them untouched (they may be the model's own tensors). The pieces wait in
        the agent's pool when it can set them all aside, else in this process's memory.
        """
        requests = _Requests()
        requests.send(agent_pb2.RestoreRequest(open=agent_pb2.RestoreOpen(
            id=common_pb2.CheckpointId(job=manifest.job, kind=manifest.kind, step=manifest.step),
            names=list(names), shared_memory=self.shared_memory, hold=hold,
            ranges=[agent_pb2.ShardRange(shard=s, start=a, stop=b) for s, a, b in ranges])))
        replies = requests.call = self._restore(iter(requests))
        kept: list[tuple[ByteSink, int, bytes | memoryview]] = []
        try:
            opened = next(replies).opened
            if opened.save_id != manifest.save_id:
                raise LayervaultError(f"{manifest.job}/{manifest.kind} step {manifest.step} was overwritten while loading; load again")
            pool = self._try_pool(opened.pool_path, opened.pool_size) if opened.pool_path else None
            if opened.pool_path and pool is None:
                raise UnavailableError(f"cannot map the agent's shared memory {opened.pool_path} (agent on another host?); "
                                       "use shared_memory=False or LAYERVAULT_SHARED_MEMORY=0")
            give_back = pool is not None and not opened.held  # each pool extent is released once read
            for reply in replies:
                if isinstance(reply, RestoreFrame):  # bytes over gRPC, read by hand (layervault.stream_frames)
                    piece = reply
                elif reply.WhichOneof("kind") == "done":
                    break
                else:
                    piece = reply.piece
                sink = sinks.get(piece.shard)
                if sink is None:
                    raise InvalidArgumentError(f"agent sent shard #{piece.shard}, which was not asked for")
                if isinstance(piece, RestoreFrame):
                    data: bytes | memoryview = piece.data
                elif pool is not None:
                    data = pool.view[piece.pool_offset:piece.pool_offset + piece.length]
                else:
                    data = memoryview(piece.data)
                if not hold:
                    sink.write(piece.shard_offset, data)
                elif give_back:
                    kept.append((sink, piece.shard_offset, bytes(data)))  # the agent wants its extent back
                else:
                    kept.append((sink, piece.shard_offset, data))
                if give_back:
                    requests.send(agent_pb2.RestoreRequest(release=agent_pb2.Piece(pool_offset=piece.pool_offset, length=piece.length)))
            for sink, offset, data in kept:  # everything arrived verified: now the sinks change
                sink.write(offset, data)
            kept.clear()  # (views of the pool go before the agent frees it at the stream's end)
            requests.close()
        except grpc.RpcError as exc:
            requests.close()
            raise _translate(exc, self.address) from None
        except BaseException:
            kept.clear()
            replies.cancel()  # first: a full send queue then no longer waits for the agent
            requests.close()
            raise


def _translate(exc: grpc.RpcError, address: str) -> LayervaultError:
    err = error_from_rpc(exc)
    # The agent answers for its storage and its coordinator by name; anything else is the agent itself.
    if exc.code() == grpc.StatusCode.UNAVAILABLE and "storage" not in str(err) and "coordinator at " not in str(err):
        err = UnavailableError(f"layervault agent at {address} is unavailable: {exc.details()}")
    return err
