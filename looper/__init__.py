"""looper: post-training language models on math reasoning.

The public API is resolved lazily, so ``import looper.regime_w`` never imports torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    "Config": "looper.config",
    "load_config": "looper.config",
    "train_sft": "looper.loops.sft",
    "collect_rollouts": "looper.loops.rollout",
    "build_preference_file": "looper.loops.prefs",
    "train_dpo": "looper.loops.dpo",
    "evaluate": "looper.loops.evaluate",
    "compare": "looper.loops.evaluate",
    "run_pipeline": "looper.loops.pipeline",
    "score_group": "looper.regime_w",
    "trajectory_rewards": "looper.regime_w",
    "build_preferences": "looper.regime_w",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'looper' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_API))
