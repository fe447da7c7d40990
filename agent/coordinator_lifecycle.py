"""The coordinator's side of the checkpoint lifecycle: bases, retention, protected deletes.

The coordinator is the one process that knows which saves are in flight, so the deletes it
makes are fully safe: it spares the steps of pending attempts, the base checkpoints that
pending incremental attempts borrow from, and every object their reports name. It

* names the **base** of an incremental attempt when it opens (the newest committed step of
  the same job and kind) and, right before the manifest write, checks that the base is
  still committed and names every object the new manifest borrows;
* applies the **retention** policy of a job after each of its commits, on one background
  thread, so the commit reply never waits for deletes;
* runs the reference-aware cleanup after an overwrite.

All deletes go through :mod:`layervault.agent.lifecycle` and are serialized here.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from layervault.agent import keys, lifecycle
from layervault.agent.catalog import Catalog
from layervault.agent.incremental import check_borrowed
from layervault.agent.manifest import Manifest, decode_keys, decode_manifest
from layervault.agent.retention import Retention, steps_to_delete
from layervault.agent.storage import ObjectNotFound, ObjectStore
from layervault.errors import IncompatibleStateError, LayervaultError

log = logging.getLogger("layervault.coordinator")


@dataclasses.dataclass
class InFlight:
    """What the undecided save attempts of one job hold on to."""

    steps: set[tuple[str, int]] = dataclasses.field(default_factory=set)      # (kind, step) being saved or used as a base
    attempts: set[lifecycle.AttemptId] = dataclasses.field(default_factory=set)
    borrowed: set[str] = dataclasses.field(default_factory=set)               # object keys named by their reports


class CoordinatorLifecycle:
    """Bases, retention and deletes for one coordinator; ``in_flight(job)`` (all jobs for "")
    comes from its commit tracker."""

    def __init__(self, store: ObjectStore, catalog: Catalog, in_flight: Callable[[str], InFlight],
                 default_retention: Retention | None = None) -> None:
        self.store = store
        self.catalog = catalog
        self.in_flight = in_flight
        self.default_retention = default_retention or Retention()
        self._deletes = threading.Lock()
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="lv-retention")

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)

    def flush(self, timeout: float | None = None) -> None:
        """Wait until the retention queued so far has run (tests, orderly shutdown)."""
        self._worker.submit(lambda: None).result(timeout)

    # -- incremental bases ---------------------------------------------------------------------

    def choose_base(self, job: str, kind: str, step: int) -> tuple[int, str] | None:
        """(step, save_id) of the newest committed checkpoint other than ``step``, if any."""
        for candidate in reversed(lifecycle.committed_steps(self.store, job, kind)):
            if candidate == step:
                continue
            key = keys.manifest_key(job, kind, candidate)
            self.catalog.forget(key)
            try:
                return candidate, self.catalog.manifest(key).save_id
            except LayervaultError:
                continue  # deleted since the listing, or unreadable: try the next older one
        return None

    def check_base(self, manifest: Manifest, base: tuple[int, str] | None, label: str) -> None:
        """Before the commit: the base is still committed (same attempt) and names every borrowed object."""
        current = None
        if base is not None:
            try:
                current = decode_manifest(self.store.get(keys.manifest_key(manifest.job, manifest.kind, base[0])))
            except ObjectNotFound:
                current = None
            if current is not None and current.save_id != base[1]:
                current = None
        check_borrowed(manifest, current, label)

    # -- deletes -------------------------------------------------------------------------------

    def release_replaced(self, old: Manifest, new: Manifest) -> None:
        """After an overwrite: delete the objects only the replaced manifest referred to."""
        stale = {c.key for s in old.shards for c in s.chunks} - {c.key for s in new.shards for c in s.chunks}
        with self._deletes:
            try:
                lifecycle.release_objects(self.store, self.catalog, old.job, stale, self.in_flight(old.job).borrowed)
            except Exception:  # noqa: BLE001 - garbage left behind is harmless; gc collects it
                log.exception("could not delete %d objects of the overwritten %s/%s step %d",
                              len(stale), old.job, old.kind, old.step)

    def delete(self, job: str, kind: str, step: int) -> lifecycle.DeleteResult:
        """Delete a committed checkpoint, sparing what in-flight saves hold on to."""
        with self._deletes:
            held = self.in_flight(job)
            if (kind, step) in held.steps:
                raise IncompatibleStateError(
                    f"{job}/{kind} step {step} is being saved, or is the base of an incremental save in flight; "
                    "delete it once that save is decided")
            return lifecycle.delete_checkpoint(self.store, self.catalog, job, kind, step, held.borrowed)

    def gc(self, job: str, min_age: float, dry_run: bool = False) -> lifecycle.GcResult:
        with self._deletes:
            held = self.in_flight(job)
            return lifecycle.collect_garbage(self.store, self.catalog, job, min_age, held.attempts, held.borrowed, dry_run)

    # -- retention -----------------------------------------------------------------------------

    def after_commit(self, job: str, kind: str, policy: Retention | None) -> None:
        """Queue the job's retention policy (or the coordinator's default) for (job, kind)."""
        policy = policy if policy is not None and policy.active else self.default_retention
        if policy.active:
            self._worker.submit(self._apply_retention, job, kind, policy)

    def _apply_retention(self, job: str, kind: str, policy: Retention) -> list[int]:
        try:
            with self._deletes:
                steps = lifecycle.committed_steps(self.store, job, kind)
                checkpoints = []
                for step in steps:
                    keys_ = {}
                    if policy.keep_best:
                        keys_ = decode_keys(self.catalog.manifest(keys.manifest_key(job, kind, step)).keys)
                    checkpoints.append((step, keys_))
                held = self.in_flight(job)
                protected = {step for k, step in held.steps if k == kind}
                doomed = steps_to_delete(policy, checkpoints, protected)
                for step in doomed:
                    lifecycle.delete_checkpoint(self.store, self.catalog, job, kind, step, held.borrowed)
            if doomed:
                log.info("retention (%s) of %s/%s deleted steps %s", policy, job, kind, doomed)
            return doomed
        except Exception:  # noqa: BLE001 - retention is retried after the next commit
            log.exception("retention (%s) of %s/%s failed", policy, job, kind)
            return []

