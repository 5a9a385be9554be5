"""Stage 3: build ``data/preferences.jsonl`` from ``data/rollouts.jsonl``.

No torch here: this stage runs on any machine with numpy, and ``looper prefs`` starts fast.
"""

from __future__ import annotations

import json
from typing import Optional

from looper.config import Config, save_config, to_dict
from looper.io import DataError, iter_jsonl, write_json_atomic, write_jsonl_atomic
from looper.layout import RunLayout, holds_run_lock, meta_path
from looper.regime_w.rescore import rescore
from looper.regime_w.preferences import (
    build_preferences,
    check_rollout_record,
    format_summary,
    summarize,
)

__all__ = ["build_preference_file", "read_rollouts"]


def read_rollouts(path: str) -> list[dict]:
    """Read and validate a rollouts file.

    Raises ``DataError`` naming ``path:line`` for malformed JSON, a missing or mistyped
    field (also inside ``trajectories``), a repeated ``question_id``, or an empty file.
    """
    records: list[dict] = []
    first_line: dict[str, int] = {}
    for lineno, rec in iter_jsonl(path):
        where = f"{path}:{lineno}"
        check_rollout_record(rec, where)
        qid = str(rec["question_id"])
        if qid in first_line:
            raise DataError(
                f"{where}: duplicate question_id {qid!r} (first at line {first_line[qid]}); "
                f"each question must appear once"
            )
        first_line[qid] = lineno
        records.append(rec)
    if not records:
        raise DataError(f"{path}: the file holds no rollout records; run `looper rollout` first")
    return records


def _why_no_pairs(cfg: Config, summary: dict) -> str:
    """Explain a run that produced zero pairs."""
    p = cfg.prefs
    s = summary
    parts = [
        f"no preference pairs from {s['n_questions']} questions "
        f"({s['n_all_correct']} all-correct, {s['n_all_wrong']} all-wrong, {s['n_mixed']} mixed)."
    ]
    if s["n_mixed"] == 0:
        parts.append(
            "Correctness pairs need a question with both a correct and an incorrect trajectory, "
            "and every group was all-correct or all-wrong."
        )
    elif p.max_correctness_pairs == 0:
        parts.append("Correctness pairs are disabled (prefs.max_correctness_pairs=0).")
    else:
        parts.append(
            f"The {s['n_mixed']} mixed groups gave no usable pair: every candidate had identical "
            f"chosen and rejected texts or duplicated an earlier pair."
        )
    if not p.coherence or p.max_coherence_pairs == 0:
        parts.append("Coherence pairs are disabled (prefs.coherence / prefs.max_coherence_pairs).")
    else:
        parts.append(
            f"No coherence margin reached prefs.threshold={p.threshold:g} (largest reward gap "
            f"between correct trajectories of one question: {s['max_correct_reward_gap']:.6g})."
        )
    parts.append(
        "Sample more trajectories (rollout.k), use a higher temperature, lower prefs.threshold, "
        "or set regime_w.scope=trajectory to spread the rewards of correct trajectories."
    )
    return " ".join(parts)


def _scored_with(rollouts_path: str) -> Optional[dict]:
    """The ``regime_w`` settings the rollout stage scored ``rollouts_path`` with (from its
    ``.meta.json``), or None when it does not say (a file made by hand)."""
    try:
        with open(meta_path(rollouts_path), encoding="utf-8") as f:
            return json.load(f).get("info", {}).get("regime_w")
    except (OSError, ValueError):
        return None


def _rescorable(rec: dict) -> bool:
    return all(k in t for t in rec["trajectories"] for k in ("answer", "num_tokens"))


@holds_run_lock
def build_preference_file(cfg: Config) -> dict:
    """Read the run's rollouts (``RunLayout.rollouts``), rescore them with ``cfg.regime_w``
    (so ``regime_w.*`` overrides apply without sampling again), build the pairs (``cfg.prefs``,
    prompts from ``cfg.data.prompt_template`` unless a record carries its own ``prompt``),
    write ``RunLayout.preferences`` atomically, print and return the summary, and save the
    resolved config under ``configs/prefs.yaml``.

    Raises ``DataError`` for bad rollouts or zero pairs; nothing is written then.
    """
    layout = RunLayout.of(cfg)
    src = layout.rollouts()
    dst = layout.preferences()
    records = read_rollouts(src)
    scored_with = _scored_with(src)
    if scored_with is not None and scored_with != to_dict(cfg.regime_w) and all(_rescorable(r) for r in records):
        # the rollouts were scored under other regime_w settings: today's decide the rewards
        records, changed = rescore(records, cfg.regime_w)
        print(f"[prefs] rescored {changed} of {len(records)} groups with the current regime_w settings")
    pairs = build_preferences(records, cfg.prefs, prompt_template=cfg.data.prompt_template)
    summary = summarize(records, pairs, bins=cfg.prefs.hist_bins)
    if not pairs:
        raise DataError(f"{src}: {_why_no_pairs(cfg, summary)}")
    write_jsonl_atomic(dst, pairs)
    save_config(cfg, layout.config("prefs"))
    summary = {**summary, "rollouts_path": src, "preferences_path": dst}
    write_json_atomic(layout.preferences_summary(), summary)
    print(format_summary(summary))
    print(f"wrote {len(pairs)} pairs to {dst}")
    return summary
