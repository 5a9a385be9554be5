"""Evaluation: accuracy of the base model or base + adapter on GSM8K-style questions.

- ``evaluate(cfg)`` generates one completion per question (greedy by default) and writes
  ``outputs/<name>_eval.jsonl`` (one record per question) and ``outputs/<name>_eval.json``
  (the summary). A rerun resumes from the questions already written.
- ``compare(files)`` puts several eval files side by side: accuracy with 95% intervals,
  the questions each run fixes or breaks relative to the first, and an exact McNemar test.
"""

from __future__ import annotations

import math
import os
from fractions import Fraction
from typing import Optional, Sequence

from looper.config import Config, save_config
from looper.io import DataError, check_writable, read_jsonl, write_json_atomic, write_text_atomic
from looper.layout import RunLayout, holds_run_lock, resolve_adapter as resolve_adapter_spec

EVAL_SUFFIX = "_eval.jsonl"

__all__ = ["evaluate", "compare", "comparison", "summarize_eval", "wilson_interval", "mcnemar_exact", "resolve_adapter"]


# --------------------------------------------------------------------------- statistics


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for ``k`` successes in ``n`` trials (95% for z = 1.96)."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value: a binomial test of ``b`` vs ``c`` discordant pairs.

    ``p = min(1, 2 * sum_{i <= min(b, c)} C(b + c, i) / 2^(b + c))``; 1.0 when b = c = 0.
    """
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1))
    return float(min(Fraction(1), Fraction(2 * tail, 2**n)))


def summarize_eval(records: Sequence[dict]) -> dict:
    """Accuracy (flexible and strict) with Wilson 95% intervals, and answer statistics."""
    n = len(records)
    if n == 0:
        raise DataError("no eval records to summarize")
    correct = sum(bool(r.get("correct")) for r in records)
    strict = sum(bool(r.get("strict_correct")) for r in records)
    lo, hi = wilson_interval(correct, n)
    s_lo, s_hi = wilson_interval(strict, n)
    tokens = [r["num_tokens"] for r in records if isinstance(r.get("num_tokens"), int)]
    return {
        "n": n,
        "correct": correct,
        "accuracy": correct / n,
        "ci95": [lo, hi],
        "flexible": {"correct": correct, "accuracy": correct / n, "ci95": [lo, hi]},
        "strict": {"correct": strict, "accuracy": strict / n, "ci95": [s_lo, s_hi]},
        "no_answer": sum(r.get("prediction") is None for r in records),
        "truncated": sum(r.get("finished") is False for r in records),
        "mean_tokens": (sum(tokens) / len(tokens)) if tokens else None,
    }


# --------------------------------------------------------------------------- settings


def resolve_adapter(cfg: Config) -> tuple[Optional[str], str]:
    """``(adapter path or None, label)`` from ``cfg.eval.adapter`` (the spellings of
    ``looper.layout.resolve_adapter``); a missing folder is a ConfigError.

    The label names the output: ``base``, ``sft``, ``dpo`` (``dpo_r2`` with ``pipeline.round=2``),
    or the adapter folder's name.
    """
    layout = RunLayout.of(cfg)
    path = resolve_adapter_spec(layout, cfg.eval.adapter, "eval.adapter")
    if path is None:
        return None, "base"
    key = str(cfg.eval.adapter).strip().lower()
    if key == "sft":
        return path, key
    if key == "dpo":  # this round's DPO adapter: dpo, dpo_r2, ...
        return path, layout.stage_name("dpo")
    return path, os.path.basename(os.path.normpath(path)) or "adapter"


def _dataset_tag(source: Optional[str]) -> str:
    """A short name for a data source, for output names."""
    if source is None:
        return "synthetic"
    key = str(source).strip()
    if key.lower() in ("gsm8k", "openai/gsm8k"):
        return "gsm8k"
    if key.lower() in ("platinum", "gsm8k-platinum", "madrylab/gsm8k-platinum"):
        return "platinum"
    base = os.path.basename(os.path.normpath(key))
    for ext in (".jsonl", ".json", ".jl"):
        if base.endswith(ext):
            base = base[: -len(ext)]
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in base) or "data"


def eval_name(cfg: Config, adapter_label: str) -> str:
    """``cfg.eval.name``, else the adapter label, suffixed with the dataset when eval.dataset is set."""
    if cfg.eval.name:
        return cfg.eval.name  # a plain file name (checked when the config loads)
    if cfg.eval.dataset is None:
        return adapter_label
    return f"{adapter_label}_{_dataset_tag(cfg.eval.dataset)}"


def load_eval_questions(cfg: Config) -> tuple[list[dict], str]:
    """The questions to evaluate and a description of where they came from."""
    from looper.data.gsm8k import load_questions

    source = cfg.eval.dataset if cfg.eval.dataset is not None else cfg.data.test
    questions = load_questions(source, "test", cfg.data)
    if cfg.eval.n_questions is not None and cfg.eval.n_questions >= 0:
        questions = questions[: cfg.eval.n_questions]
    if not questions:
        raise DataError(f"eval: no questions to evaluate (dataset {source!r}, n_questions={cfg.eval.n_questions})")
    return questions, "synthetic" if source is None else str(source)


# --------------------------------------------------------------------------- evaluate


def _make_record(item: dict, samples: list[dict]) -> dict:
    from looper.data.gsm8k import extract_answer, extract_answer_strict, is_correct

    sample = samples[0]
    text = sample["text"]
    prediction = extract_answer(text)
    strict = extract_answer_strict(text)
    return {
        "question_id": item["question_id"],
        "question": item["question"],
        "prompt": item["prompt"],
        "gold": item["gold"],
        "completion": text,
        "prediction": prediction,
        "correct": is_correct(prediction, item["gold"]),
        "strict_prediction": strict,
        "strict_correct": is_correct(strict, item["gold"]),
        "num_tokens": sample["num_tokens"],
        "finished": sample["finished"],
    }


@holds_run_lock
def evaluate(cfg: Config) -> dict:
    """Evaluate ``cfg.eval.adapter`` (or the base model) on ``cfg.eval.dataset``.

    Writes ``outputs/<name>_eval.jsonl`` and ``outputs/<name>_eval.json`` under
    ``run.output_dir`` and returns the summary. Runs on one process or under torchrun
    (questions are sharded; rank 0 writes the summary). A rerun resumes the questions
    already written, and refuses other settings, naming each one.
    """
    from looper import dist, fingerprint, tracking
    from looper.data import formats
    from looper.generation import check_resumable, generation_meta, run_generation
    from looper.models import ensure_model, load_for_generation

    layout = RunLayout.of(cfg)
    adapter_path, adapter_label = resolve_adapter(cfg)  # before anything is touched
    name = eval_name(cfg, adapter_label)
    questions, source = load_eval_questions(cfg)

    env = dist.init_distributed(cfg.run.device)
    out_jsonl = layout.eval_records(name)
    model_path = ensure_model(cfg, announce=True)
    meta = generation_meta(
        cfg.eval.generation, 1, settings=fingerprint.stage_settings(cfg, "eval"),
        inputs={"model": fingerprint.folder_stamp(model_path), "adapter": fingerprint.adapter_digest(adapter_path)},
        info={"dataset": source, "adapter": adapter_path, "model": model_path},
    )
    check_resumable(out_jsonl, meta, "eval")  # before any work
    check_writable([out_jsonl, layout.eval_summary(name), layout.config(f"eval_{name}")])
    tracker = tracking.for_stage(cfg, layout, f"eval_{name}")  # a missing tracker package fails here
    model, tokenizer = load_for_generation(cfg, adapter_path, env.device)  # checks data.prompt_format first
    fmt = formats.resolve(tokenizer, cfg.data)
    for q in questions:  # the prompt as sent: its text goes into the record, its tokens to the model
        q["prompt"] = fmt.prompt(q["question"])
        q["prompt_ids"] = fmt.prompt_ids(q["prompt"])
    records = run_generation(
        model, tokenizer, questions, cfg.eval.generation, 1, out_jsonl, _make_record,
        progress=cfg.run.progress, device=env.device, meta=meta, desc=f"eval {name}",
    )
    summary = {
        "name": name,
        **summarize_eval(records),
        "dataset": source,
        "adapter": adapter_path,
        "model": cfg.model.name_or_path,
        "generation": meta["generation"],
        "eval_file": out_jsonl,
    }
    if env.is_main:
        write_json_atomic(layout.eval_summary(name), summary)
        save_config(cfg, layout.config(f"eval_{name}"))
        if tracker is not None:  # one point per eval, at the pipeline round
            tracker.open()
            tracker.log({"step": cfg.pipeline.round, "eval/accuracy": summary["accuracy"],
                         "eval/strict_accuracy": summary["strict"]["accuracy"], "eval/n": summary["n"]})
            tracker.close()
        lo, hi = summary["ci95"]
        print(
            f"eval {name}: accuracy {summary['accuracy']:.4f} ({summary['correct']}/{summary['n']}, "
            f"95% CI {lo:.3f}-{hi:.3f}), strict {summary['strict']['accuracy']:.4f} "
            f"[{source}, adapter={adapter_path or 'none'}] -> {out_jsonl}"
        )
    dist.barrier()
    return summary


# --------------------------------------------------------------------------- compare


def _run_name(path: str) -> str:
    base = os.path.basename(path)
    return base[: -len(EVAL_SUFFIX)] if base.endswith(EVAL_SUFFIX) else os.path.splitext(base)[0]


def _load_eval_file(path: str) -> dict[str, bool]:
    out: dict[str, bool] = {}
    for rec in read_jsonl(path, required=("question_id", "correct")):
        qid = str(rec["question_id"])
        if qid in out:
            raise DataError(f"{path}: duplicate question_id {qid!r}")
        if not isinstance(rec["correct"], bool):
            raise DataError(f"{path}: question {qid!r}: 'correct' must be true or false, got {rec['correct']!r}")
        out[qid] = rec["correct"]
    return out


def comparison(files: Sequence[str]) -> dict:
    """Eval files side by side, against the first one (nothing printed or written).

    Questions are matched by ``question_id``. When the files do not cover the same ids,
    the comparison uses the ids they all share and says so (no shared id is an error).
    Returns ``{"baseline", "n", "note", "runs": [...]}``; each run has its accuracy, Wilson
    95% interval, ``fixes`` / ``breaks`` (ids wrong -> right and right -> wrong vs the
    baseline) and ``mcnemar_p`` (exact, two-sided).
    """
    if not files:
        raise DataError("compare: give at least one eval file")
    runs = [(f, _load_eval_file(f)) for f in files]
    common = set(runs[0][1])
    for _, r in runs[1:]:
        common &= set(r)
    if not common:
        raise DataError(f"compare: the files share no question_id ({', '.join(files)})")
    note = None
    if any(len(r) != len(common) for _, r in runs):
        sizes = ", ".join(f"{_run_name(f)}={len(r)}" for f, r in runs)
        note = f"files cover different questions ({sizes}); compared on the {len(common)} shared ids"
    ids = [q for q in runs[0][1] if q in common]  # the baseline file's order
    base = runs[0][1]
    table = []
    for path, r in runs:
        k = sum(r[q] for q in ids)
        fixes = [q for q in ids if r[q] and not base[q]]
        breaks = [q for q in ids if base[q] and not r[q]]
        lo, hi = wilson_interval(k, len(ids))
        table.append({
            "name": _run_name(path), "file": path, "n": len(ids), "correct": k, "accuracy": k / len(ids),
            "ci95": [lo, hi], "fixes": fixes, "breaks": breaks, "mcnemar_p": mcnemar_exact(len(fixes), len(breaks)),
        })
    return {"baseline": table[0]["name"], "n": len(ids), "note": note, "runs": table}


def compare(files: Sequence[str], markdown_path: Optional[str] = None) -> dict:
    """``comparison(files)``, printed as a table and written as Markdown (by default
    ``compare.md`` beside the first file; never over one of the inputs). Returns the
    comparison with its ``markdown`` path."""
    md_path = markdown_path or os.path.join(os.path.dirname(os.path.abspath(files[0])), "compare.md") if files else None
    if md_path and os.path.realpath(md_path) in {os.path.realpath(f) for f in files}:
        raise DataError(f"compare: the Markdown output {md_path} is one of the eval files being compared; "
                        "give --markdown another path")
    result = {**comparison(files), "markdown": md_path}
    text = _markdown(result)
    print(text, end="")
    write_text_atomic(md_path, text)
    return result


def _markdown(result: dict) -> str:
    lines = [f"# Eval comparison (baseline: {result['baseline']}, {result['n']} questions)", ""]
    if result["note"]:
        lines += [f"Note: {result['note']}.", ""]
    lines += [
        "| run | accuracy | 95% CI | correct | fixes | breaks | McNemar p |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(result["runs"]):
        lo, hi = r["ci95"]
        vs = ("-", "-", "-") if i == 0 else (str(len(r["fixes"])), str(len(r["breaks"])), f"{r['mcnemar_p']:.4g}")
        lines.append(
            f"| {r['name']} | {r['accuracy']:.4f} | {lo:.3f}-{hi:.3f} | {r['correct']}/{r['n']} | "
            f"{vs[0]} | {vs[1]} | {vs[2]} |"
        )
    for r in result["runs"][1:]:
        lines += ["", f"## {r['name']} vs {result['baseline']}", ""]
        lines.append(f"- fixes ({len(r['fixes'])}): {_id_list(r['fixes'])}")
        lines.append(f"- breaks ({len(r['breaks'])}): {_id_list(r['breaks'])}")
    return "\n".join(lines) + "\n"


def _id_list(ids: list[str], limit: int = 50) -> str:
    if not ids:
        return "none"
    shown = ", ".join(f"`{q}`" for q in ids[:limit])
    return shown + (f", ... ({len(ids) - limit} more)" if len(ids) > limit else "")
