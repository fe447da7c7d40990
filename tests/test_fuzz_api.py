"""Generated Save and Restore streams on the raw gRPC API of a real agent and coordinator.

Each Save stream comes from a small grammar: a valid hand-off (entries of any dtype and
shape, possibly shards of a larger tensor, bytes cut into pieces sent in any order, over
gRPC or through the shared-memory pool) with at most one corruption applied. A valid stream
must commit and read back bit-identical under its (arbitrary Unicode) layer names; a
corrupted one must end with its own specific status and a message. After every stream the
agent still answers, has freed its staging memory, and a checkpoint committed before the
fuzzing is byte-for-byte unchanged.
"""

from __future__ import annotations

import dataclasses
import itertools
import queue
import time
import uuid
from collections.abc import Callable
from typing import Any

import grpc
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import layervault as lv
from layervault.agent import keys
from layervault.agent.checksum import crc32c
from layervault.agent.staging import map_pool
from layervault.client import AgentClient
from layervault.dtypes import ITEMSIZE
from layervault.proto import agent_pb2, agent_pb2_grpc, common_pb2, manifest_pb2
from layervault.torch import ModelManager

from fuzzing import any_char, fuzz_settings, hostile_text, layer_names
from s3server import remove_bucket
from services import InProcessServices, start_in_process

OK = grpc.StatusCode.OK
CHUNK = 4096  # the harness agent's chunk size
INVALID = grpc.StatusCode.INVALID_ARGUMENT
SAFE_JOB, FUZZ_JOB, SAFE_STEP = "safe", "fuzz", 1
INT64_MAX = 2**63 - 1
SETTLE_S = 30.0  # bound on waiting for uploads to drain after a stream; never a timing assertion


# -- the agent under test ----------------------------------------------------------------------


@dataclasses.dataclass
class Harness:
    """Running services, a raw stub, the agent's pool as a rank maps it, and the untouchable checkpoint."""

    services: InProcessServices
    channel: grpc.Channel
    stub: agent_pb2_grpc.AgentStub
    pool_view: memoryview
    mm: ModelManager
    safe_state: dict[str, torch.Tensor]
    safe_manifest: bytes
    steps: itertools.count

    def assert_unharmed(self) -> None:
        """The agent answers, holds no staging memory or session any more, and the safe checkpoint is intact."""
        stats = self._settled_stats()
        assert stats.pool_in_use == 0 and stats.saves_in_flight == 0, stats
        listed = self.stub.List(common_pb2.ListRequest(job=SAFE_JOB), timeout=30).checkpoints
        assert [(c.id.kind, c.id.step) for c in listed] == [("model", SAFE_STEP)]
        assert self.services.store.get(keys.manifest_key(SAFE_JOB, "model", SAFE_STEP)) == self.safe_manifest

    def assert_safe_checkpoint_loads(self) -> None:
        target = {name: torch.zeros_like(t) for name, t in self.safe_state.items()}
        self.mm.load(target, step=SAFE_STEP)
        for name, tensor in self.safe_state.items():
            assert torch.equal(target[name], tensor), name

    def _settled_stats(self) -> agent_pb2.AgentStats:
        """Stats once a failed stream's uploads have drained (bounded wait, not a timing assertion)."""
        deadline = time.monotonic() + SETTLE_S
        stats = self.stub.Stats(common_pb2.Empty(), timeout=30)
        while (stats.pool_in_use or stats.saves_in_flight) and time.monotonic() < deadline:
            time.sleep(0.01)
            stats = self.stub.Stats(common_pb2.Empty(), timeout=30)
        return stats


def start_harness(store_url: str) -> Harness:
    services = start_in_process(store_url, staging_bytes=16 << 20, chunk_size=CHUNK)
    client = AgentClient(services.agent_address)
    mm = ModelManager(lv.ModelConfig(job=SAFE_JOB, name="m"), agent=client)
    safe_state = {"w": torch.arange(3000, dtype=torch.float32),               # 3 chunks
                  "層/../b": torch.randn(3, 5).to(torch.bfloat16),
                  "i": torch.arange(7, dtype=torch.int64)}
    mm.save(safe_state, step=SAFE_STEP).wait(60)
    channel = grpc.insecure_channel(services.agent.tcp_address)
    stub = agent_pb2_grpc.AgentStub(channel)
    stats = stub.Stats(common_pb2.Empty(), timeout=30)
    _, view = map_pool(stats.pool_path, stats.pool_size)
    manifest = services.store.get(keys.manifest_key(SAFE_JOB, "model", SAFE_STEP))
    harness = Harness(services, channel, stub, view, mm, safe_state, manifest, itertools.count(100))
    harness.assert_safe_checkpoint_loads()
    return harness


