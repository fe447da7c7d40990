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
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
import uuid

from layervault.agent import keys
from layervault.agent.catalog import Catalog
from layervault.agent.manifest import FORMAT_VERSION, Manifest, checkpoint_info, encode_manifest, now_rfc3339
from layervault.agent.storage import ObjectNotFound, ObjectStore
from layervault.errors import (
    AlreadyExistsError,
    DeadlineError,
    IncompatibleStateError,
    InvalidArgumentError,
    LayervaultError,
    NotFoundError,
    SaveFailedError,
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
    reports: dict[int, coordinator_pb2.ReportShardsRequest] = dataclasses.field(default_factory=dict)
    error: LayervaultError | None = None
    info: common_pb2.CheckpointInfo | None = None
    committing: bool = False
    needs_seal: bool = False
    seal: coordinator_pb2.SealSaveRequest | None = None

    def ready(self) -> bool:
        """Every rank reported, and the seal is in if one is needed."""
        return (len(self.reports) == self.world_size and (self.seal is not None or not self.needs_seal)
                and not self.committing and self.error is None)

    @property
    def label(self) -> str:
        job, kind, step = self.key
        return f"{job}/{kind}/step {step}"

    def missing(self) -> str:
        ranks = [r for r in range(self.world_size) if r not in self.reports]
        if not ranks and self.needs_seal and self.seal is None:
            return "every rank reported, but the coordinator rank never sealed the save (finish() did not run)"
        agents = sorted({self.begun[r] for r in ranks if r in self.begun})
        text = f"ranks {ranks} did not report durable shards"
        never = [r for r in ranks if r not in self.begun]
        if never:
            text += f" (ranks {never} never started saving)"
        if agents:
            text += f"; their agents: {', '.join(agents)}"
        return text


def _key(checkpoint: common_pb2.CheckpointId) -> CheckpointKey:
    return keys.check_job(checkpoint.job), keys.check_kind(checkpoint.kind), keys.check_step(checkpoint.step)


class CommitCoordinator:
    """Tracks pending saves and commits them; all methods are thread-safe."""

    def __init__(self, store: ObjectStore, catalog: Catalog, commit_timeout: float = 600.0) -> None:
        self.store = store
        self.catalog = catalog
        self.commit_timeout = commit_timeout
        self._pending: dict[CheckpointKey, PendingSave] = {}
        self._cond = threading.Condition()

    # -- protocol steps ------------------------------------------------------------------------

    def begin(self, req: coordinator_pb2.BeginSaveRequest) -> str:
        key = _key(req.id)
        if req.world_size < 1 or not 0 <= req.rank < req.world_size:
            raise InvalidArgumentError(f"rank {req.rank} is not within world size {req.world_size}")
        with self._cond:
            self._expire_locked()
            pending = self._pending.get(key)
            if pending and pending.error is None and pending.info is None:
                if pending.world_size != req.world_size:
                    raise IncompatibleStateError(
                        f"{pending.label}: rank {req.rank} saves with world size {req.world_size}, "
                        f"but the attempt in progress has world size {pending.world_size}"
                    )
                if req.rank not in pending.begun and pending.needs_seal == req.needs_seal:
                    pending.begun[req.rank] = req.agent_id
                    return pending.save_id
                # The same rank starts again: its job restarted. The old attempt can never finish.
                self._fail_locked(pending, SaveFailedError(f"{pending.label}: superseded by a new save attempt"))
            manifest_key = keys.manifest_key(*key)
        if not req.overwrite and self.store.exists(manifest_key):
            raise AlreadyExistsError(
                f"checkpoint {key[0]}/{key[1]} step {key[2]} is already committed; pass overwrite=True to replace it"
            )
        with self._cond:
            pending = self._pending.get(key)
            if pending and pending.error is None and pending.info is None and req.rank not in pending.begun:
                pending.begun[req.rank] = req.agent_id  # another rank opened it meanwhile
                return pending.save_id
            pending = PendingSave(key, uuid.uuid4().hex[:12], req.world_size, req.overwrite, time.monotonic(),
                                  needs_seal=req.needs_seal)
            pending.begun[req.rank] = req.agent_id
            self._pending[key] = pending
            log.info("save %s opened: attempt %s, world size %d", pending.label, pending.save_id, req.world_size)
            return pending.save_id

    def report(self, req: coordinator_pb2.ReportShardsRequest) -> None:
        key = _key(req.id)
        with self._cond:
            pending = self._attempt_locked(key, req.save_id)
            if pending.error is not None:
                raise pending.error
            if req.world_size != pending.world_size or not 0 <= req.rank < pending.world_size:
                raise IncompatibleStateError(f"{pending.label}: report from rank {req.rank} of {req.world_size} does not fit world size {pending.world_size}")
            pending.reports[req.rank] = req
            ready = pending.ready()
            if ready:
                pending.committing = True
        if ready:
            self._commit(pending)

    def seal(self, req: coordinator_pb2.SealSaveRequest) -> None:
        key = _key(req.id)
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
            self._fail_locked(pending, SaveFailedError(
                f"{pending.label}: rank {req.rank} on agent {req.agent_id or '?'} failed: {req.reason}"))

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
                    raise DeadlineError(f"{pending.label}: not committed after {req.timeout_s:.0f}s: {pending.missing()}")
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

    # -- internals ---------------------------------------------------------------------------

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
            log.warning("save %s failed: %s", pending.label, error)
            self._cond.notify_all()
            threading.Thread(target=self._delete_attempt_objects, args=(pending,), daemon=True).start()

    def _expire_locked(self) -> None:
        now = time.monotonic()
        for key, pending in list(self._pending.items()):
            age = now - pending.started
            if pending.info is None and pending.error is None and age > self.commit_timeout:
                self._fail_locked(pending, DeadlineError(
                    f"{pending.label}: not committed within {self.commit_timeout:.0f}s: {pending.missing()}"))
            elif age > 2 * self.commit_timeout:
                del self._pending[key]  # long decided; storage answers for committed ones

    def _commit(self, pending: PendingSave) -> None:
        job, kind, step = pending.key
        try:
            manifest = self._build_manifest(pending)
            manifest_key = keys.manifest_key(job, kind, step)
            previous = None
            data = encode_manifest(manifest)
            if pending.overwrite:
                try:
                    previous = self.catalog.manifest(manifest_key)
                except NotFoundError:
                    previous = None
                self.store.put(manifest_key, data)
            elif not self.store.put_if_absent(manifest_key, data):
                raise AlreadyExistsError(f"{pending.label} was committed by another attempt meanwhile")
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
        log.info("committed %s: %d shards, %d bytes stored", pending.label, len(manifest.shards), info.stored_bytes)
        if previous is not None:
            self._delete_unreferenced(previous, manifest)

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

    def _move_latest(self, job: str, kind: str, step: int, manifest_key: str) -> None:
        latest = keys.latest_key(job, kind)
        try:
            current = json.loads(self.store.get(latest)).get("step", -1)
        except (ObjectNotFound, ValueError):
            current = -1
        if step >= current:
            self.store.put(latest, json.dumps({"step": step, "manifest": manifest_key}).encode())

    def _delete_unreferenced(self, old: Manifest, new: Manifest) -> None:
        keep = {c.key for s in new.shards for c in s.chunks}
        stale = [c.key for s in old.shards for c in s.chunks if c.key not in keep]
        try:
            self.store.delete(stale)
        except Exception:  # noqa: BLE001 - garbage left behind is harmless; gc can collect it
            log.exception("could not delete %d objects of the overwritten %s/%s step %d", len(stale), old.job, old.kind, old.step)

    def _delete_attempt_objects(self, pending: PendingSave) -> None:
        """Best-effort removal of a failed attempt's chunk objects (its save_id is in their names)."""
        job, kind, step = pending.key
        try:
            prefix = keys.step_prefix(job, kind, step)
            doomed = [k for k in self.store.list(prefix) if k.rsplit("/", 1)[-1].startswith(pending.save_id + ".")]
            self.store.delete(doomed)
        except Exception:  # noqa: BLE001
            log.exception("could not clean up failed attempt %s of %s", pending.save_id, pending.label)
