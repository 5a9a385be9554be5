"""``looper.report.write_report``: ``report.md`` from a run folder built by hand (every file
at its ``RunLayout`` path), with the accuracy table, the rollout and pair numbers, the last
row of each training log, the stage times, and the PNG plots (or a note without
matplotlib)."""

from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path

import pytest

from looper.config import load_config
from looper.layout import RunLayout
from looper.report import write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

COMPARE_MD = """# Eval comparison (baseline: sft, 16 questions)

| run | accuracy | 95% CI | correct | fixes | breaks | McNemar p |
|---|---|---|---|---|---|---|
| sft | 0.5000 | 0.280-0.720 | 8/16 | - | - | - |
| base | 0.2500 | 0.102-0.495 | 4/16 | 0 | 4 | 0.125 |
| dpo | 0.6250 | 0.386-0.815 | 10/16 | 3 | 1 | 0.625 |

## base vs sft

- fixes (0): none
- breaks (4): `q1`, `q2`, `q3`, `q4`
"""

SFT_ROWS = [
    {"step": 1, "loss": 2.0, "lr": 5e-05, "grad_norm": 3.0, "tokens": 100, "tokens_per_s": 500.0},
    {"step": 2, "loss": 1.75, "eval_loss": 1.9, "lr": 0.0001, "grad_norm": 2.0, "tokens": 200, "tokens_per_s": 510.0},
    {"step": 3, "loss": 1.23456, "eval_loss": 1.5, "lr": 0.0001, "grad_norm": 0.5, "tokens": 300, "tokens_per_s": 12345.678},
]
DPO_ROWS = [
    {"step": s, "loss": 0.7 - 0.01 * s, "rewards/chosen": 0.01 * s, "rewards/rejected": -0.01 * s,
     "rewards/accuracies": 0.25 * s, "rewards/margins": 0.02 * s, "logps/chosen": -40.0 - s,
     "logps/rejected": -45.0 - s, "tokens": 50 * s, "tokens_per_s": 700.0 + s}
    for s in (1, 2, 3)
] + [
    {"step": 4, "loss": 0.6931, "rewards/chosen": 0.1, "rewards/rejected": -0.2, "rewards/accuracies": 0.75,
     "rewards/margins": 0.0123, "logps/chosen": -45.678, "logps/rejected": -50.0, "tokens": 200, "tokens_per_s": 800.0},
]
ROLLOUTS = {
    "questions": 12, "k": 6, "accuracy": 0.4166666666666667, "maj_at_k": 0.5, "pass_at_k": 0.75,
    "s_end": 0.61234, "s_path": 0.9, "s_cf": 0.87654321, "s_wm": 0.7, "all_correct": 2, "all_wrong": 3,
    "mixed": 7, "mean_tokens": 27.25, "seconds": 3.21,
}
PREFS = {
    "n_questions": 12, "n_trajectories": 72, "accuracy": 0.4166666666666667, "n_all_correct": 2, "n_all_wrong": 3,
    "n_mixed": 7, "n_pairs": 19, "n_correctness": 14, "n_coherence": 5, "n_questions_with_pairs": 7,
    "max_correct_reward_gap": 0.3, "mean_reward_correct": 1.23456, "mean_reward_wrong": 0.0987654,
    "margin_hist": {"counts": [3, 16], "edges": [0.0, 0.5, 1.0]}, "reward_hist": {"counts": [], "edges": []},
}
EVALS = {
    "base": {"n": 16, "correct": 4, "accuracy": 0.25, "ci95": [0.102, 0.495]},
    "sft": {"n": 16, "correct": 8, "accuracy": 0.5, "ci95": [0.28, 0.72]},
    "dpo": {"n": 16, "correct": 10, "accuracy": 0.625, "ci95": [0.386, 0.815]},
}
STATE = {"completed": {"sft": {"seconds": 12.5}, "rollout": {"seconds": 3.0, "records": 12},
                       "prefs": {"seconds": 0.1}, "dpo": {"seconds": 20.4}, "eval": {"seconds": 7.0}}}


def write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def write_jsonl(path: str, rows) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def make_run(tmp_path) -> tuple:
    cfg = load_config(None, [f"run.output_dir={tmp_path / 'run'}"])
    lay = RunLayout.of(cfg)
    write_jsonl(lay.metrics("sft"), SFT_ROWS)
    write_jsonl(lay.metrics("dpo"), DPO_ROWS)
    for name, summary in EVALS.items():
        write_json(lay.eval_summary(name), summary)
    Path(lay.compare_markdown).write_text(COMPARE_MD)
    write_json(lay.rollouts_summary(), ROLLOUTS)
    write_json(lay.preferences_summary(), PREFS)
    write_json(lay.pipeline_state, STATE)
    return cfg, lay


def png_size(path) -> tuple[int, int]:
    data = Path(path).read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    assert data[-8:-4] == b"IEND"  # complete, not cut short
    return struct.unpack(">II", data[16:24])


def section(report: str, title: str) -> str:
    """The text of ``## title`` up to the next report section."""
    start = report.index(f"## {title}\n")
    ends = [report.find(f"\n## {t}", start + 1) for t in
            ("Rollouts", "Preference pairs", "Final base", "Final sft", "Final dpo", "Plots")]
    ends = [e for e in ends if e > start]
    return report[start: min(ends) if ends else len(report)]


