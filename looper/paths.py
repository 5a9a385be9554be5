"""Where a stage reads and writes under ``run.output_dir`` (the layout in DESIGN.md)."""

from __future__ import annotations

import os


def checkpoint_dir(cfg, name: str) -> str:
    return os.path.join(cfg.run.output_dir, "checkpoints", name)


def rollouts_path(cfg) -> str:
    return os.path.join(cfg.run.output_dir, "data", "rollouts.jsonl")


def preferences_path(cfg) -> str:
    return os.path.join(cfg.run.output_dir, "data", "preferences.jsonl")


def outputs_dir(cfg) -> str:
    return os.path.join(cfg.run.output_dir, "outputs")


def metrics_path(cfg, stage: str) -> str:
    return os.path.join(cfg.run.output_dir, "metrics", f"{stage}.jsonl")


def resolved_config_path(cfg, stage: str) -> str:
    return os.path.join(cfg.run.output_dir, "configs", f"{stage}.yaml")
