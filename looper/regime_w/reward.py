"""Regime W trajectory rewards.

For trajectory ``i`` of a group of K (docs/design.md, "Regime W")::

    reward_i = alpha * correct_i + beta * coherence_i + bonus * full_i
               - lam * max(0, n_i - free_tokens)

- ``full_i`` = 1 when trajectory ``i`` is correct and all K trajectories gave that same
  answer (every ``agree_j`` is true), else 0.
- ``coherence_i`` depends on ``cfg.scope``:

  - ``"question"`` (default): ``s_wm``, the same for every trajectory of the question;
  - ``"trajectory"``: ``w_end * [a_i == majority] + w_path * (1 - length_dev_i) + w_cf * cf_i``
    with ``length_dev_i = min(1, |n_i - mean n| / mean n)``; correct trajectories of one
    question then get different rewards.

Defaults: alpha=1.0, beta=0.5, bonus=0.1, lam=0.001, free_tokens=512, weights 0.5/0.3/0.2.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from looper.config import RegimeWConfig
from looper.regime_w.scoring import GroupScores

__all__ = ["coherence_terms", "trajectory_rewards"]


def coherence_terms(scores: GroupScores, cfg: Optional[RegimeWConfig] = None) -> np.ndarray:
    """The coherence term of each trajectory (``s_wm`` everywhere, or per trajectory)."""
    cfg = cfg or RegimeWConfig()
    if cfg.scope == "question":
        return np.full(scores.k, scores.s_wm, dtype=np.float64)
    return (
        cfg.w_end * scores.agree.astype(np.float64)
        + cfg.w_path * (1.0 - scores.length_dev)
        + cfg.w_cf * scores.cf
    )


def trajectory_rewards(
    correct: Sequence[bool],
    num_tokens: Sequence[int],
    scores: GroupScores,
    cfg: Optional[RegimeWConfig] = None,
) -> np.ndarray:
    """``reward_i`` for each of the K trajectories (formula in the module docstring)."""
    cfg = cfg or RegimeWConfig()
    c_raw = np.asarray(correct)
    n = np.asarray(num_tokens, dtype=np.float64)
    k = scores.k
    if c_raw.shape != (k,) or n.shape != (k,):
        raise ValueError(
            f"correct and num_tokens must each hold K={k} values, got shapes {c_raw.shape} and {n.shape}"
        )
    if c_raw.dtype != np.bool_ and not np.all((c_raw == 0) | (c_raw == 1)):
        raise ValueError(f"correct must be booleans (or 0/1), got {c_raw.tolist()}")
    if not np.all(np.isfinite(n)) or np.any(n < 0):
        raise ValueError(f"num_tokens must be finite and >= 0, got {n.tolist()}")
    c = c_raw.astype(bool)
    full = c & bool(np.all(scores.agree))
    penalty = cfg.lam * np.maximum(0.0, n - cfg.free_tokens)
    return (
        cfg.alpha * c.astype(np.float64)
        + cfg.beta * coherence_terms(scores, cfg)
        + cfg.bonus * full.astype(np.float64)
        - penalty
    )
