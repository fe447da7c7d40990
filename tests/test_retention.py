"""Retention policy as a pure function: steps and training keys in, steps to delete out."""

from __future__ import annotations

import pytest

import layervault as lv
from layervault.agent.retention import Retention, steps_to_delete


def ckpts(*steps, **keys_by_step):
    return [(s, keys_by_step.get(f"s{s}", {})) for s in steps]


def test_no_rule_keeps_everything():
    assert steps_to_delete(Retention(), ckpts(1, 2, 3)) == []
    assert not Retention().active


def test_keep_last_never_drops_the_newest_or_protected():
    assert steps_to_delete(Retention(keep_last=2), ckpts(10, 20, 30, 40)) == [10, 20]
    assert steps_to_delete(Retention(keep_last=2), ckpts(10, 20, 30, 40), protected={20}) == [10]
    assert steps_to_delete(Retention(keep_every=1000), ckpts(10, 20, 30)) == [10, 20]  # 30 is the newest
    assert steps_to_delete(Retention(keep_last=3), ckpts(40, 10, 30, 20, 40)) == [10]  # order and duplicates


def test_keep_every_and_keep_last_are_a_union():
    policy = Retention(keep_last=1, keep_every=100)
    assert steps_to_delete(policy, ckpts(50, 100, 150, 200, 250, 300, 310)) == [50, 150, 250]


@pytest.mark.parametrize("mode, kept", [("min", {2, 4}), ("max", {1, 3})])
def test_keep_best_ranks_by_a_training_key(mode, kept):
    losses = {1: 0.9, 2: 0.1, 3: 0.8, 4: 0.1, 5: 0.5}
    checkpoints = [(s, {"loss": v}) for s, v in losses.items()] + [(6, {"epoch": 3}), (7, {"loss": "n/a"})]
    policy = Retention(keep_best=2, best_key="loss", best_mode=mode)
    deleted = steps_to_delete(policy, checkpoints)
    # 6 and 7 have no numeric loss: no rule keeps 6; 7 is the newest, kept anyway.
    assert set(deleted) == (set(losses) - kept) | {6}


def test_equal_values_prefer_the_newer_step():
    policy = Retention(keep_best=1, best_key="loss")
    assert steps_to_delete(policy, [(1, {"loss": 0.5}), (2, {"loss": 0.5}), (3, {"loss": 0.7})]) == [1]


def test_parse_and_proto_round_trip():
    policy = Retention.parse("keep_last=3, keep_every=100,keep_best=acc:max:2")
    assert policy == Retention(keep_last=3, keep_every=100, keep_best=2, best_key="acc", best_mode="max")
    assert Retention.from_proto(policy.to_proto()) == policy
    assert Retention.parse("keep_best=loss:4") == Retention(keep_best=4, best_key="loss", best_mode="min")
    assert str(policy) == "keep_last=3,keep_every=100,keep_best=acc:max:2"


@pytest.mark.parametrize("text", ["keep_last=x", "keep_first=3", "keep_best=loss", "keep_best=loss:avg:2", "keep_last=-1"])
def test_bad_policies_are_named(text):
    with pytest.raises(lv.InvalidArgumentError, match="retention|keep_"):
        Retention.parse(text)


def test_config_validation():
    with pytest.raises(lv.InvalidArgumentError, match="best_key"):
        Retention(keep_best=2)
    with pytest.raises(lv.InvalidArgumentError, match="keep_best=M"):
        Retention(best_key="loss")
    with pytest.raises(lv.InvalidArgumentError, match="retention must be"):
        lv.ModelConfig(job="j", name="m", retention={"keep_last": 3})
    with pytest.raises(lv.InvalidArgumentError, match="incremental"):
        lv.OptimizerConfig(job="j", name="o", incremental="yes")
