import pytest

from layervault.agent import keys
from layervault.errors import InvalidArgumentError

NASTY = ["..", ".", "../../etc/passwd", "/abs/path", "a/../../b", "x\x00y", "tab\there", "ünïcødé/层", "a" * 5000,
         "%2e%2e", "\\..\\windows", " ", "line\nbreak"]


@pytest.mark.parametrize("name", NASTY)
def test_layer_names_stay_in_one_segment_under_the_step(name):
    key = keys.chunk_key("job", "model", 7, name, "abcdef", 3, 12)
    prefix = keys.step_prefix("job", "model", 7) + "layers/"
    assert key.startswith(prefix)
    segment, leaf = key[len(prefix):].split("/")
    assert leaf == "abcdef.r3.c00012"
    assert segment not in ("", ".", "..")
    assert len(segment) <= 200
    assert all(c.isprintable() and c not in "\\/" for c in segment)


def test_distinct_long_names_get_distinct_segments():
    assert keys.layer_segment("a" * 5000 + "x") != keys.layer_segment("a" * 5000 + "y")


@pytest.mark.parametrize("job", ["", "..", "a/b", "../x", "-x", ".hidden", "a" * 200, "sp ace", "x\x00"])
def test_bad_job_names_are_rejected(job):
    with pytest.raises(InvalidArgumentError, match="invalid job name"):
        keys.check_job(job)


def test_bad_kind_and_step():
    with pytest.raises(InvalidArgumentError, match="kind"):
        keys.manifest_key("job", "weights", 1)
    with pytest.raises(InvalidArgumentError, match="step"):
        keys.manifest_key("job", "model", -1)


def test_manifest_key_roundtrip():
    key = keys.manifest_key("run-42", "optimizer", 1234)
    assert keys.parse_manifest_key(key) == ("run-42", "optimizer", 1234)
    assert keys.parse_manifest_key("run-42/model/0000000001/layers/x/y.r0.c00000") is None
