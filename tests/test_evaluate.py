"""Evaluation: statistics, compare, and `looper eval` end to end on the tiny model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from looper.config import ConfigError
from looper.io import DataError
from looper.loops.evaluate import compare, mcnemar_exact, summarize_eval, wilson_interval

# --------------------------------------------------------------------------- statistics


def test_wilson_interval_known_values():
    # p = 0.5, n = 10: centre 0.5, half-width 1.96 * sqrt(0.025 + 0.009604) / 1.38416 = 0.26341
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(0.23659, abs=1e-4) and hi == pytest.approx(0.76341, abs=1e-4)
    lo, hi = wilson_interval(0, 10)  # z^2/n / (1 + z^2/n) = 0.38416 / 1.38416 = 0.27754
    assert lo == 0.0 and hi == pytest.approx(0.27754, abs=1e-4)
    assert wilson_interval(10, 10)[1] == 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_mcnemar_exact_known_values():
    # b=5, c=1: p = 2 * (C(6,0) + C(6,1)) / 2^6 = 2 * 7 / 64 = 0.21875
    assert mcnemar_exact(5, 1) == pytest.approx(0.21875)
    assert mcnemar_exact(1, 5) == pytest.approx(0.21875)
    # b=10, c=0: p = 2 / 2^10
    assert mcnemar_exact(10, 0) == pytest.approx(2 / 1024)
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(3, 3) == 1.0  # capped at 1


def _write_eval(path: Path, correct: list[bool], ids=None) -> None:
    ids = ids or [f"q{i:02d}" for i in range(len(correct))]
    with open(path, "w") as f:
        for qid, ok in zip(ids, correct):
            rec = {"question_id": qid, "question": "?", "gold": "1", "completion": "", "prediction": "1" if ok else "2",
                   "correct": ok, "strict_prediction": None, "strict_correct": False, "num_tokens": 3, "finished": True}
            f.write(json.dumps(rec) + "\n")


def test_summarize_eval():
    recs = [{"correct": i < 7, "strict_correct": i < 4, "prediction": None if i == 9 else "1", "num_tokens": 10,
             "finished": i != 0} for i in range(10)]
    s = summarize_eval(recs)
    assert (s["n"], s["correct"], s["accuracy"]) == (10, 7, 0.7)
    assert s["strict"]["accuracy"] == 0.4 and s["flexible"]["accuracy"] == 0.7
    assert s["ci95"] == list(wilson_interval(7, 10))
    assert s["no_answer"] == 1 and s["truncated"] == 1 and s["mean_tokens"] == 10
    with pytest.raises(DataError):
        summarize_eval([])


def test_compare_fixes_breaks_and_mcnemar(tmp_path):
    base = [i < 10 for i in range(20)]  # 10/20
    new = list(base)
    for i in (10, 11, 12, 13, 14):  # 5 fixes
        new[i] = True
    new[0] = False  # 1 break -> 14/20
    _write_eval(tmp_path / "base_eval.jsonl", base)
    _write_eval(tmp_path / "sft_eval.jsonl", new)
    res = compare([str(tmp_path / "base_eval.jsonl"), str(tmp_path / "sft_eval.jsonl")])
    b, s = res["runs"]
    assert (b["name"], b["accuracy"], s["name"], s["accuracy"]) == ("base", 0.5, "sft", 0.7)
    assert s["fixes"] == ["q10", "q11", "q12", "q13", "q14"] and s["breaks"] == ["q00"]
    assert s["mcnemar_p"] == pytest.approx(0.21875)
    assert res["note"] is None and res["n"] == 20
    md = (tmp_path / "compare.md").read_text()
    assert "| sft | 0.7000 |" in md and "0.2188" in md and "`q00`" in md
    assert res["markdown"] == str(tmp_path / "compare.md")


def test_compare_different_ids(tmp_path):
    _write_eval(tmp_path / "a_eval.jsonl", [True, False, True], ["x", "y", "z"])
    _write_eval(tmp_path / "b_eval.jsonl", [True, True], ["y", "z"])
    res = compare([str(tmp_path / "a_eval.jsonl"), str(tmp_path / "b_eval.jsonl")], markdown_path=str(tmp_path / "m.md"))
    assert res["n"] == 2 and "shared" in res["note"] and res["runs"][1]["fixes"] == ["y"]
    assert "Note:" in (tmp_path / "m.md").read_text()
    _write_eval(tmp_path / "c_eval.jsonl", [True], ["w"])
    with pytest.raises(DataError, match="share no question_id"):
        compare([str(tmp_path / "a_eval.jsonl"), str(tmp_path / "c_eval.jsonl")])
    (tmp_path / "d_eval.jsonl").write_text('{"question_id": "x"}\n')
    with pytest.raises(DataError, match="missing field"):
        compare([str(tmp_path / "d_eval.jsonl")])


# --------------------------------------------------------------------------- evaluate

EVAL_SETTINGS = ["eval.n_questions=6", "eval.generation.max_new_tokens=12", "eval.generation.batch_size=4"]


def _eval_cfg(micro_cfg, tmp_path, *extra):
    return micro_cfg(tmp_path / "run", *EVAL_SETTINGS, *extra)


def test_eval_cli_on_tiny_model(micro_overrides, tmp_path, capsys):
    from looper.cli import main

    args = ["eval", *micro_overrides(tmp_path / "run", *EVAL_SETTINGS)]
    assert main(args) == 0
    out = tmp_path / "run" / "outputs"
    recs = [json.loads(line) for line in (out / "base_eval.jsonl").read_text().splitlines()]
    assert len(recs) == 6
    keys = {"question_id", "question", "gold", "completion", "prediction", "correct", "strict_prediction",
            "strict_correct", "num_tokens"}
    assert all(keys <= set(r) for r in recs)
    summary = json.loads((out / "base_eval.json").read_text())
    assert summary["n"] == 6 and summary["correct"] == sum(r["correct"] for r in recs)
    assert summary["name"] == "base" and summary["adapter"] is None
    lo, hi = summary["ci95"]
    assert 0 <= lo <= summary["accuracy"] <= hi <= 1
    assert "strict" in summary and "flexible" in summary
    assert (tmp_path / "run" / "configs" / "eval_base.yaml").is_file()
    assert "eval base: accuracy" in capsys.readouterr().out
    # a rerun resumes: nothing to generate, same bytes
    before = (out / "base_eval.jsonl").read_bytes()
    assert main(args) == 0
    assert (out / "base_eval.jsonl").read_bytes() == before


def test_eval_platinum_file_drops_rejected(micro_cfg, tmp_path):
    from looper.loops.evaluate import evaluate

    rows = [
        {"question": "Tom has 2 apples and buys 3 more. How many apples?", "answer": "2+3=5\n#### 5",
         "cleaning_status": "consistent"},
        {"question": "A broken question", "answer": "#### 1", "cleaning_status": "rejected"},
        {"question": "Ann has 4 pens and loses 1. How many pens?", "answer": "4-1=3\n#### 3",
         "cleaning_status": "revised"},
    ]
    path = tmp_path / "platinum_test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = evaluate(_eval_cfg(micro_cfg, tmp_path, f"eval.dataset={path}"))
    assert summary["n"] == 2 and summary["name"] == "base_platinum_test"
    recs = (tmp_path / "run" / "outputs" / "base_platinum_test_eval.jsonl").read_text().splitlines()
    assert [json.loads(r)["gold"] for r in recs] == ["5", "3"]


def test_eval_with_sft_adapter(micro_cfg, tiny_model_dir, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model

    from looper.loops.evaluate import evaluate
    from looper.models import load_base_model

    cfg = _eval_cfg(micro_cfg, tmp_path, "eval.adapter=sft")
    torch.manual_seed(0)
    peft_model = get_peft_model(load_base_model(str(tiny_model_dir)),
                                LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    adapter = tmp_path / "run" / "checkpoints" / "sft_lora"
    peft_model.save_pretrained(str(adapter))
    summary = evaluate(cfg)
    assert summary["name"] == "sft" and summary["adapter"] == str(adapter)
    assert (tmp_path / "run" / "outputs" / "sft_eval.json").is_file()


def _snapshot(folder: Path) -> dict:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} if folder.exists() else {}


def test_eval_bad_inputs_leave_results_untouched(micro_cfg, micro_overrides, tmp_path, capsys):
    from looper.cli import main
    from looper.loops.evaluate import evaluate

    out = tmp_path / "run" / "outputs"
    out.mkdir(parents=True)
    (out / "base_eval.jsonl").write_text('{"question_id": "synthetic-test-00000", "correct": true}\n')
    (out / "base_eval.json").write_text('{"accuracy": 1.0}\n')
    before = _snapshot(out)

    # a missing adapter: a ConfigError before anything is touched (and exit code 2 from the CLI)
    with pytest.raises(ConfigError, match="adapter_config.json"):
        evaluate(_eval_cfg(micro_cfg, tmp_path, f"eval.adapter={tmp_path / 'nope'}"))
    with pytest.raises(ConfigError, match="sft_lora"):
        evaluate(_eval_cfg(micro_cfg, tmp_path, "eval.adapter=sft"))
    assert main(["eval", *micro_overrides(tmp_path / "run", *EVAL_SETTINGS, f"eval.adapter={tmp_path / 'nope'}")]) == 2
    assert "adapter" in capsys.readouterr().err

    # a data set whose rows lack 'question'
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q?", "answer": "#### 1"}\n{"problem": "q?", "answer": "#### 2"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2.*question"):
        evaluate(_eval_cfg(micro_cfg, tmp_path, f"eval.dataset={bad}", "eval.name=base"))

    # a corrupted partial output file
    partial = out / "base_eval.jsonl.rank0.partial"
    partial.write_text('{"question_id": "synthetic-test-00001"}\n{oops\n{"question_id": "synthetic-test-00002"}\n')
    before[partial] = partial.read_bytes()
    with pytest.raises(DataError, match="corrupted"):
        evaluate(_eval_cfg(micro_cfg, tmp_path))
    assert _snapshot(out) == before


@pytest.mark.slow
def test_eval_two_ranks_match_one(micro_overrides, tmp_path, run_torchrun):
    """`looper eval` under torchrun with 2 ranks writes the same file as 1 process (sampling on)."""
    from looper.cli import main

    settings = [*EVAL_SETTINGS, "eval.n_questions=8", "eval.generation.temperature=1.0"]
    assert main(["eval", *micro_overrides(tmp_path / "one", *settings)]) == 0  # this process: one thread
    run_torchrun(cli=["eval", *micro_overrides(tmp_path / "two", *settings)], nproc=2)
    one = (tmp_path / "one" / "outputs" / "base_eval.jsonl").read_bytes()
    two = (tmp_path / "two" / "outputs" / "base_eval.jsonl").read_bytes()
    assert one == two and len(one.splitlines()) == 8
    assert not list((tmp_path / "two" / "outputs").glob("*.partial"))
    s = json.loads((tmp_path / "two" / "outputs" / "base_eval.json").read_text())
    assert s["n"] == 8 and math.isclose(s["accuracy"], s["correct"] / 8)


# --------------------------------------------------------------------------- the run folder contract


def test_a_smaller_n_questions_keeps_the_finished_records(micro_cfg, tmp_path, capsys):
    from looper.loops.evaluate import evaluate

    out = tmp_path / "run" / "outputs"
    full = evaluate(_eval_cfg(micro_cfg, tmp_path))
    path = out / "base_eval.jsonl"
    before = path.read_bytes()
    records = [json.loads(line) for line in before.splitlines()]
    assert full["n"] == len(records) == 6

    summary = evaluate(_eval_cfg(micro_cfg, tmp_path, "eval.n_questions=3"))
    assert path.read_bytes() == before  # all 6 records kept, none regenerated
    assert summary["n"] == 3 and summary["correct"] == sum(r["correct"] for r in records[:3])
    assert json.loads((out / "base_eval.json").read_text())["n"] == 3
    assert "(%d/3," % summary["correct"] in capsys.readouterr().out


def test_compare_refuses_to_write_its_markdown_over_an_input(tmp_path, capsys):
    from looper.cli import main

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    _write_eval(a, [True, False, True])
    _write_eval(b, [True, True, False])
    before = a.read_bytes()
    assert main(["compare", str(a), str(b), "--markdown", str(a)]) == 2
    err = capsys.readouterr().err
    assert "looper compare: error:" in err and str(a) in err and "one of the eval files being compared" in err, err
    assert a.read_bytes() == before
    # the same file named another way is still an input
    assert main(["compare", str(a), str(b), "--markdown", str(tmp_path / "." / "a.jsonl")]) == 2
    assert a.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "b.jsonl"]


def test_compare_reads_correct_only_as_a_json_boolean(tmp_path):
    a, b = tmp_path / "a_eval.jsonl", tmp_path / "b_eval.jsonl"
    _write_eval(a, [True, False, True])
    _write_eval(b, [True, True, False])
    lines = b.read_text().splitlines()
    rec = json.loads(lines[1])
    rec["correct"] = "false"  # a string: bool("false") would count it as correct
    lines[1] = json.dumps(rec)
    b.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"{b}: question 'q01': 'correct' must be true or false, got 'false'"):
        compare([str(a), str(b)])
    assert not (tmp_path / "compare.md").exists()
