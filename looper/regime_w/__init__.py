"""Regime W: group scoring, trajectory rewards and preference pairs.

numpy and the standard library only (plus ``looper.config``, ``looper.io`` and
``looper.answers``, which holds the number grammar and answer equality it shares with
``looper.data.gsm8k``): importing this package never imports torch, transformers or peft.

- :func:`score_group` -> :class:`GroupScores` (``s_end``, ``s_path``, ``s_cf``, ``s_wm``,
  the majority answer and per-trajectory ``agree``, ``length_dev``, ``step``,
  ``grounded``, ``cf``);
- :func:`trajectory_rewards` -> one reward per trajectory;
- :func:`score_record` / :func:`rescore` -> a rollout record's Regime W fields;
- :func:`build_preferences` -> correctness and coherence pairs; :func:`summarize` and
  :func:`format_summary` describe them.

The formulas are in the docstrings of :mod:`.scoring`, :mod:`.reward` and
:mod:`.preferences` (and in docs/design.md, "Regime W").
"""

from __future__ import annotations

from looper.regime_w.preferences import (
    build_preferences,
    check_rollout_record,
    format_summary,
    record_prompt,
    summarize,
)
from looper.regime_w.rescore import rescore, score_record
from looper.regime_w.reward import coherence_terms, trajectory_rewards
from looper.regime_w.scoring import (
    Claim,
    GroupScores,
    answer_key,
    answer_value,
    evaluate_expression,
    extract_claims,
    final_answer_split,
    grounded,
    score_group,
    score_trajectory,
)

__all__ = [
    "Claim",
    "GroupScores",
    "answer_key",
    "answer_value",
    "build_preferences",
    "check_rollout_record",
    "coherence_terms",
    "evaluate_expression",
    "extract_claims",
    "final_answer_split",
    "format_summary",
    "grounded",
    "record_prompt",
    "rescore",
    "score_group",
    "score_record",
    "score_trajectory",
    "summarize",
    "trajectory_rewards",
]
