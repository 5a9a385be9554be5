"""``report.md`` for a pipeline run: the comparison table, the rounds of iterative DPO
(accuracy with its interval and McNemar tests against SFT and the previous round, pairs by
kind, rollout pass@k and maj@k), rollout and pair summaries, the final training metrics,
and (with matplotlib installed) PNG plots."""

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


def round_table(layout: RunLayout, rounds: int) -> list[dict]:
    """One row per policy, SFT (round 0) then each DPO round: accuracy, 95% interval, McNemar
    against SFT and against the previous round, the round's pairs and rollouts."""
    from looper.loops.evaluate import comparison

    names = ["sft"] + [layout.stage_name("dpo", r) for r in range(1, rounds + 1)]
    files = [layout.eval_records(n) for n in names]
    present = [i for i, f in enumerate(files) if os.path.exists(f)]
    if not present or present[0] != 0:
        return []
    vs_sft = {run["name"]: run for run in comparison([files[i] for i in present])["runs"]}
    rows = []
    for i in present:
        run = vs_sft[names[i]]
        row = {"round": i, "policy": names[i], "accuracy": run["accuracy"], "ci95": run["ci95"], "n": run["n"]}
        if i > 0:
            prev = comparison([files[i - 1], files[i]])["runs"][1] if os.path.exists(files[i - 1]) else None
            pairs = _read_json(layout.preferences_summary(i)) or {}
            roll = _read_json(layout.rollouts_summary(i)) or {}
            row.update(
                vs_sft=(len(run["fixes"]), len(run["breaks"]), run["mcnemar_p"]),
                vs_prev=(len(prev["fixes"]), len(prev["breaks"]), prev["mcnemar_p"]) if prev else None,
                correctness=pairs.get("n_correctness"), coherence=pairs.get("n_coherence"),
                sample_accuracy=roll.get("accuracy"), maj_at_k=roll.get("maj_at_k"), pass_at_k=roll.get("pass_at_k"),
            )
        rows.append(row)
    return rows


def _rounds_markdown(rows: list[dict]) -> list[str]:
    def vs(t) -> str:
        return "-" if not t else f"+{t[0]} / -{t[1]} (p={t[2]:.3g})"

    def num(v) -> str:
        return "-" if v is None else _fmt(v)

    lines = [
        "## Rounds", "",
        "Round 0 is the SFT adapter; round r samples from round r-1's policy, trains from it and uses it, "
        "frozen, as the reference. Fixes / breaks and the exact McNemar p-value are against SFT and "
        "against the previous round; the rollout columns describe the samples the round's pairs came from.", "",
        "| round | policy | accuracy | 95% CI | vs SFT | vs previous round | correctness pairs | coherence pairs "
        "| rollout accuracy | maj@k | pass@k |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lo, hi = r["ci95"]
        lines.append(
            f"| {r['round']} | {r['policy']} | {r['accuracy']:.4f} | {lo:.3f}-{hi:.3f} | {vs(r.get('vs_sft'))} | "
            f"{vs(r.get('vs_prev'))} | {num(r.get('correctness'))} | {num(r.get('coherence'))} | "
            f"{num(r.get('sample_accuracy'))} | {num(r.get('maj_at_k'))} | {num(r.get('pass_at_k'))} |"
        )
    return lines + [""]


def make_plots(layout: RunLayout, rounds: int = 1) -> Optional[list[str]]:
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
    names = ["base", "sft"] + [layout.stage_name("dpo", r) for r in range(1, rounds + 1)]
    evals = [(n, _read_json(layout.eval_summary(n))) for n in names]
    evals = [(n, e) for n, e in evals if e]
    if evals:
        fig, ax = plt.subplots(figsize=(4, 3.2))
        acc = [e["accuracy"] for _, e in evals]
        lo = [e["accuracy"] - e["ci95"][0] for _, e in evals]
        hi = [e["ci95"][1] - e["accuracy"] for _, e in evals]
        ax.bar([n for n, _ in evals], acc, yerr=[lo, hi], capsize=4)
        ax.set(ylabel="accuracy", ylim=(0, 1), title="accuracy (95% CI)")
        made.append(_save(fig, layout, "accuracy.png"))
    rows = round_table(layout, rounds) if rounds > 1 else []
    if len(rows) > 1:
        fig, ax = plt.subplots(figsize=(4.5, 3.2))
        acc = [r["accuracy"] for r in rows]
        err = [[a - r["ci95"][0] for a, r in zip(acc, rows)], [r["ci95"][1] - a for a, r in zip(acc, rows)]]
        ax.errorbar([r["round"] for r in rows], acc, yerr=err, fmt="o-", capsize=4)
        ax.set(xlabel="round (0 = SFT)", ylabel="accuracy", title="accuracy by round (95% CI)")
        ax.set_xticks([r["round"] for r in rows])
        made.append(_save(fig, layout, "accuracy_by_round.png"))
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
    rounds = cfg.pipeline.rounds
    compare_md = layout.compare_markdown
    if os.path.exists(compare_md):
        lines += ["## Accuracy", "", open(compare_md).read().strip(), ""]
    if rounds > 1:
        rows = round_table(layout, rounds)
        if rows:
            lines += _rounds_markdown(rows)
    for r in range(1, rounds + 1):
        title = "" if rounds == 1 else f", round {r}"
        roll = _read_json(layout.rollouts_summary(r))
        if roll:
            lines += [f"## Rollouts{title}", "", "| " + " | ".join(roll) + " |", "|" + "---|" * len(roll),
                      "| " + " | ".join(_fmt(v) for v in roll.values()) + " |", ""]
        prefs = _read_json(layout.preferences_summary(r))
        if prefs:
            keys = ["n_questions", "n_all_correct", "n_all_wrong", "n_mixed", "n_pairs", "n_correctness",
                    "n_coherence", "mean_reward_correct", "mean_reward_wrong"]
            keys = [k for k in keys if k in prefs]
            lines += [f"## Preference pairs{title}", "", "| " + " | ".join(k.removeprefix("n_") for k in keys) + " |",
                      "|" + "---|" * len(keys), "| " + " | ".join(_fmt(prefs[k]) for k in keys) + " |", ""]
    dpo_keys = ["step", "loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected", "eval/loss", "tokens_per_s"]
    for stage, keys in (
        ("base", ["step", "loss", "eval_loss", "lr", "tokens_per_s"]),
        ("sft", ["step", "loss", "eval_loss", "lr", "grad_norm", "tokens_per_s"]),
        *((layout.stage_name("dpo", r), dpo_keys) for r in range(1, rounds + 1)),
    ):
        rows = _read_metrics(layout, stage)
        if rows:
            lines += [f"## Final {stage} metrics", "", _metrics_table(rows, keys)]
    plots = make_plots(layout, rounds)
    if plots is None:
        lines += ["Plots skipped: matplotlib is not installed (`pip install 'looper[plot]'`).", ""]
    elif plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    path = layout.report
    write_text_atomic(path, "\n".join(lines))
    print(f"[pipeline] report: {path}")
    return path
