"""Save journals: what a restarted agent needs to finish the uploads of a handed-off save.

A rank's hand-off ends when its bytes are in the agent's shared-memory pool; the uploads run
after that. If the agent process dies then (SIGKILL, OOM kill, crash), the pool file in
/dev/shm survives it, and so does the coordinator's pending attempt. The journal is the
rest: written when the hand-off finishes and *before* the rank is told it is done, it holds
the open message, the attempt id, the pool and where each staged piece lies in it.

    {state_dir}/{pool file}/{job}.{kind}.{step}.r{rank}.{save_id}.journal   the plan (JSON, one atomic rename per save)
    {state_dir}/{pool file}/{...}.durable                                  one JSON line per chunk made durable
    /dev/shm/layervault-hold-{pool id} -> {state_dir}/{pool file}          keeps the pool from remove_stale_pools

The durable-chunk log is what makes resuming safe, not just possible: the agent frees a
pool extent as soon as its chunks are durable, and a later hand-off may overwrite it. A
chunk is appended to the log *before* its extent can be freed, so on restart every chunk
is either in the log (skipped: its bytes may be gone) or still in the pool (uploaded
again under a fresh key). A save that fails drops its journal before freeing anything.

Nothing is fsync'd, on purpose: the journal only has to outlive the agent process, and
the kernel keeps written pages when a process dies. A kernel crash or reboot loses the
pool (tmpfs) anyway, and with it everything the journal could have resumed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import threading
from typing import Iterable, Iterator

from google.protobuf import json_format

from layervault.agent.staging import JOURNAL_SUFFIX, POOL_PREFIX, SHM_DIR, hold_path
from layervault.errors import LayervaultError
from layervault.proto import agent_pb2, manifest_pb2

log = logging.getLogger("layervault.agent")

FORMAT = "layervault-save-journal/1"
DURABLE_SUFFIX = ".durable"


class JournalError(LayervaultError):
    """A journal file that cannot be used: corrupt, truncated, or of another format version."""


def default_state_dir(socket_path: str) -> pathlib.Path:
    """Beside the agent's socket, named after it: two agents of one node never share one."""
    return pathlib.Path(socket_path).with_suffix(".state")


@dataclasses.dataclass(frozen=True)
class StagedPiece:
    """Bytes ``[entry_offset, entry_offset + length)`` of entry ``entry`` lie at ``pool_offset``;
    ``chunk_crc32c``: the rank's CRC32C of each chunk-size span, checked before each upload."""

    entry: int
    entry_offset: int
    pool_offset: int
    length: int
    chunk_crc32c: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class DurableChunk:
    """A chunk that is in storage, with the codec chain its entry uses."""

    entry: int
    chain: tuple[str, ...]
    ref: manifest_pb2.ChunkRef

    def encode(self) -> bytes:
        return (json.dumps({"entry": self.entry, "chain": list(self.chain),
                            "chunk": json_format.MessageToDict(self.ref)}, separators=(",", ":")) + "\n").encode()


