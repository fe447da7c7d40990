"""The node agent's gRPC service: hand-off from ranks, commit via the coordinator, restore.

See ``proto/agent.proto`` for the message flow of one Save stream.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import pathlib
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

import grpc
import psutil

from layervault import __version__
from layervault.agent import attempt_cleanup
from layervault.agent.agent_registry import rfc3339
from layervault.agent.auth import Metadata, forwarded, token_digest
from layervault.agent.catalog import Catalog
from layervault.agent.codecs import StoreRates
from layervault.agent.handoff_gate import DEFAULT_MAX_WAIT, HandoffGate
from layervault.agent.heartbeat import Heartbeat
from layervault.agent.incremental import ReuseIndex, load_base
from layervault.agent.journal import JournalFile, SaveJournal, StateDir
from layervault.agent.metrics import AgentMetrics
from layervault.agent.restore import FetchSlots, fetch_spans, select_spans, span_chunks
from layervault.agent.restore_cache import ChunkCache
from layervault.agent.resume import AdoptedPool, resume_saves
from layervault.agent.rpc import CHANNEL_OPTIONS, handler
from layervault.agent.save_session import SaveSession, validate_open
from layervault.agent.security import ServerSecurity
from layervault.agent.staging import StagingPool
from layervault.agent.storage import ObjectStore
from layervault.errors import (ChecksumError, DeadlineError, InvalidArgumentError, LayervaultError, SaveFailedError,
                               UnavailableError, error_from_rpc)
from layervault.stream_frames import DataFrame, RestoreFrame
from layervault.proto import agent_pb2, agent_pb2_grpc, common_pb2, coordinator_pb2, coordinator_pb2_grpc, manifest_pb2

log = logging.getLogger("layervault.agent")

_agents_in_process = itertools.count(1)  # a second agent in one process (tests, demos) gets its own id


def _attempt_refused(exc: grpc.RpcError) -> bool:
    """True when the coordinator answered that the attempt failed or is unknown to it; false
    when the call timed out or never arrived, since the attempt may be committing right now."""
    code = exc.code()
    # grpc's own client-side deadline says exactly "Deadline Exceeded"; the coordinator's names the save.
    return code == grpc.StatusCode.ABORTED or (code == grpc.StatusCode.DEADLINE_EXCEEDED
                                               and exc.details() != "Deadline Exceeded")


def _coordinator_error(exc: grpc.RpcError, address: str, what: str) -> LayervaultError:
    """A failed coordinator call, as the rank should read it: an unreachable coordinator is
    named as such, so the rank does not take it for its own agent being down."""
    if exc.code() == grpc.StatusCode.UNAVAILABLE:
        return UnavailableError(f"{what}: coordinator at {address} is unreachable: {exc.details()}")
    return error_from_rpc(exc)


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
        metrics: AgentMetrics | None = None,
        heartbeat_interval: float = 2.0,
        security: ServerSecurity | None = None,
        state_dir: str | pathlib.Path | None = None,
        handoff_wait: float = DEFAULT_MAX_WAIT,
        store_rates: StoreRates = StoreRates(),
    ) -> None:
        self.store = store
        self.store_rates = store_rates  # weighed against codec time per layer (agent/codecs/select.py)
        self.security = security or ServerSecurity()
        self.access = self.security.access("agent")
        self.catalog = Catalog(store)
        self.pool = StagingPool(staging_bytes)
        self.handoffs = HandoffGate(lambda: self.pool.waiters, max_wait=handoff_wait)
        self.state = StateDir(pathlib.Path(state_dir)) if state_dir else None  # save journals: see resume_saves
        self.chunk_size = chunk_size
        self.staging_timeout = staging_timeout
        nth = next(_agents_in_process)
        self.agent_id = agent_id or f"{socket.gethostname()}:{os.getpid()}" + (f".{nth}" if nth > 1 else "")
        self.uploads = ThreadPoolExecutor(upload_workers, thread_name_prefix="lv-upload", initializer=_lower_priority)
        self.fetches = ThreadPoolExecutor(upload_workers, thread_name_prefix="lv-fetch")
        # Reports (and the commit they may trigger) run here: never on a rank's hand-off or an upload thread.
        self.reports = ThreadPoolExecutor(4, thread_name_prefix="lv-report")
        self.coordinator_address = coordinator_address
        self._channel = self.security.dial(coordinator_address, CHANNEL_OPTIONS)  # mTLS when configured
        self.coordinator = coordinator_pb2_grpc.CoordinatorStub(self._channel)
        self._sessions: dict[tuple[str, str, int, int], SaveSession] = {}
        self.cache = ChunkCache(cache_bytes)
        self.restore_slots = FetchSlots(2 * upload_workers, staging_timeout)  # restore memory: slots x chunk
        self._lock = threading.Lock()
        self._peak_rss = 0
        self._draining = False
        self._closed = threading.Event()
        self._observability_init(metrics or AgentMetrics(), heartbeat_interval)
        threading.Thread(target=self._rss_sampler, daemon=True, name="lv-rss").start()

    def start_draining(self) -> None:
        """Refuse new saves from now on (the agent is shutting down)."""
        with self._lock:
            self._draining = True
        self.heartbeat.poke()

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
        self.heartbeat.stop(final=self.agent_state(coordinator_pb2.AGENT_PHASE_STOPPED))
        self._channel.close()
        self.pool.close()
        if self.state is not None:
            self.state.release(self.pool.path)

    # -- resume after a restart (agent/journal.py, agent/resume.py) ---------------------------------

    def _journal(self, open_msg: agent_pb2.SaveOpen, save_id: str) -> JournalFile | None:
        """The journal of a new save (None when the agent keeps none)."""
        if self.state is None:
            return None
        return self.state.journal(self.pool.path, open_msg, save_id)

    def _journaled_auth(self, plan: SaveJournal) -> Metadata:
        """The rank's token for a journaled save, found again in this agent's token file by its
        digest; raises when it is not there, since the coordinator would refuse every report."""
        if not plan.auth_digest:
            return ()
        auth = self.access.metadata_for(plan.auth_digest)
        if auth is None:
            raise InvalidArgumentError("it was saved with a job token that this agent's --tokens file does not "
                                       "hold (give the agent the token file its ranks' tokens are in)")
        return auth

    def resume_saves(self) -> int:
        """Finish the saves an earlier process of this agent journaled; call once, before serving."""
        if self.state is None:
            return 0
        return resume_saves(self.state, self.pool.path, self._resumed_session, self._abort_attempt)

    def _resumed_session(self, plan: SaveJournal, journal: JournalFile, pool: AdoptedPool,
                         on_closed: Callable[[SaveSession], None]) -> SaveSession:
        auth = self._journaled_auth(plan)

        def done(session: SaveSession) -> None:
            self.reports.submit(self._session_done, session, auth).add_done_callback(lambda _: on_closed(session))

        reuse = None
        if plan.open.incremental:  # the same base as before the restart: chunks it references are referenced again
            id_ = plan.open.id
            base = load_base(self.catalog, id_.job, id_.kind, plan.base_step, plan.base_save_id)
            reuse = ReuseIndex(base, plan.open.config.compressor)
        session = SaveSession(plan.open, plan.save_id, pool, self.store, self.uploads,  # type: ignore[arg-type]
                              plan.chunk_size, done, metrics=self.metrics, journal=journal, rates=self.store_rates,
                              auth_digest=plan.auth_digest, reuse=reuse)
        id_ = plan.open.id
        with self._lock:
            self._sessions[(id_.job, id_.kind, id_.step, plan.open.rank)] = session
        return session

    def _abort_attempt(self, plan: SaveJournal, reason: str) -> None:
        try:
            auth = self._journaled_auth(plan)
        except InvalidArgumentError:  # best effort: without the token the attempt expires at its deadline
            auth = ()
        try:
            self.coordinator.AbortSave(coordinator_pb2.AbortSaveRequest(
                id=plan.open.id, save_id=plan.save_id, rank=plan.open.rank, agent_id=self.agent_id, reason=reason),
                timeout=30, metadata=auth)
        except grpc.RpcError as exc:
            log.warning("%s: could not tell the coordinator the attempt failed: %s", plan.label, exc.details())

    # -- save ------------------------------------------------------------------------------------

    @handler
    def Save(self, request_iterator: Iterator[agent_pb2.SaveRequest | DataFrame],
             context: grpc.ServicerContext) -> Iterator[agent_pb2.SaveReply]:
        first = next(request_iterator, None)
        if first is None or isinstance(first, DataFrame) or first.WhichOneof("kind") != "open":
            raise InvalidArgumentError("a Save stream must start with an open message")
        self.access.require(context, first.open.id.job, "save")  # before any work or any memory
        session = self._open_session(first.open, forwarded(context))
        finished = False
        with self.handoffs.handoff():  # uploads defer to this rank until it finished
            try:
                yield agent_pb2.SaveReply(opened=agent_pb2.SaveOpened(
                    save_id=session.save_id, pool_path=str(self.pool.path) if first.open.shared_memory else "",
                    pool_size=self.pool.size, chunk_size=self.chunk_size))
                for req in request_iterator:
                    if isinstance(req, DataFrame):  # a data message, read by hand (layervault.stream_frames)
                        session.stage_data(req, self.staging_timeout)
                        continue
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

    def _open_session(self, open_msg: agent_pb2.SaveOpen, auth: Metadata = ()) -> SaveSession:
        """``auth``: the rank's token metadata, passed on with every coordinator call of this save."""
        if self._draining:
            raise UnavailableError(f"agent {self.agent_id} is shutting down; save through another agent or retry")
        validate_open(open_msg)
        id_ = open_msg.id
        begin = coordinator_pb2.BeginSaveRequest(id=id_, world_size=open_msg.world_size, rank=open_msg.rank,
                                                 agent_id=self.agent_id, overwrite=open_msg.overwrite,
                                                 needs_seal=open_msg.needs_seal, incremental=open_msg.incremental,
                                                 retention=open_msg.retention, incarnation=open_msg.incarnation)
        try:
            begun = self.coordinator.BeginSave(begin, timeout=30, metadata=auth)
        except grpc.RpcError as exc:
            raise _coordinator_error(exc, self.coordinator_address, f"{id_.job}/{id_.kind}/step {id_.step}") from None
        save_id = begun.save_id
        reuse = None
        if open_msg.incremental:
            base = load_base(self.catalog, id_.job, id_.kind, begun.base_step, begun.base_save_id)
            reuse = ReuseIndex(base, open_msg.config.compressor)
        session = SaveSession(open_msg, save_id, self.pool, self.store, self.uploads, self.chunk_size,
                              lambda done: self.reports.submit(self._session_done, done, auth), metrics=self.metrics,
                              reuse=reuse, journal=self._journal(open_msg, save_id), gate=self.handoffs,
                              rates=self.store_rates, auth_digest=token_digest(auth))
        with self._lock:
            self._sessions[(id_.job, id_.kind, id_.step, open_msg.rank)] = session
        self.metrics.saves_started.inc()
        self.heartbeat.poke()
        return session

    def _session_done(self, session: SaveSession, auth: Metadata = ()) -> None:
        """Every chunk of the rank is durable (or the save failed): tell the coordinator."""
        try:
            if session.error is None:
                report = coordinator_pb2.ReportShardsRequest(
                    id=session.id, save_id=session.save_id, rank=session.rank, world_size=session.open.world_size,
                    agent_id=self.agent_id, config=session.open.config, keys=dict(session.open.keys),
                    extra=dict(session.open.extra), shards=session.shard_records())
                self.coordinator.ReportShards(report, timeout=60, metadata=auth)
            else:
                self._note_failure(session, str(session.error))
                self.coordinator.AbortSave(coordinator_pb2.AbortSaveRequest(
                    id=session.id, save_id=session.save_id, rank=session.rank, agent_id=self.agent_id,
                    reason=str(session.error), data_loss=isinstance(session.error, ChecksumError)),
                    timeout=30, metadata=auth)
                self._sweep_attempt(session)
        except grpc.RpcError as exc:
            log.error("%s: coordinator call failed: %s", session.label, exc, extra=self._log_fields(session))
            if session.error is None:
                session.error = error_from_rpc(exc)
                if exc.code() == grpc.StatusCode.UNAVAILABLE:  # the attempt cannot commit without this report
                    session.error = SaveFailedError(f"{session.label}: shards are durable, but reporting them failed: "
                                                    f"coordinator at {self.coordinator_address} is unreachable: {exc.details()}")
                self._note_failure(session, f"{session.label}: reporting to the coordinator failed: {session.error}")
                if _attempt_refused(exc):
                    self._sweep_attempt(session)
            if exc.code() != grpc.StatusCode.UNAVAILABLE and exc.details() != "Deadline Exceeded":
                session.close_journal()  # the coordinator answered; if it never heard, the next agent start retries
            return  # keep the session: WaitSave reports this error
        session.close_journal()
        with self._lock:  # the coordinator now knows the outcome; WaitSave asks it directly
            id_ = session.id
            if self._sessions.get((id_.job, id_.kind, id_.step, session.rank)) is session:
                del self._sessions[(id_.job, id_.kind, id_.step, session.rank)]
        if session.error is None:
            self.metrics.saves_durable.inc()
            log.info("%s: shards durable (%d bytes handed off, %d stored), reported to the coordinator", session.label,
                     sum(e.staged for e in session.entries), sum(e.stored for e in session.entries),
                     extra=self._log_fields(session))
        self.heartbeat.poke()

    def _sweep_attempt(self, session: SaveSession) -> None:
        """Delete this rank's objects of an attempt that can no longer commit. Chunks still in
        flight when the coordinator swept the attempt are found only here. On its own thread:
        with storage failing, the sweep may take the whole retry deadline, and neither reports
        nor a shutdown should wait for it."""
        id_ = session.id

        def sweep() -> None:
            try:
                attempt_cleanup.delete_attempt(self.store, id_.job, id_.kind, id_.step, session.save_id, session.rank)
            except Exception:  # noqa: BLE001 - leftovers are garbage, not damage
                log.exception("%s: could not clean up the objects of failed attempt %s", session.label, session.save_id)

        threading.Thread(target=sweep, daemon=True, name="lv-sweep").start()

    @handler
    def WaitSave(self, request: agent_pb2.WaitSaveRequest, context: grpc.ServicerContext) -> agent_pb2.WaitSaveReply:
        self.access.require(context, request.id.job, "wait for a save of")
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
                id=id_, save_id=save_id, timeout_s=request.timeout_s), timeout=(timeout + 5) if timeout else None,
                metadata=forwarded(context))
        except grpc.RpcError as exc:
            raise _coordinator_error(exc, self.coordinator_address, f"{id_.job}/{id_.kind}/step {id_.step}") from None
        with self._lock:
            self._sessions.pop((id_.job, id_.kind, id_.step, request.rank), None)
        return agent_pb2.WaitSaveReply(info=info)

    @handler
    def Seal(self, request: agent_pb2.SealRequest, context: grpc.ServicerContext) -> common_pb2.Empty:
        self.access.require(context, request.id.job, "save")
        return self._coordinator_call("Seal", coordinator_pb2.SealSaveRequest(
            id=request.id, world_size=request.world_size, keys=dict(request.keys), extra=dict(request.extra)),
            forwarded(context))

    # -- restore and catalog ------------------------------------------------------------------------

    def _coordinator_call(self, method: str, request: object, auth: Metadata) -> object:
        """``auth``: the caller's token metadata; the coordinator checks it for the same job."""
        try:
            return getattr(self.coordinator, method)(request, timeout=60, metadata=auth)
        except grpc.RpcError as exc:
            raise _coordinator_error(exc, self.coordinator_address, method) from None

    @handler
    def Resolve(self, request: common_pb2.ResolveRequest, context: grpc.ServicerContext) -> manifest_pb2.Manifest:
        self.access.require(context, request.job, "read")
        return self._resolve(request, forwarded(context))

    def _resolve(self, request: common_pb2.ResolveRequest, auth: Metadata) -> manifest_pb2.Manifest:
        info = self._coordinator_call("Resolve", request, auth)
        manifest = self.catalog.manifest(info.manifest_key)
        if manifest.save_id != info.save_id:  # overwritten since we cached it
            self.catalog.forget(info.manifest_key)
            manifest = self.catalog.manifest(info.manifest_key)
        return manifest

    @handler
    def List(self, request: common_pb2.ListRequest, context: grpc.ServicerContext) -> common_pb2.ListReply:
        if request.job:
            self.access.require(context, request.job, "list")
        reply = self._coordinator_call("List", request, forwarded(context))
        visible = self.access.visible(context)  # a List of all jobs shows only the token's jobs
        return common_pb2.ListReply(checkpoints=[c for c in reply.checkpoints if visible(c.id.job)],
                                    damaged=[d for d in reply.damaged if visible(d.id.job)])

    @handler
    def Restore(self, request_iterator: Iterator[agent_pb2.RestoreRequest], context: grpc.ServicerContext) -> Iterator[agent_pb2.RestoreReply]:
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("kind") != "open":
            raise InvalidArgumentError("a Restore stream must start with an open message")
        req = first.open
        self.access.require(context, req.id.job, "read")  # before any fetch or any pool memory
        manifest = self._resolve(common_pb2.ResolveRequest(
            job=req.id.job, kind=req.id.kind, selector=common_pb2.Selector(keys={"step": str(req.id.step)})),
            forwarded(context))
        spans = select_spans(manifest, list(req.names), list(req.ranges))
        use_shm = req.shared_memory
        held: dict[int, int] = {}  # pool extents the rank has not released yet
        held_lock = threading.Lock()

        def free_held() -> None:
            with held_lock:
                leftovers = list(held.items())
                held.clear()
            for offset, length in leftovers:
                self.pool.free(offset, length)

        set_aside = self._set_aside([c.raw_size for _, _, c in span_chunks(manifest, spans)]) if use_shm and req.hold else None
        if set_aside:
            held.update(set_aside)
        # Also when the rank goes away mid-stream: gRPC then stops pulling this generator,
        # whose finally would only run once it is collected.
        context.add_callback(free_held)

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
            yield agent_pb2.RestoreReply(opened=agent_pb2.SaveOpened(
                save_id=manifest.save_id, pool_path=str(self.pool.path) if use_shm else "",
                pool_size=self.pool.size, chunk_size=self.chunk_size, held=set_aside is not None))
            for chunk in fetch_spans(self.store, manifest, spans, self.fetches, self.cache, slots=self.restore_slots):
                n = len(chunk.data)
                self.metrics.restore_bytes.inc(n)
                if not use_shm:  # written out by hand (layervault.stream_frames): one copy of the chunk
                    yield RestoreFrame(chunk.shard, chunk.shard_offset, chunk.data)
                    continue
                if set_aside is not None:  # the rank keeps every piece until the end: its extents are taken
                    offset, _ = set_aside.popitem(last=False)
                    with held_lock:  # once free_held() ran (the rank is gone) the extent may be another's
                        if offset not in held:
                            return
                        self.pool.view[offset:offset + n] = chunk.data
                else:
                    offset, length = self.pool.allocate(n, min_bytes=n, timeout=self.staging_timeout)
                    self.pool.view[offset:offset + n] = chunk.data
                    with held_lock:
                        held[offset] = length
                yield agent_pb2.RestoreReply(piece=agent_pb2.RestorePiece(
                    shard=chunk.shard, shard_offset=chunk.shard_offset, pool_offset=offset, length=n))
            yield agent_pb2.RestoreReply(done=True)
            if releaser:
                releaser.join(timeout=self.staging_timeout)
        finally:
            free_held()

    def _set_aside(self, sizes: list[int]) -> collections.OrderedDict[int, int] | None:
        """Pool extents (offset -> length) for every chunk of a restore whose rank holds all its
        pieces to the end, taken now or not at all: a rank holding part of them while the
        agent waits for memory would never release it. At most half the pool, so saves go on."""
        if sum(sizes) > self.pool.size // 2:
            return None
        taken: collections.OrderedDict[int, int] = collections.OrderedDict()
        try:
            for size in sizes:
                offset, length = self.pool.allocate(max(size, 1), min_bytes=max(size, 1), timeout=0)
                taken[offset] = length
        except DeadlineError:  # the pool is busy: pieces come one by one, the rank copies them out
            for offset, length in taken.items():
                self.pool.free(offset, length)
            return None
        return taken

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

    # -- observability: metrics, heartbeat, log context -------------------------------------------

    def _observability_init(self, metrics: AgentMetrics, heartbeat_interval: float) -> None:
        self.metrics = metrics
        self.started_at = time.time()
        self.addresses: tuple[str, str, str] = ("", "", "")  # ranks' address, TCP, metrics; set once serving
        self._last_error = ("", 0.0)  # message, time.time()
        metrics.watch(staging_used=lambda: self.pool.in_use, staging_budget=lambda: self.pool.size,
                      upload_queue=self._upload_queue_chunks, saves_in_flight=self._saves_in_flight,
                      cache_counts=lambda: (self.cache.hits, self.cache.misses), store_stats=self.store.stats)
        self.heartbeat = Heartbeat(self.coordinator, self.agent_state, heartbeat_interval)

    def start_heartbeat(self, address: str, tcp_address: str, metrics_address: str = "") -> None:
        """Begin reporting to the coordinator, now that the agent's addresses are known."""
        self.addresses = (address, tcp_address, metrics_address)
        self.heartbeat.start()

    def _saves_in_flight(self) -> int:
        with self._lock:
            return len(self._sessions)

    def _upload_queue_chunks(self) -> int:
        with self._lock:
            sessions = list(self._sessions.values())
        return sum(s.pending_chunks for s in sessions)

    def _log_fields(self, session: SaveSession) -> dict[str, object]:
        return {**session.log_fields, "agent": self.agent_id}

    def _note_failure(self, session: SaveSession, message: str) -> None:
        """A rank's save failed here: count it, keep it as the agent's last error, tell the coordinator soon."""
        self.metrics.saves_failed.inc()
        self._last_error = (message, time.time())
        log.warning("save failed: %s", message, extra=self._log_fields(session))
        self.heartbeat.poke()

    def agent_state(self, phase: int | None = None) -> coordinator_pb2.AgentState:
        """This agent's state as the heartbeat reports it (and ``layervault status`` shows it)."""
        if phase is None:
            phase = coordinator_pb2.AGENT_PHASE_DRAINING if self._draining else coordinator_pb2.AGENT_PHASE_SERVING
        error, error_at = self._last_error
        address, tcp_address, metrics_address = self.addresses
        return coordinator_pb2.AgentState(
            agent_id=self.agent_id, address=address, tcp_address=tcp_address, metrics_address=metrics_address,
            version=__version__, started_at=rfc3339(self.started_at), phase=phase,
            saves_in_flight=self._saves_in_flight(), staging_used_bytes=self.pool.in_use,
            staging_budget_bytes=self.pool.size, upload_queue_chunks=self._upload_queue_chunks(),
            rss_bytes=self._sample_rss(), peak_rss_bytes=self._peak_rss,
            last_error=error, last_error_at=rfc3339(error_at) if error else "")
