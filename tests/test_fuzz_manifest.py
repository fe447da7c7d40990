"""Manifests are data, never code: anything that is not a valid manifest is refused with
:class:`ManifestError` naming what is wrong, on every path that reads one (decoder, catalog,
agent, ``layervault show``), never with a Python traceback."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import grpc
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import layervault as lv
from layervault.agent import keys
from layervault.agent.catalog import Catalog
from layervault.agent.manifest import FORMAT_VERSION, decode_manifest, encode_manifest
from layervault.agent.storage import open_store
from layervault.client import AgentClient
from layervault.errors import ManifestError
from layervault.proto import manifest_pb2

from fuzzing import any_char, fuzz_settings
from services import start_in_process

JOB, STEP = "mf-job", 5


def valid_manifest() -> manifest_pb2.Manifest:
    def shard(name: str, rank: int, dtype: str, shape: list[int], chunk_sizes: list[int]) -> manifest_pb2.ShardRecord:
        chunks, offset = [], 0
        for i, size in enumerate(chunk_sizes):
            chunks.append(manifest_pb2.ChunkRef(key=keys.chunk_key(JOB, "model", STEP, name, "0123456789ab", rank, i),
                                                raw_offset=offset, raw_size=size, stored_size=size, crc32c=7))
            offset += size
        return manifest_pb2.ShardRecord(
            name=name, rank=rank, codec=["shuffle/1:4", "lz4/1:1"], chunks=chunks, raw_bytes=offset, stored_bytes=offset,
            layout=manifest_pb2.TensorLayout(dtype=dtype, global_shape=[shape[0] * 2, *shape[1:]], offsets=[shape[0] * rank, 0],
                                             local_shape=shape))
    return manifest_pb2.Manifest(
        format_version=FORMAT_VERSION, job=JOB, kind="model", step=STEP, keys={"step": str(STEP), "epoch": "3"},
        config=manifest_pb2.Config(name="m", framework="torch", compressor="lz4"), world_size=2, save_id="0123456789ab",
        committed_at="2026-01-01T00:00:00.000Z", extra={"param_groups": '[{"lr": 0.1}]'},
        shards=[shard("enc.w", 0, "float32", [4, 8], [64, 64]), shard("enc.w", 1, "float32", [4, 8], [128]),
                shard("層/../x", 0, "int64", [2, 1], [16])])


VALID = encode_manifest(valid_manifest())
VALID_DOC = json.loads(VALID)


def decodes_or_refuses(data: bytes) -> manifest_pb2.Manifest | ManifestError:
    """The decoder's only two outcomes: a manifest, or ManifestError with a message naming the source."""
    try:
        return decode_manifest(data, source="s3://b/p/the-key")
    except ManifestError as exc:
        assert str(exc).startswith("s3://b/p/the-key: ") and len(str(exc)) > len("s3://b/p/the-key: ")
        return exc


def test_the_valid_manifest_decodes():
    assert decode_manifest(VALID) == valid_manifest()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(any_char, max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(any_char, max_size=8), inner, max_size=4),
    max_leaves=12)


@fuzz_settings(300)
@given(data=st.binary(max_size=300))
@example(data=b"[" * 100_000)   # nesting deeper than the JSON parser's recursion limit
@example(data=b"\xff\xfe{\x00")  # a UTF-16 byte order mark, then garbage
@example(data=b"")
def test_random_bytes_are_refused(data):
    assert isinstance(decodes_or_refuses(data), ManifestError)


@fuzz_settings(300)
@given(doc=json_values)
@example(doc={"format_version": 2})
@example(doc={"format_version": True, "world_size": 1})
@example(doc={"format_version": "1"})
@example(doc={"format_version": 1})   # no world size
def test_random_json_is_refused(doc):
    assert isinstance(decodes_or_refuses(json.dumps(doc).encode()), ManifestError)


def _paths(node, path=()):
    yield path
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*path, i))


PATHS = list(_paths(VALID_DOC))[1:]


def _set(doc, path, value):
    node = doc
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value


@fuzz_settings(400)
@given(path=st.sampled_from(PATHS), value=json_values)
def test_a_mutated_field_is_refused_or_still_a_consistent_manifest(path, value):
    doc = copy.deepcopy(VALID_DOC)
    _set(doc, path, value)
    outcome = decodes_or_refuses(json.dumps(doc).encode())
    if isinstance(outcome, manifest_pb2.Manifest):
        # Accepted: then it is a manifest every reader can use (re-encoding and re-reading it agrees).
        assert decode_manifest(encode_manifest(outcome)) == outcome


