"""Preference pairs: hand-built records, pair rules, caps, determinism, summary."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from looper.config import ABEL_PROMPT, ConfigError, PrefsConfig
from looper.io import DataError
from looper.regime_w import build_preferences, check_rollout_record, format_summary, record_prompt, summarize


def traj(text: str, correct: bool, reward: float) -> dict:
    return {"full_text": text, "answer": None, "num_tokens": 10, "correct": correct, "cf": 1.0, "reward": reward}


def records() -> list[dict]:
    return [
        {  # mixed: C = A2 (1.5), A0 (1.3), A4 (1.2); W = A1 (0.2), A3 (0.4)
            "question_id": "qa",
            "question": "  How many apples?  ",
            "trajectories": [
                traj("A0", True, 1.3),
                traj("A1", False, 0.2),
                traj("A2", True, 1.5),
                traj("A3", False, 0.4),
                traj("A4", True, 1.2),
            ],
        },
        {  # all correct, with two identical texts; carries its own prompt
            "question_id": 7,
            "question": "ignored",
            "prompt": "custom prompt\n",
            "trajectories": [traj("same", True, 1.5), traj("same", True, 1.2), traj("other", True, 1.0)],
        },
        {  # all wrong: no pairs
            "question_id": "qc",
            "question": "Q?",
            "trajectories": [traj("W0", False, 0.3), traj("W1", False, 0.1)],
        },
        {  # duplicates: two correct trajectories with the same text
            "question_id": "qd",
            "question": "D?",
            "trajectories": [traj("X", True, 1.5), traj("X", True, 1.4), traj("Y", False, 0.3), traj("Z", False, 0.1)],
        },
    ]


def triples(pairs: list[dict]) -> list[tuple[str, str, str, str]]:
    return [(p["pair_id"], p["chosen"], p["rejected"], p["kind"]) for p in pairs]


def test_hand_built_pairs_exact():
    pairs = build_preferences(records(), PrefsConfig())
    assert triples(pairs) == [
        # C sorted [A2, A0, A4], W sorted [A1, A3]; round robin over all 3*2 combinations
        ("qa-corr-0", "A2", "A1", "correctness"),
        ("qa-corr-1", "A0", "A3", "correctness"),
        ("qa-corr-2", "A4", "A1", "correctness"),
        ("qa-corr-3", "A2", "A3", "correctness"),
        ("qa-corr-4", "A0", "A1", "correctness"),
        ("qa-corr-5", "A4", "A3", "correctness"),
        # coherence, largest margin first: 1.5-1.2, 1.5-1.3, 1.3-1.2
        ("qa-cohe-0", "A2", "A4", "coherence"),
        ("qa-cohe-1", "A2", "A0", "coherence"),
        ("qa-cohe-2", "A0", "A4", "coherence"),
        # same>same has identical texts; the second same>other duplicates the first
        ("7-cohe-0", "same", "other", "coherence"),
        # C [X(1.5), X(1.4)], W [Z(0.1), Y(0.3)]: X>Z, X>Y, then two duplicates dropped
        ("qd-corr-0", "X", "Z", "correctness"),
        ("qd-corr-1", "X", "Y", "correctness"),
    ]
    first = pairs[0]
    assert set(first) == {
        "pair_id", "question_id", "kind", "prompt", "chosen", "rejected", "chosen_reward", "rejected_reward", "margin",
    }
    assert first["question_id"] == "qa"
    assert (first["chosen_reward"], first["rejected_reward"], first["margin"]) == (1.5, 0.2, 1.3)
    assert [p["margin"] for p in pairs if p["kind"] == "coherence"] == [0.3, 0.2, 0.1, 0.5]
    assert pairs[9]["question_id"] == 7


def test_prompt_from_record_or_template():
    from looper.data.gsm8k import format_prompt

    pairs = build_preferences(records())
    by_q = {p["question_id"]: p["prompt"] for p in pairs}
    # the same prompt the data module builds for rollouts
    assert by_q["qa"] == format_prompt("  How many apples?  ", ABEL_PROMPT)
    assert by_q["qa"] == ABEL_PROMPT.replace("{question}", "How many apples?")
    assert by_q[7] == "custom prompt\n"
    custom = build_preferences(records(), prompt_template="Q: {question} {braces}\nA:")
    assert custom[0]["prompt"] == "Q: How many apples? {braces}\nA:"
    with pytest.raises(ConfigError, match="question"):
        record_prompt({"question": "x"}, "no placeholder")


def test_caps_threshold_and_switches():
    pairs = build_preferences(records(), PrefsConfig(max_correctness_pairs=4, max_coherence_pairs=2))
    qa = [p for p in pairs if p["question_id"] == "qa"]
    assert [p["pair_id"] for p in qa] == ["qa-corr-0", "qa-corr-1", "qa-corr-2", "qa-corr-3", "qa-cohe-0", "qa-cohe-1"]
    pairs = build_preferences(records(), PrefsConfig(threshold=0.25))
    assert [(p["chosen"], p["rejected"]) for p in pairs if p["kind"] == "coherence"] == [("A2", "A4"), ("same", "other")]
    pairs = build_preferences(records(), PrefsConfig(coherence=False))
    assert {p["kind"] for p in pairs} == {"correctness"} and len(pairs) == 8
    pairs = build_preferences(records(), PrefsConfig(max_correctness_pairs=0, max_coherence_pairs=0))
    assert pairs == []


def test_bad_prefs_config():
    with pytest.raises(ConfigError, match="threshold"):
        PrefsConfig(threshold=0.0)
    with pytest.raises(ConfigError, match="max_coherence_pairs"):
        PrefsConfig(max_coherence_pairs=-1)


def _random_records(rng: np.random.Generator, n: int, unique: bool) -> list[dict]:
    recs = []
    for q in range(n):
        k = int(rng.integers(1, 9))
        trajs = []
        for i in range(k):
            correct = bool(rng.random() < 0.5)
            tag = f"{q}-{i}" if unique else str(int(rng.integers(0, 3)))
            reward = float(np.round(rng.random() * 0.2 + (1.0 if correct else 0.0), 3))
            trajs.append(traj(("C" if correct else "W") + tag, correct, reward))
        recs.append({"question_id": f"q{q}", "question": f"question {q % 5}", "trajectories": trajs})
    return recs


@pytest.mark.parametrize("unique", [True, False])
def test_pair_rules_hold_on_random_records(unique):
    rng = np.random.default_rng(1)
    recs = _random_records(rng, 80, unique)
    before = copy.deepcopy(recs)
    cfg = PrefsConfig(max_correctness_pairs=5, max_coherence_pairs=3, threshold=0.05)
    pairs = build_preferences(recs, cfg)
    assert recs == before  # input untouched
    # two runs give byte-identical output
    assert json.dumps(pairs) == json.dumps(build_preferences(copy.deepcopy(recs), cfg))
    assert len({p["pair_id"] for p in pairs}) == len(pairs)
    seen = set()
    for p in pairs:
        assert p["chosen"] != p["rejected"]
        key = (p["prompt"], p["chosen"], p["rejected"])
        assert key not in seen
        seen.add(key)
        assert p["margin"] == pytest.approx(p["chosen_reward"] - p["rejected_reward"])
        if p["kind"] == "correctness":
            # a correct trajectory is never rejected, an incorrect one never chosen
            assert p["chosen"].startswith("C") and p["rejected"].startswith("W")
        else:
            assert p["chosen"].startswith("C") and p["rejected"].startswith("C")
            assert p["margin"] >= cfg.threshold
    for rec in recs:
        n_c = sum(t["correct"] for t in rec["trajectories"])
        n_w = len(rec["trajectories"]) - n_c
        mine = [p for p in pairs if p["question_id"] == rec["question_id"]]
        n_corr = sum(p["kind"] == "correctness" for p in mine)
        n_coh = sum(p["kind"] == "coherence" for p in mine)
        assert n_corr <= min(cfg.max_correctness_pairs, n_c * n_w)
        assert n_coh <= cfg.max_coherence_pairs
        if unique:  # nothing is dropped, so the caps are reached exactly
            assert n_corr == min(cfg.max_correctness_pairs, n_c * n_w)
            rewards = sorted(t["reward"] for t in rec["trajectories"] if t["correct"])
            n_gaps = sum(round(a - b, 12) >= cfg.threshold for a in rewards for b in rewards)
            assert n_coh == min(cfg.max_coherence_pairs, n_gaps)
        # correctness pairs come before the coherence pairs of the same question
        kinds = [p["kind"] for p in mine]
        assert kinds == sorted(kinds, key=lambda k: k != "correctness")


def test_round_robin_spreads_trajectories():
    # |C| = |W| = 4, cap 8: the first pass pairs best with worst, 2nd with 2nd, ...,
    # and every trajectory appears exactly twice
    trajs = [traj(f"C{i}", True, 2.0 - i / 10) for i in range(4)] + [traj(f"W{i}", False, i / 10) for i in range(4)]
    pairs = build_preferences([{"question_id": 1, "question": "q", "trajectories": trajs}], PrefsConfig(coherence=False))
    got = [(p["chosen"], p["rejected"]) for p in pairs]
    assert got[:4] == [("C0", "W0"), ("C1", "W1"), ("C2", "W2"), ("C3", "W3")]
    assert len(set(got)) == 8
    for name in [f"C{i}" for i in range(4)] + [f"W{i}" for i in range(4)]:
        assert sum(name in pair for pair in got) == 2


def test_validation_errors():
    good = records()[0]
    check_rollout_record(good, "x")
    bad = copy.deepcopy(good)
    del bad["trajectories"][1]["reward"]
    with pytest.raises(DataError, match=r"f\.jsonl:3: trajectories\[1\]: missing field\(s\) \['reward'\]"):
        check_rollout_record(bad, "f.jsonl:3")
    cases = [
        ({"question": "q", "trajectories": []}, "question_id"),
        ({"question_id": 1, "trajectories": [traj("a", True, 1.0)]}, "question"),
        ({"question_id": 1, "question": "q", "trajectories": []}, "non-empty list"),
        ({"question_id": 1, "question": "q", "trajectories": ["x"]}, "expected an object"),
        ({"question_id": 1, "question": "q", "trajectories": [traj("a", "yes", 1.0)]}, "'correct'"),
        ({"question_id": 1, "question": "q", "trajectories": [traj("a", True, float("nan"))]}, "'reward'"),
        ({"question_id": 1, "question": "q", "trajectories": [traj(None, True, 1.0)]}, "'full_text'"),
        ({"question_id": True, "question": "q", "trajectories": [traj("a", True, 1.0)]}, "question_id"),
        ([1, 2], "JSON object"),
    ]
    for rec, msg in cases:
        with pytest.raises(DataError, match=msg):
            check_rollout_record(rec, "where")
    dup = records()[:1] * 2
    with pytest.raises(DataError, match="duplicate question_id"):
        build_preferences(dup)


def test_summary_counts_and_histograms():
    recs = records()
    pairs = build_preferences(recs)
    s = summarize(recs, pairs, bins=5)
    assert (s["n_questions"], s["n_trajectories"]) == (4, 14)
    assert (s["n_all_correct"], s["n_all_wrong"], s["n_mixed"]) == (1, 1, 2)
    assert (s["n_pairs"], s["n_correctness"], s["n_coherence"]) == (12, 8, 4)
    assert s["n_questions_with_pairs"] == 3
    assert s["accuracy"] == pytest.approx(8 / 14)
    assert s["max_correct_reward_gap"] == pytest.approx(0.5)
    assert s["mean_reward_correct"] == pytest.approx((1.3 + 1.5 + 1.2 + 1.5 + 1.2 + 1.0 + 1.5 + 1.4) / 8)
    assert len(s["margin_hist"]["counts"]) == 5 and sum(s["margin_hist"]["counts"]) == 12
    assert len(s["reward_hist"]["edges"]) == 6 and sum(s["reward_hist"]["counts"]) == 14
    assert s["reward_hist"]["edges"][0] == pytest.approx(0.1) and s["reward_hist"]["edges"][-1] == pytest.approx(1.5)
    json.dumps(s)  # serializable
    text = format_summary(s)
    assert "1 all-correct, 1 all-wrong, 2 mixed" in text
    assert "pairs: 12 (8 correctness, 4 coherence)" in text
    assert text.count("\n") >= 4 + 5 + 5
    empty = summarize([], [])
    assert empty["n_pairs"] == 0 and empty["margin_hist"] == {"counts": [], "edges": []}
    assert "(none)" in format_summary(empty)


def test_a_pair_with_an_empty_side_is_skipped():
    """Regression: a trajectory that stopped at once (empty text) became a rejected text that
    `looper dpo` refuses, so one such pair made the whole pair file unusable."""
    from looper.config import PrefsConfig
    from looper.regime_w import build_preferences

    trajs = [
        {"full_text": "3 + 4 = 7\n#### 7", "correct": True, "reward": 1.5},
        {"full_text": "", "correct": False, "reward": 0.2},
        {"full_text": "  \n", "correct": False, "reward": 0.1},
        {"full_text": "3 + 4 = 8\n#### 8", "correct": False, "reward": 0.3},
    ]
    pairs = build_preferences([{"question_id": "q", "question": "?", "trajectories": trajs}], PrefsConfig())
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("3 + 4 = 7\n#### 7", "3 + 4 = 8\n#### 8")]