@dataclasses.dataclass
class SaveJournal:
    """The plan of one handed-off save: enough to cut the same chunks from the same pool again."""

    open: agent_pb2.SaveOpen
    save_id: str
    pool_path: str
    pool_size: int
    chunk_size: int
    pieces: list[StagedPiece]
    generation: int = 0  # agents that resumed it so far; each uploads under fresh chunk indices
    auth_digest: str = ""  # SHA-256 of the rank's job token (never the token: see agent/auth.py token_digest)
    base_step: int = 0     # incremental saves: the base checkpoint unchanged chunks are referenced from
    base_save_id: str = ""

    @property
    def label(self) -> str:
        id_ = self.open.id
        return f"{id_.job}/{id_.kind}/step {id_.step} rank {self.open.rank} (attempt {self.save_id})"

    def chunk_count(self) -> int:
        """Chunks the pieces are cut into; the first agent numbers them ``[0, chunk_count)``."""
        return sum(-(-p.length // self.chunk_size) for p in self.pieces)

    def encode(self) -> bytes:
        return json.dumps({
            "format": FORMAT, "save_id": self.save_id, "generation": self.generation,
            "pool": {"path": self.pool_path, "size": self.pool_size}, "chunk_size": self.chunk_size,
            "pieces": [[p.entry, p.entry_offset, p.pool_offset, p.length, list(p.chunk_crc32c)] for p in self.pieces],
            "auth": self.auth_digest, "base": [self.base_step, self.base_save_id],
            "open": json_format.MessageToDict(self.open),
        }, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes, where: pathlib.Path) -> "SaveJournal":
        try:
            doc = json.loads(data)
        except ValueError as exc:
            raise JournalError(f"journal {where} is not JSON (truncated or corrupt): {exc}") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
            raise JournalError(f"journal {where} has format {found!r}; this agent reads {FORMAT!r}")
        try:
            journal = cls(
                open=json_format.ParseDict(doc["open"], agent_pb2.SaveOpen()),
                save_id=str(doc["save_id"]), pool_path=str(doc["pool"]["path"]), pool_size=int(doc["pool"]["size"]),
                chunk_size=int(doc["chunk_size"]), generation=int(doc["generation"]),
                pieces=[_staged_piece(p) for p in doc["pieces"]], auth_digest=str(doc.get("auth", "")),
                base_step=int(doc.get("base", [0, ""])[0]), base_save_id=str(doc.get("base", [0, ""])[1]),
            )
        except (KeyError, TypeError, ValueError, json_format.ParseError) as exc:
            raise JournalError(f"journal {where} is malformed: {type(exc).__name__}: {exc}") from None
        journal.check(where)
        return journal

    def check(self, where: pathlib.Path) -> None:
        """Refuse a plan whose pieces could never be cut from its pool and entries."""
        entries = self.open.entries
        if not self.save_id or self.chunk_size <= 0 or self.pool_size <= 0 or self.generation < 0:
            raise JournalError(f"journal {where} is malformed: empty attempt id or non-positive sizes")
        for p in self.pieces:
            if not (0 <= p.entry < len(entries) and p.length > 0 and 0 <= p.pool_offset
                    and p.pool_offset + p.length <= self.pool_size
                    and 0 <= p.entry_offset and p.entry_offset + p.length <= entries[p.entry].nbytes):
                raise JournalError(f"journal {where}: piece {dataclasses.astuple(p)[:4]} lies outside its pool or entry")
            if p.chunk_crc32c and len(p.chunk_crc32c) != -(-p.length // self.chunk_size):
                raise JournalError(f"journal {where}: piece {dataclasses.astuple(p)[:4]} has {len(p.chunk_crc32c)} "
                                   "chunk checksums for its chunks")
        covered = [0] * len(entries)
        for p in sorted(self.pieces, key=lambda p: (p.entry, p.entry_offset)):
            if p.entry_offset != covered[p.entry]:
                raise JournalError(f"journal {where}: entry {entries[p.entry].name!r} has overlapping pieces or a gap "
                                   f"at byte {covered[p.entry]}")
            covered[p.entry] += p.length
        short = [e.name for e, n in zip(entries, covered) if n != e.nbytes]
        if short:
            raise JournalError(f"journal {where}: entries {short[:5]} are not completely staged")


def _staged_piece(fields: list) -> StagedPiece:
    entry, entry_offset, pool_offset, length, *crcs = fields
    checksums = tuple(int(c) for c in crcs[0]) if crcs else ()
    return StagedPiece(int(entry), int(entry_offset), int(pool_offset), int(length), checksums)


def pending_pieces(journal: SaveJournal, durable: Iterable[DurableChunk]) -> list[StagedPiece]:
    """Pieces with at least one chunk not in storage yet: they (and only they) need the pool."""
    done = {(c.entry, c.ref.raw_offset) for c in durable}
    return [p for p in journal.pieces
            if any((p.entry, p.entry_offset + start) not in done for start in range(0, p.length, journal.chunk_size))]


def decode_durable(data: bytes, where: pathlib.Path) -> list[DurableChunk]:
    """The durable-chunk log; an unfinished last line (the agent died writing it) is ignored:
    the extent of that chunk was not freed yet, so it is simply uploaded again."""
    lines = data.split(b"\n")
    chunks = []
    for number, line in enumerate(lines, 1):
        if not line:
            continue
        try:
            doc = json.loads(line)
            chunks.append(DurableChunk(int(doc["entry"]), tuple(str(c) for c in doc["chain"]),
                                       json_format.ParseDict(doc["chunk"], manifest_pb2.ChunkRef())))
        except (KeyError, TypeError, ValueError, json_format.ParseError) as exc:
            if number == len(lines):  # no newline after it: cut short by the agent's death
                break
            raise JournalError(f"durable-chunk log {where}, line {number}, is corrupt: {exc}") from None
    return chunks


class JournalFile:
    """One save's journal on disk. Thread-safe: upload threads record chunks concurrently."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path
        self.durable_path = path.with_suffix(DURABLE_SUFFIX)
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._removed = False

    @property
    def active(self) -> bool:
        return self._fd is not None

    def start_log(self) -> bool:
        """Open (and empty) the durable-chunk log; False (logged) when it cannot be written."""
        with self._lock:
            try:
                self._fd = os.open(self.durable_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
            except OSError as exc:
                log.warning("cannot write save journal %s (this save will not survive an agent restart): %s",
                            self.durable_path, exc)
                return False
            return True

    def reopen_log(self) -> None:
        """Keep appending to the log of a journal written by an earlier agent process."""
        with self._lock:
            self._fd = os.open(self.durable_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def write(self, journal: SaveJournal, durable: Iterable[DurableChunk] = ()) -> bool:
        """Write the plan (atomically replacing an older one) and chunks already durable."""
        lines = b"".join(chunk.encode() for chunk in durable)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            with self._lock:
                if self._fd is None:
                    return False
                if lines:
                    os.write(self._fd, lines)
            tmp.write_bytes(journal.encode())
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("cannot write save journal %s (%s will not survive an agent restart): %s",
                        self.path, journal.label, exc)
            tmp.unlink(missing_ok=True)
            self.remove()
            return False
        return True

    def record(self, chunk: DurableChunk) -> None:
        """One more chunk is durable. Called before its pool extent can be freed."""
        with self._lock:
            if self._fd is None:
                return
            data = chunk.encode()
            try:
                written = os.write(self._fd, data)
                if written == len(data):
                    return
                error: object = f"short write ({written} of {len(data)} bytes)"
            except OSError as exc:
                error = exc
        # A chunk missing from the log would be uploaded again from memory that may hold
        # another save's bytes by then: without a complete log there must be no journal.
        log.warning("save journal %s dropped: recording a durable chunk failed: %s", self.path, error)
        self.remove()

    def remove(self) -> None:
        """The coordinator has the outcome (or the save failed): the journal is not needed any more."""
        with self._lock:
            if self._removed:
                return
            self._removed = True
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            self.path.unlink(missing_ok=True)
            self.durable_path.unlink(missing_ok=True)

    def read(self) -> tuple[SaveJournal, list[DurableChunk]]:
        """The plan and its durable chunks (raises JournalError)."""
        try:
            journal = SaveJournal.decode(self.path.read_bytes(), self.path)
            durable = decode_durable(self.durable_path.read_bytes(), self.durable_path) if self.durable_path.exists() else []
        except OSError as exc:
            raise JournalError(f"cannot read journal {self.path}: {exc}") from None
        for chunk in durable:
            if not 0 <= chunk.entry < len(journal.open.entries):
                raise JournalError(f"durable-chunk log {self.durable_path} names entry #{chunk.entry}, "
                                   f"but the save has {len(journal.open.entries)}")
        return journal, durable


class StateDir:
    """The agent's journal folder: one sub-folder per pool, held by a link beside the pool."""

    def __init__(self, root: pathlib.Path, shm_dir: pathlib.Path = SHM_DIR) -> None:
        self.root = root
        self.shm_dir = shm_dir
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._held: set[str] = set()
        self._lock = threading.Lock()

    def journal(self, pool_path: pathlib.Path, open_msg: agent_pb2.SaveOpen, save_id: str) -> JournalFile:
        """The journal file for one save's hand-off into ``pool_path`` (created on write)."""
        folder = self.root / pool_path.name
        with self._lock:
            if pool_path.name not in self._held:
                folder.mkdir(exist_ok=True, mode=0o700)
                link = hold_path(pool_path)
                link.unlink(missing_ok=True)
                link.symlink_to(folder.resolve())
                self._held.add(pool_path.name)
        id_ = open_msg.id
        name = f"{id_.job}.{id_.kind}.{id_.step:010d}.r{open_msg.rank}.{save_id}{JOURNAL_SUFFIX}"
        return JournalFile(folder / name)

    def pool_folders(self) -> Iterator[pathlib.Path]:
        """Folders of pools this agent (in an earlier process) journaled into."""
        for folder in sorted(self.root.iterdir()):
            if folder.is_dir() and folder.name.startswith(POOL_PREFIX):
                yield folder

    def pool_of(self, folder: pathlib.Path) -> pathlib.Path:
        return self.shm_dir / folder.name

    def release(self, pool_path: pathlib.Path) -> None:
        """This process is done with the pool's journals: drop its folder and hold link (not the
        pool itself), unless journals are left (the coordinator was unreachable when they were
        reported): the next agent start retries those."""
        folder = self.root / pool_path.name
        with self._lock:
            self._held.discard(pool_path.name)
            if folder.is_dir():
                for leftover in folder.iterdir():  # temporary files, and logs of journals never written
                    orphan = not leftover.with_suffix(JOURNAL_SUFFIX).exists()
                    if not leftover.name.endswith(JOURNAL_SUFFIX) and orphan:
                        leftover.unlink(missing_ok=True)
                try:
                    folder.rmdir()
                except OSError:
                    return
            hold_path(pool_path).unlink(missing_ok=True)