def stop_harness(harness: Harness) -> None:
    harness.assert_unharmed()
    harness.assert_safe_checkpoint_loads()
    harness.pool_view.release()
    harness.channel.close()
    harness.services.stop()


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    started = start_harness((tmp_path_factory.mktemp("fuzz-api") / "store").as_uri())
    yield started
    stop_harness(started)


@pytest.fixture(scope="module")
def s3_harness(s3_server):
    bucket = f"lv-fuzz-{uuid.uuid4().hex[:12]}"
    s3_server.admin.create_bucket(Bucket=bucket)
    started = start_harness(f"s3://{bucket}/fuzz")
    yield started
    stop_harness(started)
    remove_bucket(s3_server.admin, bucket)


# -- a Save stream as a list of operations ---------------------------------------------------------


@dataclasses.dataclass
class Entry:
    name: str
    dtype: str
    global_shape: list[int]
    offsets: list[int]
    local_shape: list[int]
    payload: bytes

    def spec(self) -> agent_pb2.EntrySpec:
        layout = manifest_pb2.TensorLayout(dtype=self.dtype, global_shape=self.global_shape, offsets=self.offsets,
                                           local_shape=self.local_shape)
        return agent_pb2.EntrySpec(name=self.name, layout=layout, nbytes=len(self.payload))


@dataclasses.dataclass
class Piece:
    entry: int
    offset: int
    data: bytes
    pool_shift: int = 0           # shared memory: where the piece claims to lie, relative to where it was copied
    length: int | None = None     # shared memory: the length the Stage claims (default: len(data))
    crcs: list[int] | None = None  # the chunk CRC32Cs sent (default: those of the bytes the piece claims)


def chunk_crcs(data: bytes | memoryview) -> list[int]:
    """What an honest rank sends: the CRC32C of each CHUNK-byte span (see agent.proto Piece)."""
    return [crc32c(data[i:i + CHUNK]) for i in range(0, len(data), CHUNK)]


class _Driver:
    """Sends requests one by one and reads the replies a real rank would wait for."""

    END = None

    def __init__(self, harness: Harness) -> None:
        self.harness = harness
        self.requests: queue.Queue = queue.Queue()
        self.replies = harness.stub.Save(iter(self.requests.get, self.END), timeout=60)
        self.last_reservation: agent_pb2.Reservation | None = None

    def send(self, request: agent_pb2.SaveRequest) -> None:
        self.requests.put(request)

    def reply(self) -> agent_pb2.SaveReply:
        return next(self.replies)

    def close(self) -> None:
        self.requests.put(self.END)

    def drain(self) -> None:
        for _ in self.replies:
            pass


Op = Callable[[_Driver], None]


def op_open(open_msg: agent_pb2.SaveOpen) -> Op:
    def run(d: _Driver) -> None:
        d.send(agent_pb2.SaveRequest(open=open_msg))
        assert d.reply().WhichOneof("kind") == "opened"
    return run


def op_data(piece: Piece) -> Op:
    def run(d: _Driver) -> None:
        crcs = chunk_crcs(piece.data) if piece.crcs is None else piece.crcs
        d.send(agent_pb2.SaveRequest(data=agent_pb2.DataPiece(entry=piece.entry, entry_offset=piece.offset, data=piece.data,
                                                              chunk_crc32c=crcs)))
    return run


def op_shared(pieces: list[Piece]) -> Op:
    """Reserve room, copy the pieces into the pool, stage them (one Stage per reservation, like the client)."""
    def run(d: _Driver) -> None:
        total = sum(max(1, len(p.data)) for p in pieces)
        d.send(agent_pb2.SaveRequest(reserve=total))
        reserved = d.reply().reserved
        assert reserved.length >= total, reserved
        d.last_reservation = reserved
        cursor, staged = reserved.offset, []
        for p in pieces:
            d.harness.pool_view[cursor:cursor + len(p.data)] = p.data
            offset, length = cursor + p.pool_shift, len(p.data) if p.length is None else p.length
            claimed = d.harness.pool_view[max(0, offset):max(0, offset + length)]
            staged.append(agent_pb2.Piece(entry=p.entry, entry_offset=p.offset, pool_offset=offset, length=length,
                                          chunk_crc32c=chunk_crcs(claimed) if p.crcs is None else p.crcs))
            cursor += max(1, len(p.data))
        d.send(agent_pb2.SaveRequest(stage=agent_pb2.StagePieces(pieces=staged)))
    return run


def op_restage_closed(d: _Driver) -> None:
    """Stage again into the reservation the previous Stage closed."""
    r = d.last_reservation
    assert r is not None
    d.send(agent_pb2.SaveRequest(stage=agent_pb2.StagePieces(pieces=[agent_pb2.Piece(entry=0, pool_offset=r.offset, length=1)])))


def op_raw(request: agent_pb2.SaveRequest, replies: bool = False) -> Op:
    def run(d: _Driver) -> None:
        d.send(request)
        if replies:
            d.reply()
    return run


