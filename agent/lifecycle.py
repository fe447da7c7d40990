"""Deleting checkpoints and collecting garbage, following references between checkpoints.

An incremental checkpoint refers to chunk objects that an earlier checkpoint of the same
job uploaded (their keys stay under the earlier step), so an object may belong to several
manifests. The one rule: **an object is deleted only when no manifest of its job refers to
it** (and no pending save, inside the coordinator). Every deletion here follows it:

* :func:`delete_checkpoint` removes the manifest first - the checkpoint stops being listed
  before any of its bytes go, so it is never seen half-deleted - then points ``latest`` at
  the newest remaining step (or removes it), then deletes the objects of the removed
  manifest that no remaining manifest refers to.
* :func:`release_objects` is that last step on its own; the commit of an overwrite uses it
  for the objects only the replaced manifest referred to.
* :func:`collect_garbage` deletes chunk objects that no manifest refers to and that are
  older than ``min_age``: left by crashed attempts, or by a delete that crashed after its
  manifest was gone. In-flight attempts upload their chunks before their manifest exists;
  the age guard (default: the commit timeout, after which an attempt can no longer commit)
  and, inside the coordinator, the list of pending attempts keep them safe.

Each function is safe to run again after a crash at any point: what is left is either
still referenced (kept) or unreferenced (collected by the next gc).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Collection, Iterable

from layervault.agent import keys
from layervault.agent.catalog import Catalog
from layervault.agent.storage import ObjectNotFound, ObjectStore
from layervault.errors import NotFoundError

log = logging.getLogger("layervault.lifecycle")

#: (job, kind, step, save_id) of a save attempt whose chunk objects must not be collected.
AttemptId = tuple[str, str, int, str]


@dataclasses.dataclass
class DeleteResult:
    """What :func:`delete_checkpoint` removed."""

    job: str
    kind: str
    step: int
    deleted: list[str]          # chunk objects deleted
    shared: int                 # objects kept because another checkpoint refers to them
    latest: int | None          # the step ``latest`` points to now (None: no checkpoint left)


@dataclasses.dataclass
class GcResult:
    """What :func:`collect_garbage` found (and, unless a dry run, deleted)."""

    deleted: list[str] = dataclasses.field(default_factory=list)
    deleted_bytes: int = 0
    referenced: int = 0         # chunk objects some manifest refers to
    young: int = 0              # unreferenced, but younger than min_age or of a pending attempt
    dry_run: bool = False


def committed_steps(store: ObjectStore, job: str, kind: str) -> list[int]:
    """Steps with a manifest, from the manifests folder alone (never walks chunk objects)."""
    found = (keys.parse_manifest_key(key) for key in store.list(keys.manifests_prefix(job, kind)))
    return sorted(parsed[2] for parsed in found if parsed is not None)


def referenced_keys(catalog: Catalog, job: str) -> set[str]:
    """Every object key that a committed manifest of ``job`` (any kind) refers to.

    Lists the manifests anew on every call (their contents are cached by key: a manifest is
    only replaced through the coordinator, which drops it from its cache).
    """
    refs: set[str] = set()
    for kind in keys.KINDS:
        for step in committed_steps(catalog.store, job, kind):
            try:
                manifest = catalog.manifest(keys.manifest_key(job, kind, step))
            except NotFoundError:
                continue  # deleted since the listing
            refs.update(chunk.key for shard in manifest.shards for chunk in shard.chunks)
    return refs


def release_objects(store: ObjectStore, catalog: Catalog, job: str, candidates: Iterable[str],
                    protect: Collection[str] = ()) -> tuple[list[str], int]:
    """Delete those of ``candidates`` that no manifest of ``job`` and nothing in ``protect``
    refers to; returns (deleted keys, number kept because still referenced)."""
    wanted = set(candidates)
    if not wanted:
        return [], 0
    live = referenced_keys(catalog, job) | set(protect)
    doomed = sorted(wanted - live)
    store.delete(doomed)
    return doomed, len(wanted) - len(doomed)


def fix_latest(store: ObjectStore, catalog: Catalog, job: str, kind: str) -> int | None:
    """Point ``{job}/{kind}/latest`` at the newest committed step, or remove it if none is left."""
    steps = committed_steps(store, job, kind)
    pointer = keys.latest_key(job, kind)
    if not steps:
        store.delete([pointer])
        return None
    newest = max(steps)
    try:
        current = json.loads(store.get(pointer)).get("step")
    except (ObjectNotFound, ValueError, AttributeError):
        current = None
    if current != newest:
        store.put(pointer, json.dumps({"step": newest, "manifest": keys.manifest_key(job, kind, newest)}).encode())
    return newest


def delete_checkpoint(store: ObjectStore, catalog: Catalog, job: str, kind: str, step: int,
                      protect: Collection[str] = ()) -> DeleteResult:
    """Delete one committed checkpoint: manifest, then ``latest``, then its unshared objects.

    Raises NotFoundError when (job, kind, step) is not committed. ``protect``: object keys
    that must survive although no manifest names them (pending saves refer to them).
    """
    manifest_key = keys.manifest_key(job, kind, step)
    catalog.forget(manifest_key)  # read it fresh: it may have been overwritten meanwhile
    try:
        manifest = catalog.manifest(manifest_key)
    except NotFoundError:
        raise NotFoundError(f"no committed {kind} checkpoint of job {job!r} at step {step} "
                            f"(objects a crashed delete left behind are removed by `layervault gc`)") from None
    store.delete([manifest_key])  # from here on, nobody lists or loads it
    catalog.forget(manifest_key)
    latest = fix_latest(store, catalog, job, kind)
    deleted, shared = release_objects(store, catalog, job, (c.key for s in manifest.shards for c in s.chunks), protect)
    log.info("deleted %s/%s step %d: %d objects, %d shared with other checkpoints kept", job, kind, step,
             len(deleted), shared)
    return DeleteResult(job, kind, step, deleted, shared, latest)


def collect_garbage(store: ObjectStore, catalog: Catalog, job: str = "", min_age: float = 600.0,
                    pending: Collection[AttemptId] = (), protect: Collection[str] = (),
                    dry_run: bool = False, now: float | None = None) -> GcResult:
    """Delete chunk objects of ``job`` (all jobs when empty) that no manifest refers to and
    that are older than ``min_age`` seconds and belong to no attempt in ``pending``.

    The listing comes first, the references after it, so a manifest committed in between
    is seen. Ages are the store's modification times against this machine's clock.
    """
    if min_age < 0:
        raise ValueError(f"gc min_age must be >= 0 seconds, got {min_age}")
    prefix = f"{keys.check_job(job)}/" if job else ""
    objects: dict[str, list] = {}
    for info in store.list_info(prefix):
        parsed = keys.parse_chunk_key(info.key)
        if parsed is not None:
            objects.setdefault(parsed[0], []).append((info, parsed))
    now = time.time() if now is None else now
    pending_set, protect_set = set(pending), set(protect)
    result = GcResult(dry_run=dry_run)
    for owner, found in sorted(objects.items()):
        live = referenced_keys(catalog, owner) | protect_set
        doomed = []
        for info, parsed in found:
            if info.key in live:
                result.referenced += 1
            elif parsed in pending_set or now - info.modified < min_age:
                result.young += 1
            else:
                doomed.append(info.key)
                result.deleted_bytes += info.size
        if doomed and not dry_run:
            store.delete(doomed)
        result.deleted.extend(doomed)
        if not dry_run:
            for kind in keys.KINDS:
                fix_latest(store, catalog, owner, kind)
    log.info("gc of %s: %s %d unreferenced objects (%d bytes); %d referenced, %d too young or pending",
             job or "all jobs", "would delete" if dry_run else "deleted", len(result.deleted),
             result.deleted_bytes, result.referenced, result.young)
    return result
