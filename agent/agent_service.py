"""The node agent's gRPC service: hand-off from ranks, commit via the coordinator, restore.

See ``proto/agent.proto`` for the message flow of one Save stream.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import grpc
import psutil

from layervault.agent.catalog import Catalog
from layervault.agent.restore import fetch_spans, select_spans
from layervault.agent.restore_cache import ChunkCache
from layervault.agent.rpc import CHANNEL_OPTIONS, handler
from layervault.agent.save_session import SaveSession, validate_open
from layervault.agent.staging import StagingPool
from layervault.agent.storage import ObjectStore
from layervault.errors import InvalidArgumentError, LayervaultError, SaveFailedError, UnavailableError, error_from_rpc
from layervault.proto import agent_pb2, agent_pb2_grpc, common_pb2, coordinator_pb2, coordinator_pb2_grpc, manifest_pb2

log = logging.getLogger("layervault.agent")


def _lower_priority() -> None:
    """Background uploads yield the CPU to training ranks (and to hand-offs) on this node."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except OSError:
        pass


class AgentService(agent_pb2_grpc.AgentServicer):
    def __init__(
        self,
        store: ObjectStore,
        coordinator_address: str,
        staging_bytes: int,
        chunk_size: int = 4 << 20,
        upload_workers: int = 8,
        staging_timeout: float = 600.0,
        agent_id: str = "",
        cache_bytes: int = 256 << 20,
    ) -> None:
        self.store = store
        self.catalog = Catalog(store)
        self.pool = StagingPool(staging_bytes)
        self.chunk_size = chunk_size
        self.staging_timeout = staging_timeout
        self.agent_id = agent_id or f"{socket.gethostname()}:{os.getpid()}"
        self.uploads = ThreadPoolExecutor(upload_workers, thread_name_prefix="lv-upload", initializer=_lower_priority)
        self.fetches = ThreadPoolExecutor(upload_workers, thread_name_prefix="lv-fetch")
        # Reports (and the commit they may trigger) run here: never on a rank's hand-off or an upload thread.
        self.reports = ThreadPoolExecutor(4, thread_name_prefix="lv-report")
        self._channel = grpc.insecure_channel(coordinator_address, options=CHANNEL_OPTIONS)
        self.coordinator = coordinator_pb2_grpc.CoordinatorStub(self._channel)
        self._sessions: dict[tuple[str, str, int, int], SaveSession] = {}
        self.cache = ChunkCache(cache_bytes)
        self._lock = threading.Lock()
        self._peak_rss = 0
        self._draining = False
        self._closed = threading.Event()
        threading.Thread(target=self._rss_sampler, daemon=True, name="lv-rss").start()

    def start_draining(self) -> None:
        """Refuse new saves from now on (the agent is shutting down)."""
        with self._lock:
            self._draining = True

    def drain(self, grace: float) -> None:
        """Let handed-off saves finish uploading and report, for at most ``grace`` seconds;
        abort the rest, so the coordinator never commits them, and flush those reports."""
        self.start_draining()
        deadline = time.monotonic() + grace
        with self._lock:
            sessions = list(self._sessions.values())
        for session in sessions:
            if not session.wait_durable(max(0.0, deadline - time.monotonic())):
                log.warning("%s: aborted, uploads not finished within the %.0fs shutdown grace", session.label, grace)
                session.abort("the agent shut down before its uploads finished")
        self.reports.shutdown(wait=True)

    def close(self) -> None:
        self._closed.set()
        self.pool.allocator.close()
        self.uploads.shutdown(wait=False, cancel_futures=True)
        self.fetches.shutdown(wait=False, cancel_futures=True)
        self.reports.shutdown(wait=False, cancel_futures=True)
        self._channel.close()
        self.pool.close()

    # -- save ------------------------------------------------------------------------------------

    @handler
    def Save(self, request_iterator: Iterator[agent_pb2.SaveRequest], context: grpc.ServicerContext) -> Iterator[agent_pb2.SaveReply]:
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("kind") != "open":
            raise InvalidArgumentError("a Save stream must start with an open message")
        session = self._open_session(first.open)
        finished = False
        try:
            yield agent_pb2.SaveReply(opened=agent_pb2.SaveOpened(
                save_id=session.save_id, pool_path=str(self.pool.path) if first.open.shared_memory else "",
                pool_size=self.pool.size, chunk_size=self.chunk_size))
            for req in request_iterator:
                kind = req.WhichOneof("kind")
                if kind == "reserve":
                    offset, length = session.reserve(req.reserve, self.staging_timeout)
                    yield agent_pb2.SaveReply(reserved=agent_pb2.Reservation(offset=offset, length=length))
                elif kind == "stage":
                    session.stage(list(req.stage.pieces))
                elif kind == "data":
                    session.stage_data(req.data, self.staging_timeout)
                elif kind == "finish":
                    staged = session.finish()
                    finished = True
                    yield agent_pb2.SaveReply(finished=agent_pb2.SaveFinished(staged_bytes=staged))
                    return
                else:
                    raise InvalidArgumentError(f"unexpected {kind} message in a Save stream")
            raise SaveFailedError(f"{session.label}: the rank closed its stream before finishing the hand-off")
        except BaseException as exc:
            if not finished:
                reason = str(exc) if isinstance(exc, LayervaultError) else f"hand-off interrupted ({type(exc).__name__}: {exc})"
                if context.is_active() is False and not isinstance(exc, LayervaultError):
                    reason = "the rank disconnected during the hand-off"
                session.abort(reason)
            raise

    def _open_session(self, open_msg: agent_pb2.SaveOpen) -> SaveSession:
        if self._draining:
            raise UnavailableError(f"agent {self.agent_id} is shutting down; save through another agent or retry")
        validate_open(open_msg)
        id_ = open_msg.id
        begin = coordinator_pb2.BeginSaveRequest(id=id_, world_size=open_msg.world_size, rank=open_msg.rank,
                                                 agent_id=self.agent_id, overwrite=open_msg.overwrite,
                                                 needs_seal=open_msg.needs_seal)
        try:
            save_id = self.coordinator.BeginSave(begin, timeout=30).save_id
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        session = SaveSession(open_msg, save_id, self.pool, self.store, self.uploads, self.chunk_size,
                              lambda done: self.reports.submit(self._session_done, done))
        with self._lock:
            self._sessions[(id_.job, id_.kind, id_.step, open_msg.rank)] = session
        return session

    def _session_done(self, session: SaveSession) -> None:
        """Every chunk of the rank is durable (or the save failed): tell the coordinator."""
        try:
            if session.error is None:
                report = coordinator_pb2.ReportShardsRequest(
                    id=session.id, save_id=session.save_id, rank=session.rank, world_size=session.open.world_size,
                    agent_id=self.agent_id, config=session.open.config, keys=dict(session.open.keys),
                    extra=dict(session.open.extra), shards=session.shard_records())
                self.coordinator.ReportShards(report, timeout=60)
            else:
                self.coordinator.AbortSave(coordinator_pb2.AbortSaveRequest(
                    id=session.id, save_id=session.save_id, rank=session.rank, agent_id=self.agent_id,
                    reason=str(session.error)), timeout=30)
        except grpc.RpcError as exc:
            log.error("%s: coordinator call failed: %s", session.label, exc)
            if session.error is None:
                session.error = error_from_rpc(exc)
            return  # keep the session: WaitSave reports this error
        with self._lock:  # the coordinator now knows the outcome; WaitSave asks it directly
            id_ = session.id
            if self._sessions.get((id_.job, id_.kind, id_.step, session.rank)) is session:
                del self._sessions[(id_.job, id_.kind, id_.step, session.rank)]

    @handler
    def WaitSave(self, request: agent_pb2.WaitSaveRequest, context: grpc.ServicerContext) -> agent_pb2.WaitSaveReply:
        id_ = request.id
        with self._lock:
            session = self._sessions.get((id_.job, id_.kind, id_.step, request.rank))
        timeout = request.timeout_s if request.timeout_s > 0 else None
        save_id = ""
        if session is not None:
            if not session.wait_durable(timeout):
                raise SaveFailedError(f"{session.label}: uploads not durable within {timeout}s")
            if session.error is not None:
                raise session.error
            save_id = session.save_id
        try:
            info = self.coordinator.WaitCommit(coordinator_pb2.WaitCommitRequest(
                id=id_, save_id=save_id, timeout_s=request.timeout_s), timeout=(timeout + 5) if timeout else None)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        with self._lock:
            self._sessions.pop((id_.job, id_.kind, id_.step, request.rank), None)
        return agent_pb2.WaitSaveReply(info=info)

    @handler
    def Seal(self, request: agent_pb2.SealRequest, context: grpc.ServicerContext) -> common_pb2.Empty:
        return self._coordinator_call("Seal", coordinator_pb2.SealSaveRequest(
            id=request.id, world_size=request.world_size, keys=dict(request.keys), extra=dict(request.extra)))

    # -- restore and catalog ------------------------------------------------------------------------

    def _coordinator_call(self, method: str, request: object) -> object:
        try:
            return getattr(self.coordinator, method)(request, timeout=60)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    @handler
    def Resolve(self, request: common_pb2.ResolveRequest, context: grpc.ServicerContext) -> manifest_pb2.Manifest:
        return self._resolve(request)

    def _resolve(self, request: common_pb2.ResolveRequest) -> manifest_pb2.Manifest:
        info = self._coordinator_call("Resolve", request)
        manifest = self.catalog.manifest(info.manifest_key)
        if manifest.save_id != info.save_id:  # overwritten since we cached it
            self.catalog.forget(info.manifest_key)
            manifest = self.catalog.manifest(info.manifest_key)
        return manifest

    @handler
    def List(self, request: common_pb2.ListRequest, context: grpc.ServicerContext) -> common_pb2.ListReply:
        return self._coordinator_call("List", request)

    @handler
    def Restore(self, request_iterator: Iterator[agent_pb2.RestoreRequest], context: grpc.ServicerContext) -> Iterator[agent_pb2.RestoreReply]:
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("kind") != "open":
            raise InvalidArgumentError("a Restore stream must start with an open message")
        req = first.open
        manifest = self._resolve(common_pb2.ResolveRequest(
            job=req.id.job, kind=req.id.kind, selector=common_pb2.Selector(keys={"step": str(req.id.step)})))
        spans = select_spans(manifest, list(req.names), list(req.ranges))
        use_shm = req.shared_memory
        yield agent_pb2.RestoreReply(opened=agent_pb2.SaveOpened(
            save_id=manifest.save_id, pool_path=str(self.pool.path) if use_shm else "",
            pool_size=self.pool.size, chunk_size=self.chunk_size))
        held: dict[int, int] = {}
        held_lock = threading.Lock()

        def release_loop() -> None:
            try:
                for msg in request_iterator:
                    if msg.WhichOneof("kind") == "release":
                        with held_lock:
                            length = held.pop(msg.release.pool_offset, None)
                        if length is not None:
                            self.pool.free(msg.release.pool_offset, length)
            except grpc.RpcError:
                pass

        releaser = threading.Thread(target=release_loop, daemon=True) if use_shm else None
        if releaser:
            releaser.start()
        try:
            for chunk in fetch_spans(self.store, manifest, spans, self.fetches, self.cache):
                n = len(chunk.data)
                if use_shm:
                    offset, length = self.pool.allocate(n, min_bytes=n, timeout=self.staging_timeout)
                    self.pool.view[offset:offset + n] = chunk.data
                    with held_lock:
                        held[offset] = length
                    piece = agent_pb2.RestorePiece(shard=chunk.shard, shard_offset=chunk.shard_offset, pool_offset=offset, length=n)
                else:
                    piece = agent_pb2.RestorePiece(shard=chunk.shard, shard_offset=chunk.shard_offset, length=n, data=bytes(chunk.data))
                yield agent_pb2.RestoreReply(piece=piece)
            yield agent_pb2.RestoreReply(done=True)
            if releaser:
                releaser.join(timeout=self.staging_timeout)
        finally:
            with held_lock:
                leftovers = list(held.items())
                held.clear()
            for offset, length in leftovers:
                self.pool.free(offset, length)

    # -- stats ------------------------------------------------------------------------------------

    def _rss_sampler(self) -> None:
        while not self._closed.wait(0.05):
            self._sample_rss()

    def _sample_rss(self) -> int:
        rss = psutil.Process().memory_info().rss
        self._peak_rss = max(self._peak_rss, rss)
        return rss

    @handler
    def Stats(self, request: common_pb2.Empty, context: grpc.ServicerContext) -> agent_pb2.AgentStats:
        counts = self.store.stats.snapshot()
        self._sample_rss()
        with self._lock:
            in_flight = len(self._sessions)
        return agent_pb2.AgentStats(
            agent_id=self.agent_id, pool_size=self.pool.size, pool_in_use=self.pool.in_use,
            store_puts=counts["puts"], store_put_bytes=counts["put_bytes"], store_gets=counts["gets"],
            store_get_bytes=counts["get_bytes"], saves_in_flight=in_flight, peak_rss_bytes=self._peak_rss,
            pool_path=str(self.pool.path))