def op_finish(d: _Driver) -> None:
    d.send(agent_pb2.SaveRequest(finish=True))
    assert d.reply().WhichOneof("kind") == "finished"


@dataclasses.dataclass
class Expected:
    code: grpc.StatusCode
    fragments: tuple[str, ...] = ()   # one of them must be in the status message
    # Found by the uploads, after the hand-off: the stream may end OK, then WaitSave has the status.
    after_handoff: bool = False


def run_stream(harness: Harness, ops: list[Op]) -> tuple[grpc.StatusCode, str]:
    driver = _Driver(harness)
    try:
        for op in ops:
            op(driver)
        driver.close()
        driver.drain()
        return OK, ""
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    finally:
        driver.close()  # a rejected stream leaves gRPC's request thread waiting for this


# -- the grammar ---------------------------------------------------------------------------------

DTYPES = sorted(ITEMSIZE)


@st.composite
def entries(draw: st.DrawFn, first_nonempty: bool) -> Entry:
    dtype = draw(st.sampled_from(DTYPES))
    ndim = draw(st.integers(1 if first_nonempty else 0, 3))
    local = [draw(st.integers(1 if first_nonempty else 0, 5)) for _ in range(ndim)]
    offsets, global_shape = [], []
    for size in local:
        before, after = draw(st.integers(0, 3)), draw(st.integers(0, 3))
        offsets.append(before)
        global_shape.append(before + size + after)
    nbytes = ITEMSIZE[dtype]
    for size in local:
        nbytes *= size
    payload = draw(st.binary(min_size=nbytes, max_size=nbytes))
    return Entry("", dtype, global_shape, offsets, local, payload)


@st.composite
def valid_saves(draw: st.DrawFn) -> tuple[list[Entry], list[Piece], bool]:
    """Entries with unique names, their bytes cut into pieces in any order, and the hand-off mode."""
    names = draw(st.lists(layer_names(), min_size=1, max_size=3, unique=True))
    ents = [draw(entries(first_nonempty=(i == 0))) for i in range(len(names))]
    for entry, name in zip(ents, names):
        entry.name = name
    pieces = []
    for index, entry in enumerate(ents):
        n = len(entry.payload)
        cuts = sorted(set(draw(st.lists(st.integers(1, max(1, n - 1)), max_size=3)))) if n > 1 else []
        bounds = [0, *cuts, n] if n else []
        pieces += [Piece(index, a, entry.payload[a:b]) for a, b in zip(bounds, bounds[1:])]
    pieces = draw(st.permutations(pieces))   # out of order is fine: the agent sorts pieces by offset
    return ents, pieces, draw(st.booleans())


@dataclasses.dataclass
class SaveCase:
    """One generated Save stream and what it must end with."""

    corruption: str
    open_msg: agent_pb2.SaveOpen
    entries: list[Entry]
    ops: list[Op]
    expected: Expected


def _open(ents: list[Entry], step: int, shared: bool, **changes: Any) -> agent_pb2.SaveOpen:
    fields: dict[str, Any] = dict(id=common_pb2.CheckpointId(job=FUZZ_JOB, kind="model", step=step), rank=0, world_size=1,
                                  entries=[e.spec() for e in ents], shared_memory=shared,
                                  config=manifest_pb2.Config(name="fuzz", compressor="lz4"))
    fields.update(changes)
    return agent_pb2.SaveOpen(**fields)


def _hand_off(pieces: list[Piece], shared: bool) -> list[Op]:
    if not pieces:
        return []
    if shared:
        half = len(pieces) // 2 or 1
        return [op_shared(pieces[:half])] + ([op_shared(pieces[half:])] if pieces[half:] else [])
    return [op_data(p) for p in pieces]


def _bad_job(draw: st.DrawFn) -> str:
    def refused(job: str) -> bool:
        try:
            keys.check_job(job)
            return False
        except lv.InvalidArgumentError:
            return True
    return draw(st.one_of(hostile_text(), st.text(any_char, max_size=10)).filter(refused))


OPEN_CORRUPTIONS = ["bad_job", "bad_kind", "bad_step", "bad_world", "empty_name", "unknown_dtype", "negative_dim",
                    "shard_outside", "negative_offset", "huge_shape", "wrong_nbytes", "duplicate_entry",
                    "unknown_compressor", "bad_training_key", "already_committed"]
STREAM_CORRUPTIONS = ["truncate", "no_open_first", "drop_piece", "overlap", "past_end", "negative_entry_offset",
                      "unknown_entry", "empty_message", "second_open", "bad_reserve", "stage_outside",
                      "stage_negative_length", "stage_closed_reservation", "finish_early", "checksum_count",
                      "checksum_mismatch"]
VARIATIONS = ["none", "huge_reserve"]  # valid streams: must commit


