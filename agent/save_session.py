"""One rank's part of one save, inside the agent: staged pieces -> chunks -> durable objects.

The rank's bytes arrive in the staging pool (shared memory, or copied there from gRPC
Data messages). Each piece is cut into chunks of at most ``chunk_size`` bytes; every
chunk is checksummed, encoded with its layer's codec chain and PUT by the shared upload
executor, and its pool memory is freed as soon as its reservation has no pending chunk.
When the rank has finished its hand-off and every chunk is durable, the session holds the
rank's ShardRecords, ready to be reported to the coordinator.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from concurrent.futures import Executor
from typing import Callable

from layervault.agent import keys
from layervault.agent.checksum import crc32c
from layervault.agent.handoff_gate import HandoffGate
from layervault.stream_frames import DataFrame
from layervault.agent.codecs import CodecChain, StoreRates, choose_chain
from layervault.agent.incremental import DIGEST_ALGORITHM, ReuseIndex, chunk_digest, shard_digest
from layervault.agent.journal import DurableChunk, JournalFile, SaveJournal, StagedPiece, pending_pieces
from layervault.agent.manifest import check_json_map
from layervault.config import COMPRESSORS
from layervault.agent.metrics import AgentMetrics
from layervault.agent.staging import StagingPool
from layervault.agent.storage import ObjectStore
from layervault.dtypes import itemsize_of
from layervault.errors import ChecksumError, InvalidArgumentError, LayervaultError, SaveFailedError
from layervault.proto import agent_pb2, manifest_pb2

log = logging.getLogger("layervault.agent")


@dataclasses.dataclass
class Reservation:
    """A pool extent handed to the rank; freed when all chunks staged in it are durable."""

    offset: int
    length: int
    pending: int = 0
    sealed: bool = False  # no more pieces will be staged into it


@dataclasses.dataclass
class EntryState:
    spec: agent_pb2.EntrySpec
    chain: list[str] | None = None
    chunks: list[manifest_pb2.ChunkRef] = dataclasses.field(default_factory=list)
    ranges: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # (offset, length) handed off
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    staged: int = 0
    stored: int = 0
    base: manifest_pb2.ShardRecord | None = None  # incremental: the base's shard of the same identity
    reused: int = 0                               # raw bytes referenced from the base, not uploaded
    index: int = 0                                # position in the open message


def validate_open(open_msg: agent_pb2.SaveOpen) -> None:
    """Refuse a save whose declared entries can never be valid, before anything is staged."""
    id_ = open_msg.id
    keys.step_prefix(id_.job, id_.kind, id_.step)
    label = f"{id_.job}/{id_.kind}/step {id_.step} rank {open_msg.rank}"
    if open_msg.world_size < 1 or not 0 <= open_msg.rank < open_msg.world_size:
        raise InvalidArgumentError(f"{label}: rank {open_msg.rank} is not within world size {open_msg.world_size}")
    seen = set()
    for spec in open_msg.entries:
        keys.layer_segment(spec.name)
        layout = spec.layout
        where = (spec.name, tuple(layout.offsets))
        if where in seen:
            raise InvalidArgumentError(f"{label}: duplicate entry {spec.name!r} at offsets {list(layout.offsets)}")
        seen.add(where)
        shape = list(layout.local_shape)
        if any(d < 0 for d in shape) or any(d < 0 for d in layout.global_shape):
            raise InvalidArgumentError(f"{label}: entry {spec.name!r} has a negative dimension")
        if len(layout.offsets) != len(shape) or len(layout.global_shape) != len(shape) or any(
                o < 0 or o + d > g for o, d, g in zip(layout.offsets, shape, layout.global_shape)):
            raise InvalidArgumentError(f"{label}: entry {spec.name!r}: shard {shape} at {list(layout.offsets)} "
                                       f"does not fit in global shape {list(layout.global_shape)}")
        expected = itemsize_of(layout.dtype)
        for d in shape:
            expected *= d
        if spec.nbytes != expected:
            raise InvalidArgumentError(
                f"{label}: entry {spec.name!r} declares {spec.nbytes} bytes, but {layout.dtype}{shape} holds {expected}")
    compressor = open_msg.config.compressor
    if compressor and compressor not in COMPRESSORS:
        raise InvalidArgumentError(f"{label}: unknown compressor {compressor!r}; choose one of {', '.join(COMPRESSORS)}")
    # Training keys land in the manifest, where every reader parses them as JSON scalars.
    try:
        check_json_map(open_msg.keys, "training key")
    except InvalidArgumentError as exc:
        raise InvalidArgumentError(f"{label}: {exc}") from None


class SaveSession:
    """State of one (checkpoint, rank) save in this agent."""

    def __init__(
        self,
        open_msg: agent_pb2.SaveOpen,
        save_id: str,
        pool: StagingPool,
        store: ObjectStore,
        executor: Executor,
        chunk_size: int,
        on_done: Callable[["SaveSession"], None],
        metrics: AgentMetrics | None = None,
        journal: JournalFile | None = None,
        reuse: ReuseIndex | None = None,
        gate: HandoffGate | None = None,
        rates: StoreRates = StoreRates(),
        auth_digest: str = "",
    ) -> None:
        """``rates``: what a stored byte costs, weighed against codec time (see :mod:`.codecs.select`).
        ``auth_digest``: the digest of the rank's job token, journaled so that a restarted agent
        can report for the rank again (see :func:`layervault.agent.auth.token_digest`)."""
        self.open = open_msg
        self.id = open_msg.id
        self.rank = open_msg.rank
        self.save_id = save_id
        self.pool = pool
        self.store = store
        self.executor = executor
        self.chunk_size = chunk_size
        self.rates = rates
        self.gate = gate  # uploads defer to ranks still handing off (agent/handoff_gate.py)
        self._on_done = on_done
        self.entries = [EntryState(spec) for spec in open_msg.entries]
        # Incremental mode: digest every chunk; reference the base's chunks that match.
        self.reuse = reuse if reuse is not None else (ReuseIndex() if open_msg.incremental else None)
        if self.reuse is not None:
            for state in self.entries:
                state.base = self.reuse.shard(state.spec)
        self._reservations: list[Reservation] = []
        self._pending_chunks = 0
        self._finished = False   # the rank sent Finish
        self._completed = False  # on_done was called
        self.error: LayervaultError | None = None
        self._cond = threading.Condition()
        self._chunk_counter = 0
        self.metrics = metrics
        self.log = logging.LoggerAdapter(log, self.log_fields)
        for index, state in enumerate(self.entries):
            state.index = index
        # Resume after an agent restart (agent/journal.py): where the pieces lie, which chunks are durable.
        self.journal = journal
        self.auth_digest = auth_digest
        self._pieces: list[StagedPiece] = []
        self._durable_offsets: set[tuple[int, int]] = set()  # (entry, raw_offset) already in storage

    @property
    def label(self) -> str:
        return f"{self.id.job}/{self.id.kind}/step {self.id.step} rank {self.rank}"

    @property
    def log_fields(self) -> dict[str, object]:
        """The save's context for structured log lines (see :mod:`layervault.agent.logs`)."""
        return {"job": self.id.job, "kind": self.id.kind, "step": self.id.step, "rank": self.rank, "save_id": self.save_id}

    @property
    def pending_chunks(self) -> int:
        """Staged pieces and chunks not yet durable: this session's part of the upload queue."""
        return self._pending_chunks

    # -- hand-off ---------------------------------------------------------------------------

    def reserve(self, nbytes: int, timeout: float | None) -> tuple[int, int]:
        offset, length = self.pool.allocate(nbytes, min_bytes=self.chunk_size, timeout=timeout)
        with self._cond:
            self._reservations.append(Reservation(offset, length))
        return offset, length

    def stage(self, pieces: list[agent_pb2.Piece]) -> None:
        """Pieces the rank copied into the reservations granted so far: queue their chunks.

        A Stage message closes every reservation granted before it: their unused rest and,
        once their chunks are durable, their used part go back to the pool.
        """
        for piece in pieces:
            reservation = self._reservation_of(piece.pool_offset, piece.length)
            self._queue_piece(piece.entry, piece.entry_offset, piece.pool_offset, piece.length, reservation,
                              tuple(piece.chunk_crc32c))
        with self._cond:
            self._seal_all_locked()

    def stage_data(self, data: agent_pb2.DataPiece | DataFrame, timeout: float | None) -> None:
        """Bytes that came over gRPC: copy them into pool memory, then treat them as a piece."""
        length = len(data.data)
        crcs = tuple(data.chunk_crc32c)
        self._check_piece(data.entry, data.entry_offset, length, crcs)
        if length == 0:
            return
        offset, got = self.pool.allocate(length, min_bytes=length, timeout=timeout)
        reservation = Reservation(offset, got)
        with self._cond:
            self._reservations.append(reservation)
        self.pool.view[offset:offset + length] = data.data
        self._queue_piece(data.entry, data.entry_offset, offset, length, reservation, crcs)
        self._seal(reservation)

    def finish(self) -> int:
        """The rank's hand-off is complete: check every byte arrived; returns staged bytes."""
        for e in self.entries:
            position = 0
            for offset, length in sorted(e.ranges):
                if offset != position:
                    what = "overlapping pieces" if offset < position else f"a gap at byte {position}"
                    raise InvalidArgumentError(f"{self.label}: entry {e.spec.name!r} was handed off with {what}")
                position += length
        missing = [e.spec.name for e in self.entries if e.staged != e.spec.nbytes]
        if missing:
            raise InvalidArgumentError(
                f"{self.label}: hand-off finished with incomplete entries: {', '.join(missing[:5])}"
                + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            )
        self._write_journal()
        with self._cond:
            self._seal_all_locked()
            self._finished = True
        self._maybe_complete()
        return sum(e.staged for e in self.entries)

    def abort(self, reason: str) -> None:
        """Stop the save: pending chunks are not uploaded, memory is freed as they drain."""
        with self._cond:
            if self.error is None:
                self.error = SaveFailedError(f"{self.label}: {reason}")
            self._finished = True
            self._seal_all_locked()
        self._maybe_complete()

    # -- journal: resuming after an agent restart (see agent/journal.py) ---------------------------

    def _write_journal(self) -> None:
        """Record the finished hand-off, before the rank hears it is done (no-op without a journal)."""
        if self.journal is None or self.journal.active:
            return
        with self._cond:  # chunks durable before this are in the snapshot, those after it are logged
            if self.error is not None or not self.journal.start_log():
                return
            durable = [DurableChunk(s.index, tuple(s.chain or ()), ref) for s in self.entries for ref in s.chunks]
            pieces = list(self._pieces)
        base = self.reuse.base if self.reuse is not None else None
        self.journal.write(SaveJournal(self.open, self.save_id, str(self.pool.path), self.pool.size,
                                       self.chunk_size, pieces, auth_digest=self.auth_digest,
                                       base_step=base.step if base is not None else 0,
                                       base_save_id=base.save_id if base is not None else ""), durable)

    def resume(self, plan: SaveJournal, durable: list[DurableChunk]) -> int:
        """Finish a save that an earlier agent process journaled: keep its durable chunks, cut the
        rest from its pool (``self.pool``) under chunk indices no earlier process used.
        Returns the number of pieces that still had chunks to upload."""
        for chunk in durable:
            where = (chunk.entry, chunk.ref.raw_offset)
            if where not in self._durable_offsets:
                self._durable_offsets.add(where)
                state = self.entries[chunk.entry]
                state.chain = list(chunk.chain)
                state.chunks.append(chunk.ref)
                state.stored += chunk.ref.stored_size
        self._chunk_counter = plan.generation * plan.chunk_count()
        todo = pending_pieces(plan, durable)
        for piece in plan.pieces:
            state = self.entries[piece.entry]
            with self._cond:
                state.ranges.append((piece.entry_offset, piece.length))
                state.staged += piece.length
                self._pieces.append(piece)
        for piece in todo:
            reservation = Reservation(piece.pool_offset, piece.length, pending=1, sealed=True)
            with self._cond:
                self._reservations.append(reservation)
                self._pending_chunks += 1
            self.executor.submit(self._plan_piece, self.entries[piece.entry], piece.entry_offset, piece.pool_offset,
                                 piece.length, reservation, piece.chunk_crc32c)
        self.finish()
        return len(todo)

    def close_journal(self) -> None:
        """The coordinator has this rank's outcome: the save never needs resuming."""
        if self.journal is not None:
            self.journal.remove()

    # -- internals ---------------------------------------------------------------------------

    def _reservation_of(self, offset: int, length: int) -> Reservation:
        # Only open reservations: a sealed one may be freed (and handed to another rank) the
        # moment its last chunk is durable, so whether a late piece still found it would be a race.
        with self._cond:
            for reservation in self._reservations:
                if (not reservation.sealed and reservation.offset <= offset
                        and offset + length <= reservation.offset + reservation.length):
                    return reservation
        raise InvalidArgumentError(f"{self.label}: piece [{offset}, {offset + length}) is outside every reservation "
                                   "of this save still open (a Stage closes the reservations granted before it)")

    def _check_piece(self, entry: int, entry_offset: int, length: int, crcs: tuple[int, ...]) -> EntryState:
        if not 0 <= entry < len(self.entries):
            raise InvalidArgumentError(f"{self.label}: piece names entry #{entry}, but only {len(self.entries)} were opened")
        state = self.entries[entry]
        if entry_offset < 0 or length < 0 or entry_offset + length > state.spec.nbytes:
            raise InvalidArgumentError(
                f"{self.label}: piece [{entry_offset}, {entry_offset + length}) lies outside "
                f"entry {state.spec.name!r} of {state.spec.nbytes} bytes"
            )
        chunks = -(-length // self.chunk_size)
        if len(crcs) != chunks:
            raise InvalidArgumentError(
                f"{self.label}: piece [{entry_offset}, {entry_offset + length}) of entry {state.spec.name!r} carries "
                f"{len(crcs)} chunk checksums, expected {chunks} (the CRC32C of each {self.chunk_size}-byte span)")
        return state

    def _queue_piece(self, entry: int, entry_offset: int, pool_offset: int, length: int, reservation: Reservation,
                     crcs: tuple[int, ...]) -> None:
        """Account for a piece now; cut and upload it on the executor, off the rank's critical path."""
        state = self._check_piece(entry, entry_offset, length, crcs)
        with self._cond:
            if self.error is not None:
                raise self.error
            state.ranges.append((entry_offset, length))
            state.staged += length
            self._pieces.append(StagedPiece(entry, entry_offset, pool_offset, length, crcs))
            reservation.pending += 1
            self._pending_chunks += 1
        if self.metrics is not None:
            self.metrics.received_bytes.inc(length)
        self.executor.submit(self._plan_piece, state, entry_offset, pool_offset, length, reservation, crcs)

    def _plan_piece(self, state: EntryState, entry_offset: int, pool_offset: int, length: int, reservation: Reservation,
                    crcs: tuple[int, ...]) -> None:
        try:
            self._defer_to_handoffs()  # choosing the codec samples the bytes: upload work, not hand-off work
            with state.lock:  # one codec chain per shard, chosen from its first piece
                if state.chain is None and state.base is not None:
                    state.chain = list(state.base.codec)  # reused chunks are stored with it
                if state.chain is None:
                    sample = self.pool.view[pool_offset:pool_offset + min(length, 1 << 18)]
                    state.chain = choose_chain(sample, self.open.config.compressor or "lz4",
                                               itemsize_of(state.spec.layout.dtype), self.rates)
            for start in range(0, length, self.chunk_size):
                if (state.index, entry_offset + start) in self._durable_offsets:
                    continue  # uploaded before the agent restarted
                n = min(self.chunk_size, length - start)
                with self._cond:
                    if self.error is not None:
                        break
                    reservation.pending += 1
                    self._pending_chunks += 1
                    index = self._chunk_counter
                    self._chunk_counter += 1
                try:
                    expected = crcs[start // self.chunk_size] if crcs else None  # None: journaled by an older agent
                    self.executor.submit(self._upload_chunk, state, state.chain, entry_offset + start,
                                         pool_offset + start, n, index, reservation, expected)
                except BaseException:
                    self._chunk_done(reservation)  # the chunk counted above will never run
                    raise
        except Exception as exc:  # noqa: BLE001 - nobody reads this future: an error must fail the save, not vanish
            log.exception("%s: planning the chunks of layer %r failed", self.label, state.spec.name)
            self._fail(SaveFailedError(f"{self.label}: layer {state.spec.name!r} could not be chunked: {exc}"))
        finally:
            self._chunk_done(reservation)

    def _upload_chunk(self, state: EntryState, chain: list[str], entry_offset: int, pool_offset: int,
                      length: int, index: int, reservation: Reservation, expected_crc: int | None) -> None:
        try:
            self._defer_to_handoffs()
            if self.error is None:
                raw = self.pool.view[pool_offset:pool_offset + length]
                checksum = crc32c(raw)
                if expected_crc is not None and checksum != expected_crc:
                    self._fail(ChecksumError(
                        f"{self.label}: bytes [{entry_offset}, {entry_offset + length}) of layer {state.spec.name!r} "
                        f"changed after rank {self.rank} staged them (crc32c {checksum:#010x}, the rank computed "
                        f"{expected_crc:#010x}); nothing of this save is uploaded past this point, it does not commit"))
                    return
                digest = chunk_digest(raw) if self.reuse is not None else b""
                same = self.reuse.chunk(state.base, entry_offset, length, digest) if state.base is not None else None
                if same is not None:  # unchanged since the base: reference its object
                    with self._cond:
                        state.chunks.append(manifest_pb2.ChunkRef(
                            key=same.key, raw_offset=entry_offset, raw_size=length, stored_size=same.stored_size,
                            crc32c=same.crc32c, digest=digest))
                        state.stored += same.stored_size
                        state.reused += length
                    return
                body = CodecChain(chain).encode(raw) if chain else raw
                key = keys.chunk_key(self.id.job, self.id.kind, self.id.step, state.spec.name, self.save_id, self.rank, index)
                started = time.perf_counter()
                self.store.put(key, body)
                if self.metrics is not None:
                    self.metrics.chunk_stored(chain, length, len(body), time.perf_counter() - started)
                ref = manifest_pb2.ChunkRef(key=key, raw_offset=entry_offset, raw_size=length,
                                            stored_size=len(body), crc32c=checksum, digest=digest)
                with self._cond:
                    state.chunks.append(ref)
                    state.stored += len(body)
                    journal = self.journal if self.journal is not None and self.journal.active else None
                if journal is not None:  # before _chunk_done can free the extent
                    journal.record(DurableChunk(state.index, tuple(chain), ref))
        except Exception as exc:  # noqa: BLE001 - any failure fails the save, with its cause
            self.log.exception("%s: upload of layer %r failed", self.label, state.spec.name)
            self._fail(SaveFailedError(f"{self.label}: upload of layer {state.spec.name!r} failed: {exc}"))
        finally:
            self._chunk_done(reservation)

    def _fail(self, error: LayervaultError) -> None:
        """The save cannot commit; the first error is the one reported."""
        with self._cond:
            if self.error is None:
                self.error = error
        if isinstance(error, ChecksumError):
            self.log.error("%s", error)

    def _defer_to_handoffs(self) -> None:
        """Upload work waits while ranks hand off (agent/handoff_gate.py), and the wait is counted."""
        if self.gate is None:
            return
        deferred = self.gate.yield_to_handoffs()
        if deferred and self.metrics is not None:
            self.metrics.upload_deferred.inc(deferred)

    def _chunk_done(self, reservation: Reservation) -> None:
        with self._cond:
            reservation.pending -= 1
            self._pending_chunks -= 1
            self._release_idle_reservations()
        self._maybe_complete()

    def _seal(self, reservation: Reservation) -> None:
        with self._cond:
            reservation.sealed = True
            self._release_idle_reservations()

    def _seal_all_locked(self) -> None:
        for reservation in self._reservations:
            reservation.sealed = True
        self._release_idle_reservations()

    def _release_idle_reservations(self) -> None:
        # caller holds self._cond
        if self.error is not None and self.journal is not None:
            self.journal.remove()  # a failed save frees extents whose chunks are not durable: never resume it
        keep = []
        for reservation in self._reservations:
            if reservation.sealed and reservation.pending == 0:
                self.pool.free(reservation.offset, reservation.length)
            else:
                keep.append(reservation)
        self._reservations = keep

    def _maybe_complete(self) -> None:
        with self._cond:
            if self._completed or not self._finished or self._pending_chunks:
                return
            self._completed = True
            self._cond.notify_all()
        self._on_done(self)

    def wait_durable(self, timeout: float | None) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._completed, timeout)

    def shard_records(self) -> list[manifest_pb2.ShardRecord]:
        records = []
        for state in self.entries:
            chunks = sorted(state.chunks, key=lambda c: c.raw_offset)
            record = manifest_pb2.ShardRecord(
                name=state.spec.name, layout=state.spec.layout, rank=self.rank,
                codec=state.chain or [], chunks=chunks, raw_bytes=state.spec.nbytes, stored_bytes=state.stored,
            )
            if self.reuse is not None:
                record.digest_algorithm = DIGEST_ALGORITHM
                record.digest = shard_digest(chunks)
            records.append(record)
        return records
