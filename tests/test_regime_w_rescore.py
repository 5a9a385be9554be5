"""looper.regime_w.rescore: a record's Regime W fields from its texts, answers and grades."""

from __future__ import annotations

import numpy as np
import pytest

from looper.config import RegimeWConfig
from looper.regime_w import rescore, score_group, score_record, trajectory_rewards

TRAJS = [
    {"full_text": "3 + 4 = <<3+4=7>>7\n#### 7", "answer": "7", "num_tokens": 20, "correct": True},
    {"full_text": "3 + 4 = <<3+4=8>>7\n#### 7", "answer": "7", "num_tokens": 24, "correct": True},
    {"full_text": "3 + 4 = <<3+4=8>>8\n#### 8", "answer": "8", "num_tokens": 30, "correct": False},
    {"full_text": "I do not know", "answer": None, "num_tokens": 6, "correct": False},
]
RECORD = {"question_id": "q1", "question": "3 + 4?", "prompt": "P", "gold": "7", "trajectories": TRAJS}


def test_score_record_equals_score_group_and_trajectory_rewards():
    cfg = RegimeWConfig(scope="trajectory")
    out = score_record(RECORD, cfg)
    texts = [t["full_text"] for t in TRAJS]
    n = np.array([t["num_tokens"] for t in TRAJS])
    scores = score_group(texts, [t["answer"] for t in TRAJS], n, cfg)
    rewards = trajectory_rewards(np.array([t["correct"] for t in TRAJS]), n, scores, cfg)
    for key, value in scores.question_fields().items():
        assert out[key] == value
    assert [t["reward"] for t in out["trajectories"]] == pytest.approx(list(rewards))
    assert [t["cf"] for t in out["trajectories"]] == pytest.approx(list(scores.cf))
    # the claim 3+4=8 is false: the second correct trajectory is less consistent than the first
    assert out["trajectories"][0]["cf"] > out["trajectories"][1]["cf"]
    # everything else is kept, and the field order puts the group scores before the trajectories
    assert list(out)[:4] == ["question_id", "question", "prompt", "gold"] and list(out)[-1] == "trajectories"
    assert RECORD["trajectories"][0].get("reward") is None  # the input is not modified


def test_rescore_counts_only_records_that_change():
    cfg = RegimeWConfig()
    scored = [score_record(RECORD, cfg), score_record(dict(RECORD, question_id="q2"), cfg)]
    same, changed = rescore(scored, cfg)
    assert changed == 0 and same == scored
    other = RegimeWConfig(w_end=0.2, w_path=0.2, w_cf=0.6)
    new, changed = rescore(scored, other)
    assert changed == 2 and new[0]["s_wm"] != scored[0]["s_wm"]