@st.composite
def save_cases(draw: st.DrawFn, step: int, corruption: str) -> SaveCase:
    ents, pieces, shared = draw(valid_saves())
    changes: dict[str, Any] = {}
    specs = [e.spec() for e in ents]
    victim = draw(st.integers(0, len(ents) - 1))
    spec = specs[victim]
    layout = spec.layout
    ops_before: list[Op] = []
    expected = Expected(OK)

    # -- corruptions of the open message: refused before anything is staged
    if corruption == "bad_job":
        changes["id"] = common_pb2.CheckpointId(job=_bad_job(draw), kind="model", step=step)
        expected = Expected(INVALID, ("invalid job name",))
    elif corruption == "bad_kind":
        kind = draw(st.text(any_char, max_size=12).filter(lambda k: k not in keys.KINDS))
        changes["id"] = common_pb2.CheckpointId(job=FUZZ_JOB, kind=kind, step=step)
        expected = Expected(INVALID, ("invalid checkpoint kind",))
    elif corruption == "bad_step":
        bad = draw(st.one_of(st.integers(-(2**63), -1), st.integers(10**18, INT64_MAX)))
        changes["id"] = common_pb2.CheckpointId(job=FUZZ_JOB, kind="model", step=bad)
        expected = Expected(INVALID, ("invalid step",))
    elif corruption == "bad_world":
        world = draw(st.integers(-(2**31), 2**31 - 1))
        rank = draw(st.one_of(st.integers(-(2**31), -1), st.integers(max(world, 0), 2**31 - 1)) if world >= 1
                    else st.integers(-(2**31), 2**31 - 1))
        changes.update(rank=rank, world_size=world)
        expected = Expected(INVALID, ("not within world size",))
    elif corruption == "empty_name":
        spec.name = ""
        expected = Expected(INVALID, ("invalid layer name",))
    elif corruption == "unknown_dtype":
        layout.dtype = draw(st.text(any_char, max_size=12).filter(lambda d: d not in ITEMSIZE))
        expected = Expected(INVALID, ("unknown dtype",))
    elif corruption == "negative_dim":
        dim = draw(st.integers(-(2**63), -1))
        if layout.local_shape:
            layout.local_shape[draw(st.integers(0, len(layout.local_shape) - 1))] = dim
        else:
            layout.global_shape.append(dim)
        expected = Expected(INVALID, ("negative dimension",))
    elif corruption == "shard_outside":
        if layout.local_shape:
            i = draw(st.integers(0, len(layout.local_shape) - 1))
            layout.offsets[i] = layout.global_shape[i] - layout.local_shape[i] + draw(st.integers(1, INT64_MAX // 2))
        else:
            layout.offsets.append(draw(st.integers(0, 5)))  # more offsets than dimensions
        expected = Expected(INVALID, ("does not fit",))
    elif corruption == "negative_offset":
        if layout.local_shape:
            layout.offsets[draw(st.integers(0, len(layout.offsets) - 1))] = draw(st.integers(-(2**63), -1))
        else:
            layout.offsets.append(-1)
        expected = Expected(INVALID, ("does not fit",))
    elif corruption == "huge_shape":
        # Each dimension fits in int64; their product (the byte count) does not, or is far beyond the declared size.
        dims = draw(st.lists(st.integers(2**31, INT64_MAX), min_size=2, max_size=3))
        layout.ClearField("local_shape"), layout.ClearField("global_shape"), layout.ClearField("offsets")
        layout.local_shape.extend(dims), layout.global_shape.extend(dims), layout.offsets.extend([0] * len(dims))
        expected = Expected(INVALID, ("declares",))
    elif corruption == "wrong_nbytes":
        spec.nbytes = draw(st.integers(-(2**63), INT64_MAX).filter(lambda n: n != spec.nbytes))
        expected = Expected(INVALID, ("declares",))
    elif corruption == "duplicate_entry":
        copy = agent_pb2.EntrySpec()
        copy.CopyFrom(spec)
        specs.insert(draw(st.integers(0, len(specs))), copy)
        expected = Expected(INVALID, ("duplicate entry",))
    elif corruption == "unknown_compressor":
        compressor = draw(st.text(any_char, min_size=1, max_size=10).filter(lambda c: c not in lv.config.COMPRESSORS))
        changes["config"] = manifest_pb2.Config(name="fuzz", compressor=compressor)
        expected = Expected(INVALID, ("unknown compressor",))
    elif corruption == "bad_training_key":
        text = draw(st.sampled_from(["", "not json", "[1, 2]", '{"a": 1}', "null", "NaN", "Infinity", "[" * 5000]))
        changes["keys"] = {draw(st.text(any_char, min_size=1, max_size=8)): text}
        expected = Expected(INVALID, ("training key",))
    elif corruption == "already_committed":
        changes["id"] = common_pb2.CheckpointId(job=SAFE_JOB, kind="model", step=SAFE_STEP)
        expected = Expected(grpc.StatusCode.ALREADY_EXISTS, ("already committed",))
    open_msg = _open(ents, step, shared, **changes)
    del open_msg.entries[:]
    open_msg.entries.extend(specs)
    if corruption in OPEN_CORRUPTIONS:
        # The open is refused: what follows it never matters.
        return SaveCase(corruption, open_msg, ents, [op_open(open_msg), *_hand_off(pieces, shared), op_finish], expected)

    # -- corruptions of the stream after a valid open
    nonempty = [p for p in pieces if p.data]
    target = draw(st.sampled_from(nonempty))  # entry 0 always has bytes
    entry_bytes = len(ents[target.entry].payload)
    after: list[Op] = []
    if corruption == "huge_reserve":  # an absurd reservation gets what the pool has; an empty Stage closes it
        ops_before.append(op_raw(agent_pb2.SaveRequest(reserve=draw(st.integers(1, INT64_MAX))), replies=True))
        ops_before.append(op_raw(agent_pb2.SaveRequest(stage=agent_pb2.StagePieces())))
    elif corruption == "truncate":
        pass  # cut below, once the full op list exists
    elif corruption == "no_open_first":
        first = draw(st.sampled_from([agent_pb2.SaveRequest(finish=True), agent_pb2.SaveRequest(reserve=16),
                                      agent_pb2.SaveRequest(data=agent_pb2.DataPiece(entry=0, data=b"x")),
                                      agent_pb2.SaveRequest()]))
        return SaveCase(corruption, open_msg, ents, [op_raw(first), op_open(open_msg)],
                        Expected(INVALID, ("must start with an open",)))
    elif corruption == "drop_piece":
        pieces = [p for p in pieces if p is not target]
        expected = Expected(INVALID, ("incomplete entries", "with a gap at byte"))
    elif corruption == "overlap":
        start = draw(st.integers(0, len(target.data) - 1))
        pieces = [*pieces, Piece(target.entry, target.offset + start, target.data[start:])]
        pieces = draw(st.permutations(pieces))
        expected = Expected(INVALID, ("overlapping pieces",))
    elif corruption == "past_end":
        overshoot = draw(st.integers(1, 64))
        pieces = [*pieces, Piece(target.entry, entry_bytes - len(target.data) + overshoot, target.data)]
        expected = Expected(INVALID, ("lies outside entry",))
    elif corruption == "negative_entry_offset":
        pieces = [*pieces, Piece(target.entry, draw(st.integers(-(2**63), -1)), target.data)]
        expected = Expected(INVALID, ("lies outside entry",))
    elif corruption == "unknown_entry":
        bad = draw(st.one_of(st.integers(-(2**31), -1), st.integers(len(specs), 2**31 - 1)))
        pieces = [*pieces, Piece(bad, 0, target.data)]
        expected = Expected(INVALID, ("entry #",))
    elif corruption == "empty_message":
        after.append(op_raw(agent_pb2.SaveRequest()))
        expected = Expected(INVALID, ("unexpected None message",))
    elif corruption == "second_open":
        after.append(op_raw(agent_pb2.SaveRequest(open=open_msg)))
        expected = Expected(INVALID, ("unexpected open message",))
    elif corruption == "bad_reserve":
        after.append(op_raw(agent_pb2.SaveRequest(reserve=draw(st.integers(-(2**63), 0))), replies=True))
        expected = Expected(INVALID, ("cannot reserve",))
    elif corruption in ("stage_outside", "stage_negative_length", "stage_closed_reservation"):
        shared = True
        if corruption == "stage_outside":
            # beyond the 16 MiB pool either way, so never inside this (or any) reservation
            target.pool_shift = draw(st.one_of(st.integers(-(2**62), -(1 << 24)), st.integers(1 << 24, 2**62)))
            expected = Expected(INVALID, ("outside every reservation",))
        elif corruption == "stage_negative_length":
            target.length = draw(st.integers(-(2**31), -1))
            expected = Expected(INVALID, ("lies outside entry",))
        else:
            after.append(op_restage_closed)
            expected = Expected(INVALID, ("outside every reservation",))
        open_msg.shared_memory = True
    elif corruption == "checksum_count":
        right = chunk_crcs(target.data)
        target.crcs = draw(st.one_of(st.just(right[:-1]), st.just(right + [0]), st.just([])))
        expected = Expected(INVALID, ("chunk checksums, expected",))
    elif corruption == "checksum_mismatch":  # the bytes changed between the rank's CRC and the agent's read
        crcs = chunk_crcs(target.data)
        crcs[draw(st.integers(0, len(crcs) - 1))] ^= 1 << draw(st.integers(0, 31))
        target.crcs = crcs
        expected = Expected(grpc.StatusCode.DATA_LOSS, ("changed after rank 0 staged them",), after_handoff=True)
    elif corruption == "finish_early":
        keep = draw(st.integers(0, len(pieces) - 1))
        pieces = pieces[:keep]
        expected = Expected(INVALID, ("incomplete entries", "with a gap at byte"))
    ops = [op_open(open_msg), *ops_before, *_hand_off(pieces, shared), *after, op_finish]
    if corruption == "truncate":
        cut = draw(st.integers(0, len(ops) - 1))
        ops = ops[:cut]
        expected = (Expected(grpc.StatusCode.ABORTED, ("closed its stream",)) if cut
                    else Expected(INVALID, ("must start with an open",)))
    return SaveCase(corruption, open_msg, ents, ops, expected)


# -- properties ----------------------------------------------------------------------------------


def check_save_case(harness: Harness, case: SaveCase) -> None:
    code, message = run_stream(harness, case.ops)
    want = case.expected
    if code == OK and want.after_handoff:
        code, message = wait_status(harness, case.open_msg.id)
    assert code not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), (case.corruption, code, message)
    assert code == want.code, (case.corruption, code, message)
    if code != OK:
        assert message.strip(), case.corruption
        assert any(f in message for f in want.fragments), (case.corruption, message)
    else:
        check_committed(harness, case)
    harness.assert_unharmed()


def wait_status(harness: Harness, id_: common_pb2.CheckpointId) -> tuple[grpc.StatusCode, str]:
    try:
        harness.stub.WaitSave(agent_pb2.WaitSaveRequest(id=id_, rank=0, timeout_s=60), timeout=90)
        return OK, ""
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""


def check_committed(harness: Harness, case: SaveCase) -> None:
    """A valid stream committed exactly what was sent, under the names it was sent with."""
    id_ = case.open_msg.id
    info = harness.stub.WaitSave(agent_pb2.WaitSaveRequest(id=id_, rank=0, timeout_s=60), timeout=90).info
    assert info.id.step == id_.step and info.entries == len(case.entries)
    manifest = harness.stub.Resolve(common_pb2.ResolveRequest(
        job=id_.job, kind=id_.kind, selector=common_pb2.Selector(keys={"step": str(id_.step)})), timeout=30)
    assert sorted(s.name for s in manifest.shards) == sorted(e.name for e in case.entries)
    got: dict[int, bytearray] = {i: bytearray(s.raw_bytes) for i, s in enumerate(manifest.shards)}
    request = agent_pb2.RestoreRequest(open=agent_pb2.RestoreOpen(id=id_))
    for reply in harness.stub.Restore(iter([request]), timeout=60):
        if reply.WhichOneof("kind") == "piece":
            p = reply.piece
            got[p.shard][p.shard_offset:p.shard_offset + p.length] = p.data
    by_name = {s.name: bytes(got[i]) for i, s in enumerate(manifest.shards)}
    for entry in case.entries:
        assert by_name[entry.name] == entry.payload, entry.name


ALL_CASES = VARIATIONS + OPEN_CORRUPTIONS + STREAM_CORRUPTIONS


# One property per corruption, so each is tried on many streams rather than left to chance.
@pytest.mark.parametrize("corruption", ALL_CASES)
@fuzz_settings(12)
@given(data=st.data())
def test_generated_save_streams_end_with_their_own_status(harness, corruption, data):
    case = data.draw(save_cases(next(harness.steps), corruption), label="case")
    check_save_case(harness, case)


@pytest.mark.s3
@fuzz_settings(len(ALL_CASES))
@given(data=st.data())
def test_generated_save_streams_on_s3(s3_harness, data):
    corruption = data.draw(st.sampled_from(ALL_CASES), label="corruption")
    case = data.draw(save_cases(next(s3_harness.steps), corruption), label="case")
    check_save_case(s3_harness, case)


# -- Restore ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class RestoreCase:
    what: str
    requests: list[agent_pb2.RestoreRequest]
    expected: Expected
    ranges: list[tuple[int, int, int]] = dataclasses.field(default_factory=list)


@st.composite
def restore_cases(draw: st.DrawFn, shard_sizes: list[int]) -> RestoreCase:
    what = draw(st.sampled_from(["unknown_job", "bad_job", "bad_kind", "unknown_step", "bad_step", "unknown_name",
                                 "bad_shard", "bad_range", "not_open_first", "valid_ranges", "valid_names"]))
    job, kind, step, names, ranges = SAFE_JOB, "model", SAFE_STEP, [], []
    expected = Expected(OK)
    n = len(shard_sizes)
    if what == "unknown_job":
        job = draw(st.from_regex(r"\A[a-z][a-z0-9-]{0,20}\Z").filter(lambda j: j not in (SAFE_JOB, FUZZ_JOB)))
        expected = Expected(grpc.StatusCode.NOT_FOUND, ("no committed",))
    elif what == "bad_job":
        job = _bad_job(draw)
        expected = Expected(INVALID, ("invalid job name",))
    elif what == "bad_kind":
        kind = draw(st.text(any_char, min_size=1, max_size=12).filter(lambda k: k not in keys.KINDS))
        expected = Expected(INVALID, ("invalid checkpoint kind",))
    elif what == "unknown_step":
        step = draw(st.integers(0, 10**18 - 1).filter(lambda s: s != SAFE_STEP))
        expected = Expected(grpc.StatusCode.NOT_FOUND, ("no committed",))
    elif what == "bad_step":
        step = draw(st.one_of(st.integers(-(2**63), -1), st.integers(10**18, INT64_MAX)))
        expected = Expected(INVALID, ("step",))
    elif what == "unknown_name":
        names = draw(st.lists(layer_names(), min_size=1, max_size=3).filter(lambda ns: not set(ns) <= {"w", "層/../b", "i"}))
        expected = Expected(grpc.StatusCode.NOT_FOUND, ("has no layer",))
    elif what == "bad_shard":
        ranges = [(draw(st.one_of(st.integers(-(2**31), -1), st.integers(n, 2**31 - 1))), 0, 1)]
        expected = Expected(INVALID, ("does not exist",))
    elif what == "bad_range":
        shard = draw(st.integers(0, n - 1))
        size = shard_sizes[shard]
        start, stop = draw(st.sampled_from([
            (st.integers(-(2**63), -1), st.integers(0, size)),          # negative start
            (st.integers(0, size), st.integers(size + 1, INT64_MAX)),   # past the end
            (st.integers(1, size), st.integers(-(2**63), 0)),           # stop before start
        ]))
        a, b = draw(start), draw(stop)
        if a <= b and 0 <= a and b <= size:  # stop-before-start drew a valid range: make it invalid
            a, b = b + 1, b
        ranges = [(shard, a, b)]
        expected = Expected(INVALID, ("outside shard",))
    elif what == "not_open_first":
        return RestoreCase(what, [agent_pb2.RestoreRequest(release=agent_pb2.Piece(pool_offset=0, length=1))],
                           Expected(INVALID, ("must start with an open",)))
    elif what == "valid_ranges":
        for _ in range(draw(st.integers(1, 4))):
            shard = draw(st.integers(0, n - 1))
            a = draw(st.integers(0, shard_sizes[shard]))
            ranges.append((shard, a, draw(st.integers(a, shard_sizes[shard]))))
    elif what == "valid_names":
        names = draw(st.lists(st.sampled_from(["w", "層/../b", "i"]), min_size=1, max_size=3))
    open_msg = agent_pb2.RestoreOpen(id=common_pb2.CheckpointId(job=job, kind=kind, step=step), names=names,
                                     shared_memory=draw(st.booleans()),
                                     ranges=[agent_pb2.ShardRange(shard=s, start=a, stop=b) for s, a, b in ranges])
    # Stray releases of offsets this restore never handed out must be ignored.
    releases = [agent_pb2.RestoreRequest(release=agent_pb2.Piece(pool_offset=o, length=1))
                for o in draw(st.lists(st.integers(-(2**63), INT64_MAX), max_size=2))]
    return RestoreCase(what, [agent_pb2.RestoreRequest(open=open_msg), *releases], expected, ranges)


def _raw_bytes(harness: Harness, manifest: manifest_pb2.Manifest) -> list[bytes]:
    return [bytes(harness.safe_state[s.name].contiguous().view(torch.uint8).numpy().tobytes()) for s in manifest.shards]


@fuzz_settings(200)
@given(data=st.data())
def test_generated_restore_requests_end_with_their_own_status(harness, data):
    manifest = harness.stub.Resolve(common_pb2.ResolveRequest(job=SAFE_JOB, kind="model"), timeout=30)
    raw = _raw_bytes(harness, manifest)
    case = data.draw(restore_cases([len(r) for r in raw]), label="case")
    received: list[agent_pb2.RestorePiece] = []
    try:
        for reply in harness.stub.Restore(iter(case.requests), timeout=60):
            if reply.WhichOneof("kind") == "piece":
                received.append(reply.piece)
        code, message = OK, ""
    except grpc.RpcError as exc:
        code, message = exc.code(), exc.details() or ""
    assert code not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), (case.what, code, message)
    assert code == case.expected.code, (case.what, code, message)
    if code != OK:
        assert message.strip() and any(f in message for f in case.expected.fragments), (case.what, message)
    else:
        for piece in received:  # every piece is the stored bytes at its offset (from the pool, or inline)
            body = bytes(harness.pool_view[piece.pool_offset:piece.pool_offset + piece.length]) if not piece.data else piece.data
            assert body == raw[piece.shard][piece.shard_offset:piece.shard_offset + piece.length], case.what
        for shard, a, b in case.ranges:  # and the pieces cover every requested byte
            covered = set()
            for p in received:
                if p.shard == shard:
                    covered.update(range(p.shard_offset, p.shard_offset + p.length))
            assert set(range(a, b)) <= covered, (case.what, shard, a, b)
    harness.assert_unharmed()


