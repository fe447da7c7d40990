"""The commit rule: a checkpoint exists once, completely, or not at all.

A save attempt of (job, kind, step) with world size W is pending until all W ranks have
reported durable shards. Then the manifest is written - create-only, and last - and only
then the ``latest`` pointer moves. Before the manifest write nothing lists the checkpoint;
after it, every object it names is durable and checksummed. Overwriting a committed step
(only when asked) writes the new manifest over the old one and then deletes the objects
only the old one referred to, so a reader always sees one complete version.

Pending attempts are kept in memory only; the catalog in storage is the truth, so a
restarted coordinator loses nothing committed. An attempt it forgot cannot commit: its
waiters get an error that names the ranks that did not report.

Two shutdowns end attempts early. An agent that stops gracefully has aborted every save it
had not made durable, and its goodbye heartbeat (:meth:`CommitCoordinator.agent_stopped`)
fails each attempt in which one of its ranks never reported - at once, not at the commit
timeout - so the attempt's objects and open multipart uploads are removed while the job
waits. A coordinator that stops (:meth:`CommitCoordinator.shut_down`) fails the attempts it
has not begun to commit: it would forget them on restart, and no manifest may be written
for them; their waiters get the reason at once instead of holding up the shutdown.

A job that dies mid-save leaves its attempt pending until the commit timeout. Each rank's
BeginSave names the job's *incarnation* (one id per run of the job, shared by its ranks), so
the restarted job's first rank supersedes the dead run's attempt instead of joining it; a
rank joining by rank number alone would be orphaned as soon as a rank the dead run had
begun came back. Without incarnations (older clients) ranks join by rank number.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
import uuid
from typing import Callable

from layervault.agent import attempt_cleanup, keys
from layervault.agent.catalog import Catalog
from layervault.agent.coordinator_lifecycle import CoordinatorLifecycle, InFlight
from layervault.agent.manifest import FORMAT_VERSION, Manifest, check_json_map, checkpoint_info, encode_manifest, now_rfc3339
from layervault.agent.metrics import CoordinatorMetrics
from layervault.agent.retention import Retention
from layervault.agent.storage import ObjectNotFound, ObjectStore, StorageError
from layervault.errors import (
    AlreadyExistsError,
    ChecksumError,
    DeadlineError,
    IncompatibleStateError,
    InvalidArgumentError,
    LayervaultError,
    NotFoundError,
    SaveFailedError,
    UnavailableError,
)
from layervault.proto import common_pb2, coordinator_pb2

log = logging.getLogger("layervault.coordinator")

CheckpointKey = tuple[str, str, int]


@dataclasses.dataclass
class PendingSave:
    """One save attempt that has not committed (yet)."""

    key: CheckpointKey
    save_id: str
    world_size: int
    overwrite: bool
    started: float
    begun: dict[int, str] = dataclasses.field(default_factory=dict)     # rank -> agent id
    peers: dict[int, str] = dataclasses.field(default_factory=dict)     # rank -> the agent's connection (gRPC peer)
    reports: dict[int, coordinator_pb2.ReportShardsRequest] = dataclasses.field(default_factory=dict)
    error: LayervaultError | None = None
    info: common_pb2.CheckpointInfo | None = None
    committing: bool = False
    needs_seal: bool = False
    seal: coordinator_pb2.SealSaveRequest | None = None
    base: tuple[int, str] | None = None       # incremental: (step, save_id) of the committed base
    retention: Retention | None = None        # the job's policy, applied after the commit
    incarnation: str = ""                     # the run of the job that opened it; empty: unknown

    def reply(self) -> coordinator_pb2.BeginSaveReply:
        base_step, base_save_id = self.base or (0, "")
        return coordinator_pb2.BeginSaveReply(save_id=self.save_id, base_step=base_step, base_save_id=base_save_id)

    def ready(self) -> bool:
        """Every rank reported, and the seal is in if one is needed."""
        return (len(self.reports) == self.world_size and (self.seal is not None or not self.needs_seal)
                and not self.committing and self.error is None)

    @property
    def label(self) -> str:
        job, kind, step = self.key
        return f"{job}/{kind}/step {step}"

    @property
    def log_fields(self) -> dict[str, object]:
        """The attempt's context for structured log lines (see :mod:`layervault.agent.logs`)."""
        job, kind, step = self.key
        return {"job": job, "kind": kind, "step": step, "save_id": self.save_id}

    def open(self) -> bool:
        """Neither committed nor failed: ranks may still join it."""
        return self.error is None and self.info is None

    def superseded_by(self, req: coordinator_pb2.BeginSaveRequest) -> str:
        """Why ``req`` must start a new attempt instead of joining this one; empty: it joins.

        Raises IncompatibleStateError for a rank of the same run with another world size.
        """
        if req.incarnation and self.incarnation and req.incarnation != self.incarnation:
            return f"superseded: the job restarted (incarnation {self.incarnation} -> {req.incarnation})"
        if self.world_size != req.world_size:
            raise IncompatibleStateError(
                f"{self.label}: rank {req.rank} saves with world size {req.world_size}, "
                f"but the attempt in progress has world size {self.world_size}"
            )
        if req.rank in self.begun or self.needs_seal != req.needs_seal:
            # The same rank starts again: a retry (or a restart without incarnations).
            return f"superseded by a new save attempt (rank {req.rank} began again)"
        return ""

    def missing(self, describe: Callable[[str], str] = str) -> str:
        """Which ranks did not report, which of them never began, and the agents of those that
        did (``describe`` turns an agent id into what the message shows of it, e.g. its address)."""
        ranks = [r for r in range(self.world_size) if r not in self.reports]
        if not ranks and self.needs_seal and self.seal is None:
            return "every rank reported, but the coordinator rank never sealed the save (finish() did not run)"
        text = f"ranks {ranks} did not report durable shards"
        never = [r for r in ranks if r not in self.begun]
        if never:
            text += f" (ranks {never} never started saving)"
        began: dict[str, list[int]] = {}
        for rank in ranks:
            if rank in self.begun:
                began.setdefault(self.begun[rank], []).append(rank)
        if began:
            text += "; began on " + "; ".join(
                f"agent {describe(agent)} (rank{'s' if len(held) > 1 else ''} {', '.join(map(str, held))})"
                for agent, held in sorted(began.items()))
        return text