def test_report_holds_every_summary(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    cfg, lay = make_run(tmp_path)
    path = write_report(cfg, elapsed_s=42.4)
    assert path == lay.report == str(tmp_path / "run" / "report.md")
    assert f"[pipeline] report: {path}" in capsys.readouterr().out
    report = Path(path).read_text()

    assert report.startswith("# looper pipeline report\n")
    assert f"- output folder: `{lay.root}`" in report
    assert "- base model: `tiny`" in report
    assert "- stage times: sft 12.5s, rollout 3.0s, prefs 0.1s, dpo 20.4s, eval 7.0s\n" in report
    assert "- this invocation: 42s\n" in report
    # the comparison table, as compare.md has it
    assert "## Accuracy\n\n" + COMPARE_MD.strip() + "\n" in report
    # rollouts: every summary key, in order, floats to 4 significant digits
    assert section(report, "Rollouts") == (
        "## Rollouts\n\n"
        "| questions | k | accuracy | maj_at_k | pass_at_k | s_end | s_path | s_cf | s_wm | all_correct | all_wrong "
        "| mixed | mean_tokens | seconds |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
        "| 12 | 6 | 0.4167 | 0.5 | 0.75 | 0.6123 | 0.9 | 0.8765 | 0.7 | 2 | 3 | 7 | 27.25 | 3.21 |\n"
    )
    assert section(report, "Preference pairs") == (
        "## Preference pairs\n\n"
        "| questions | all_correct | all_wrong | mixed | pairs | correctness | coherence | mean_reward_correct "
        "| mean_reward_wrong |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
        "| 12 | 2 | 3 | 7 | 19 | 14 | 5 | 1.235 | 0.09877 |\n"
    )
    # the last row of each log; a key the last row lacks (eval/loss) has no column
    assert section(report, "Final sft metrics") == (
        "## Final sft metrics\n\n"
        "| step | loss | eval_loss | lr | grad_norm | tokens_per_s |\n"
        "|---|---|---|---|---|---|\n"
        "| 3 | 1.235 | 1.5 | 0.0001 | 0.5 | 1.235e+04 |\n"
    )
    assert section(report, "Final dpo metrics") == (
        "## Final dpo metrics\n\n"
        "| step | loss | rewards/accuracies | rewards/margins | logps/chosen | logps/rejected | tokens_per_s |\n"
        "|---|---|---|---|---|---|---|\n"
        "| 4 | 0.6931 | 0.75 | 0.0123 | -45.68 | -50 | 800 |\n"
    )
    assert "## Final base metrics" not in report  # no base log in this folder
    assert "Plots skipped" not in report

    # the plots: linked, and real PNGs of the drawn figure size (inches x 110 dpi)
    expected = {"sft_loss.png": (550, 352), "dpo_metrics.png": (1320, 352), "accuracy.png": (440, 352)}
    assert "## Plots\n\n" + "\n".join(f"![{n}]({n})" for n in expected) + "\n" in report
    for name, size in expected.items():
        assert png_size(lay.plot(name)) == size, name
    # the report is the only other file written at the top level
    top = {p.name for p in Path(lay.root).iterdir() if p.is_file()}
    assert top == {"report.md", "pipeline_state.json", *expected}


def test_without_matplotlib_the_plots_are_skipped(tmp_path, monkeypatch):
    cfg, lay = make_run(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    report = Path(write_report(cfg)).read_text()
    assert "Plots skipped: matplotlib is not installed" in report
    assert "## Plots" not in report and "![" not in report
    assert not list(Path(lay.root).glob("*.png"))
    assert "this invocation" not in report  # no elapsed_s given
    # the tables do not depend on matplotlib
    assert "| 3 | 1.235 | 1.5 | 0.0001 | 0.5 | 1.235e+04 |" in report
    assert "| 12 | 2 | 3 | 7 | 19 | 14 | 5 | 1.235 | 0.09877 |" in report


def test_a_partial_run_folder_reports_what_is_there(tmp_path):
    pytest.importorskip("matplotlib")
    cfg = load_config(None, [f"run.output_dir={tmp_path / 'run'}"])
    lay = RunLayout.of(cfg)
    write_jsonl(lay.metrics("sft"), SFT_ROWS[:2])  # only SFT has run, no pipeline state yet
    report = Path(write_report(cfg)).read_text()
    assert "stage times" not in report
    for absent in ("## Accuracy", "## Rollouts", "## Preference pairs", "## Final dpo metrics"):
        assert absent not in report
    assert "| 2 | 1.75 | 1.9 | 0.0001 | 2 | 510 |" in report
    assert "![sft_loss.png](sft_loss.png)" in report and "accuracy.png" not in report
    assert [p.name for p in Path(lay.root).glob("*.png")] == ["sft_loss.png"]
    assert png_size(lay.plot("sft_loss.png")) == (550, 352)


def test_nothing_to_plot_is_not_reported_as_a_missing_matplotlib(tmp_path):
    # Regression: make_plots returned [] both without matplotlib and with nothing to plot,
    # so a folder with only rollouts and pairs (`looper pipeline --stages rollout,prefs`)
    # was told that matplotlib is not installed.
    pytest.importorskip("matplotlib")
    cfg = load_config(None, [f"run.output_dir={tmp_path / 'run'}"])
    lay = RunLayout.of(cfg)
    write_json(lay.rollouts_summary(), ROLLOUTS)
    report = Path(write_report(cfg)).read_text()
    assert "## Rollouts" in report
    assert "matplotlib is not installed" not in report