# -- cases a grammar cannot express with one stream ------------------------------------------------


def test_message_over_the_size_limit_is_refused(harness):
    big = 65 << 20  # the agent accepts messages up to 64 MiB
    layout = manifest_pb2.TensorLayout(dtype="uint8", global_shape=[big], offsets=[0], local_shape=[big])
    open_msg = agent_pb2.SaveOpen(id=common_pb2.CheckpointId(job=FUZZ_JOB, kind="model", step=next(harness.steps)),
                                  rank=0, world_size=1, entries=[agent_pb2.EntrySpec(name="big", nbytes=big, layout=layout)])
    code, message = run_stream(harness, [op_open(open_msg), op_data(Piece(0, 0, bytes(big))), op_finish])
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and message, message
    harness.assert_unharmed()


def test_ranks_of_one_save_must_agree_on_the_world_size(harness):
    step = next(harness.steps)
    entry = Entry("w", "uint8", [4], [0], [4], b"abcd")
    first = _Driver(harness)
    try:
        op_open(_open([entry], step, False, rank=0, world_size=2))(first)
        code, message = run_stream(harness, [op_open(_open([entry], step, False, rank=1, world_size=3))])
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "world size 3" in message and "world size 2" in message, message
    finally:
        first.close()
    with pytest.raises(grpc.RpcError) as info:
        first.drain()
    assert info.value.code() == grpc.StatusCode.ABORTED and "closed its stream" in info.value.details()
    harness.assert_unharmed()


