"""`looper prefs`: rollouts.jsonl -> preferences.jsonl through the CLI, and its errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from looper.cli import main
from looper.config import load_config
from looper.io import DataError
from looper.loops.prefs import build_preference_file

REPO = Path(__file__).resolve().parents[1]


def traj(text: str, correct: bool, reward: float, **extra) -> dict:
    t = {"full_text": text, "answer": "1", "num_tokens": 5, "correct": correct, "cf": 1.0, "reward": reward}
    t.update(extra)
    return t


MIXED = {
    "question_id": "q1",
    "question": "What is 2 + 3?",
    "gold": "5",
    "s_end": 0.5,
    "s_path": 1.0,
    "s_cf": 1.0,
    "s_wm": 0.75,
    "trajectories": [
        traj("2 + 3 = 5\n#### 5", True, 1.4),
        traj("2 + 3 = 6\n#### 6", False, 0.3),
        traj("It is 5.\n#### 5", True, 1.35),
    ],
}
ALL_CORRECT = {
    "question_id": "q2",
    "question": "What is 1 + 1?",
    "trajectories": [traj("1 + 1 = 2\n#### 2", True, 1.4), traj("#### 2", True, 1.4)],
}


def write_rollouts(run_dir: Path, lines: list) -> Path:
    path = run_dir / "data" / "rollouts.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    return path


def prefs_path(run_dir: Path) -> Path:
    return run_dir / "data" / "preferences.jsonl"


def leftovers(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "data").iterdir() if p.name != "rollouts.jsonl")


def test_cli_writes_pairs(tmp_path, capsys):
    write_rollouts(tmp_path, [MIXED, "", ALL_CORRECT])  # a blank line is allowed
    rc = main(["prefs", f"run.output_dir={tmp_path}"])
    assert rc == 0
    pairs = [json.loads(line) for line in prefs_path(tmp_path).read_text().splitlines()]
    # 2 correct x 1 wrong = 2 correctness pairs, one coherence pair (1.4 - 1.35 >= 0.01)
    assert [(p["pair_id"], p["kind"]) for p in pairs] == [
        ("q1-corr-0", "correctness"),
        ("q1-corr-1", "correctness"),
        ("q1-cohe-0", "coherence"),
    ]
    assert pairs[0]["prompt"] == "Question:\nWhat is 2 + 3?\nAnswer:\nLet's think step by step.\n"
    assert pairs[0]["chosen"] == "2 + 3 = 5\n#### 5" and pairs[0]["rejected"] == "2 + 3 = 6\n#### 6"
    assert pairs[2]["margin"] == pytest.approx(0.05)
    out = capsys.readouterr().out
    assert "1 all-correct, 0 all-wrong, 1 mixed" in out
    assert "wrote 3 pairs" in out
    # the resolved config is saved and reloads
    saved = tmp_path / "configs" / "prefs.yaml"
    assert saved.exists()
    assert load_config(str(saved)).run.output_dir == str(tmp_path)
    assert leftovers(tmp_path) == ["preferences.jsonl", "preferences_summary.json"]
    summary = json.loads((tmp_path / "data" / "preferences_summary.json").read_text())
    assert (summary["n_pairs"], summary["n_correctness"], summary["n_coherence"]) == (3, 2, 1)


def test_cli_overrides_reach_the_pair_builder(tmp_path):
    write_rollouts(tmp_path, [MIXED, ALL_CORRECT])
    assert main(["prefs", f"run.output_dir={tmp_path}", "prefs.coherence=false", "prefs.max_correctness_pairs=1"]) == 0
    pairs = prefs_path(tmp_path).read_text().splitlines()
    assert len(pairs) == 1 and json.loads(pairs[0])["kind"] == "correctness"
    # values are YAML: a template with ": " must be quoted ("\\n" is a newline inside quotes)
    assert main(["prefs", f"run.output_dir={tmp_path}", 'data.prompt_template="Q: {question}\\nA:"']) == 0
    first = json.loads(prefs_path(tmp_path).read_text().splitlines()[0])
    assert first["prompt"] == "Q: What is 2 + 3?\nA:"


def test_python_entry_point_returns_summary(tmp_path, capsys):
    write_rollouts(tmp_path, [MIXED, ALL_CORRECT])
    cfg = load_config(overrides=[f"run.output_dir={tmp_path}"])
    summary = build_preference_file(cfg)
    assert summary["n_pairs"] == 3 and summary["n_questions"] == 2
    assert summary["preferences_path"] == str(prefs_path(tmp_path))


def test_malformed_line_names_the_line_and_writes_nothing(tmp_path, capsys):
    write_rollouts(tmp_path, [MIXED, '{"question_id": "q2", "trajectories": [', ALL_CORRECT])
    assert main(["prefs", f"run.output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "rollouts.jsonl:2" in err and "malformed JSON" in err
    assert not prefs_path(tmp_path).exists()
    assert leftovers(tmp_path) == []
    assert not (tmp_path / "configs").exists()


def test_missing_field_inside_trajectory_names_line_and_index(tmp_path, capsys):
    bad = json.loads(json.dumps(ALL_CORRECT))
    del bad["trajectories"][1]["reward"]
    write_rollouts(tmp_path, [MIXED, "", bad])
    assert main(["prefs", f"run.output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "rollouts.jsonl:3: trajectories[1]: missing field(s) ['reward']" in err
    assert not prefs_path(tmp_path).exists()


@pytest.mark.parametrize(
    "line, expected",
    [
        ('["not", "an", "object"]', "expected a JSON object"),
        ('{"question": "q", "trajectories": []}', "missing field(s) ['question_id']"),
        ('{"question_id": "q9", "question": "q", "trajectories": {}}', "non-empty list"),
        (json.dumps(MIXED), "duplicate question_id 'q1' (first at line 1)"),
    ],
)
def test_other_bad_records(tmp_path, capsys, line, expected):
    write_rollouts(tmp_path, [MIXED, line])
    assert main(["prefs", f"run.output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "rollouts.jsonl:2" in err and expected in err
    assert not prefs_path(tmp_path).exists()


def test_missing_and_empty_rollouts(tmp_path, capsys):
    assert main(["prefs", f"run.output_dir={tmp_path}"]) == 2
    assert "rollouts.jsonl: file not found" in capsys.readouterr().err
    write_rollouts(tmp_path, ["", "  "])
    assert main(["prefs", f"run.output_dir={tmp_path}"]) == 2
    assert "holds no rollout records" in capsys.readouterr().err
    assert not prefs_path(tmp_path).exists()


def test_zero_pairs_is_an_explained_error(tmp_path, capsys):
    all_wrong = {"question_id": "q3", "question": "?", "trajectories": [traj("a", False, 0.2), traj("b", False, 0.1)]}
    write_rollouts(tmp_path, [ALL_CORRECT, all_wrong])
    assert main(["prefs", f"run.output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "no preference pairs from 2 questions (1 all-correct, 1 all-wrong, 0 mixed)" in err
    assert "every group was all-correct or all-wrong" in err
    assert "prefs.threshold=0.01" in err and "largest reward gap" in err
    assert not prefs_path(tmp_path).exists()
    assert not (tmp_path / "configs").exists()
    cfg = load_config(overrides=[f"run.output_dir={tmp_path}"])
    with pytest.raises(DataError, match="no preference pairs"):
        build_preference_file(cfg)


def test_zero_pairs_when_coherence_is_disabled(tmp_path, capsys):
    spread = {"question_id": "q4", "question": "?", "trajectories": [traj("a", True, 1.5), traj("b", True, 1.0)]}
    write_rollouts(tmp_path, [spread])
    assert main(["prefs", f"run.output_dir={tmp_path}"]) == 0  # a coherence pair exists
    os.remove(prefs_path(tmp_path))
    assert main(["prefs", f"run.output_dir={tmp_path}", "prefs.coherence=false"]) == 2
    assert "Coherence pairs are disabled" in capsys.readouterr().err
    assert not prefs_path(tmp_path).exists()


def test_imports_stay_free_of_torch():
    code = (
        "import looper.regime_w, looper.loops.prefs, sys; "
        "bad = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules]; "
        "assert not bad, bad"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
