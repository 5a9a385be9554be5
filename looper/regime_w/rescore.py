"""Regime W scores of a rollout record, from the texts, answers and grades it holds.

``score_record`` computes the group fields (``s_end``, ``s_path``, ``s_cf``, ``s_wm``) and
each trajectory's ``cf`` and ``reward`` under a ``RegimeWConfig``. The rollout stage scores
its records with it, and ``rescore`` applies it to records written earlier, so a file is
never left holding records scored under two settings, and ``looper prefs`` honours the
current ``regime_w`` settings without sampling again.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from looper.config import RegimeWConfig
from looper.regime_w.reward import trajectory_rewards
from looper.regime_w.scoring import score_group

__all__ = ["score_record", "rescore"]


def score_record(rec: dict, cfg: Optional[RegimeWConfig] = None) -> dict:
    """``rec`` with its Regime W fields computed under ``cfg`` (the rest kept as it is).

    Each trajectory needs ``full_text``, ``answer``, ``num_tokens`` and ``correct``.
    """
    cfg = cfg or RegimeWConfig()
    trajs = rec["trajectories"]
    texts = [t["full_text"] for t in trajs]
    answers = [t["answer"] for t in trajs]
    num_tokens = np.array([t["num_tokens"] for t in trajs], dtype=np.int64)
    correct = np.array([t["correct"] for t in trajs], dtype=bool)
    scores = score_group(texts, answers, num_tokens, cfg)
    rewards = trajectory_rewards(correct, num_tokens, scores, cfg)
    out = {k: v for k, v in rec.items() if k != "trajectories"}
    out.update(scores.question_fields())
    out["trajectories"] = [dict(t, cf=float(scores.cf[i]), reward=float(rewards[i])) for i, t in enumerate(trajs)]
    return out


def rescore(records: Sequence[dict], cfg: Optional[RegimeWConfig] = None) -> tuple[list[dict], int]:
    """Every record rescored under ``cfg``; returns the records and how many changed."""
    out = [score_record(r, cfg) for r in records]
    return out, sum(a != b for a, b in zip(out, records))
