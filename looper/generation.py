"""Sharded, resumable generation runs over the engine (``looper.engine``).

:func:`run_generation` shards the items across ranks, appends one record per question
to a per-rank partial file as it goes, and merges everything into one output file in
input order. A rerun resumes: questions already written are skipped.

Batches are planned from the whole item list, before sharding: rank ``r`` runs batches
``r, r + W, ...`` of those not yet done, so every question is computed in the same batch
(same shapes, same arithmetic) whatever the number of ranks, and a resumed run recomputes
a half-written batch whole. The output file is byte-identical for 1 or N ranks and for
killed-and-resumed runs, given the same device type and thread count.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from typing import Any, Callable, Optional, Sequence

import torch

from looper import dist
from looper.config import ConfigError, GenerationConfig
from looper.engine import Sample, _check_args, _Engine, _model_device, _prepare
from looper.io import DataError, JsonlAppender, read_jsonl_prefix, write_json_atomic, write_jsonl_atomic
from looper.layout import meta_path, partial_path, partial_paths

MakeRecord = Callable[[dict, list[Sample]], dict]

__all__ = ["run_generation", "generation_meta", "check_resumable"]


# --------------------------------------------------------------------------- sharded runs


def _existing_records(out_path: str) -> dict[str, dict]:
    """Records already written (final file and every rank's partial file), by question id."""
    done: dict[str, dict] = {}
    paths = [out_path] + partial_paths(out_path)
    for path in paths:
        records, _ = read_jsonl_prefix(path, "question_id")
        for rec in records:
            done.setdefault(str(rec["question_id"]), rec)
    return done


def check_resumable(out_path: str, meta: dict, stage: str = "<stage>") -> None:
    """Raise ``ConfigError`` if ``out_path`` holds results made with other settings than
    ``meta`` (call it before loading a model: it reads only small files). ``stage`` names
    the pipeline stage that redoes the file, for the message."""
    done = os.path.exists(out_path) or bool(partial_paths(out_path))
    _check_meta(out_path, meta, done, stage)


def _check_meta(out_path: str, meta: Optional[dict], has_results: bool, stage: str = "<stage>") -> None:
    """Refuse to resume results produced with different settings, naming each one.

    Keys under ``meta["info"]`` (paths, labels) are recorded but not compared.
    """
    from looper.fingerprint import changes, describe, flatten

    if meta is None or not has_results or not os.path.exists(meta_path(out_path)):
        return
    try:
        with open(meta_path(out_path), encoding="utf-8") as f:
            old = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"{meta_path(out_path)}: unreadable ({e}); move it away to start over") from None
    diffs = changes(flatten({k: v for k, v in old.items() if k != "info"}),
                    flatten({k: v for k, v in meta.items() if k != "info"}))
    if diffs:
        raise ConfigError(
            f"{out_path} holds results made with other settings ({describe(diffs)}). Restore them to "
            f"resume it; or redo it (`--force {stage}` in the pipeline, or move the file and its "
            ".meta.json away); or write to another output name"
        )


def _progress_bar(total: int, initial: int, enabled: bool, desc: str):
    from looper.metrics import progress

    return progress(total, desc, enabled=enabled, initial=initial, unit="q")


