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
from concurrent.futures import Executor
from typing import Callable

from layervault.agent import keys
from layervault.agent.checksum import crc32c
from layervault.agent.codecs import CodecChain, choose_chain
from layervault.agent.staging import StagingPool
from layervault.agent.storage import ObjectStore
from layervault.dtypes import itemsize_of
from layervault.errors import InvalidArgumentError, LayervaultError, SaveFailedError
from layervault.proto import agent_pb2, common_pb2, manifest_pb2

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
    ) -> None:
        self.open = open_msg
        self.id = open_msg.id
        self.rank = open_msg.rank
        self.save_id = save_id
        self.pool = pool
        self.store = store
        self.executor = executor
        self.chunk_size = chunk_size
        self._on_done = on_done
        self.entries = [EntryState(spec) for spec in open_msg.entries]
        self._reservations: list[Reservation] = []
        self._pending_chunks = 0
        self._finished = False   # the rank sent Finish
        self._completed = False  # on_done was called
        self.error: LayervaultError | None = None
        self._cond = threading.Condition()
        self._chunk_counter = 0

    @property
    def label(self) -> str:
        return f"{self.id.job}/{self.id.kind}/step {self.id.step} rank {self.rank}"

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
            self._queue_piece(piece.entry, piece.entry_offset, piece.pool_offset, piece.length, reservation)
        with self._cond:
            self._seal_all_locked()

    def stage_data(self, data: agent_pb2.DataPiece, timeout: float | None) -> None:
        """Bytes that came over gRPC: copy them into pool memory, then treat them as a piece."""
        length = len(data.data)
        self._check_piece(data.entry, data.entry_offset, length)
        if length == 0:
            return
        offset, got = self.pool.allocate(length, min_bytes=length, timeout=timeout)
        reservation = Reservation(offset, got)
        with self._cond:
            self._reservations.append(reservation)
        self.pool.view[offset:offset + length] = data.data
        self._queue_piece(data.entry, data.entry_offset, offset, length, reservation)
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

    # -- internals ---------------------------------------------------------------------------

    def _reservation_of(self, offset: int, length: int) -> Reservation:
        with self._cond:
            for reservation in self._reservations:
                if reservation.offset <= offset and offset + length <= reservation.offset + reservation.length:
                    return reservation
        raise InvalidArgumentError(f"{self.label}: piece [{offset}, {offset + length}) is outside every reservation of this save")

    def _check_piece(self, entry: int, entry_offset: int, length: int) -> EntryState:
        if not 0 <= entry < len(self.entries):
            raise InvalidArgumentError(f"{self.label}: piece names entry #{entry}, but only {len(self.entries)} were opened")
        state = self.entries[entry]
        if entry_offset < 0 or length < 0 or entry_offset + length > state.spec.nbytes:
            raise InvalidArgumentError(
                f"{self.label}: piece [{entry_offset}, {entry_offset + length}) lies outside "
                f"entry {state.spec.name!r} of {state.spec.nbytes} bytes"
            )
        return state

    def _queue_piece(self, entry: int, entry_offset: int, pool_offset: int, length: int, reservation: Reservation) -> None:
        """Account for a piece now; cut and upload it on the executor, off the rank's critical path."""
        state = self._check_piece(entry, entry_offset, length)
        with self._cond:
            if self.error is not None:
                raise self.error
            state.ranges.append((entry_offset, length))
            state.staged += length
            reservation.pending += 1
            self._pending_chunks += 1
        self.executor.submit(self._plan_piece, state, entry_offset, pool_offset, length, reservation)

    def _plan_piece(self, state: EntryState, entry_offset: int, pool_offset: int, length: int, reservation: Reservation) -> None:
        try:
            with state.lock:  # one codec chain per shard, chosen from its first piece
                if state.chain is None:
                    sample = self.pool.view[pool_offset:pool_offset + min(length, 1 << 18)]
                    state.chain = choose_chain(sample, self.open.config.compressor or "lz4",
                                               itemsize_of(state.spec.layout.dtype))
            for start in range(0, length, self.chunk_size):
                n = min(self.chunk_size, length - start)
                with self._cond:
                    if self.error is not None:
                        break
                    reservation.pending += 1
                    self._pending_chunks += 1
                    index = self._chunk_counter
                    self._chunk_counter += 1
                self.executor.submit(self._upload_chunk, state, state.chain, entry_offset + start,
                                     pool_offset + start, n, index, reservation)
        finally:
            self._chunk_done(reservation)

    def _upload_chunk(self, state: EntryState, chain: list[str], entry_offset: int, pool_offset: int,
                      length: int, index: int, reservation: Reservation) -> None:
        try:
            if self.error is None:
                raw = self.pool.view[pool_offset:pool_offset + length]
                checksum = crc32c(raw)
                body = CodecChain(chain).encode(raw) if chain else raw
                key = keys.chunk_key(self.id.job, self.id.kind, self.id.step, state.spec.name, self.save_id, self.rank, index)
                self.store.put(key, body)
                ref = manifest_pb2.ChunkRef(key=key, raw_offset=entry_offset, raw_size=length,
                                            stored_size=len(body), crc32c=checksum)
                with self._cond:
                    state.chunks.append(ref)
                    state.stored += len(body)
        except Exception as exc:  # noqa: BLE001 - any failure fails the save, with its cause
            log.exception("%s: upload of layer %r failed", self.label, state.spec.name)
            with self._cond:
                if self.error is None:
                    self.error = SaveFailedError(f"{self.label}: upload of layer {state.spec.name!r} failed: {exc}")
        finally:
            self._chunk_done(reservation)

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
            records.append(manifest_pb2.ShardRecord(
                name=state.spec.name, layout=state.spec.layout, rank=self.rank,
                codec=state.chain or [], chunks=chunks, raw_bytes=state.spec.nbytes, stored_bytes=state.stored,
            ))
        return records