#: Mutations that must always be refused, with words the message must contain.
BROKEN = {
    "unknown version": (("format_version",), 2, "unsupported manifest format_version 2"),
    "version as text": (("format_version",), "1", "unsupported manifest format_version '1'"),
    "no world": (("world_size",), 0, "world_size must be >= 1"),
    "bad job": (("job",), "../etc", "invalid job name"),
    "bad kind": (("kind",), "weights", "invalid checkpoint kind"),
    "unknown field": (("pickle",), "gASVAAAAAAAAAAB9lC4=", "pickle"),
    "unknown dtype": (("shards", 0, "layout", "dtype"), "float13", "unknown dtype 'float13'"),
    "negative dim": (("shards", 0, "layout", "local_shape", 0), "-4", "does not fit"),
    "size mismatch": (("shards", 0, "raw_bytes"), "129", "holds 128 bytes"),
    "gap in chunks": (("shards", 0, "chunks", 1, "raw_offset"), "65", "chunks do not tile"),
    "escaping chunk key": (("shards", 0, "chunks", 0, "key"), f"{JOB}/../other/x", "chunk key"),
    "other job's chunk": (("shards", 0, "chunks", 0, "key"), "other-job/model/0000000005/layers/w/a.r0.c00000", "chunk key"),
    "absolute chunk key": (("shards", 0, "chunks", 0, "key"), "/etc/passwd", "chunk key"),
    "unknown codec": (("shards", 0, "codec", 1), "zstd/9:1", "unknown codec 'zstd/9:1'"),
    "bad codec parameter": (("shards", 0, "codec", 0), "shuffle/1:x", "shuffle/1 needs an element size"),
    "rank outside world": (("shards", 2, "rank"), 2, "rank is not within world size 2"),
    "training key not JSON": (("keys", "epoch"), "three", "training key 'epoch'"),
    "keys not a map": (("keys",), [1, 2], "keys"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_manifests_are_refused_with_what_is_wrong(case):
    path, value, words = BROKEN[case]
    doc = copy.deepcopy(VALID_DOC)
    _set(doc, path, value)
    outcome = decodes_or_refuses(json.dumps(doc).encode())
    assert isinstance(outcome, ManifestError) and words in str(outcome), outcome


# -- every reading path ----------------------------------------------------------------------------


@pytest.fixture
def corrupt_store(tmp_path):
    """A store with one good checkpoint (step 1, saved through the agent) and broken manifests beside it."""
    url = (tmp_path / "store").as_uri()
    services = start_in_process(url)
    import torch
    from layervault.torch import ModelManager

    mm = ModelManager(lv.ModelConfig(job=JOB, name="m"), agent=AgentClient(services.agent_address))
    mm.save({"w": torch.arange(10.0)}, step=1).wait(60)
    store = services.store
    future = dict(VALID_DOC, format_version=FORMAT_VERSION + 1)
    store.put(keys.manifest_key(JOB, "model", 2), json.dumps(future).encode())
    store.put(keys.manifest_key(JOB, "model", 3), b"\x80\x04\x95 not json, a pickle header")
    store.put(keys.manifest_key(JOB, "model", 4), store.get(keys.manifest_key(JOB, "model", 1)))  # copied into step 4's place
    yield services, url, mm
    services.stop()


BAD_STEPS = {2: "unsupported manifest format_version 2", 3: "not valid JSON", 4: "not the checkpoint its key names"}


def test_catalog_refuses_broken_manifests(corrupt_store):
    _, url, _ = corrupt_store
    catalog = Catalog(open_store(url))
    assert catalog.resolve(JOB, "model", {"step": "1"})[1].step == 1
    for step, words in BAD_STEPS.items():
        with pytest.raises(ManifestError, match=words) as info:
            catalog.resolve(JOB, "model", {"step": str(step)})
        assert keys.manifest_key(JOB, "model", step) in str(info.value)


def test_agent_and_managers_refuse_broken_manifests(corrupt_store):
    services, _, mm = corrupt_store
    client = AgentClient(services.agent_address)
    for step, words in BAD_STEPS.items():
        with pytest.raises(lv.IncompatibleStateError, match=words) as info:
            client.resolve(JOB, "model", {"step": str(step)})
        assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(lv.IncompatibleStateError, match=words):
            mm.load_layer("w", step=step)
    assert mm.load_layer("w", step=1).tolist() == list(range(10))  # the good one is unaffected


def test_show_prints_the_error_not_a_traceback(corrupt_store):
    services, url, _ = corrupt_store
    for args, env in ((["--storage", url], {}), ([], {"LAYERVAULT_AGENT": services.agent_address})):
        result = subprocess.run([sys.executable, "-m", "layervault.cli", "show", JOB, "2", *args], capture_output=True,
                                text=True, timeout=60, env={**os.environ, **env})
        assert result.returncode == 1, result.stdout
        assert "unsupported manifest format_version 2" in result.stderr and "Traceback" not in result.stderr, result.stderr