def run_generation(
    model,
    tokenizer,
    items: Sequence[dict],
    gen_cfg: GenerationConfig,
    num_samples: int,
    out_path: str,
    make_record: MakeRecord,
    progress: bool = True,
    device: Optional[torch.device | str] = None,
    ignore_eos: bool = False,
    meta: Optional[dict] = None,
    desc: str = "generate",
) -> list[dict]:
    """Generate for every item across all ranks and write ``out_path`` (JSONL, input order).

    Call it on every rank (or in a single process). Each rank runs its share of the
    planned batches and appends ``make_record(item, samples)`` (a JSON-able dict with the
    item's ``question_id``) to ``<out_path>.rank<r>.partial``, flushed per record. Rank 0
    then writes ``out_path`` atomically, in input order, and removes the partial files.
    Every rank returns the records of ``items``, in their order.

    Records of other questions already in ``out_path`` (an earlier run over more questions)
    stay in the file, after those of ``items``: a smaller count never deletes work.

    Resume: a rerun skips the question ids already present in ``out_path`` or any partial
    file; a torn last line is dropped; a corrupted line elsewhere raises ``DataError``
    before anything is written. ``meta`` (JSON-able settings, e.g. model, adapter and
    generation config) is stored in ``<out_path>.meta.json``; resuming with different
    ``meta`` raises ``ConfigError`` instead of mixing results.
    """
    _check_args(gen_cfg, num_samples)
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = torch.device(device) if device is not None else _model_device(model)
    engine = _Engine(model, tokenizer, gen_cfg, num_samples, dev, ignore_eos)
    prompts, batches = _prepare(engine, items, out_path)

    done = _existing_records(out_path)  # raises on corruption, before any write
    _check_meta(out_path, meta, bool(done))
    dist.barrier()  # every rank has read the same state before anyone appends
    if rank == 0 and meta is not None:
        write_json_atomic(meta_path(out_path), meta)

    ids = [str(it["question_id"]) for it in items]
    pending = [b for b in batches if any(ids[i] not in done for i in b)]
    mine = pending[rank::world]
    _run_batches(engine, items, prompts, ids, mine, done, out_path, make_record, progress, desc)

    dist.barrier()
    error = None
    if rank == 0:
        try:
            _merge(out_path, ids)
        except DataError as e:
            error = str(e)
    error = dist.broadcast_object(error)  # every rank fails the same way
    if error is not None:
        raise DataError(error)
    records, _ = read_jsonl_prefix(out_path, "question_id")
    wanted = set(ids)
    return [r for r in records if str(r["question_id"]) in wanted]


def _run_batches(engine, items, prompts, ids, batches, done, out_path, make_record, progress, desc) -> None:
    rank = dist.get_rank()
    part = partial_path(out_path, rank)
    _, good = read_jsonl_prefix(part, "question_id")
    todo = sum(1 for b in batches for i in b if ids[i] not in done)
    bar = _progress_bar(todo, 0, progress, desc)
    t0, n_tokens, n_q = time.perf_counter(), 0, 0
    try:
        with JsonlAppender(part, truncate_to=good) as out:
            for batch in batches:
                samples = engine.run([items[i] for i in batch], [prompts[i] for i in batch])
                for i, s in zip(batch, samples):
                    if ids[i] in done:
                        continue
                    rec = make_record(items[i], s)
                    if str(rec.get("question_id")) != ids[i]:
                        raise ValueError(f"make_record must keep question_id {ids[i]!r}, got {rec.get('question_id')!r}")
                    out.write(rec)
                    n_q += 1
                    n_tokens += sum(x["num_tokens"] for x in s)
                    bar.update(1)
                elapsed = max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix(q_s=f"{n_q / elapsed:.2f}", tok_s=f"{n_tokens / elapsed:.0f}")
    finally:
        bar.close()


def _merge(out_path: str, ids: list[str]) -> None:
    """Rank 0: final file in input order from the old file and all partials (records of other
    questions kept after them, in their order), then clean up."""
    done = _existing_records(out_path)
    missing = [q for q in ids if q not in done]
    if missing:
        raise DataError(
            f"{out_path}: {len(missing)} question(s) have no result after generation "
            f"(first: {missing[:3]}); did a rank fail? Rerun to resume."
        )
    wanted = set(ids)
    write_jsonl_atomic(out_path, [done[q] for q in ids] + [r for q, r in done.items() if q not in wanted])
    for p in partial_paths(out_path):
        os.remove(p)


def generation_meta(gen_cfg: GenerationConfig, num_samples: int, **extra: Any) -> dict:
    """A JSON-able description of a generation run, for ``run_generation(meta=...)``.

    The batch sizes are left out: how many sequences share a forward does not change what
    each sample is (every sample has its own seed), so a rerun may change them.
    """
    gen = {k: v for k, v in asdict(gen_cfg).items() if k not in ("batch_size", "max_batch_tokens")}
    return {"generation": gen, "num_samples": num_samples, **extra}
