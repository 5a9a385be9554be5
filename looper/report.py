"""``report.md`` for a pipeline run: the comparison table, rollout and pair summaries, the
final training metrics, and (with matplotlib installed) PNG plots."""

from __future__ import annotations

import json
import os
from typing import Optional

from looper.config import Config
from looper.io import write_text_atomic
from looper.layout import RunLayout


def _read_json(path: str) -> Optional[dict]:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _read_metrics(layout: RunLayout, stage: str) -> list[dict]:
    path = layout.metrics(stage)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _metrics_table(rows: list[dict], keys: list[str]) -> str:
    last = rows[-1]
    keys = [k for k in keys if k in last]
    return "| " + " | ".join(keys) + " |\n|" + "---|" * len(keys) + "\n| " + " | ".join(_fmt(last[k]) for k in keys) + " |\n"


def make_plots(layout: RunLayout) -> Optional[list[str]]:
    """Draw SFT loss, DPO loss/margins/accuracy and accuracy per stage; returns the file
    names drawn ([] when there is nothing to plot), or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    made = []
    sft = _read_metrics(layout, "sft")
    if sft:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot([r["step"] for r in sft], [r["loss"] for r in sft], label="train")
        ev = [r for r in sft if r.get("eval_loss") is not None]
        if ev:
            ax.plot([r["step"] for r in ev], [r["eval_loss"] for r in ev], "o-", label="eval")
        ax.set(xlabel="step", ylabel="loss", title="SFT loss")
        ax.legend()
        made.append(_save(fig, layout, "sft_loss.png"))
    dpo = _read_metrics(layout, "dpo")
    if dpo:
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
        steps = [r["step"] for r in dpo]
        for ax, key in zip(axes, ("loss", "rewards/margins", "rewards/accuracies")):
            ax.plot(steps, [r[key] for r in dpo])
            ax.set(xlabel="step", title=f"DPO {key}")
        made.append(_save(fig, layout, "dpo_metrics.png"))
    evals = [(n, _read_json(layout.eval_summary(n))) for n in ("base", "sft", "dpo")]
    evals = [(n, e) for n, e in evals if e]
    if evals:
        fig, ax = plt.subplots(figsize=(4, 3.2))
        acc = [e["accuracy"] for _, e in evals]
        lo = [e["accuracy"] - e["ci95"][0] for _, e in evals]
        hi = [e["ci95"][1] - e["accuracy"] for _, e in evals]
        ax.bar([n for n, _ in evals], acc, yerr=[lo, hi], capsize=4)
        ax.set(ylabel="accuracy", ylim=(0, 1), title="accuracy (95% CI)")
        made.append(_save(fig, layout, "accuracy.png"))
    return made


def _save(fig, layout: RunLayout, name: str) -> str:
    path = layout.plot(name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return name


def write_report(cfg: Config, elapsed_s: Optional[float] = None) -> str:
    layout = RunLayout.of(cfg)
    lines = ["# looper pipeline report", ""]
    lines += [f"- output folder: `{layout.root}`", f"- base model: `{cfg.model.name_or_path}`"]
    state = _read_json(layout.pipeline_state) or {"completed": {}}
    times = ", ".join(f"{k} {v['seconds']}s" for k, v in state["completed"].items())
    if times:
        lines.append(f"- stage times: {times}")
    if elapsed_s is not None:
        lines.append(f"- this invocation: {elapsed_s:.0f}s")
    lines.append("")
    compare_md = layout.compare_markdown
    if os.path.exists(compare_md):
        lines += ["## Accuracy", "", open(compare_md).read().strip(), ""]
    roll = _read_json(layout.rollouts_summary())
    if roll:
        lines += ["## Rollouts", "", "| " + " | ".join(roll) + " |", "|" + "---|" * len(roll),
                  "| " + " | ".join(_fmt(v) for v in roll.values()) + " |", ""]
    prefs = _read_json(layout.preferences_summary())
    if prefs:
        keys = ["n_questions", "n_all_correct", "n_all_wrong", "n_mixed", "n_pairs", "n_correctness",
                "n_coherence", "mean_reward_correct", "mean_reward_wrong"]
        keys = [k for k in keys if k in prefs]
        lines += ["## Preference pairs", "", "| " + " | ".join(k.removeprefix("n_") for k in keys) + " |",
                  "|" + "---|" * len(keys), "| " + " | ".join(_fmt(prefs[k]) for k in keys) + " |", ""]
    for stage, keys in (
        ("base", ["step", "loss", "eval_loss", "lr", "tokens_per_s"]),
        ("sft", ["step", "loss", "eval_loss", "lr", "grad_norm", "tokens_per_s"]),
        ("dpo", ["step", "loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected", "eval/loss", "tokens_per_s"]),
    ):
        rows = _read_metrics(layout, stage)
        if rows:
            lines += [f"## Final {stage} metrics", "", _metrics_table(rows, keys)]
    plots = make_plots(layout)
    if plots is None:
        lines += ["Plots skipped: matplotlib is not installed (`pip install 'looper[plot]'`).", ""]
    elif plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    path = layout.report
    write_text_atomic(path, "\n".join(lines))
    print(f"[pipeline] report: {path}")
    return path
