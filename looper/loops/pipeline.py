"""The whole pipeline: ``run_pipeline(cfg)`` runs every stage in order into one output folder.

Stages: ``base`` (tiny model only: full fine-tuning that gives the offline model a base
ability), ``sft``, ``rollout``, ``prefs``, ``dpo``, ``eval`` (base, SFT and DPO, then the
comparison table). A finished stage is recorded in ``pipeline_state.json`` and skipped on
rerun; an interrupted one resumes (every stage is itself resumable). ``force`` redoes a
stage and every stage after it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from typing import Optional, Sequence

from looper import dist
from looper.config import Config, ConfigError, EvalConfig, save_config
from looper.io import DataError, write_json_atomic
from looper.layout import RunLayout, holds_run_lock, stage_outputs

STAGES = ("base", "sft", "rollout", "prefs", "dpo", "eval")
EVALUATED = (("base", None), ("sft", "sft"), ("dpo", "dpo"))  # eval name, eval.adapter


def _read_state(layout: RunLayout) -> dict:
    path = layout.pipeline_state
    if not os.path.exists(path):
        return {"completed": {}}
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
        if not isinstance(state, dict) or not isinstance(state.get("completed"), dict):
            raise ValueError("expected {\"completed\": {stage: ...}}")
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(
            f"{path}: corrupted pipeline state ({e}); delete it to rerun every stage (finished stages "
            "then resume or skip from their own outputs), or restore it"
        ) from None
    return state


def _mark_done(layout: RunLayout, stage: str, seconds: float, **info) -> None:
    if dist.is_main():
        state = _read_state(layout)
        state["completed"][stage] = {"seconds": round(seconds, 1), **info}
        write_json_atomic(layout.pipeline_state, state)
    dist.barrier()


def _forget(layout: RunLayout, stages: Sequence[str]) -> None:
    """Drop the record and the outputs of ``stages`` (rank 0), so they run from scratch."""
    if dist.is_main():
        state = _read_state(layout)
        for stage in stages:
            state["completed"].pop(stage, None)
            for path in stage_outputs(layout, stage):
                if os.path.isdir(path):
                    shutil.rmtree(path)
                elif os.path.exists(path):
                    os.remove(path)
        if os.path.exists(layout.pipeline_state):
            write_json_atomic(layout.pipeline_state, state)
    dist.barrier()


def _check_completed(cfg: Config, done: dict, world_size: int) -> None:
    """A finished stage is skipped only if it was made with today's settings: otherwise a
    ``ConfigError`` names each changed key and how to redo the stage."""
    from looper.fingerprint import changes, describe, stage_settings

    for stage, record in done.items():
        saved = record.get("settings") if isinstance(record, dict) else None
        if stage not in STAGES or saved is None:
            continue  # recorded before settings were kept
        diffs = changes(saved, stage_settings(cfg, stage, world_size))
        if diffs:
            raise ConfigError(
                f"the {stage} stage of {cfg.run.output_dir} was completed with other settings ({describe(diffs)}). "
                f"Rerun with --force {stage} to redo it and every stage after it, restore the settings, "
                "or use another run.output_dir"
            )


def _check_pipeline_settings(cfg: Config) -> None:
    """Settings the pipeline sets itself: giving them would be silently overwritten."""
    default = EvalConfig()
    for key in ("adapter", "name"):
        if getattr(cfg.eval, key) != getattr(default, key):
            raise ConfigError(
                f"eval.{key}={getattr(cfg.eval, key)!r}: the pipeline evaluates base, sft and dpo itself and "
                f"names their outputs; eval.{key} is for `looper eval`"
            )


@holds_run_lock
def run_pipeline(cfg: Config, stages: Optional[Sequence[str]] = None, force: Sequence[str] = ()) -> dict:
    """Run the selected stages (default: all) in order; returns the comparison summary.

    A stage recorded as complete in ``pipeline_state.json`` is skipped when its settings are
    today's, and refused (before any work) when they are not; ``force`` redoes a stage and
    every stage after it.
    """
    from looper.fingerprint import stage_settings
    from looper.loops.dpo import train_dpo
    from looper.loops.evaluate import compare, evaluate
    from looper.loops.prefs import build_preference_file
    from looper.loops.rollout import collect_rollouts
    from looper.loops.sft import train_sft

    selected = list(stages) if stages else list(STAGES)
    for s in list(selected) + list(force):
        if s not in STAGES:
            raise ConfigError(f"unknown pipeline stage '{s}'; the stages are {', '.join(STAGES)}")
    _check_pipeline_settings(cfg)
    layout = RunLayout.of(cfg)
    env = dist.init_distributed(cfg.run.device)
    redo = STAGES[min(STAGES.index(s) for s in force):] if force else ()
    done = _read_state(layout)["completed"]
    _check_completed(cfg, {k: v for k, v in done.items() if k not in redo}, env.world_size)  # before any work
    if redo:
        _forget(layout, redo)
        done = _read_state(layout)["completed"]
    if env.is_main:
        save_config(cfg, layout.config("pipeline"))
    t_start = time.time()
    summary: dict = {}

    for stage in STAGES:
        if stage not in selected or (stage == "base" and not layout.has_base_stage):
            continue
        if stage in done:
            if env.is_main:
                print(f"[pipeline] {stage}: complete, skipped (use --force {stage} to redo it)")
            continue
        if env.is_main:
            print(f"[pipeline] {stage}: running")
        t0 = time.time()
        if stage == "base":
            train_sft(cfg, stage="base")
        elif stage == "sft":
            train_sft(cfg)
        elif stage == "rollout":
            collect_rollouts(cfg)
        elif stage == "prefs":
            if env.is_main:
                build_preference_file(cfg)
            dist.barrier()
        elif stage == "dpo":
            train_dpo(cfg)
        elif stage == "eval":
            for name, adapter in EVALUATED:
                evaluate(dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, name=name, adapter=adapter)))
            if env.is_main:
                files = {name: layout.eval_records(name) for name, _ in EVALUATED}
                summary = compare([files["sft"], files["base"], files["dpo"]], markdown_path=layout.compare_markdown)
            dist.barrier()
        _mark_done(layout, stage, time.time() - t0, settings=stage_settings(cfg, stage, env.world_size))

    if env.is_main and "eval" in selected:
        from looper.report import write_report

        write_report(cfg, elapsed_s=time.time() - t_start)
    return summary
