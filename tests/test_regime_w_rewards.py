"""Regime W trajectory rewards: hand-computed values and invariants."""

from __future__ import annotations

import numpy as np
import pytest

from looper.config import ConfigError, RegimeWConfig
from looper.regime_w import GroupScores, coherence_terms, score_group, trajectory_rewards

# The group of tests/test_regime_w_scoring.py::test_full_s_wm_worked_out:
# s_wm = 0.65, agree = [T, F, T, F], length_dev = [0, 0.5, 0.5, 0], cf = [1, 0.75, 0.5, 0.5].
TEXTS = [
    "Tom has 3 + 4 = 7 apples.\nHe buys 2 more: 7 + 2 = 9.\n#### 9",
    "Tom has 3 + 4 = 8 apples.\nHe buys 2 more: 8 + 2 = 10.\n#### 10",
    "Tom has 7 apples and buys 2.\n#### 9",
    "I am not sure.",
]
ANSWERS = ["9", "10", "9", None]
TOKENS = [40, 60, 20, 40]
CORRECT = [True, False, True, False]  # gold answer 9


def make_scores(k: int, s_wm: float = 0.5, agree=None, length_dev=None, cf=None) -> GroupScores:
    agree = np.ones(k, bool) if agree is None else np.asarray(agree, bool)
    return GroupScores(
        s_end=1.0,
        s_path=1.0,
        s_cf=1.0,
        s_wm=s_wm,
        majority="1",
        agree=agree,
        length_dev=np.zeros(k) if length_dev is None else np.asarray(length_dev, float),
        step=np.ones(k),
        grounded=np.ones(k),
        cf=np.ones(k) if cf is None else np.asarray(cf, float),
    )


def test_question_scope_hand_computed():
    g = score_group(TEXTS, ANSWERS, TOKENS)
    r = trajectory_rewards(CORRECT, TOKENS, g)
    # alpha*c + beta*s_wm = c + 0.5*0.65; no full agreement, every n below 512
    assert r == pytest.approx([1.325, 0.325, 1.325, 0.325])


def test_trajectory_scope_hand_computed():
    cfg = RegimeWConfig(scope="trajectory")
    g = score_group(TEXTS, ANSWERS, TOKENS, cfg)
    # coherence_i = 0.5*agree + 0.3*(1 - length_dev) + 0.2*cf
    #   t0: 0.5 + 0.3*1.0 + 0.2*1.00 = 1.00
    #   t1: 0.0 + 0.3*0.5 + 0.2*0.75 = 0.30
    #   t2: 0.5 + 0.3*0.5 + 0.2*0.50 = 0.75
    #   t3: 0.0 + 0.3*1.0 + 0.2*0.50 = 0.40
    assert coherence_terms(g, cfg) == pytest.approx([1.0, 0.3, 0.75, 0.4])
    # reward = c + 0.5*coherence
    r = trajectory_rewards(CORRECT, TOKENS, g, cfg)
    assert r == pytest.approx([1.5, 0.15, 1.375, 0.2])
    # the two correct trajectories now differ (question scope gives them equal rewards)
    assert r[0] != r[2]


def test_trajectory_scope_uses_configured_weights():
    cfg = RegimeWConfig(scope="trajectory", w_end=0.0, w_path=0.0, w_cf=1.0, beta=1.0, alpha=0.0)
    g = score_group(TEXTS, ANSWERS, TOKENS, cfg)
    assert trajectory_rewards(CORRECT, TOKENS, g, cfg) == pytest.approx(g.cf)


def test_bonus_only_on_full_agreement():
    cfg = RegimeWConfig()
    texts = ["2 + 2 = 4\n#### 4"] * 3
    full = score_group(texts, ["4", "4", "4.0"], [10, 10, 10])
    assert full.agree.all()
    r = trajectory_rewards([True, True, True], [10] * 3, full)
    # 1 + 0.5*s_wm + 0.1, s_wm = 0.5*1 + 0.3*1 + 0.2*1 = 1
    assert r == pytest.approx([1.6, 1.6, 1.6])
    # everyone agrees on a wrong answer: no bonus
    assert trajectory_rewards([False] * 3, [10] * 3, full) == pytest.approx([0.5] * 3)
    # one dissent: nobody gets the bonus
    split = score_group(texts, ["4", "4", "5"], [10, 10, 10])
    r = trajectory_rewards([True, True, False], [10] * 3, split)
    assert r[:2] == pytest.approx(1.0 + cfg.beta * split.s_wm)
    # a missing answer also breaks full agreement
    none = score_group(texts, ["4", "4", None], [10, 10, 10])
    r = trajectory_rewards([True, True, False], [10] * 3, none)
    assert r[0] == pytest.approx(1.0 + cfg.beta * none.s_wm)


def test_reward_rises_with_correctness():
    s = make_scores(2, agree=[True, False])  # no full agreement, so no bonus
    r = trajectory_rewards([True, False], [100, 100], s)
    assert r[0] - r[1] == pytest.approx(RegimeWConfig().alpha)
    # with full agreement the correct one also gets the bonus
    r = trajectory_rewards([True, False], [100, 100], make_scores(2))
    assert r[0] - r[1] == pytest.approx(RegimeWConfig().alpha + RegimeWConfig().bonus)
    cfg = RegimeWConfig(alpha=2.5, bonus=0.0)
    r = trajectory_rewards([True, False], [100, 100], s, cfg)
    assert r[0] - r[1] == pytest.approx(2.5)


def test_reward_falls_with_length_beyond_free_tokens():
    cfg = RegimeWConfig()
    s = make_scores(6)
    n = [0, 300, 512, 513, 600, 2000]
    r = trajectory_rewards([True] * 6, n, s, cfg)
    # flat up to free_tokens, then -lam per extra token
    assert r[0] == r[1] == r[2]
    assert r[3] == pytest.approx(r[2] - 0.001)
    assert r[4] == pytest.approx(r[2] - 0.088)
    assert r[5] == pytest.approx(r[2] - 0.001 * (2000 - 512))
    assert np.all(np.diff(r[2:]) < 0)
    cfg = RegimeWConfig(lam=0.01, free_tokens=100)
    r = trajectory_rewards([True, True], [100, 150], make_scores(2), cfg)
    assert r[0] - r[1] == pytest.approx(0.5)


def test_question_scope_reward_formula_defaults():
    s = make_scores(3, s_wm=0.4, agree=[True, True, False])
    r = trajectory_rewards([True, False, False], [10, 10, 700], s)
    # 1*c + 0.5*0.4 + 0.1*0 - 0.001*max(0, n - 512)
    assert r == pytest.approx([1.2, 0.2, 0.2 - 0.188])


def test_bad_reward_inputs():
    s = make_scores(3)
    with pytest.raises(ValueError, match="K=3"):
        trajectory_rewards([True, False], [1, 2, 3], s)
    with pytest.raises(ValueError, match="K=3"):
        trajectory_rewards([True, False, True], [1, 2], s)
    with pytest.raises(ValueError, match="booleans"):
        trajectory_rewards([2, 0, 1], [1, 2, 3], s)
    with pytest.raises(ValueError, match="num_tokens"):
        trajectory_rewards([1, 0, 1], [1, -2, 3], s)
    with pytest.raises(ConfigError, match="sum to 1"):
        RegimeWConfig(w_end=0.4, w_path=0.4, w_cf=0.4)
    with pytest.raises(ConfigError, match="lam"):
        RegimeWConfig(lam=-1.0)