# -- focused regressions for what the fuzzing found -----------------------------------------------


def test_status_naming_a_very_long_layer_survives_the_trailer_limit(harness):
    """A message quoting a 5000-character name used to exceed gRPC's 8 KiB metadata limit:
    the caller got RESOURCE_EXHAUSTED "Stream removed" instead of INVALID_ARGUMENT."""
    name = "層" * 5000
    layout = manifest_pb2.TensorLayout(dtype="float32", global_shape=[4], offsets=[0], local_shape=[4])
    open_msg = agent_pb2.SaveOpen(id=common_pb2.CheckpointId(job=FUZZ_JOB, kind="model", step=next(harness.steps)),
                                  rank=0, world_size=1, entries=[agent_pb2.EntrySpec(name=name, layout=layout, nbytes=17)])
    code, message = run_stream(harness, [op_open(open_msg)])
    assert code == INVALID and "declares 17 bytes, but float32[4] holds 16" in message and "characters cut" in message
    harness.assert_unharmed()


def test_a_piece_in_a_reservation_closed_by_a_stage_is_refused(harness):
    """Whether such a piece was accepted used to depend on whether the closed reservation's
    uploads had drained yet; now it is always refused."""
    entry = Entry("w", "uint8", [8], [0], [8], b"abcdefgh")
    ops = [op_open(_open([entry], next(harness.steps), True)), op_shared([Piece(0, 0, b"abcd")]), op_restage_closed]
    code, message = run_stream(harness, ops)
    assert code == INVALID and "still open" in message, message
    harness.assert_unharmed()


