"""Regime W rollouts: ``collect_rollouts(cfg)`` samples K trajectories per question from the
SFT policy (base + SFT adapter, merged), grades them, scores each group with Regime W and
writes ``data/rollouts.jsonl`` (one record per question, the format in docs/design.md).

Sharding, per-question seeds and resume come from the generation engine, so 1 and N ranks
write identical files and a killed run finishes where it stopped.
"""

from __future__ import annotations

import time

import numpy as np

from looper import dist, fingerprint
from looper.config import Config, save_config, to_dict
from looper.data import formats
from looper.data.gsm8k import extract_answer, is_correct, load_questions
from looper.generation import check_resumable, generation_meta, run_generation
from looper.io import DataError, check_writable, read_jsonl, write_json_atomic, write_jsonl_atomic
from looper.layout import RunLayout, holds_run_lock, resolve_adapter
from looper.models import ensure_model, load_for_generation
from looper.answers import majority
from looper.regime_w.rescore import rescore, score_record


def resolve_policy_adapter(cfg: Config):
    """``rollout.adapter``: ``auto`` = the round's policy (round 1: the SFT adapter; round r:
    round r-1's DPO adapter); ``none`` = the base model; ``sft``, ``dpo`` or a path
    (``looper.layout.resolve_adapter``)."""
    layout = RunLayout.of(cfg)
    return resolve_adapter(layout, cfg.rollout.adapter, "rollout.adapter", auto=layout.policy())


def round_questions(cfg: Config) -> tuple[int, int]:
    """``(first, count)`` of the dataset's questions this round samples (count -1 = all).

    ``pipeline.fresh_questions``: round r takes the r-th block of ``rollout.n_questions``
    after ``rollout.offset``; otherwise every round takes the same block.
    """
    r = cfg.rollout
    first = r.offset
    if cfg.pipeline.fresh_questions:
        first += (cfg.pipeline.round - 1) * r.n_questions
    return first, r.n_questions


def round_generation(cfg: Config):
    """The round's sampling settings: round r draws with seed ``generation.seed + 1000*(r-1)``,
    so a round that revisits questions does not replay the previous round's noise."""
    import dataclasses

    g = cfg.rollout.generation
    return dataclasses.replace(g, seed=g.seed + 1000 * (cfg.pipeline.round - 1))


def make_rollout_record(question: dict, samples: list[dict], cfg: Config) -> dict:
    """Grade one group of K samples and score it with Regime W (``score_record``)."""
    texts = [s["text"] for s in samples]
    answers = [extract_answer(t) for t in texts]
    rec = {
        "question_id": question["question_id"],
        "question": question["question"],
        "prompt": question["prompt"],
        "gold": question["gold"],
        "trajectories": [
            {
                "full_text": text,
                "answer": answer,
                "num_tokens": int(sample["num_tokens"]),
                "correct": bool(is_correct(answer, question["gold"])),
                "finished": bool(sample["finished"]),
            }
            for text, answer, sample in zip(texts, answers, samples)
        ],
    }
    return score_record(rec, cfg.regime_w)


def majority_answer(answers: list, max_digits: int = 30):
    """The majority answer of a group as Regime W defines it (``looper.answers.majority``, the
    rule ``score_group`` uses for s_end): the most common non-None answer, numbers agreeing
    by value, ties to the smallest key. None if every answer is None."""
    return majority(answers, max_digits)[2]


def rollout_summary(records: list[dict], max_digits: int = 30) -> dict:
    """Single-sample accuracy, maj@k (majority answer as in Regime W's s_end), pass@k,
    mean group scores and group counts."""
    n = len(records)
    corr = [[t["correct"] for t in r["trajectories"]] for r in records]
    maj = 0
    for r in records:
        top = majority_answer([t["answer"] for t in r["trajectories"]], max_digits)
        if top is not None:
            maj += is_correct(top, r["gold"])
    mean = lambda key: float(np.mean([r[key] for r in records])) if n else 0.0  # noqa: E731
    return {
        "questions": n,
        "k": len(corr[0]) if corr else 0,
        "accuracy": float(np.mean([c for cs in corr for c in cs])) if n else 0.0,
        "maj_at_k": maj / n if n else 0.0,
        "pass_at_k": sum(any(cs) for cs in corr) / n if n else 0.0,
        "s_end": mean("s_end"),
        "s_path": mean("s_path"),
        "s_cf": mean("s_cf"),
        "s_wm": mean("s_wm"),
        "all_correct": sum(all(cs) for cs in corr),
        "all_wrong": sum(not any(cs) for cs in corr),
        "mixed": sum(any(cs) and not all(cs) for cs in corr),
        "mean_tokens": float(np.mean([t["num_tokens"] for r in records for t in r["trajectories"]])) if n else 0.0,
    }


