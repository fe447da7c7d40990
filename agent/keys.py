"""Object keys: where every byte of a checkpoint lives in the store.

    {job}/{kind}/{step:010d}/layers/{layer}/{save_id}.r{rank}.c{chunk:05d}   chunk objects
    {job}/{kind}/manifests/{step:010d}.json                                   the commit
    {job}/{kind}/latest                                                       pointer (a hint)

Objects are grouped by layer so one layer can be fetched without the rest. Manifests sit in
their own folder so listing a job's checkpoints never walks its chunk objects. Chunk keys
carry the save attempt id: a retried or overwriting save never touches the objects a
committed manifest refers to.

Job names are restricted to a safe alphabet; layer names are arbitrary Unicode and are
percent-encoded into exactly one key segment, so no name can escape its folder.
"""

from __future__ import annotations

import hashlib
import re
import urllib.parse

from layervault.errors import InvalidArgumentError

KINDS = ("model", "optimizer")
_JOB_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_MAX_SEGMENT = 200


def check_job(job: str) -> str:
    if not isinstance(job, str) or not _JOB_RE.fullmatch(job) or ".." in job:
        raise InvalidArgumentError(
            f"invalid job name {job!r}: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return job


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise InvalidArgumentError(f"invalid checkpoint kind {kind!r}: expected one of {', '.join(KINDS)}")
    return kind


def check_step(step: int) -> int:
    if not isinstance(step, int) or isinstance(step, bool) or step < 0 or step >= 10**18:
        raise InvalidArgumentError(f"invalid step {step!r}: expected an integer in [0, 1e18)")
    return step


def layer_segment(name: str) -> str:
    """One key segment for a layer name: percent-encoded, never '.', '..' or over-long.

    Only ``[A-Za-z0-9_.-]`` and ``%XX`` escapes appear, plus one ``~`` before the digest of
    a name too long to encode whole; ``~`` itself and a leading ``.`` are escaped, so the
    segment is never hidden (``.tmp-*`` is the local store's temporary-file form) and a
    short name can never spell another name's hashed segment.
    """
    if not isinstance(name, str) or not name:
        raise InvalidArgumentError(f"invalid layer name {name!r}: must be a non-empty string")
    try:
        raw = name.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgumentError(f"invalid layer name {name!r}: not valid Unicode (lone surrogate)") from None
    seg = urllib.parse.quote(raw, safe="").replace("~", "%7E")
    if seg.startswith("."):
        seg = "%2E" + seg[1:]
    if len(seg) > _MAX_SEGMENT:
        digest = hashlib.sha256(raw).hexdigest()[:16]
        head = seg[:_MAX_SEGMENT - 18]
        cut = head.rfind("%", len(head) - 2)
        seg = (head[:cut] if cut >= 0 else head) + "~" + digest  # never a broken %XX escape
    return seg


def layer_name_of_segment(segment: str) -> str | None:
    """The layer name a :func:`layer_segment` encodes; None for a hashed (over-long) name,
    which only the manifest records. For people and tools reading storage listings."""
    if "~" in segment:
        return None
    return urllib.parse.unquote(segment, errors="strict")


def kind_prefix(job: str, kind: str) -> str:
    return f"{check_job(job)}/{check_kind(kind)}/"


def step_prefix(job: str, kind: str, step: int) -> str:
    return f"{kind_prefix(job, kind)}{check_step(step):010d}/"


def manifests_prefix(job: str, kind: str) -> str:
    return f"{kind_prefix(job, kind)}manifests/"


def manifest_key(job: str, kind: str, step: int) -> str:
    return f"{manifests_prefix(job, kind)}{check_step(step):010d}.json"


def latest_key(job: str, kind: str) -> str:
    return f"{kind_prefix(job, kind)}latest"


def chunk_key(job: str, kind: str, step: int, layer: str, save_id: str, rank: int, chunk: int) -> str:
    return f"{step_prefix(job, kind, step)}layers/{layer_segment(layer)}/{save_id}.r{rank}.c{chunk:05d}"


def parse_manifest_key(key: str) -> tuple[str, str, int] | None:
    """(job, kind, step) for a manifest key, None for any other key."""
    parts = key.split("/")
    if len(parts) != 4 or parts[2] != "manifests" or not parts[3].endswith(".json"):
        return None
    stem = parts[3][: -len(".json")]
    if not stem.isdigit() or parts[1] not in KINDS:
        return None
    return parts[0], parts[1], int(stem)


def parse_chunk_key(key: str) -> tuple[str, str, int, str] | None:
    """(job, kind, step, save_id) for a chunk object key, None for any other key."""
    parts = key.split("/")
    if len(parts) != 6 or parts[1] not in KINDS or parts[3] != "layers" or not parts[2].isdigit():
        return None
    save_id, dot, rest = parts[5].partition(".")
    if not dot or not rest.startswith("r"):
        return None
    return parts[0], parts[1], int(parts[2]), save_id
