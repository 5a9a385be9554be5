"""Tests for looper.data.synthetic: the offline GSM8K-style problem generator."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest

from looper.config import DataConfig, SyntheticConfig
from looper.data.gsm8k import extract_answer, gold_answer, load_questions
from looper.data.synthetic import OPS, corpus, generate_problems

_CALC = re.compile(r"<<(\d+)([-+*/])(\d+)=(\d+)>>(\d+)")


def _steps(answer: str) -> list[tuple[int, str, int, int]]:
    """(left, op, right, result) for each calculator annotation, checking the echo after it."""
    out = []
    for m in _CALC.finditer(answer):
        a, op, b, r, echo = m.groups()
        assert r == echo, answer
        out.append((int(a), op, int(b), int(r)))
    return out


def _evaluate(a: int, op: str, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    assert a % b == 0, f"inexact division {a}/{b}"
    return a // b


def test_record_shape_and_format():
    probs = generate_problems(20, seed=3)
    assert len(probs) == 20
    assert [p["question_id"] for p in probs] == [f"synth-3-{i:05d}" for i in range(20)]
    for p in probs:
        assert set(p) == {"question_id", "question", "answer", "gold"}
        lines = p["answer"].split("\n")
        assert lines[-1] == f"#### {p['gold']}"
        assert all("<<" in line and line.endswith(".") for line in lines[:-1])
        assert p["question"].endswith("?")


def test_deterministic_per_seed_and_seeds_differ():
    a = generate_problems(50, seed=7)
    assert a == generate_problems(50, seed=7)
    b = generate_problems(50, seed=8)
    assert [p["question"] for p in a] != [p["question"] for p in b]
    # the generator never touches the global random state
    import random

    random.seed(123)
    before = random.random()
    random.seed(123)
    generate_problems(10, seed=0)
    assert random.random() == before


def test_gold_matches_final_line_and_annotations():
    for p in generate_problems(500, seed=1, max_result=100):
        steps = _steps(p["answer"])
        assert steps
        assert gold_answer(p["answer"]) == p["gold"]
        assert extract_answer(p["answer"]) == p["gold"]
        prev = None
        for a, op, b, r in steps:
            assert _evaluate(a, op, b) == r  # every annotation holds
            assert 2 <= r <= 100  # non-negative, bounded
            if prev is not None:
                assert a == prev  # each step continues from the previous result
            prev = r
        assert str(prev) == p["gold"]


@pytest.mark.parametrize("min_steps, max_steps", [(1, 1), (2, 4), (3, 3)])
def test_steps_within_range(min_steps, max_steps):
    probs = generate_problems(200, seed=2, min_steps=min_steps, max_steps=max_steps)
    counts = {len(_steps(p["answer"])) for p in probs}
    assert counts == set(range(min_steps, max_steps + 1))


def test_knobs_ops_and_numbers():
    probs = generate_problems(100, seed=4, ops=["+"], max_number=9, max_result=50)
    for p in probs:
        for a, op, b, r in _steps(p["answer"]):
            assert op == "+" and b <= 9 and r <= 50
        assert all(int(x) <= 9 for x in re.findall(r"\d+", p["question"]))
    ops_seen = {op for p in generate_problems(300, seed=5) for _, op, _, _ in _steps(p["answer"])}
    assert ops_seen == set(OPS)


def test_questions_are_short_and_varied():
    probs = generate_problems(300, seed=0)
    words = [len(p["question"].split()) for p in probs]
    assert min(words) >= 8 and max(words) <= 60
    assert len({p["question"] for p in probs}) >= 295
    names = {p["question"].split()[0] for p in probs}
    assert len(names) >= 10


def test_exclude_and_unique():
    base = generate_problems(200, seed=0, max_steps=1, max_number=5)
    banned = {p["question"] for p in base}
    fresh = generate_problems(100, seed=1, max_steps=1, max_number=5, exclude=banned, unique=True)
    qs = [p["question"] for p in fresh]
    assert not banned & set(qs)
    assert len(set(qs)) == len(qs)


def test_bad_arguments():
    with pytest.raises(ValueError, match="min_steps"):
        generate_problems(3, min_steps=3, max_steps=2)
    with pytest.raises(ValueError, match="ops"):
        generate_problems(3, ops=["^"])
    # an impossible request stops with a clear error instead of looping forever
    with pytest.raises(ValueError, match="could only generate"):
        generate_problems(50, ops=["/"], min_steps=3, max_steps=3, max_number=5, max_result=5)


def test_corpus():
    texts = corpus(20, seed=0)
    assert texts == corpus(20, seed=0)
    assert len(texts) == 20
    for t in texts:
        assert t.startswith("Question:\n") and "\nAnswer:\nLet's think step by step.\n" in t
        assert re.search(r"\n#### \d+$", t)
        assert len(t) < 600  # short enough for ~128 tokens with a small BPE vocab


def test_load_questions_synthetic_splits():
    # a tiny problem space, so that independent draws really do collide with train
    cfg = DataConfig(synthetic=SyntheticConfig(n_train=3000, n_test=200, max_steps=1, max_number=2, seed=11, n_val=20))
    train = load_questions(None, "train", cfg)
    test = load_questions(None, "test", cfg)
    val = load_questions(None, "val", cfg)
    assert (len(train), len(test), len(val)) == (3000, 200, 20)
    assert train == generate_problems(3000, seed=11, max_steps=1, max_number=2)
    train_qs = {p["question"] for p in train}
    test_qs = {p["question"] for p in test}
    raw_test = generate_problems(200, seed=int(test[0]["question_id"].split("-")[1]), max_steps=1, max_number=2)
    assert sum(p["question"] in train_qs for p in raw_test) >= 5  # collisions exist ...
    assert not train_qs & test_qs  # ... and the test split skips every one of them
    assert not ({p["question"] for p in val} & (train_qs | test_qs))
    assert len(test_qs) == len(test)
    ids = [p["question_id"] for p in train + test + val]
    assert len(set(ids)) == len(ids)
    assert load_questions(None, "test", cfg) == test  # deterministic
    other = load_questions(None, "test", replace(cfg, synthetic=replace(cfg.synthetic, seed=12)))
    assert [p["question"] for p in other] != [p["question"] for p in test]
    with pytest.raises(ValueError, match="splits"):
        load_questions(None, "dev", cfg)
