"""looper.loops.common: the schedule, held-out splits, evaluation shards, the finite check
and the choice of resume state, with hand-derived values."""

from __future__ import annotations

import math

import pytest

from looper.config import ConfigError, TrainConfig
from looper.io import DataError
from looper.loops.common import check_finite, equal_shards, lr_lambda, resume_point, split_val, total_steps


def test_warmup_then_cosine_to_the_floor():
    t = TrainConfig(warmup_steps=2, schedule="cosine", min_lr_ratio=0.1)
    f = lr_lambda(t, total_steps=6)
    assert [f(0), f(1)] == [0.5, 1.0]  # linear warmup from 0: (step + 1) / warmup
    # then 0.1 + 0.9 * 0.5 * (1 + cos(pi * (step - 2) / 4))
    for step in (2, 3, 4, 6):
        assert f(step) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - 2) / 4)))
    assert f(6) == pytest.approx(0.1)
    linear = lr_lambda(TrainConfig(schedule="linear"), total_steps=4)
    assert [linear(s) for s in range(5)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    assert lr_lambda(TrainConfig(schedule="constant"), 10)(7) == 1.0


def test_total_steps_from_epochs_or_max_steps():
    assert total_steps(TrainConfig(epochs=2.5), steps_per_epoch=4) == 10
    assert total_steps(TrainConfig(epochs=0.1), steps_per_epoch=4) == 1
    assert total_steps(TrainConfig(max_steps=7, epochs=3), steps_per_epoch=4) == 7


def test_split_val_is_deterministic_disjoint_and_complete():
    rows = list(range(50))
    train, val = split_val(rows, 10, seed=3)
    assert len(val) == 10 and sorted(train + val) == rows
    assert split_val(rows, 10, seed=3) == (train, val)
    assert split_val(rows, 10, seed=4)[1] != val
    assert split_val(rows, 0, seed=3) == (rows, [])
    with pytest.raises(DataError, match=r"dpo\.val_size=50 leaves no training rows out of 50"):
        split_val(rows, 50, seed=3, key="dpo.val_size")


def test_equal_shards_give_every_rank_the_same_number_of_batches():
    shards = [equal_shards(7, batch_size=2, rank=r, world=3) for r in range(3)]
    assert shards == [[[0, 3], [6]], [[1, 4], []], [[2, 5], []]]
    assert sorted(i for s in shards for b in s for i in b) == list(range(7))


def test_check_finite_names_the_step_and_the_checkpoint():
    check_finite(1.5, 3, "loss", None)
    with pytest.raises(FloatingPointError, match=r"non-finite loss \(nan\) at optimizer step 3.*ckpt/step-2"):
        check_finite(float("nan"), 3, "loss", "ckpt/step-2")
    with pytest.raises(FloatingPointError, match="no checkpoint was written yet"):
        check_finite(float("inf"), 1, "gradient norm", None)


def test_resume_point_none_auto_and_explicit(tmp_path):
    identity = {"settings": {"sft.lr": 0.1}}
    assert resume_point(TrainConfig(resume="none"), str(tmp_path), identity, "sft") is None
    assert resume_point(TrainConfig(resume="auto"), str(tmp_path / "absent"), identity, "sft") is None
    with pytest.raises(ConfigError, match="not a resume state"):
        resume_point(TrainConfig(resume=str(tmp_path)), str(tmp_path), identity, "sft")
