"""The Save and Restore streams' hand-written data messages (layervault.stream_frames) are plain protobuf."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import given
from hypothesis import strategies as st

from layervault.proto import agent_pb2
from layervault.stream_frames import (DataFrame, RestoreFrame, decode_restore_reply, decode_save_request,
                                      encode_restore_reply, encode_save_request)

from fuzzing import fuzz_settings

INT32 = st.integers(-(1 << 31), (1 << 31) - 1)
INT64 = st.integers(-(1 << 63), (1 << 63) - 1)


UINT32 = st.integers(0, (1 << 32) - 1)


def _proto(entry: int, offset: int, data: bytes, crcs: list[int] = ()) -> agent_pb2.SaveRequest:
    return agent_pb2.SaveRequest(data=agent_pb2.DataPiece(entry=entry, entry_offset=offset, data=data, chunk_crc32c=crcs))


@fuzz_settings(300)
@given(entry=INT32, offset=INT64, data=st.binary(max_size=300), crcs=st.lists(UINT32, max_size=4))
def test_frames_are_byte_identical_to_protobuf_and_read_back(entry, offset, data, crcs):
    wire = encode_save_request(DataFrame(entry, offset, data, crcs))
    assert wire == _proto(entry, offset, data, crcs).SerializeToString()
    assert agent_pb2.SaveRequest.FromString(wire) == _proto(entry, offset, data, crcs)
    frame = decode_save_request(wire)
    assert isinstance(frame, DataFrame)
    assert (frame.entry, frame.entry_offset, bytes(frame.data), list(frame.chunk_crc32c)) == (entry, offset, data, crcs)


def test_a_large_piece_from_a_numpy_view_is_read_as_a_view():
    array = np.arange(1 << 20, dtype=np.float32)
    wire = encode_save_request(DataFrame(3, 4 << 20, memoryview(array.view(np.uint8))))
    frame = decode_save_request(wire)
    assert isinstance(frame.data, memoryview) and frame.data.obj is wire  # no copy on the way in
    assert bytes(frame.data) == array.tobytes() and (frame.entry, frame.entry_offset) == (3, 4 << 20)


@pytest.mark.parametrize("message", [
    agent_pb2.SaveRequest(open=agent_pb2.SaveOpen(rank=1, world_size=2)),
    agent_pb2.SaveRequest(reserve=1 << 30),
    agent_pb2.SaveRequest(stage=agent_pb2.StagePieces(pieces=[agent_pb2.Piece(entry=1, length=5)])),
    agent_pb2.SaveRequest(finish=True),
    agent_pb2.SaveRequest(),
])
def test_other_messages_are_protobuf_as_usual(message):
    wire = encode_save_request(message)
    assert wire == message.SerializeToString()
    assert decode_save_request(wire) == message


def test_anything_unusual_is_left_to_protobuf():
    piece = _proto(1, 2, b"abc").SerializeToString()
    # a data message followed by another field: protobuf's rules (the last oneof member wins) apply
    merged = piece + agent_pb2.SaveRequest(finish=True).SerializeToString()
    assert decode_save_request(merged) == agent_pb2.SaveRequest.FromString(merged)
    # an unknown field inside the piece: still a valid protobuf message, read by protobuf
    odd = bytes([0x22, 2, 0x28, 0x07])  # DataPiece with field 5 = 7 (unknown to this version)
    assert decode_save_request(odd) == agent_pb2.SaveRequest.FromString(odd)
    # checksums sent unpacked (also valid protobuf) and a packed field of a length no fixed32 list has
    unpacked = bytes([0x22, 10, 0x25, 1, 0, 0, 0, 0x25, 2, 0, 0, 0])
    assert decode_save_request(unpacked) == agent_pb2.SaveRequest.FromString(unpacked)
    assert list(decode_save_request(unpacked).data.chunk_crc32c) == [1, 2]


@pytest.mark.parametrize("wire", [
    bytes([0x22, 10, 0x1A, 50]) + b"short",     # declared lengths past the end
    bytes([0x22, 0x80]),                          # truncated varint
    bytes([0x22, 3, 0x1A, 9, 0x00]),              # the payload runs past the piece
])
def test_malformed_data_messages_fail_as_protobuf_fails(wire):
    with pytest.raises(DecodeError):
        agent_pb2.SaveRequest.FromString(wire)
    with pytest.raises(DecodeError):
        decode_save_request(wire)


def _reply(shard: int, offset: int, data: bytes) -> agent_pb2.RestoreReply:
    return agent_pb2.RestoreReply(piece=agent_pb2.RestorePiece(shard=shard, shard_offset=offset, length=len(data), data=data))


@fuzz_settings(300)
@given(shard=INT32, offset=INT64, data=st.binary(min_size=1, max_size=300))
def test_restore_frames_are_byte_identical_to_protobuf_and_read_back(shard, offset, data):
    wire = encode_restore_reply(RestoreFrame(shard, offset, data))
    assert wire == _reply(shard, offset, data).SerializeToString()
    frame = decode_restore_reply(wire)
    assert isinstance(frame, RestoreFrame)
    assert (frame.shard, frame.shard_offset, bytes(frame.data)) == (shard, offset, data)


@pytest.mark.parametrize("message", [
    agent_pb2.RestoreReply(opened=agent_pb2.SaveOpened(save_id="abc", pool_path="/dev/shm/x", pool_size=1 << 20)),
    agent_pb2.RestoreReply(piece=agent_pb2.RestorePiece(shard=2, shard_offset=8, pool_offset=0, length=4096)),  # shared memory
    agent_pb2.RestoreReply(piece=agent_pb2.RestorePiece(shard=2, shard_offset=8, pool_offset=4096, length=4096)),
    agent_pb2.RestoreReply(done=True),
])
def test_other_restore_replies_are_protobuf_as_usual(message):
    wire = encode_restore_reply(message)
    assert wire == message.SerializeToString()
    assert decode_restore_reply(wire) == message


def test_restores_over_grpc_read_bytes_back_exactly(tmp_path):
    """End to end without shared memory: every byte of every layer comes back through the frames."""
    import torch

    import layervault as lv
    from layervault.client import AgentClient
    from layervault.torch import ModelManager

    from services import start_in_process

    services = start_in_process((tmp_path / "store").as_uri(), chunk_size=1 << 20)
    try:
        client = AgentClient(services.agent_address, shared_memory=False)
        mm = ModelManager(lv.ModelConfig(job="frames", name="m"), agent=client)
        state = {"w": torch.randn(700, 1000), "b": torch.arange(3, dtype=torch.int64), "h": torch.randn(64).half()}
        mm.save(state, step=1).wait(60)
        target = {name: torch.zeros_like(t) for name, t in state.items()}
        mm.load(target, step=1)
        for name, want in state.items():
            assert torch.equal(target[name], want), name
        client.close()
    finally:
        services.stop()
