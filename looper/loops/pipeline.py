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

from looper import dist, paths
from looper.config import Config, ConfigError, save_config
from looper.io import write_json_atomic
from looper.models import TINY

STAGES = ("base", "sft", "rollout", "prefs", "dpo", "eval")


def _state_path(cfg: Config) -> str:
    return os.path.join(cfg.run.output_dir, "pipeline_state.json")


def _read_state(cfg: Config) -> dict:
    path = _state_path(cfg)
    if not os.path.exists(path):
        return {"completed": {}}
    with open(path) as f:
        return json.load(f)


def _mark_done(cfg: Config, stage: str, seconds: float, **info) -> None:
    if dist.is_main():
        state = _read_state(cfg)
        state["completed"][stage] = {"seconds": round(seconds, 1), **info}
        write_json_atomic(_state_path(cfg), state)
    dist.barrier()


def _stage_outputs(cfg: Config, stage: str) -> list[str]:
    """What a stage writes (outputs and resume states); removed when the stage is forced."""
    import glob

    from looper.loops.common import stage_dirs

    def both(name: str, st: str) -> list[str]:
        d = stage_dirs(cfg, name, st)
        return [d["out"], d["resume"]]

    roll = paths.rollouts_path(cfg)
    prefs = paths.preferences_path(cfg)
    return {
        "base": both("base", "base"),
        "sft": both(cfg.sft.output_name, "sft"),
        "rollout": [roll, f"{roll}.meta.json", *glob.glob(glob.escape(roll) + ".rank*.partial")],
        "prefs": [prefs],
        "dpo": both(cfg.dpo.output_name, "dpo"),
        "eval": [paths.outputs_dir(cfg)],
    }[stage]


def _forget(cfg: Config, stages: Sequence[str]) -> None:
    """Drop the record and the outputs of ``stages`` (rank 0), so they run from scratch."""
    if dist.is_main():
        state = _read_state(cfg)
        for stage in stages:
            state["completed"].pop(stage, None)
            for path in _stage_outputs(cfg, stage):
                if os.path.isdir(path):
                    shutil.rmtree(path)
                elif os.path.exists(path):
                    os.remove(path)
        if os.path.exists(_state_path(cfg)):
            write_json_atomic(_state_path(cfg), state)
    dist.barrier()


def base_stage_config(cfg: Config) -> Config:
    """The tiny model's base training: the SFT loop in full fine-tuning mode."""
    bt = dataclasses.replace(cfg.base_train, output_name="base", init_adapter=None)
    return dataclasses.replace(cfg, lora=None, sft=bt)


def after_base(cfg: Config) -> Config:
    """Later stages start from the base-trained model when there is a base stage."""
    if not uses_base_stage(cfg):
        return cfg
    model = dataclasses.replace(cfg.model, name_or_path=paths.checkpoint_dir(cfg, "base"))
    return dataclasses.replace(cfg, model=model)


def uses_base_stage(cfg: Config) -> bool:
    return cfg.model.name_or_path == TINY and cfg.base_train is not None


def stage_config(cfg: Config, announce: bool = False) -> Config:
    """The config a single stage command runs with: after the tiny base stage has run,
    stages start from its output, as they do inside the pipeline."""
    if not uses_base_stage(cfg):
        return cfg
    if os.path.isfile(os.path.join(paths.checkpoint_dir(cfg, "base"), "config.json")):
        return after_base(cfg)
    if announce and dist.is_main():
        print(
            "[looper] note: the tiny model's base stage has not run in this output folder, so this "
            "stage uses the untrained tiny model; `looper pipeline --stages base` runs it"
        )
    return cfg


def run_pipeline(cfg: Config, stages: Optional[Sequence[str]] = None, force: Sequence[str] = ()) -> dict:
    """Run the selected stages (default: all) in order; returns the comparison summary."""
    from looper.loops.dpo import train_dpo
    from looper.loops.evaluate import compare, evaluate
    from looper.loops.prefs import build_preference_file
    from looper.loops.rollout import collect_rollouts
    from looper.loops.sft import train_sft

    selected = list(stages) if stages else list(STAGES)
    for s in list(selected) + list(force):
        if s not in STAGES:
            raise ConfigError(f"unknown pipeline stage '{s}'; the stages are {', '.join(STAGES)}")
    env = dist.init_distributed(cfg.run.device)
    if force:
        first = min(STAGES.index(s) for s in force)
        _forget(cfg, STAGES[first:])
    if env.is_main:
        save_config(cfg, paths.resolved_config_path(cfg, "pipeline"))
    done = _read_state(cfg)["completed"]
    t_start = time.time()
    stage_cfg = after_base(cfg)
    summary: dict = {}

    for stage in STAGES:
        if stage not in selected or (stage == "base" and not uses_base_stage(cfg)):
            continue
        if stage in done:
            if env.is_main:
                print(f"[pipeline] {stage}: complete, skipped (use --force {stage} to redo it)")
            continue
        if env.is_main:
            print(f"[pipeline] {stage}: running")
        t0 = time.time()
        if stage == "base":
            train_sft(base_stage_config(cfg), stage="base")
        elif stage == "sft":
            train_sft(stage_cfg, stage="sft")
        elif stage == "rollout":
            collect_rollouts(stage_cfg)
        elif stage == "prefs":
            if env.is_main:
                build_preference_file(stage_cfg)
            dist.barrier()
        elif stage == "dpo":
            train_dpo(stage_cfg)
        elif stage == "eval":
            files = {}
            for name, adapter in (("base", None), ("sft", "sft"), ("dpo", "dpo")):
                ecfg = dataclasses.replace(stage_cfg, eval=dataclasses.replace(stage_cfg.eval, name=name, adapter=adapter))
                evaluate(ecfg)
                files[name] = os.path.join(paths.outputs_dir(cfg), f"{name}_eval.jsonl")
            if env.is_main:
                summary = compare(
                    [files["sft"], files["base"], files["dpo"]],
                    markdown_path=os.path.join(paths.outputs_dir(cfg), "compare.md"),
                )
            dist.barrier()
        _mark_done(cfg, stage, time.time() - t0)

    if env.is_main and "eval" in selected:
        from looper.report import write_report

        write_report(cfg, elapsed_s=time.time() - t_start)
    return summary
