"""Tests for looper.data.gsm8k: answer extraction and grading, prompts, and loading."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from looper.config import ABEL_PROMPT, DataConfig
from looper.data import gsm8k
from looper.data.gsm8k import (
    extract_answer,
    extract_answer_strict,
    format_completion,
    format_prompt,
    gold_answer,
    is_correct,
    load_gsm8k,
    load_platinum,
    load_questions,
    normalize_answer,
    strip_calculator,
)
from looper.io import DataError

SHARED_GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"

SOLUTION = (
    "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\n"
    "She makes 9 * 2 = $<<9*2=18>>18 every day at the farmer's market.\n"
    "#### 18"
)


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------- normalize


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("18", "18"),
        ("  18 \n", "18"),
        ("$18", "18"),
        ("1,000.00", "1000"),
        ("$1,234.50", "1234.5"),
        ("-3.50", "-3.5"),
        ("5.", "5"),
        ("**42**", "42"),
        ("0.250", "0.25"),
        ("-0", "0"),
        ("-$7", "-7"),
        ("$-7", "-7"),
        ("18 dollars", "18"),
        ("1,234,567", "1234567"),
        (70000, "70000"),
        (2.5, "2.5"),
        ("no number here", None),
        ("", None),
        (None, None),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_gold_answer():
    assert gold_answer(SOLUTION) == "18"
    assert gold_answer("So he made a profit of $70,000\n#### 70,000") == "70000"
    assert gold_answer("x\n#### -2.50") == "-2.5"
    with pytest.raises(ValueError, match="####"):
        gold_answer("The answer is 18")
    with pytest.raises(ValueError, match="no number"):
        gold_answer("#### eighteen")


# --------------------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    "text, strict, flexible",
    [
        (SOLUTION, "18", "18"),
        ("He has 5 apples.\n#### 5", "5", "5"),
        ("#### $1,234.50", "1234.5", "1234.5"),
        ("So the total is 12.\nThe answer is 12.", "12", "12"),
        ("the ANSWER IS $1,000 per month", "1000", "1000"),
        ("The final answer is: -4", "-4", "-4"),
        ("The answer is **27** apples.", "27", "27"),
        ("Answer: 3.75", "3.75", "3.75"),
        ("answer:  $2,500.", "2500", "2500"),
        # the last strict match wins, whatever its form
        ("Answer: 7\nWait, let me redo it.\nThe answer is 9", "9", "9"),
        ("The answer is 9\n#### 10", "10", "10"),
        # no strict form: only the flexible extractor answers, with the last number
        ("She pays $1,234.50 in total", None, "1234.5"),
        ("The temperature drops to -8 degrees.", None, "-8"),
        ("16-3-4 = 9 eggs", None, "9"),
        ("10 - 4 = 6 and then we are done", None, "6"),
        ("So it costs 0.5 dollars each.", None, "0.5"),
        ("Total: 3 + 4 = <<3+4=7>>7 cats\nA: 7", None, "7"),
        # no number at all
        ("I don't know.", None, None),
        ("", None, None),
    ],
)
def test_extract_strict_and_flexible(text, strict, flexible):
    assert extract_answer_strict(text) == strict
    assert extract_answer(text) == flexible


def test_answer_keyword_needs_a_number_on_the_same_line():
    assert extract_answer_strict("Answer:\n42") is None
    assert extract_answer("Answer:\n42") == "42"  # flexible still finds the number


def test_abel_prompt_is_not_an_answer():
    prompt = format_prompt("Tom has 3 apples and buys 4 more. How many apples does he have?")
    assert prompt.endswith("Answer:\nLet's think step by step.\n")
    # the prompt's "Answer:" is followed by a newline, never a number
    assert extract_answer_strict(prompt) is None
    assert extract_answer_strict(ABEL_PROMPT.format(question="What is 2 + 2?")) is None
    assert extract_answer(ABEL_PROMPT.format(question="What is the answer?")) is None
    # a completion after the prompt: the completion's answer is found, not a question number
    text = prompt + "He has 3 + 4 = <<3+4=7>>7 apples.\n#### 7"
    assert extract_answer_strict(text) == "7"
    text = prompt + "He has 3 + 4 = 7 apples. The answer is 7. Extra 100 words."
    assert extract_answer(text) == "7"


@pytest.mark.parametrize(
    "pred, gold, expected",
    [
        ("18", "18", True),
        ("$18.00", "18", True),
        ("1,000", "1000", True),
        ("18.", "18", True),
        ("0.3333333", "0.33333333", True),  # within 1e-6 relative
        ("0.333", "0.3333333", False),
        ("-5", "5", False),
        ("17", "18", False),
        (None, "18", False),
        ("", "18", False),
        (18, "18", True),
    ],
)
def test_is_correct(pred, gold, expected):
    assert is_correct(pred, gold) is expected


def test_strip_calculator_and_completion():
    assert strip_calculator("9 * 2 = $<<9*2=18>>18 a day") == "9 * 2 = $18 a day"
    assert format_completion("  " + SOLUTION + "\n") == SOLUTION
    stripped = format_completion(SOLUTION, strip_calc=True)
    assert "<<" not in stripped and stripped.endswith("#### 18")
    assert "16 - 3 - 4 = 9 duck eggs" in stripped


def test_format_prompt_template():
    assert format_prompt(" Q? ") == "Question:\nQ?\nAnswer:\nLet's think step by step.\n"
    assert format_prompt("Q?", template="Q: {question}\nA:") == "Q: Q?\nA:"
    # braces in the question are kept as they are
    assert format_prompt("What is {x}?", template="<{question}>") == "<What is {x}?>"
    with pytest.raises(ValueError, match="question"):
        format_prompt("Q?", template="no placeholder")


def test_module_does_not_import_torch_or_datasets():
    code = (
        "import sys, looper.data.gsm8k, looper.data.synthetic; "
        "bad = [m for m in ('torch', 'datasets') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- loading


def test_load_jsonl(tmp_path):
    path = _write_jsonl(
        tmp_path / "mini.jsonl",
        [
            {"question": "Q0?", "answer": "1 + 1 = <<1+1=2>>2\n#### 2"},
            "",
            {"question": "Q1?", "answer": "#### 1,000"},
        ],
    )
    rows = load_gsm8k(str(path), split="train")
    assert [r["question_id"] for r in rows] == ["mini-train-00000", "mini-train-00001"]
    assert [r["gold"] for r in rows] == ["2", "1000"]
    assert rows[0]["answer"].endswith("#### 2")
    assert set(rows[0]) == {"question_id", "question", "answer", "gold"}
    # same result through the dispatcher and a Path
    assert load_questions(path, "train", DataConfig()) == rows


def test_load_list_and_own_ids():
    rows = load_gsm8k([{"question": "Q", "answer": "#### 3", "question_id": "my-id"}], split="test")
    assert rows == [{"question_id": "my-id", "question": "Q", "answer": "#### 3", "gold": "3"}]
    with pytest.raises(DataError, match="duplicate question_id"):
        load_gsm8k([{"question": "Q", "answer": "#### 3", "question_id": "x"}] * 2)


def test_load_datasets_dataset():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([{"question": "A?", "answer": "#### 4"}, {"question": "B?", "answer": "#### 5"}])
    rows = load_questions(ds, "test", DataConfig())
    assert [r["gold"] for r in rows] == ["4", "5"]
    assert rows[1]["question_id"].endswith("-test-00001")


PLATINUM_ROWS = [
    {"question": "Q0?", "answer": "#### 1", "cleaning_status": "consensus"},
    {"question": "Q1?", "answer": "bad question", "cleaning_status": "rejected"},
    {"question": "Q2?", "answer": "#### 3", "cleaning_status": "revised"},
    {"question": "Q3?", "answer": "#### 4", "cleaning_status": "Rejected"},
    {"question": "Q4?", "answer": "#### 5", "cleaning_status": "verified"},
]


def test_platinum_local_jsonl_drops_rejected_with_stable_ids(tmp_path):
    path = _write_jsonl(tmp_path / "plat.jsonl", PLATINUM_ROWS)
    rows = load_platinum(str(path))
    assert [r["question"] for r in rows] == ["Q0?", "Q2?", "Q4?"]
    # ids keep the row index of the full file, so they match the unfiltered rows
    assert [r["question_id"] for r in rows] == ["plat-test-00000", "plat-test-00002", "plat-test-00004"]
    assert [r["gold"] for r in rows] == ["1", "3", "5"]
    # auto-detected as Platinum when read as plain GSM8K or through the dispatcher
    assert load_gsm8k(str(path)) == rows
    assert load_questions(str(path), "test", DataConfig()) == rows


def test_hf_shorthands_dispatch(monkeypatch):
    calls = []

    def fake_load_hf(hf_id, hf_config, split):
        calls.append((hf_id, hf_config, split))
        if hf_id == gsm8k.PLATINUM_HF_ID:
            return PLATINUM_ROWS
        return [{"question": "Q?", "answer": "#### 7"}]

    monkeypatch.setattr(gsm8k, "_load_hf", fake_load_hf)
    cfg = DataConfig()
    rows = load_questions("gsm8k", "train", cfg)
    assert rows[0]["question_id"] == "gsm8k-train-00000" and rows[0]["gold"] == "7"
    assert load_questions("openai/gsm8k", "test", cfg)[0]["question_id"] == "gsm8k-test-00000"
    plat = load_questions("platinum", "test", cfg)
    assert [r["question_id"] for r in plat] == ["platinum-test-00000", "platinum-test-00002", "platinum-test-00004"]
    assert load_questions("madrylab/gsm8k-platinum", "test", cfg) == plat
    load_questions("someone/other-math", "test", cfg)
    assert calls == [
        ("openai/gsm8k", "main", "train"),
        ("openai/gsm8k", "main", "test"),
        ("madrylab/gsm8k-platinum", "main", "test"),
        ("madrylab/gsm8k-platinum", "main", "test"),
        ("someone/other-math", "main", "test"),
    ]


# --------------------------------------------------------------------------- bad input


def test_malformed_json_names_file_and_line(tmp_path):
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"question": "Q", "answer": "#### 1"}, "", '{"question": "Q2", '])
    with pytest.raises(DataError) as e:
        load_gsm8k(str(path))
    assert f"{path}:3" in str(e.value) and "malformed JSON" in str(e.value)


def test_missing_field_names_file_and_line(tmp_path):
    path = _write_jsonl(tmp_path / "missing.jsonl", [{"question": "Q", "answer": "#### 1"}, {"question": "Q2"}])
    with pytest.raises(DataError) as e:
        load_questions(str(path), "test", DataConfig())
    assert f"{path}:2" in str(e.value) and "answer" in str(e.value)


def test_answer_without_final_line_names_the_line(tmp_path):
    path = _write_jsonl(tmp_path / "nohash.jsonl", [{"question": "Q", "answer": "#### 1"}, {"question": "Q2", "answer": "It is 5."}])
    with pytest.raises(DataError) as e:
        load_gsm8k(str(path))
    assert f"{path}:2" in str(e.value) and "####" in str(e.value)


def test_missing_field_in_rows_names_the_row():
    with pytest.raises(DataError, match="row 1.*question"):
        load_gsm8k([{"question": "Q", "answer": "#### 1"}, {"answer": "#### 2"}])


def test_empty_inputs(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="empty"):
        load_gsm8k(str(empty))
    with pytest.raises(DataError, match="empty"):
        load_gsm8k([])
    rejected = _write_jsonl(tmp_path / "rej.jsonl", [{"question": "Q", "answer": "#### 1", "cleaning_status": "rejected"}])
    with pytest.raises(DataError, match="rejected"):
        load_platinum(str(rejected))


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_questions(str(tmp_path / "nope.jsonl"), "test", DataConfig())
    with pytest.raises(DataError, match="unsupported"):
        load_gsm8k(12345)


# --------------------------------------------------------------------------- real GSM8K files


def _shared_file(name: str) -> Path:
    path = SHARED_GSM8K / name
    if not path.is_file():
        pytest.skip(f"{path} is not available")
    return path


@pytest.mark.parametrize("name", ["train.jsonl", "test.jsonl"])
def test_gold_parses_every_row(name):
    path = _shared_file(name)
    rows = load_gsm8k(str(path), split=name.split(".")[0])
    n_lines = sum(1 for line in path.read_text().splitlines() if line.strip())
    assert len(rows) == n_lines
    for r in rows:
        assert r["gold"] == gold_answer(r["answer"])
        float(r["gold"])
        # the reference solution grades as correct against its own gold
        assert is_correct(extract_answer(r["answer"]), r["gold"])
        assert extract_answer_strict(r["answer"]) == r["gold"]


def test_agreement_with_example_model_solutions():
    """Our grading agrees with the labels shipped with GSM8K's example model solutions."""
    test_path = _shared_file("test.jsonl")
    sol_path = _shared_file("example_model_solutions.jsonl")
    gold_by_question = {r["question"]: r["gold"] for r in load_gsm8k(str(test_path))}
    total = agree = 0
    for line in sol_path.read_text().splitlines():
        row = json.loads(line)
        gold = gold_by_question.get(row["question"])
        if gold is None:  # ground_truth ends with "A: N" instead of "#### N"
            gold = normalize_answer(row["ground_truth"].strip().splitlines()[-1].split("A:")[-1])
        for value in row.values():
            if isinstance(value, dict) and "is_correct" in value:
                total += 1
                agree += is_correct(extract_answer(value["solution"]), gold) == bool(value["is_correct"])
    assert total > 5000
    assert agree / total >= 0.99, f"agreement {agree}/{total} = {agree / total:.4f}"
