"""The catalog: which checkpoints are committed, read straight from storage.

Storage is the only truth: a checkpoint exists iff its manifest object exists. The
coordinator keeps an in-memory cache of decoded manifests on top of this (rebuildable at
any time), and ``layervault show --storage URL`` uses the same code with no service running.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from typing import Callable, Iterator, Mapping

from layervault.agent import keys
from layervault.agent.manifest import Manifest, checkpoint_info, decode_manifest, matches
from layervault.agent.storage import ObjectNotFound, ObjectStore
from layervault.errors import InvalidArgumentError, ManifestError, NotFoundError
from layervault.proto import common_pb2

log = logging.getLogger("layervault.catalog")


@dataclasses.dataclass(frozen=True)
class Listing:
    """A catalog listing: the readable checkpoints, and the manifests that are stored but
    cannot be read (reported apart: one damaged manifest must neither hide the others nor
    pass for a sound checkpoint)."""

    checkpoints: list[tuple[str, Manifest]]                  # (manifest key, manifest), by job, kind, step
    damaged: list[common_pb2.DamagedManifest] = dataclasses.field(default_factory=list)

    def reply(self, visible: Callable[[str], bool] = lambda job: True) -> common_pb2.ListReply:
        """The List RPC's answer, with only the jobs ``visible`` admits."""
        return common_pb2.ListReply(checkpoints=[checkpoint_info(m, k) for k, m in self.checkpoints if visible(m.job)],
                                    damaged=[d for d in self.damaged if visible(d.id.job)])


class Catalog:
    """Lists and resolves committed checkpoints of a store; caches manifests (immutable once written)."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        self._cache: dict[str, Manifest] = {}
        self._lock = threading.Lock()

    def manifest_keys(self, job: str = "", kind: str = "") -> Iterator[tuple[str, str, int, str]]:
        """(job, kind, step, key) of every committed checkpoint, optionally of one job/kind."""
        prefix = keys.kind_prefix(job, kind) if job and kind else (f"{keys.check_job(job)}/" if job else "")
        for key in self.store.list(prefix):
            parsed = keys.parse_manifest_key(key)
            if parsed and (not kind or parsed[1] == kind):
                yield (*parsed, key)

    def manifest(self, key: str) -> Manifest:
        with self._lock:
            cached = self._cache.get(key)
        if cached is not None:
            return cached
        try:
            manifest = decode_manifest(self.store.get(key), source=f"{self.store.url}/{key}")
        except ObjectNotFound as exc:
            raise NotFoundError(f"no manifest at {self.store.url}/{key}") from exc
        named = keys.parse_manifest_key(key)
        if named is not None and named != (manifest.job, manifest.kind, manifest.step):
            # A manifest copied or edited into another checkpoint's place must not pass for that checkpoint.
            raise ManifestError(f"{self.store.url}/{key}: records {manifest.job}/{manifest.kind} step {manifest.step}, "
                                f"not the checkpoint its key names")
        with self._lock:
            self._cache[key] = manifest
        return manifest

    def forget(self, key: str) -> None:
        with self._lock:
            self._cache.pop(key, None)

    def checkpoints(self, job: str = "", kind: str = "") -> Listing:
        """Every committed checkpoint (of one job/kind), sorted by job, kind, step."""
        listing = Listing([])
        for job_, kind_, step, key in sorted(self.manifest_keys(job, kind)):
            try:
                listing.checkpoints.append((key, self.manifest(key)))
            except NotFoundError:
                continue  # deleted since the listing (rm, gc, retention)
            except ManifestError as exc:
                log.warning("damaged manifest: %s", exc)
                listing.damaged.append(common_pb2.DamagedManifest(
                    id=common_pb2.CheckpointId(job=job_, kind=kind_, step=step), key=key, problem=str(exc)))
        return listing

    def resolve(self, job: str, kind: str, selector: Mapping[str, str]) -> tuple[str, Manifest]:
        """The newest committed checkpoint whose training keys match ``selector``."""
        keys.check_job(job)
        keys.check_kind(kind)
        for name, text in selector.items():
            try:
                json.loads(text)
            except ValueError:
                raise InvalidArgumentError(f"selector {name}={text!r} is not a JSON scalar") from None
        if "step" in selector and not selector["step"].isdigit():
            raise InvalidArgumentError(f"selector step={selector['step']!r} is not a non-negative integer")
        if set(selector) == {"step"}:  # direct hit, no listing needed
            key = keys.manifest_key(job, kind, int(selector["step"]))
            if self.store.exists(key):
                return key, self.manifest(key)
            raise NotFoundError(f"no committed {kind} checkpoint of job {job!r} with step={selector['step']}")
        candidates = sorted(self.manifest_keys(job, kind), key=lambda item: item[2], reverse=True)
        if not candidates:
            raise NotFoundError(f"job {job!r} has no committed {kind} checkpoint")
        for _, _, _, key in candidates:
            manifest = self.manifest(key)
            if matches(manifest.keys, selector):
                return key, manifest
        wanted = ", ".join(f"{k}={v}" for k, v in sorted(selector.items()))
        raise NotFoundError(f"no committed {kind} checkpoint of job {job!r} with {wanted}")