def format_rollout_summary(s: dict) -> str:
    return (
        f"[rollout] {s['questions']} questions x {s['k']}: accuracy {s['accuracy']:.3f}, maj@k {s['maj_at_k']:.3f}, "
        f"pass@k {s['pass_at_k']:.3f}; mean s_end {s['s_end']:.3f} s_path {s['s_path']:.3f} "
        f"s_cf {s['s_cf']:.3f} s_wm {s['s_wm']:.3f}; groups all-correct {s['all_correct']}, "
        f"all-wrong {s['all_wrong']}, mixed {s['mixed']}"
    )


@holds_run_lock
def collect_rollouts(cfg: Config) -> dict:
    """Sample, grade and score; write ``data/rollouts.jsonl``; return the summary.

    A rerun with the same settings resumes (or skips) the questions already written; other
    settings are refused, naming each one (``looper.fingerprint``). Records are always
    scored with the current ``regime_w`` settings: a file written under other ones is
    rescored whole, never mixed.
    """
    r = cfg.rollout
    layout = RunLayout.of(cfg)
    env = dist.init_distributed(cfg.run.device)
    adapter = resolve_policy_adapter(cfg)
    out_path = layout.rollouts()
    model_path = ensure_model(cfg, announce=True)
    gen = round_generation(cfg)
    meta = generation_meta(
        gen, r.k, settings=fingerprint.stage_settings(cfg, "rollout"),
        inputs={"adapter": fingerprint.adapter_digest(adapter), "model": fingerprint.folder_stamp(model_path)},
        info={"adapter": adapter, "model": model_path, "stage": "rollout", "regime_w": to_dict(cfg.regime_w)},
    )
    check_resumable(out_path, meta, layout.stage_name("rollout"))  # before any work
    check_writable([out_path, layout.rollouts_summary(), layout.config("rollout")])
    source = r.dataset if r.dataset is not None else cfg.data.train
    first, count = round_questions(cfg)
    questions = load_questions(source, "train", cfg.data)[first:]
    if count >= 0:  # -1 = all
        questions = questions[:count]
    if not questions:
        raise DataError(f"rollout dataset {source or 'synthetic'} has no questions from question {first} on")
    if env.is_main:
        save_config(cfg, layout.config("rollout"))

    model, tokenizer = load_for_generation(cfg, adapter, env.device)  # checks data.prompt_format first
    fmt = formats.resolve(tokenizer, cfg.data)
    for q in questions:  # the prompt as sent: its text goes into the record, its tokens to the model
        q["prompt"] = fmt.prompt(q["question"])
        q["prompt_ids"] = fmt.prompt_ids(q["prompt"])
    t0 = time.perf_counter()
    records = run_generation(
        model, tokenizer, questions, gen, r.k, out_path,
        make_record=lambda q, samples: make_rollout_record(q, samples, cfg),
        progress=cfg.run.progress, meta=meta, desc="rollout",
    )
    if env.is_main:
        rescore_file(out_path, cfg)
    dist.barrier()
    records = rescore(records, cfg.regime_w)[0]
    summary = rollout_summary(records, cfg.regime_w.max_number_digits)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    summary["records_in_file"] = len(read_jsonl(out_path))
    if env.is_main:
        write_json_atomic(layout.rollouts_summary(), summary)
        print(format_rollout_summary(summary))
        if summary["records_in_file"] > summary["questions"]:
            print(f"[rollout] used {summary['questions']} of the {summary['records_in_file']} records in {out_path} "
                  "(rollout.n_questions); the others are kept")
    return summary


def rescore_file(path: str, cfg: Config) -> int:
    """Rescore every record of a rollouts file with ``cfg.regime_w``; rewrite it (atomically)
    when any record changes. Returns how many changed."""
    records, changed = rescore(read_jsonl(path), cfg.regime_w)
    if changed:
        write_jsonl_atomic(path, records)
        print(f"[rollout] rescored {changed} record(s) of {path} with the current regime_w settings")
    return changed
