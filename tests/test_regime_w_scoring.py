"""Regime W scoring: hand-computed groups, claim checking, invariants, robustness, real data."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest

from looper.config import ConfigError, RegimeWConfig, load_config
from looper.regime_w import (
    answer_key,
    evaluate_expression,
    extract_claims,
    final_answer_split,
    score_group,
    score_trajectory,
    summarize,
    trajectory_rewards,
    build_preferences,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"


def claims_of(text: str) -> list[tuple[str, float, bool]]:
    return [(c.expr, c.result, c.holds) for c in extract_claims(text)]


# --------------------------------------------------------------------------- s_end


def test_s_end_ties_and_none():
    # 12 and 12.0 are one answer (2 votes), 7 has 2 votes, None never counts: 2/6.
    g = score_group(["a"] * 6, ["12", "12.0", "7", "7", None, None], [10] * 6)
    assert g.s_end == pytest.approx(2 / 6)
    # tie 12 vs 7: the smallest number wins, whatever the order
    assert g.majority == "7"
    assert g.agree.tolist() == [False, False, True, True, False, False]


def test_s_end_all_none_is_zero():
    g = score_group(["x", "y", "z"], [None, None, None], [5, 5, 5])
    assert g.s_end == 0.0
    assert g.majority is None
    assert not g.agree.any()


def test_s_end_numeric_normalisation_and_text_answers():
    g = score_group(["a"] * 4, ["$1,000", "1000", "1000.00", "999"], [1] * 4)
    assert g.s_end == pytest.approx(3 / 4)
    assert g.agree.tolist() == [True, True, True, False]
    g = score_group(["a"] * 3, ["abc", "abc", "5"], [1] * 3)
    assert g.s_end == pytest.approx(2 / 3) and g.majority == "abc"
    assert answer_key("  ") is None and answer_key(None) is None
    assert answer_key("-0") == answer_key("0")
    assert answer_key(18) == answer_key("18.0") == answer_key(" $18. ")
    assert answer_key(10**400) == (1, "1" + "0" * 400)  # too long to be read as a number


def test_s_end_single_and_unanimous():
    assert score_group(["t"], ["5"], [3]).s_end == 1.0
    g = score_group(["t"] * 3, ["5", "5", "5"], [3, 3, 3])
    assert g.s_end == 1.0 and g.agree.all()


# --------------------------------------------------------------------------- s_path


@pytest.mark.parametrize(
    "n, s_path, length_dev",
    [
        ([100, 100, 100], 1.0, [0, 0, 0]),  # equal lengths: var = 0
        ([37], 1.0, [0]),  # K < 2
        ([0, 0, 0], 1.0, [0, 0, 0]),  # mean = 0
        # mean 200, var = (100^2 + 100^2)/2 = 10000, 10000/200^2 = 0.25
        ([100, 300], 0.75, [0.5, 0.5]),
        # mean 20, var = (100 + 0 + 100)/3 = 200/3, /400 = 1/6
        ([10, 20, 30], 5 / 6, [0.5, 0.0, 0.5]),
        # mean 100, var = (3*100^2 + 300^2)/4 = 30000, /100^2 = 3 -> clipped to 1
        ([0, 0, 0, 400], 0.0, [1.0, 1.0, 1.0, 1.0]),
    ],
)
def test_s_path_hand_computed(n, s_path, length_dev):
    g = score_group(["t"] * len(n), ["1"] * len(n), n)
    assert g.s_path == pytest.approx(s_path)
    assert g.length_dev == pytest.approx(np.array(length_dev, dtype=float))


# --------------------------------------------------------------------------- claims


def test_true_false_and_no_claims():
    # two true claims (one inline, one annotation); the inline "7 x 2 = <<...>>14" is the
    # annotation's own text and is counted once
    t = "Tom has 3 + 4 = 7 apples.\nThen 7 x 2 = <<7*2=14>>14\n#### 14"
    assert claims_of(t) == [("3 + 4", 7.0, True), ("7*2", 14.0, True)]
    assert score_trajectory(t, "14") == (1.0, 1.0, 2)

    # one false, one true claim: step 1/2; the last claim's result is the answer
    t = "3 + 4 = 8\n8 x 2 = 16\n#### 16"
    assert score_trajectory(t, "16") == (0.5, 1.0, 2)

    # a false claim whose result is not the answer, but the answer is in the reasoning
    t = "5 * 5 = 20\nSo she has 25 apples.\nThe answer is 25"
    assert score_trajectory(t, "25") == (0.0, 1.0, 1)

    # no claims: step = 1; "twelve" is not a number, so not grounded
    assert score_trajectory("She has twelve apples.\n#### 12", "12") == (1.0, 0.0, 0)
    assert score_trajectory("She had 12 apples.\n#### 12", "12") == (1.0, 1.0, 0)


def test_grounded_rules():
    # the number only on the final-answer line does not count
    assert score_trajectory("I think so.\nThe answer is 9", "9")[1] == 0.0
    # numeric equality, not string equality
    assert score_trajectory("It costs $18.00 in total.\n#### 18", "18")[1] == 1.0
    assert score_trajectory("That is 1,000 people.\n#### 1000", "1000")[1] == 1.0
    assert score_trajectory("That is 1000 people.\n#### 1,000", "1,000.0")[1] == 1.0
    # None and non-numeric answers are never grounded
    assert score_trajectory("3 + 4 = 7\n#### 7", None)[1] == 0.0
    assert score_trajectory("the word seven\n#### seven", "seven")[1] == 0.0
    # "16-3" is 16 and 3, not -3; "is -3" is -3
    assert score_trajectory("He had 16-3 apples.\n#### 13", "-3")[1] == 0.0
    assert score_trajectory("He had 16-3 apples.\n#### 13", "3")[1] == 1.0
    assert score_trajectory("The change is -3 degrees.\n#### -3", "-3")[1] == 1.0
    # last claim result equals the answer even when it sits on the final line
    assert score_trajectory("So 6 x 7 = 42, the answer is 42", "42") == (1.0, 1.0, 1)


def test_final_answer_line():
    text = "Answer: first try 5\n2 + 2 = 4\nThe answer is 4\nok\n"
    assert final_answer_split(text) == ("Answer: first try 5\n2 + 2 = 4\n", "The answer is 4")
    # case-insensitive, the last marker line wins
    assert final_answer_split("a\nFINAL ANSWER: 3\nb")[1] == "FINAL ANSWER: 3"
    assert final_answer_split("x 5\n#### 5")[1] == "#### 5"
    # no marker: the last non-blank line
    assert final_answer_split("a 1\nb 2\n\n\n") == ("a 1\n", "b 2")
    assert final_answer_split("") == ("", "")
    # configurable markers
    reasoning, line = final_answer_split("x\nA: 18\ny", markers=["A:"])
    assert line == "A: 18" and reasoning == "x\n"


def test_claim_evaluator_rules():
    assert evaluate_expression("2 x (3 + $1,000) / 4") == pytest.approx(501.5)
    assert evaluate_expression("6 × 7 ÷ 2") == pytest.approx(21.0)
    assert evaluate_expression(".5 + 1.25") == pytest.approx(1.75)
    assert evaluate_expression("-(2 + 3) * 2") == pytest.approx(-10.0)
    assert math.isnan(evaluate_expression("5 / 0"))
    for bad in ("2**3", "2^3", "3x", "x", "(1 + 2", "1 + 2)", "", "abc", "3 * -2", "1 1"):
        assert evaluate_expression(bad) is None, bad


def test_inline_claim_reading():
    cases = {
        "10/3 = 3.33": True,  # rounded result with 2 decimals
        "7/2 = 3": False,  # integers are not rounded
        "5 / 0 = 0": False,  # division by zero is false
        "0.1 + 0.2 = 0.3": True,  # float noise is within the tolerance
        "3/6 = 50%": True,
        "3/6 = 40%": False,
        "$1,000 + 200 = $1,200": True,
        "4 * 60 / 5 = 4 * 12": True,  # chain: the right-hand expression
        "6/8 = 3/4": True,  # a fraction as the result
        "2 + 2 = 5 + 1": False,
        "(a) 3 + 4 = 7": True,  # stray parenthesis trimmed
        "(3 + 4 = 7)": True,
        "Step 1. 3 + 4 = 7": True,
        "so -3 + 1 = -2": True,
        "1 – 3/4 = 1/4": True,  # en dash as minus
    }
    for text, holds in cases.items():
        got = extract_claims(text)
        assert len(got) == 1 and got[0].holds is holds, (text, got)
    # each "=" of a chain is a claim
    assert claims_of("5 + 3 = 8 + 2 = 10") == [("5 + 3", 8.0, True), ("8 + 2", 10.0, True)]


@pytest.mark.parametrize(
    "text",
    [
        "x = 5",
        "2**3 = 8",
        "2^3 = 8",
        "3 == 3",
        "a <= 5",
        "Total = 12",  # a bare number is not arithmetic
        "1 dozen = 12",
        "60g * 4/5 = 240g",  # left operand cut off by a word
        "W - 3 = 5",
        "3x + 4 = 28",  # algebra, not 3 * (+4)
        "5 - 1 - 1/2 = 3 1/2",  # mixed number result
        "20% of 50 = 10",
        "<<x=5>>",
        "<<a*b=3>>",
        "<<2**3=8>>",
    ],
)
def test_not_claims(text):
    assert extract_claims(text) == []


def test_annotation_claims():
    assert claims_of("<<2*0.5=1.0>>") == [("2*0.5", 1.0, True)]
    assert claims_of("<<20*.01=.2>>") == [("20*.01", 0.2, True)]
    assert claims_of("<<3-5=-2>>") == [("3-5", -2.0, True)]
    assert claims_of("<<2*3=7>>") == [("2*3", 7.0, False)]
    # text order across both forms
    t = "1 + 1 = 2 then <<2*2=4>>4 and 4 + 1 = 6"
    assert [c.kind for c in extract_claims(t)] == ["inline", "annotation", "inline"]
    assert [c.holds for c in extract_claims(t)] == [True, True, False]


def test_claim_caps_are_configurable():
    t = "1 + 1 = 2\n" * 50
    assert len(extract_claims(t)) == 50
    assert len(extract_claims(t, RegimeWConfig(max_claims=7))) == 7
    assert len(extract_claims(t, RegimeWConfig(max_candidates=3))) == 3
    assert extract_claims("1 + 1 = 2", RegimeWConfig(max_expr_chars=4)) == []
    assert extract_claims("(((1))) + 1 = 2", RegimeWConfig(max_depth=2)) == []
    assert len(extract_claims("(((1))) + 1 = 2", RegimeWConfig(max_depth=3))) == 1
    assert extract_claims("10/3 = 3.33", RegimeWConfig(allow_rounding=False))[0].holds is False


# --------------------------------------------------------------------------- s_wm


GROUP_TEXTS = [
    # claims 3+4=7 (true), 7+2=9 (true): step 1; last claim 9 = answer: grounded 1; cf 1
    "Tom has 3 + 4 = 7 apples.\nHe buys 2 more: 7 + 2 = 9.\n#### 9",
    # claims 3+4=8 (false), 8+2=10 (true): step 1/2; last claim 10 = answer: grounded 1; cf 0.75
    "Tom has 3 + 4 = 8 apples.\nHe buys 2 more: 8 + 2 = 10.\n#### 10",
    # no claims: step 1; reasoning holds 7 and 2, not 9: grounded 0; cf 0.5
    "Tom has 7 apples and buys 2.\n#### 9",
    # no claims, no answer: step 1, grounded 0; cf 0.5
    "I am not sure.",
]
GROUP_ANSWERS = ["9", "10", "9", None]
GROUP_TOKENS = [40, 60, 20, 40]


def test_full_s_wm_worked_out():
    g = score_group(GROUP_TEXTS, GROUP_ANSWERS, GROUP_TOKENS)
    assert g.step.tolist() == [1.0, 0.5, 1.0, 1.0]
    assert g.grounded.tolist() == [1.0, 1.0, 0.0, 0.0]
    assert g.cf.tolist() == [1.0, 0.75, 0.5, 0.5]
    assert g.n_claims.tolist() == [2, 2, 0, 0]
    # s_end: "9" twice out of K=4 -> 0.5
    assert g.s_end == pytest.approx(0.5) and g.majority == "9"
    assert g.agree.tolist() == [True, False, True, False]
    # s_path: mean 40, var = (0 + 400 + 400 + 0)/4 = 200, 200/1600 = 0.125 -> 0.875
    assert g.s_path == pytest.approx(0.875)
    assert g.length_dev == pytest.approx([0.0, 0.5, 0.5, 0.0])
    # s_cf = (1 + 0.75 + 0.5 + 0.5)/4 = 0.6875
    assert g.s_cf == pytest.approx(0.6875)
    # s_wm = 0.5*0.5 + 0.3*0.875 + 0.2*0.6875 = 0.25 + 0.2625 + 0.1375 = 0.65
    assert g.s_wm == pytest.approx(0.65)
    assert g.question_fields() == pytest.approx({"s_end": 0.5, "s_path": 0.875, "s_cf": 0.6875, "s_wm": 0.65})


def test_custom_weights_and_step_weight():
    cfg = RegimeWConfig(w_end=0.2, w_path=0.2, w_cf=0.6, step_weight=1.0)
    g = score_group(GROUP_TEXTS, GROUP_ANSWERS, GROUP_TOKENS, cfg)
    # cf = step only: [1, 0.5, 1, 1] -> s_cf = 0.875
    assert g.s_cf == pytest.approx(0.875)
    assert g.s_wm == pytest.approx(0.2 * 0.5 + 0.2 * 0.875 + 0.6 * 0.875)


def test_weights_not_summing_to_one_rejected():
    with pytest.raises(ConfigError, match="sum to 1"):
        RegimeWConfig(w_end=0.5, w_path=0.3, w_cf=0.3)
    with pytest.raises(ConfigError, match="sum to 1"):
        load_config(overrides=["regime_w.w_end=0.6"])
    with pytest.raises(ConfigError, match="w_path"):
        RegimeWConfig(w_end=1.0, w_path=-0.2, w_cf=0.2)
    with pytest.raises(ConfigError, match="step_weight"):
        RegimeWConfig(step_weight=1.5)
    # a valid re-weighting through overrides is accepted
    cfg = load_config(overrides=["regime_w.w_end=0.6", "regime_w.w_path=0.2"])
    assert cfg.regime_w.w_end == 0.6


def test_bad_group_inputs():
    with pytest.raises(ValueError):
        score_group([], [], [])
    with pytest.raises(ValueError):
        score_group(["a", "b"], ["1"], [1, 2])
    with pytest.raises(ValueError):
        score_group(["a"], ["1"], [-1])
    with pytest.raises(ValueError):
        score_group(["a"], ["1"], [float("nan")])


# --------------------------------------------------------------------------- invariants


def _random_group(rng: np.random.Generator, k: int) -> tuple[list[str], list, list[int]]:
    texts, answers = [], []
    for _ in range(k):
        a, b = int(rng.integers(0, 50)), int(rng.integers(1, 50))
        c = a + b + int(rng.integers(-1, 2))  # sometimes wrong
        style = int(rng.integers(0, 4))
        if style == 0:
            texts.append(f"We add {a} + {b} = {c}.\n#### {c}")
        elif style == 1:
            texts.append(f"Total <<{a}+{b}={c}>>{c} items.\nThe answer is {c}")
        elif style == 2:
            texts.append(f"No idea about {a}.\n")
        else:
            texts.append(f"{a} x {b} = {a * b}, then {a * b} - {b} = {a * b - b}\nAnswer: {a * b - b}")
        answers.append(None if style == 2 else str(c if style < 2 else a * b - b))
    return texts, answers, [int(x) for x in rng.integers(0, 900, size=k)]


def test_reorder_invariance_and_unit_range():
    rng = np.random.default_rng(0)
    for _ in range(60):
        k = int(rng.integers(1, 9))
        texts, answers, n = _random_group(rng, k)
        g = score_group(texts, answers, n)
        for v in (g.s_end, g.s_path, g.s_cf, g.s_wm):
            assert 0.0 <= v <= 1.0
        for arr in (g.length_dev, g.step, g.grounded, g.cf):
            assert arr.shape == (k,) and np.all((arr >= 0) & (arr <= 1))
        perm = rng.permutation(k)
        h = score_group([texts[i] for i in perm], [answers[i] for i in perm], [n[i] for i in perm])
        assert (h.s_end, h.majority) == (g.s_end, g.majority)
        for name in ("s_path", "s_cf", "s_wm"):
            assert getattr(h, name) == pytest.approx(getattr(g, name), abs=1e-12)
        for name in ("agree", "step", "grounded", "cf", "n_claims"):
            assert np.array_equal(getattr(h, name), getattr(g, name)[perm]), name
        assert np.allclose(h.length_dev, g.length_dev[perm])


# --------------------------------------------------------------------------- robustness


# Each hostile pattern at ~100 kB, and all of them mixed into one 1 MB text.
HOSTILE = {
    "huge exponent": "9**99999999 = 5\n<<9**99999999=5>>\n9^99999999 = 1\n#### 5",
    "100k-digit numbers": "1" * 100_000 + " + 1 = " + "2" * 100_000 + "\n<<" + "9" * 100_000 + "*2=3>>\n#### " + "7" * 100_000,
    "deep parens": "(" * 100_000 + "1" + ")" * 100_000 + " = 1\n<<" + "(" * 5000 + "1" + ")" * 5000 + "=1>>",
    "many deep lines": ("(" * 150 + "1" + ")" * 49 + "= 1\n") * 500,
    "many claims": "1+1=2; " * 15_000,
    "only '='": "=" * 100_000,
    "'(=' pairs": "(=" * 50_000,
    "numbers": "12345 " * 17_000 + "\nThe answer is 5",
    "open '<<'": "<<" * 50_000,
    "annotations": "<<1+1=2>>" * 11_000,
    "no '='": "1+" * 50_000,
    "markers": "Answer:\n" * 12_500,
    "minus run": "-" * 100_000 + "5 = 5",
    "dollars": "$" * 100_000,
    "division and overflow": "1e308 = 1\n" + "99999999999999999999 * 99999999999999999999 * 99999999999999999999 = 1\n" + "1 / (1 - 1) = 5",
}
MIXED_1MB = "".join(HOSTILE[k] for k in sorted(HOSTILE) if k not in ("100k-digit numbers", "deep parens"))
MIXED_1MB = (MIXED_1MB * (1_000_000 // len(MIXED_1MB) + 1))[:1_000_000]


@pytest.mark.parametrize("name", [*HOSTILE, "mixed 1 MB"])
def test_hostile_text_is_fast_and_safe(name):
    text = MIXED_1MB if name == "mixed 1 MB" else HOSTILE[name]
    start = time.perf_counter()
    g = score_group([text, text[:1000], "#### 5"], ["5", "1" * 100_000, None], [10**9, 0, 3])
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, f"{name}: {elapsed:.2f}s"
    for v in (g.s_end, g.s_path, g.s_cf, g.s_wm):
        assert 0.0 <= v <= 1.0
    assert g.n_claims.max() <= RegimeWConfig().max_claims


def test_hostile_claims_read_as_expected():
    assert extract_claims(HOSTILE["huge exponent"]) == []
    assert extract_claims(HOSTILE["deep parens"]) == []
    assert extract_claims(HOSTILE["many deep lines"]) == []
    assert extract_claims(HOSTILE["100k-digit numbers"]) == []
    # 20-digit products are simply false, and so is 1/(1-1) = 5
    got = extract_claims(HOSTILE["division and overflow"])
    assert [c.holds for c in got] == [False, False]
    # only the first max_claims claims of a long text are read, and they hold
    got = extract_claims(HOSTILE["many claims"])
    assert len(got) == RegimeWConfig().max_claims and all(c.holds for c in got)
    # overflow to inf is a false claim, never an exception
    cfg = RegimeWConfig(max_number_digits=400, max_expr_chars=2000)
    big = " * ".join(["9" * 300] * 3) + " = 1"
    (claim,) = extract_claims(big, cfg)
    assert claim.holds is False and math.isinf(claim.value)


# --------------------------------------------------------------------------- real data


def _example_rows() -> list[dict]:
    path = DATA / "example_model_solutions.jsonl"
    if not path.exists():
        pytest.skip(f"{path} not present")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_real_model_solutions():
    from looper.data.gsm8k import extract_answer, is_correct, normalize_answer

    def answer_of(text: str):
        # these solutions end with "A: <answer>"; read it directly (fast), else extract
        last = text.strip().rsplit("\n", 1)[-1]
        return normalize_answer(last[2:]) if last.startswith("A:") else extract_answer(text)

    rows = _example_rows()
    records = []
    gold_steps = []
    for qi, row in enumerate(rows):
        models = sorted(k for k, v in row.items() if isinstance(v, dict) and "solution" in v)
        texts = [row[m]["solution"] for m in models]
        answers = [answer_of(t) for t in texts]
        correct = [bool(row[m]["is_correct"]) for m in models]
        gold = answer_of(row["ground_truth"])
        # the file's grading agrees with ours
        assert correct == [is_correct(a, gold) for a in answers]
        n = [len(t.split()) for t in texts]
        g = score_group(texts, answers, n)
        assert all(0.0 <= v <= 1.0 for v in (g.s_end, g.s_path, g.s_cf, g.s_wm))
        rewards = trajectory_rewards(correct, n, g)
        gold_steps.append(score_trajectory(row["ground_truth"], gold)[0])
        records.append(
            {
                "question_id": qi,
                "question": row["question"],
                "trajectories": [
                    {"full_text": t, "answer": a, "num_tokens": k, "correct": c, "cf": float(f), "reward": float(r)}
                    for t, a, k, c, f, r in zip(texts, answers, n, correct, g.cf, rewards)
                ],
            }
        )
    # reference solutions are arithmetically sound: nearly every claim holds
    assert np.mean(gold_steps) > 0.99
    pairs = build_preferences(records)
    s = summarize(records, pairs)
    assert s["n_questions"] == len(rows)
    assert s["n_all_correct"] + s["n_all_wrong"] + s["n_mixed"] == len(rows)
    assert 0 < s["n_mixed"] < len(rows)
    # every mixed question gives at least one correctness pair, never more than the cap
    assert s["n_questions_with_pairs"] >= s["n_mixed"]
    assert s["n_correctness"] <= 8 * s["n_mixed"]
    assert s["mean_reward_correct"] > s["mean_reward_wrong"]
    assert sum(s["reward_hist"]["counts"]) == s["n_trajectories"]
