"""Bad input on the raw gRPC API: a specific status and message, the agent stays up, and
committed data does not change."""

from __future__ import annotations

import grpc
import pytest
import torch

import layervault as lv
from layervault.agent.checksum import crc32c
from layervault.client import AgentClient
from layervault.proto import agent_pb2, agent_pb2_grpc, common_pb2, manifest_pb2
from layervault.torch import ModelManager

from services import start_in_process


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    services = start_in_process((tmp_path_factory.mktemp("store")).as_uri())
    mm = ModelManager(lv.ModelConfig(job="safe", name="m"), agent=AgentClient(services.agent_address))
    mm.save({"w": torch.arange(1000, dtype=torch.float32)}, step=1).wait(60)
    yield services, mm
    services.stop()


def entry(name="w", dtype="float32", shape=(4,), nbytes=None, offsets=None, global_shape=None):
    shape = list(shape)
    layout = manifest_pb2.TensorLayout(dtype=dtype, local_shape=shape, global_shape=global_shape or shape,
                                       offsets=offsets if offsets is not None else [0] * len(shape))
    return agent_pb2.EntrySpec(name=name, layout=layout, nbytes=16 if nbytes is None else nbytes)


def open_msg(entries, job="safe", step=2, rank=0, world_size=1, shared_memory=False):
    return agent_pb2.SaveRequest(open=agent_pb2.SaveOpen(
        id=common_pb2.CheckpointId(job=job, kind="model", step=step), rank=rank, world_size=world_size,
        entries=entries, shared_memory=shared_memory))


def data(entry_index, offset, payload):
    return agent_pb2.SaveRequest(data=agent_pb2.DataPiece(entry=entry_index, entry_offset=offset, data=payload,
                                                          chunk_crc32c=[crc32c(payload)] if payload else []))


FINISH = agent_pb2.SaveRequest(finish=True)

CASES = {
    "no open first": ([FINISH], grpc.StatusCode.INVALID_ARGUMENT, "must start with an open"),
    "bad job": ([open_msg([entry()], job="../x")], grpc.StatusCode.INVALID_ARGUMENT, "invalid job name"),
    "unknown dtype": ([open_msg([entry(dtype="float13")])], grpc.StatusCode.INVALID_ARGUMENT, "unknown dtype 'float13'"),
    "negative shape": ([open_msg([entry(shape=(-4,))])], grpc.StatusCode.INVALID_ARGUMENT, "negative dimension"),
    "wrong size": ([open_msg([entry(nbytes=17)])], grpc.StatusCode.INVALID_ARGUMENT, "declares 17 bytes"),
    "huge shape": ([open_msg([entry(shape=(2**40, 2**40), nbytes=16)])], grpc.StatusCode.INVALID_ARGUMENT, "declares 16 bytes"),
    "shard outside": ([open_msg([entry(offsets=[2], global_shape=[4])])], grpc.StatusCode.INVALID_ARGUMENT, "does not fit"),
    "duplicate": ([open_msg([entry(), entry()])], grpc.StatusCode.INVALID_ARGUMENT, "duplicate entry 'w'"),
    "rank outside world": ([open_msg([entry()], rank=3, world_size=2)], grpc.StatusCode.INVALID_ARGUMENT, "not within world size"),
    "data past the end": ([open_msg([entry()]), data(0, 8, b"x" * 9)], grpc.StatusCode.INVALID_ARGUMENT, "lies outside entry 'w'"),
    "unknown entry": ([open_msg([entry()]), data(5, 0, b"x")], grpc.StatusCode.INVALID_ARGUMENT, "entry #5"),
    "truncated": ([open_msg([entry()]), data(0, 0, b"x" * 8), FINISH], grpc.StatusCode.INVALID_ARGUMENT, "incomplete entries: w"),
    "stream ends early": ([open_msg([entry()]), data(0, 0, b"x" * 8)], grpc.StatusCode.ABORTED, "closed its stream"),
    "stage outside reservation": (
        [open_msg([entry()], shared_memory=True),
         agent_pb2.SaveRequest(stage=agent_pb2.StagePieces(pieces=[agent_pb2.Piece(entry=0, pool_offset=0, length=16)]))],
        grpc.StatusCode.INVALID_ARGUMENT, "outside every reservation"),
    "already committed": ([open_msg([entry()], step=1)], grpc.StatusCode.ALREADY_EXISTS, "already committed"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_save_streams_get_a_specific_status(running, case):
    services, mm = running
    requests, code, message = CASES[case]
    stub = agent_pb2_grpc.AgentStub(grpc.insecure_channel(services.agent.tcp_address))
    with pytest.raises(grpc.RpcError) as info:
        for _ in stub.Save(iter(requests)):
            pass
    assert info.value.code() == code, info.value.details()
    assert message in info.value.details()
    # the agent is still up and the committed checkpoint is intact
    assert stub.Stats(common_pb2.Empty()).pool_size > 0
    assert torch.equal(mm.load_layer("w", step=1), torch.arange(1000, dtype=torch.float32))
    assert [c.step for c in mm.checkpoints()] == [1]


def test_oversized_message_is_refused(running):
    services, _ = running
    stub = agent_pb2_grpc.AgentStub(grpc.insecure_channel(services.agent.tcp_address))
    big = 65 * 1024 * 1024
    requests = [open_msg([entry(dtype="uint8", shape=(big,), nbytes=big)], step=3), data(0, 0, b"\0" * big)]
    with pytest.raises(grpc.RpcError) as info:
        for _ in stub.Save(iter(requests)):
            pass
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_unknown_kind_and_bad_selector(running):
    services, _ = running
    stub = agent_pb2_grpc.AgentStub(grpc.insecure_channel(services.agent.tcp_address))
    with pytest.raises(grpc.RpcError) as info:
        stub.List(common_pb2.ListRequest(job="safe", kind="weights"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "weights" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        stub.Resolve(common_pb2.ResolveRequest(job="safe", kind="model", selector=common_pb2.Selector(keys={"step": "abc"})))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_seal_with_unreadable_keys_is_refused_and_a_good_one_still_commits(running):
    from layervault.client import CheckpointRef, SaveEntry
    from layervault.errors import InvalidArgumentError
    from layervault.torch.tensors import TensorSource, whole_layout

    services, mm = running
    client = AgentClient(services.agent_address)
    ref = CheckpointRef("safe", "model", 7)
    weight = torch.arange(16, dtype=torch.float32)
    handle = client.save(ref, 0, 1, manifest_pb2.Config(name="m"), {}, {},
                         [SaveEntry("w", whole_layout(weight), TensorSource(weight))], needs_seal=True)
    for bad, why in (({"loss": "low"}, "training key 'loss' is not JSON text"),
                     ({"loss": "NaN"}, "training key 'loss' must be a finite JSON number"),
                     ({"": "1"}, "training key names must be non-empty")):
        with pytest.raises(InvalidArgumentError, match=f"safe/model step 7: seal refused: {why}"):
            client.seal(ref, 1, bad, {})
    client.seal(ref, 1, {"loss": "0.25"}, {"note": "free text"})
    info = handle.wait(60)
    assert info.id.step == 7 and mm.load_layer("w", step=7).equal(weight)
    assert [c.step for c in mm.checkpoints() if c.keys.get("loss") == 0.25] == [7]