def test_a_failure_while_cutting_chunks_fails_the_save(tmp_path):
    """An exception in chunk planning (here: the upload executor shut down under it) used to
    vanish in an unread future; the session then completed with chunks missing and would
    have reported shards whose chunks did not cover their bytes."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from layervault.agent.save_session import SaveSession
    from layervault.agent.staging import StagingPool
    from layervault.agent.storage import LocalStore

    pool, executor, gate = StagingPool(1 << 20), ThreadPoolExecutor(1), threading.Event()
    done: list[SaveSession] = []
    try:
        entry = Entry("w", "uint8", [8], [0], [8], b"abcdefgh")
        session = SaveSession(_open([entry], 1, False), "0123456789ab", pool, LocalStore(tmp_path / "store"), executor,
                              4096, done.append)
        executor.submit(gate.wait)                # the only worker is busy: planning waits in the queue
        session.stage_data(agent_pb2.DataPiece(entry=0, entry_offset=0, data=entry.payload,
                                                     chunk_crc32c=chunk_crcs(entry.payload)), timeout=10)
        executor.shutdown(wait=False)             # queued work still runs; new submissions now raise
        gate.set()
        session.finish()
        assert session.wait_durable(30) and done == [session]
        assert isinstance(session.error, lv.SaveFailedError) and "could not be chunked" in str(session.error)
        assert pool.in_use == 0
    finally:
        gate.set()
        executor.shutdown(wait=True)
        pool.close()