def _key(checkpoint: common_pb2.CheckpointId) -> CheckpointKey:
    return keys.check_job(checkpoint.job), keys.check_kind(checkpoint.kind), keys.check_step(checkpoint.step)


class CommitCoordinator:
    """Tracks pending saves and commits them; all methods are thread-safe."""

    def __init__(self, store: ObjectStore, catalog: Catalog, commit_timeout: float = 600.0,
                 metrics: CoordinatorMetrics | None = None, retention: Retention | None = None,
                 describe_agent: Callable[[str], str] = str) -> None:
        """``describe_agent``: an agent id as errors name it (the coordinator adds its addresses)."""
        self.metrics = metrics or CoordinatorMetrics()
        self.store = store
        self.catalog = catalog
        self.commit_timeout = commit_timeout
        self.describe_agent = describe_agent
        self._pending: dict[CheckpointKey, PendingSave] = {}
        self._cond = threading.Condition()
        self._sweeps: list[threading.Thread] = []
        self._shut_down = False
        self.lifecycle = CoordinatorLifecycle(store, catalog, self.in_flight, retention)

    # -- protocol steps ------------------------------------------------------------------------

    def begin(self, req: coordinator_pb2.BeginSaveRequest, peer: str = "") -> coordinator_pb2.BeginSaveReply:
        """``peer``: the connection the agent's call came over (see :meth:`agent_stopped`)."""
        key = _key(req.id)
        if req.world_size < 1 or not 0 <= req.rank < req.world_size:
            raise InvalidArgumentError(f"rank {req.rank} is not within world size {req.world_size}")
        with self._cond:
            if self._shut_down:
                raise UnavailableError("the coordinator is shutting down; save again once it is back")
            self._expire_locked()
            pending = self._settled_locked(key)
            if pending and pending.open():
                reason = pending.superseded_by(req)
                if not reason:
                    pending.begun[req.rank] = req.agent_id
                    pending.peers[req.rank] = peer
                    return pending.reply()
                # The old attempt can never finish: its run is gone, or this rank left it.
                self._fail_locked(pending, SaveFailedError(f"{pending.label}: {reason}"))
            manifest_key = keys.manifest_key(*key)
        if not req.overwrite and self.store.exists(manifest_key):
            raise AlreadyExistsError(
                f"checkpoint {key[0]}/{key[1]} step {key[2]} is already committed; pass overwrite=True to replace it"
            )
        base = self.lifecycle.choose_base(*key) if req.incremental else None
        retention = Retention.from_proto(req.retention) if req.HasField("retention") else None
        with self._cond:
            pending = self._settled_locked(key)
            if pending and pending.open():  # another rank opened one meanwhile
                reason = pending.superseded_by(req)
                if not reason:
                    pending.begun[req.rank] = req.agent_id
                    pending.peers[req.rank] = peer
                    return pending.reply()
                self._fail_locked(pending, SaveFailedError(f"{pending.label}: {reason}"))
            pending = PendingSave(key, uuid.uuid4().hex[:12], req.world_size, req.overwrite, time.monotonic(),
                                  needs_seal=req.needs_seal, base=base, retention=retention,
                                  incarnation=req.incarnation)
            pending.begun[req.rank] = req.agent_id
            pending.peers[req.rank] = peer
            self._pending[key] = pending
            self.metrics.saves_started.inc()
            log.info("save %s opened: attempt %s, world size %d, incarnation %s", pending.label, pending.save_id,
                     req.world_size, req.incarnation or "-",
                     extra={**pending.log_fields, "rank": req.rank, "agent": req.agent_id})
            return pending.reply()

    def report(self, req: coordinator_pb2.ReportShardsRequest) -> None:
        key = _key(req.id)
        with self._cond:
            pending = self._attempt_locked(key, req.save_id)
            if pending.error is not None:
                raise pending.error
            if req.world_size != pending.world_size or not 0 <= req.rank < pending.world_size:
                raise IncompatibleStateError(f"{pending.label}: report from rank {req.rank} of {req.world_size} does not fit world size {pending.world_size}")
            pending.reports[req.rank] = req
            log.info("save %s: rank %d reported durable shards (%d of %d ranks)", pending.label, req.rank,
                     len(pending.reports), pending.world_size,
                     extra={**pending.log_fields, "rank": req.rank, "agent": req.agent_id})
            ready = pending.ready()
            if ready:
                pending.committing = True
        if ready:
            self._commit(pending)

    def seal(self, req: coordinator_pb2.SealSaveRequest) -> None:
        key = _key(req.id)
        # The seal's keys go into the manifest, where every reader parses them: refuse what
        # would make the committed checkpoint unreadable (the save stays open for a good seal).
        try:
            check_json_map(req.keys, "training key")
        except InvalidArgumentError as exc:
            raise InvalidArgumentError(f"{key[0]}/{key[1]} step {key[2]}: seal refused: {exc}") from None
        with self._cond:
            pending = self._pending.get(key)
            if pending is None or pending.info is not None:
                raise NotFoundError(f"{key[0]}/{key[1]} step {key[2]}: no save in progress to seal")
            if pending.error is not None:
                raise pending.error
            if not pending.needs_seal or req.world_size != pending.world_size:
                raise IncompatibleStateError(f"{pending.label}: this save was not opened for a seal of world size {req.world_size}")
            pending.seal = req
            ready = pending.ready()
            if ready:
                pending.committing = True
        if ready:
            self._commit(pending)

    def abort(self, req: coordinator_pb2.AbortSaveRequest) -> None:
        key = _key(req.id)
        with self._cond:
            pending = self._pending.get(key)
            if pending is None or pending.save_id != req.save_id or pending.info is not None:
                return
            failed = ChecksumError if req.data_loss else SaveFailedError
            self._fail_locked(pending, failed(
                f"{pending.label}: rank {req.rank} on agent {req.agent_id or '?'} failed: {req.reason}"))

    def agent_stopped(self, agent_id: str, peer: str) -> int:
        """An agent said goodbye (its last heartbeat, after its shutdown drain): fail every open
        attempt in which a rank that began on it has not reported; returns how many.

        A drained agent has aborted each save it had not made durable, so those ranks never
        report; without this their attempts would wait for the commit timeout. Heartbeats need
        no job token, so the goodbye counts only for ranks whose BeginSave came over the same
        connection (``peer``): no other process can speak for the agent. After a reconnect it
        does not match, and the commit timeout decides, as before.
        """
        if not agent_id or not peer:
            return 0
        failed = 0
        with self._cond:
            for pending in list(self._pending.values()):
                if not pending.open() or pending.committing:
                    continue
                ranks = [r for r, agent in sorted(pending.begun.items())
                         if agent == agent_id and pending.peers.get(r) == peer and r not in pending.reports]
                if ranks:
                    self._fail_locked(pending, SaveFailedError(
                        f"{pending.label}: agent {self.describe_agent(agent_id)} shut down before rank"
                        f"{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))} reported durable shards"))
                    failed += 1
        return failed

    def shut_down(self) -> int:
        """The coordinator is stopping: fail every attempt that is not writing its manifest
        (a manifest write in progress may finish) and refuse new ones. Returns how many failed."""
        failed = 0
        with self._cond:
            self._shut_down = True
            for pending in list(self._pending.values()):
                if pending.open() and not pending.committing:
                    self._fail_locked(pending, SaveFailedError(
                        f"{pending.label}: the coordinator shut down before the save could commit: "
                        f"{pending.missing(self.describe_agent)}"))
                    failed += 1
        return failed

    def join_sweeps(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the clean-ups of failed attempts; True if all ended."""
        deadline = time.monotonic() + timeout
        with self._cond:
            sweeps = list(self._sweeps)
        for sweep in sweeps:
            sweep.join(max(0.0, deadline - time.monotonic()))
        return not any(sweep.is_alive() for sweep in sweeps)

    def wait(self, req: coordinator_pb2.WaitCommitRequest) -> common_pb2.CheckpointInfo:
        key = _key(req.id)
        deadline = time.monotonic() + (req.timeout_s if req.timeout_s > 0 else self.commit_timeout)
        with self._cond:
            pending = self._pending.get(key)
            if pending is None or (req.save_id and pending.save_id != req.save_id):
                pending = None
            while pending is not None and pending.info is None and pending.error is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise DeadlineError(f"{pending.label}: not committed after {req.timeout_s:.0f}s: "
                                        f"{pending.missing(self.describe_agent)}")
                self._cond.wait(min(remaining, 1.0))
                self._expire_locked()
            if pending is not None:
                if pending.error is not None:
                    raise pending.error
                return pending.info  # type: ignore[return-value]
        # Not pending here (coordinator restarted, or long done): storage decides.
        manifest_key = keys.manifest_key(*key)
        try:
            manifest = self.catalog.manifest(manifest_key)
        except NotFoundError:
            raise NotFoundError(f"no save of {key[0]}/{key[1]} step {key[2]} is known to this coordinator and none is committed") from None
        if req.save_id and manifest.save_id != req.save_id:
            raise SaveFailedError(f"{key[0]}/{key[1]} step {key[2]}: attempt {req.save_id} was not committed (another attempt was)")
        return checkpoint_info(manifest, manifest_key)

    def pending_count(self) -> int:
        """Attempts open and not yet decided (committed or failed)."""
        with self._cond:
            return sum(1 for p in self._pending.values() if p.info is None and p.error is None)

    def in_flight(self, job: str = "") -> InFlight:
        """What undecided attempts of ``job`` (all jobs when empty) hold on to: their steps, their
        bases and the objects their reports name. Deletes spare all of it."""
        held = InFlight()
        with self._cond:
            for pending in self._pending.values():
                (pjob, kind, step) = pending.key
                if (job and pjob != job) or pending.info is not None or pending.error is not None:
                    continue
                held.steps.add((kind, step))
                held.attempts.add((pjob, kind, step, pending.save_id))
                if pending.base is not None:
                    held.steps.add((kind, pending.base[0]))
                for report in pending.reports.values():
                    held.borrowed.update(c.key for s in report.shards for c in s.chunks)
        return held

    # -- internals ---------------------------------------------------------------------------

    def _settled_locked(self, key: CheckpointKey) -> PendingSave | None:
        """The attempt of ``key``, once any manifest write of it in progress has ended: failing
        an attempt while it commits would delete the objects its manifest names."""
        pending = self._pending.get(key)
        while pending is not None and pending.committing and pending.open():
            self._cond.wait(1.0)
            pending = self._pending.get(key)
        return pending

    def _attempt_locked(self, key: CheckpointKey, save_id: str) -> PendingSave:
        pending = self._pending.get(key)
        if pending is None or pending.save_id != save_id:
            raise SaveFailedError(
                f"{key[0]}/{key[1]} step {key[2]}: attempt {save_id} is unknown to the coordinator "
                "(it restarted, or a newer attempt replaced it)"
            )
        return pending

    def _fail_locked(self, pending: PendingSave, error: LayervaultError) -> None:
        if pending.error is None and pending.info is None:
            pending.error = error
            self.metrics.saves_failed.inc()
            log.warning("save %s failed: %s", pending.label, error, extra=pending.log_fields)
            self._cond.notify_all()
            sweep = threading.Thread(target=self._delete_attempt_objects, args=(pending,), daemon=True,
                                     name="lv-attempt-sweep")
            self._sweeps = [t for t in self._sweeps if t.is_alive()] + [sweep]
            sweep.start()

    def _expire_locked(self) -> None:
        now = time.monotonic()
        for key, pending in list(self._pending.items()):
            age = now - pending.started
            if pending.info is None and pending.error is None and age > self.commit_timeout:
                self._fail_locked(pending, DeadlineError(
                    f"{pending.label}: not committed within {self.commit_timeout:.0f}s: {pending.missing(self.describe_agent)}"))
            elif age > 2 * self.commit_timeout:
                del self._pending[key]  # long decided; storage answers for committed ones

    def _commit(self, pending: PendingSave) -> None:
        job, kind, step = pending.key
        try:
            manifest = self._build_manifest(pending)
            self.lifecycle.check_base(manifest, pending.base, pending.label)
            manifest_key = keys.manifest_key(job, kind, step)
            previous = None
            data = encode_manifest(manifest)
            if pending.overwrite:
                try:
                    previous = self.catalog.manifest(manifest_key)
                except NotFoundError:
                    previous = None
                self.store.put(manifest_key, data)
            else:
                self._create_manifest(pending, manifest_key, data)
            self.catalog.forget(manifest_key)
            self._move_latest(job, kind, step, manifest_key)
            info = checkpoint_info(manifest, manifest_key)
        except LayervaultError as exc:
            with self._cond:
                self._fail_locked(pending, exc)
            return
        except Exception as exc:  # noqa: BLE001 - a storage failure fails the save, with its cause
            with self._cond:
                self._fail_locked(pending, SaveFailedError(f"{pending.label}: writing the manifest failed: {exc}"))
            return
        with self._cond:
            pending.info = info
            self._cond.notify_all()
        self.metrics.saves_committed.inc()
        self.metrics.commit_seconds.observe(time.monotonic() - pending.started)
        log.info("committed %s: %d shards, %d bytes stored", pending.label, len(manifest.shards), info.stored_bytes,
                 extra=pending.log_fields)
        if previous is not None:
            self.lifecycle.release_replaced(previous, manifest)
        self.lifecycle.after_commit(job, kind, pending.retention)

    def _build_manifest(self, pending: PendingSave) -> Manifest:
        job, kind, step = pending.key
        first = pending.reports[0]
        manifest = Manifest(
            format_version=FORMAT_VERSION, job=job, kind=kind, step=step, world_size=pending.world_size,
            save_id=pending.save_id, committed_at=now_rfc3339(), config=first.config,
        )
        manifest.keys.update(first.keys)
        manifest.extra.update(first.extra)
        if pending.seal is not None:
            manifest.keys.update(pending.seal.keys)
            manifest.extra.update(pending.seal.extra)
        manifest.keys["step"] = json.dumps(step)
        seen: dict[tuple, int] = {}
        for rank in range(pending.world_size):
            for shard in pending.reports[rank].shards:
                where = (shard.name, tuple(shard.layout.offsets))
                if where in seen:
                    raise IncompatibleStateError(
                        f"{pending.label}: layer {shard.name!r} at offsets {list(where[1])} was saved by ranks {seen[where]} and {rank}")
                seen[where] = rank
                manifest.shards.append(shard)
        return manifest

    def _create_manifest(self, pending: PendingSave, manifest_key: str, data: bytes) -> None:
        """The create-only manifest write: the commit itself.

        A write whose every try failed may still have landed (a lost reply): then the
        manifest in storage names this attempt, and the save is committed, not failed.
        """
        job, kind, step = pending.key
        try:
            created = self.store.put_if_absent(manifest_key, data)
        except StorageError:
            if not attempt_cleanup.is_committed(self.store, job, kind, step, pending.save_id):
                raise
            created = True
        if not created:
            raise AlreadyExistsError(f"{pending.label} was committed by another attempt meanwhile")

    def _move_latest(self, job: str, kind: str, step: int, manifest_key: str) -> None:
        """Move the ``latest`` hint. The manifest is the commit and listing finds it, so a
        storage failure here is logged, never turned into a failed save."""
        latest = keys.latest_key(job, kind)
        try:
            try:
                current = json.loads(self.store.get(latest)).get("step", -1)
            except (ObjectNotFound, ValueError):
                current = -1
            if step >= current:
                self.store.put(latest, json.dumps({"step": step, "manifest": manifest_key}).encode())
        except StorageError as exc:
            log.warning("%s/%s step %d is committed, but the latest pointer was not moved: %s", job, kind, step, exc)

    def _delete_attempt_objects(self, pending: PendingSave) -> None:
        """Best-effort removal of a failed attempt's chunk objects and open multipart uploads
        (see :mod:`layervault.agent.attempt_cleanup`; agents sweep their stragglers)."""
        try:
            attempt_cleanup.delete_attempt(self.store, *pending.key, pending.save_id)
        except Exception:  # noqa: BLE001
            log.exception("could not clean up failed attempt %s of %s", pending.save_id, pending.label)
