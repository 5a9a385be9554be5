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
from looper.layout import ROUND_STAGES, RunLayout, holds_run_lock, stage_outputs

STAGES = ("base", "sft", "rollout", "prefs", "dpo", "eval")  # with pipeline.rounds: 1 (see pipeline_stages)


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
        for name in stages:
            state["completed"].pop(name, None)
            stage, r = split_stage(name)
            for path in stage_outputs(layout, stage, r):
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

    for name, record in done.items():
        saved = record.get("settings") if isinstance(record, dict) else None
        stage, r = split_stage(name)
        if stage not in STAGES or saved is None:
            continue  # recorded before settings were kept
        diffs = changes(saved, stage_settings(in_round(cfg, r), stage, world_size))
        if diffs:
            raise ConfigError(
                f"the {name} stage of {cfg.run.output_dir} was completed with other settings ({describe(diffs)}). "
                f"Rerun with --force {name} to redo it and every stage after it, restore the settings, "
                "or use another run.output_dir"
            )


def _check_pipeline_settings(cfg: Config) -> None:
    """Settings the pipeline sets itself: giving them would be silently overwritten."""
    set_by_pipeline = {
        "eval.adapter": (cfg.eval.adapter, EvalConfig().adapter, "the pipeline evaluates base, sft and each round's dpo"),
        "eval.name": (cfg.eval.name, EvalConfig().name, "the pipeline names its eval outputs"),
        "pipeline.round": (cfg.pipeline.round, 1, "the pipeline runs rounds 1 to pipeline.rounds itself"),
    }
    if cfg.pipeline.rounds > 1:
        why = "each round starts from the previous round's policy and trains on its own pairs"
        set_by_pipeline["rollout.adapter"] = (cfg.rollout.adapter, "auto", why)
        set_by_pipeline["dpo.adapter"] = (cfg.dpo.adapter, "auto", why)
        set_by_pipeline["dpo.pairs"] = (cfg.dpo.pairs, None, why)
    for key, (value, default, why) in set_by_pipeline.items():
        if value != default:
            raise ConfigError(f"{key}={value!r}: {why}; {key} is for the single-stage commands")


def pipeline_stages(rounds: int) -> list[str]:
    """Every stage in order: ``base, sft``, then rollout, prefs and dpo for each round (named
    ``rollout``, ``prefs``, ``dpo`` in round 1 and ``rollout_r2``, ... after), then ``eval``."""
    per_round = [f"{s}{RunLayout.round_suffix(r)}" for r in range(1, rounds + 1) for s in ROUND_STAGES]
    return ["base", "sft", *per_round, "eval"]


def split_stage(name: str) -> tuple[str, int]:
    """``"dpo_r2"`` -> ``("dpo", 2)``; ``"sft"`` -> ``("sft", 1)``."""
    base, _, r = name.rpartition("_r")
    if base in ROUND_STAGES and r.isdigit():
        return base, int(r)
    return name, 1


def in_round(cfg: Config, r: int) -> Config:
    """The config of round ``r``: its file names and default adapters follow from ``pipeline.round``."""
    return dataclasses.replace(cfg, pipeline=dataclasses.replace(cfg.pipeline, round=r))


def _expand(names: Sequence[str], order: list[str], what: str) -> list[str]:
    """Stage names as given (``dpo`` means every round's dpo; ``dpo_r2`` just that one)."""
    out = []
    for name in names:
        matches = [s for s in order if s == name or (name in ROUND_STAGES and split_stage(s)[0] == name)]
        if not matches:
            raise ConfigError(f"unknown pipeline stage '{name}' in {what}; the stages are {', '.join(order)}")
        out += matches
    return out


@holds_run_lock
def run_pipeline(cfg: Config, stages: Optional[Sequence[str]] = None, force: Sequence[str] = ()) -> dict:
    """Run the selected stages (default: all) in order; returns the comparison summary.

    With ``pipeline.rounds: N``, rollout, prefs and dpo run N times: round r samples from
    round r-1's DPO adapter (round 1: the SFT adapter), trains from it, and uses it frozen
    as the reference (Iterative RPO). A stage recorded as complete in
    ``pipeline_state.json`` is skipped when its settings are today's, and refused (before any
    work) when they are not; ``force`` redoes a stage and every stage after it.
    """
    from looper.fingerprint import stage_settings
    from looper.loops.dpo import train_dpo
    from looper.loops.evaluate import compare, evaluate
    from looper.loops.prefs import build_preference_file
    from looper.loops.rollout import collect_rollouts
    from looper.loops.sft import train_sft

    order = pipeline_stages(cfg.pipeline.rounds)
    selected = set(_expand(stages, order, "--stages") if stages else order)
    forced = _expand(force, order, "--force")
    _check_pipeline_settings(cfg)
    layout = RunLayout.of(cfg)
    env = dist.init_distributed(cfg.run.device)
    redo = order[min(order.index(s) for s in forced):] if forced else []
    done = _read_state(layout)["completed"]
    _check_completed(cfg, {k: v for k, v in done.items() if k not in redo}, env.world_size)  # before any work
    if redo:
        _forget(layout, redo)
        done = _read_state(layout)["completed"]
    if env.is_main:
        save_config(cfg, layout.config("pipeline"))
    t_start = time.time()
    summary: dict = {}

    ran: list[str] = []  # stages run by this invocation: later stages recorded as complete are stale
    for name in order:
        stage, r = split_stage(name)
        rcfg = in_round(cfg, r)
        if name not in selected or (stage == "base" and not layout.has_base_stage):
            continue
        if name in done and not ran:
            if env.is_main:
                print(f"[pipeline] {name}: complete, skipped (use --force {name} to redo it)")
            continue
        if name in done and env.is_main:
            # e.g. eval after a new round: it reuses what is still valid and adds what is new
            print(f"[pipeline] {name}: complete before {ran[-1]} ran in this invocation; running it again")
        if env.is_main:
            print(f"[pipeline] {name}: running")
        t0 = time.time()
        if stage == "base":
            train_sft(cfg, stage="base")
        elif stage == "sft":
            train_sft(cfg)
        elif stage == "rollout":
            collect_rollouts(rcfg)
        elif stage == "prefs":
            if env.is_main:
                build_preference_file(rcfg)
            dist.barrier()
        elif stage == "dpo":
            train_dpo(rcfg)
        elif stage == "eval":
            runs = evaluated_runs(layout, cfg.pipeline.rounds)
            for run_name, adapter in runs:
                evaluate(dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, name=run_name, adapter=adapter)))
            if env.is_main:
                files = [layout.eval_records(n) for n in ["sft", "base"] + [n for n, _ in runs[2:]]]
                summary = compare(files, markdown_path=layout.compare_markdown)
            dist.barrier()
        _mark_done(layout, name, time.time() - t0, settings=stage_settings(rcfg, stage, env.world_size))
        ran.append(name)

    if env.is_main and "eval" in selected:
        from looper.report import write_report

        write_report(cfg, elapsed_s=time.time() - t_start)
    return summary


def evaluated_runs(layout: RunLayout, rounds: int) -> list[tuple[str, Optional[str]]]:
    """``(eval name, eval.adapter)`` of every run the pipeline evaluates: base, sft, and each
    round's DPO adapter (``dpo``, ``dpo_r2``, ...)."""
    runs: list[tuple[str, Optional[str]]] = [("base", None), ("sft", "sft")]
    runs += [(layout.stage_name("dpo", r), layout.dpo_adapter(r)) for r in range(1, rounds + 1)]
    return runs
