"""Removing what a save attempt that will never commit left in storage.

A chunk key names its attempt (``{step}/layers/{layer}/{save_id}.r{rank}.c{n}``), so the
leftovers of one attempt are found by listing the step's folder, and never include an
object of another attempt or of a committed checkpoint. Two parties sweep, because neither
sees everything alone:

* the coordinator, once, when the attempt fails (a rank aborted, the commit deadline
  passed, the manifest write failed): all ranks' objects that exist at that moment;
* each agent, for its own rank, when its uploads have ended and the attempt failed or its
  report was refused: the chunks that were still in flight during the coordinator's sweep.

Besides objects, a sweep aborts the attempt's open multipart uploads (an agent that died
mid-upload leaves one): their parts are stored, and billed, but no object LIST shows them.

A sweep never deletes a committed attempt: when the step's manifest names this attempt
(an ambiguous failure may have committed it after all), it does nothing.
"""

from __future__ import annotations

import dataclasses
import logging

from layervault.agent import keys
from layervault.agent.manifest import decode_manifest
from layervault.agent.storage import ObjectNotFound, ObjectStore
from layervault.agent.storage.base import IncompleteUpload

log = logging.getLogger("layervault.cleanup")


@dataclasses.dataclass(frozen=True)
class AttemptLeftovers:
    """What one attempt (optionally: one rank of it) left below its step's folder."""

    objects: list[str]
    uploads: list[IncompleteUpload]

    def __bool__(self) -> bool:
        return bool(self.objects or self.uploads)


def _belongs(key: str, save_id: str, rank: int | None) -> bool:
    name = key.rsplit("/", 1)[-1]
    if rank is None:
        return name.startswith(f"{save_id}.r")
    return name.startswith(f"{save_id}.r{rank}.")


def find_leftovers(store: ObjectStore, job: str, kind: str, step: int, save_id: str,
                   rank: int | None = None) -> AttemptLeftovers:
    """Chunk objects and open multipart uploads of attempt ``save_id`` (of one rank, if given)."""
    prefix = keys.step_prefix(job, kind, step)
    objects = [k for k in store.list(prefix) if _belongs(k, save_id, rank)]
    uploads = [u for u in store.incomplete_uploads(prefix) if _belongs(u.key, save_id, rank)]
    return AttemptLeftovers(objects, uploads)


def is_committed(store: ObjectStore, job: str, kind: str, step: int, save_id: str) -> bool:
    """True if the step's manifest names ``save_id`` (then its objects are live)."""
    key = keys.manifest_key(job, kind, step)
    try:
        manifest = decode_manifest(store.get(key), source=f"{store.url}/{key}")
    except ObjectNotFound:
        return False
    return manifest.save_id == save_id


def delete_attempt(store: ObjectStore, job: str, kind: str, step: int, save_id: str,
                   rank: int | None = None) -> AttemptLeftovers:
    """Delete the leftovers of a failed attempt; returns what was removed.

    Raises StorageError when storage cannot be listed or written (the caller logs it:
    leftovers are garbage, not damage).
    """
    if is_committed(store, job, kind, step, save_id):
        log.warning("%s/%s step %d: attempt %s is committed after all; nothing deleted", job, kind, step, save_id)
        return AttemptLeftovers([], [])
    found = find_leftovers(store, job, kind, step, save_id, rank)
    if found.uploads:
        store.abort_uploads(found.uploads)
    if found.objects:
        store.delete(found.objects)
    if found:
        log.info("%s/%s step %d: removed %d objects and %d open multipart uploads of failed attempt %s%s",
                 job, kind, step, len(found.objects), len(found.uploads), save_id,
                 "" if rank is None else f" rank {rank}")
    return found
