"""Properties of object keys over arbitrary Unicode job and layer names.

Whatever a rank calls its layers, every object stays below ``{job}/{kind}/``, is a valid
S3 key, has no empty/``.``/``..`` segment or control character, and names the layer it came
from; job names are either accepted (and safe) or refused with a message naming them.
"""

from __future__ import annotations

import re
import urllib.parse
import uuid

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from layervault.agent import keys
from layervault.agent.storage import LocalStore
from layervault.agent.storage.base import check_key
from layervault.errors import InvalidArgumentError

from fuzzing import any_char, fuzz_settings, hostile_text, layer_names

S3_MAX_KEY_BYTES = 1024
SEGMENT_ALPHABET = re.compile(r"[A-Za-z0-9_.~%-]+")
VALID_JOBS = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z").filter(lambda j: ".." not in j)
STEPS = st.integers(0, 10**18 - 1)
SAVE_ID = "0123456789ab"  # the coordinator's attempt ids are 12 hex digits


def assert_safe_key(key: str, under: str) -> None:
    assert key.startswith(under), (key, under)
    assert check_key(key) == key
    for segment in key.split("/"):
        assert segment not in ("", ".", ".."), key
        assert not segment.startswith(".tmp-"), key
    assert all(c.isprintable() and c != "\\" for c in key), key


@fuzz_settings(300)
@given(job=st.one_of(hostile_text(), st.text(any_char, max_size=200), VALID_JOBS))
@example(job="..")
@example(job="a..b")
@example(job="a/b")
@example(job="x\n")
@example(job="a" * 129)
def test_job_names_are_accepted_only_when_safe(job):
    try:
        accepted = keys.check_job(job)
    except InvalidArgumentError as exc:
        assert "invalid job name" in str(exc) and repr(job) in str(exc)
        return
    assert accepted == job
    assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", job) and ".." not in job
    for kind in keys.KINDS:
        assert_safe_key(keys.manifest_key(job, kind, 7), f"{job}/{kind}/")
        assert_safe_key(keys.latest_key(job, kind), f"{job}/{kind}/")


@fuzz_settings(200)
@given(job=VALID_JOBS, kind=st.sampled_from(keys.KINDS), step=STEPS)
def test_manifest_keys_round_trip(job, kind, step):
    key = keys.manifest_key(job, kind, step)
    assert_safe_key(key, f"{job}/{kind}/manifests/")
    assert keys.parse_manifest_key(key) == (job, kind, step)


@fuzz_settings(400)
@given(name=layer_names(), job=VALID_JOBS, kind=st.sampled_from(keys.KINDS), step=STEPS,
       rank=st.integers(0, 2**31 - 1), chunk=st.integers(0, 10**6))
@example(name="..", job="j", kind="model", step=0, rank=0, chunk=0)
@example(name=".tmp-0123", job="j", kind="model", step=0, rank=0, chunk=0)
@example(name="a" * 181 + "~" + "0" * 16, job="j", kind="model", step=0, rank=0, chunk=0)
@example(name="é" * 40 + "%", job="j", kind="model", step=0, rank=0, chunk=0)
def test_layer_keys_stay_in_one_segment_and_name_their_layer(name, job, kind, step, rank, chunk):
    key = keys.chunk_key(job, kind, step, name, SAVE_ID, rank, chunk)
    layers = keys.step_prefix(job, kind, step) + "layers/"
    assert_safe_key(key, layers)
    segment, leaf = key[len(layers):].split("/")
    assert leaf == f"{SAVE_ID}.r{rank}.c{chunk:05d}"
    assert SEGMENT_ALPHABET.fullmatch(segment) and len(segment) <= 200
    # The longest job name and a 64-character store prefix still leave an S3 key well below its limit.
    assert len(("p" * 64 + "/" + key).encode("utf-8")) + 128 - len(job) <= S3_MAX_KEY_BYTES
    decoded = keys.layer_name_of_segment(segment)
    if decoded is None:  # hashed: only the manifest knows the name, and the segment still tells names apart
        assert len(urllib.parse.quote(name.encode("utf-8"), safe="")) > 200 - 3
    else:
        assert decoded == name


@fuzz_settings(300)
@given(a=layer_names(), b=layer_names())
@example(a="a" * 5000, b="a" * 182 + "~" + "c526c6222044dab5")  # a short name spelling a long one's hashed segment
@example(a="x" * 300 + "1", b="x" * 300 + "2")
@example(a="~", b="%7E")
def test_distinct_layer_names_get_distinct_segments(a, b):
    if a != b:
        assert keys.layer_segment(a) != keys.layer_segment(b)


@pytest.mark.parametrize("name", ["", "\ud800", "a\udfffb"])
def test_empty_and_unencodable_layer_names_are_refused(name):
    with pytest.raises(InvalidArgumentError, match="invalid layer name"):
        keys.layer_segment(name)


@fuzz_settings(60)
@given(name=layer_names())
@example(name="..")
@example(name=".tmp-x")
@example(name="%2e%2e/%2f..")
def test_layer_objects_round_trip_through_the_store(store, name):
    """The key is usable as is by the real backend, lists under its layer folder, and reads back."""
    step = 3
    key = keys.chunk_key("fuzz-keys", "model", step, name, SAVE_ID, 0, 0)
    if isinstance(store, LocalStore):
        assert store._path(key).resolve().is_relative_to(store.root)
    else:
        assert len(f"{store.prefix}/{key}".encode("utf-8")) <= S3_MAX_KEY_BYTES
    body = uuid.uuid4().bytes
    store.put(key, body)
    folder = key.rsplit("/", 1)[0] + "/"
    assert list(store.list(folder)) == [key]
    assert store.get(key) == body
    layer_folder = folder[len(keys.step_prefix("fuzz-keys", "model", step) + "layers/"):-1]
    assert keys.layer_name_of_segment(layer_folder) in (name, None)
    store.delete([key])
    assert not store.exists(key)
