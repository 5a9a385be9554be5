"""Rollout throughput of the real stage (``looper.loops.rollout.collect_rollouts``). Prints JSON.

The benchmark runs ``collect_rollouts`` on a config, as ``looper rollout`` does: load the
base model and merge the SFT adapter, sample K trajectories per question (sharded
generation engine, per-question seeds, per-record appends), grade and score each group
with Regime W, merge and write ``data/rollouts.jsonl``. It reports

- trajectories/s and generated tokens/s over the stage's generation-and-scoring loop
  (``summary["seconds"]``: ``run_generation`` with its record building, the merge included),
  and the whole stage's wall time (model loading included);
- the time spent grading and scoring, and its share of the loop time, which must stay under
  ``--max-scoring-share`` (5%): the exit status is 1 when it does not. No looper module is
  patched: after the stage, the same work is replayed on the records it wrote
  (``RunLayout.of(cfg).rollouts()``) with the public functions, as ``make_rollout_record``
  does it: ``looper.data.gsm8k.extract_answer`` and ``is_correct`` on every trajectory's
  ``full_text``, then ``looper.regime_w.rescore.score_record(record, cfg.regime_w)``. The
  replayed records must equal the file's (``scoring.replay_matches_file``; exit status 1
  otherwise), so the replay times the stage's own work. The loop's rescoring passes over
  the finished file (``rescore_file``, ``rescore``) and the summary are not counted;
- peak memory: the process's peak RSS, the peak RSS sampled during the stage, and on GPU
  the peak allocated CUDA memory of the stage.

Reference setup: the tiny benchmark model of ``common.py``, shared by every benchmark
(Llama, hidden 256, 4 layers, 4 heads, intermediate 680, BPE vocabulary 4096 trained on the
GSM8K train texts; untrained, so its samples are long and EOS is rare), an SFT adapter
(LoRA r=16 on every linear projection, small random non-zero B), 32 GSM8K train questions,
K=8, 256 new tokens at temperature 1, fp32 on CPU / bf16 on GPU, one CPU thread by default.

    python benchmarks/rollout_throughput.py                                  # reference setup
    python benchmarks/rollout_throughput.py --questions 4 --k 4 --new-tokens 32   # quick
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # common.py beside this file; looper at the repo root

from common import (  # noqa: E402
    BENCH_TINY, data_source, ensure_model, make_adapter, mib, peak_rss_bytes, set_threads,
)

from looper.config import load_config  # noqa: E402
from looper.data.gsm8k import extract_answer, is_correct  # noqa: E402
from looper.dist import pick_device  # noqa: E402
from looper.io import read_jsonl  # noqa: E402
from looper.layout import RunLayout  # noqa: E402
from looper.loops.rollout import collect_rollouts  # noqa: E402
from looper.regime_w.rescore import score_record  # noqa: E402

SCORING_PARTS = ("extract_answer", "is_correct", "score_record")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--questions", type=int, default=32)
    p.add_argument("--k", type=int, default=8, help="trajectories per question")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=256, help="generation rows per forward")
    p.add_argument("--max-batch-tokens", type=int, default=1 << 20)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a shared 2-core machine 2 threads are slower; 0 = torch's default)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--model-dir", default=None, help="benchmark model folder (built there if missing)")
    p.add_argument("--work-dir", default=None, help="folder for the adapter and the runs (default: temporary, removed)")
    p.add_argument("--max-scoring-share", type=float, default=0.05)
    p.add_argument("overrides", nargs="*", help="extra looper config overrides, e.g. regime_w.scope=trajectory")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- setup


def stage_config(args, model_dir: str, adapter: str, out: str, source: str | None, **kw):
    g = dict(max_new_tokens=args.new_tokens, temperature=args.temperature, top_p=1.0,
             batch_size=args.batch_size, max_batch_tokens=args.max_batch_tokens, seed=0)
    g.update(kw.pop("generation", {}))
    settings = {
        "run.output_dir": out, "run.device": args.device, "run.progress": False,
        "model.name_or_path": model_dir,
        "rollout.dataset": source, "rollout.adapter": adapter,
        "rollout.n_questions": kw.pop("questions", args.questions), "rollout.k": kw.pop("k", args.k),
        **{f"rollout.generation.{key}": value for key, value in g.items()},
    }
    items = [f"{key}={'null' if v is None else str(v).lower() if isinstance(v, bool) else v}" for key, v in settings.items()]
    return load_config(None, items + list(args.overrides))


# --------------------------------------------------------------------------- measuring


class ScoringReplay:
    """Times the grading and scoring of a rollout stage by doing it again on the records the
    stage wrote, part by part, with the public functions ``make_rollout_record`` uses:
    ``extract_answer`` on each trajectory's ``full_text``, ``is_correct`` on each answer
    against the gold, then ``score_record`` on the graded record under ``cfg.regime_w``.

    Each part is timed over a whole group (one clock read per part and record, not per
    call). ``matches`` says whether every replayed record equals the stored one (answers,
    grades, scores and rewards), i.e. whether the replay did the stage's work."""

    def __init__(self):
        self.seconds = {name: 0.0 for name in SCORING_PARTS}
        self.calls = {name: 0 for name in SCORING_PARTS}
        self.wall_seconds, self.records, self.mismatched = 0.0, 0, []

    def run(self, records: list[dict], regime_w) -> "ScoringReplay":
        clock = time.perf_counter
        t_start = clock()
        for stored in records:
            texts = [t["full_text"] for t in stored["trajectories"]]
            gold = stored["gold"]
            t0 = clock()
            answers = [extract_answer(text) for text in texts]
            t1 = clock()
            correct = [bool(is_correct(answer, gold)) for answer in answers]
            t2 = clock()
            graded = {  # the record as make_rollout_record builds it before scoring
                "question_id": stored["question_id"],
                "question": stored["question"],
                "prompt": stored["prompt"],
                "gold": gold,
                "trajectories": [
                    {"full_text": text, "answer": answer, "num_tokens": int(t["num_tokens"]),
                     "correct": ok, "finished": bool(t["finished"])}
                    for text, answer, ok, t in zip(texts, answers, correct, stored["trajectories"])
                ],
            }
            t3 = clock()
            scored = score_record(graded, regime_w)
            t4 = clock()
            self.seconds["extract_answer"] += t1 - t0
            self.seconds["is_correct"] += t2 - t1
            self.seconds["score_record"] += t4 - t3
            self.calls["extract_answer"] += len(texts)
            self.calls["is_correct"] += len(texts)
            self.calls["score_record"] += 1
            self.records += 1
            if _canonical(scored) != _canonical(stored):
                self.mismatched.append(stored["question_id"])
        self.wall_seconds = clock() - t_start  # comparisons included
        return self

    @property
    def total(self) -> float:
        return sum(self.seconds.values())

    @property
    def matches(self) -> bool:
        return not self.mismatched


def _canonical(record: dict) -> str:
    # JSON text, keys sorted: a stored record went through JSON (NaN == NaN here, unlike floats)
    return json.dumps(record, sort_keys=True)


class RssSampler:
    """Peak resident memory of this process while a block runs (sampled every 5 ms)."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def _rss(self) -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * self._page
        except (OSError, ValueError, IndexError):
            return 0

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            self._stop.wait(self.interval)

    def __enter__(self):
        self.peak = self._rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def main(argv=None) -> dict:
    args = parse_args(argv)
    set_threads(args.threads)
    device = pick_device(args.device)
    source, data_note = data_source()
    model_dir = ensure_model(args.model_dir, source)
    # under torchrun (``torchrun --nproc_per_node 2 ... --work-dir W``) every rank runs this
    # script; the stage shards the questions, rank 0 makes the adapter, replays and prints
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and args.work_dir is None:
        raise SystemExit("rollout_throughput.py under torchrun needs --work-dir (one folder for every rank)")
    work = args.work_dir or tempfile.mkdtemp(prefix="looper-bench-rollout-")
    os.makedirs(work, exist_ok=True)
    try:
        adapter = os.path.join(work, "sft_lora")
        ready = adapter + ".ready"
        if rank == 0 and not os.path.isfile(ready):
            make_adapter(model_dir, adapter, args.lora_r)
            open(ready, "w").close()
        deadline = time.time() + 600
        while not os.path.isfile(ready):  # other ranks: until rank 0's adapter is complete
            if time.time() > deadline:
                raise SystemExit(f"rank {rank}: no adapter at {adapter} after 600 s")
            time.sleep(0.2)

        # warm-up (allocator, thread pool, kernels) on a tiny run in its own folder
        warm_out = os.path.join(work, "warmup")
        if rank == 0:  # the other ranks wait for rank 0 in the stage's process-group set-up
            shutil.rmtree(warm_out, ignore_errors=True)
        with contextlib.redirect_stdout(sys.stderr):  # stdout holds only the JSON
            collect_rollouts(stage_config(args, model_dir, adapter, warm_out, source,
                                                  questions=2, k=2, generation={"max_new_tokens": 4}))

        out = os.path.join(work, "run")
        if rank == 0:  # a fresh folder: a leftover file would be resumed, not rerun
            shutil.rmtree(out, ignore_errors=True)
        cfg = stage_config(args, model_dir, adapter, out, source)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        with RssSampler() as rss, contextlib.redirect_stdout(sys.stderr):
            t0 = time.perf_counter()
            summary = collect_rollouts(cfg)
            stage_s = time.perf_counter() - t0
        records = read_jsonl(RunLayout.of(cfg).rollouts()) if rank == 0 else []
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    if rank != 0:
        return {}

    timer = ScoringReplay().run(records, cfg.regime_w)  # after the stage: not in its times or memory
    if not timer.matches:
        print(f"[bench] the replay differs from the stage's records for {len(timer.mismatched)} question(s), "
              f"e.g. {timer.mismatched[:3]}: its times are not the stage's", file=sys.stderr)

    loop_s = max(float(summary["seconds"]), 1e-9)
    n_traj = sum(len(r["trajectories"]) for r in records)
    n_tokens = sum(t["num_tokens"] for r in records for t in r["trajectories"])
    n_finished = sum(bool(t.get("finished")) for r in records for t in r["trajectories"])
    share = timer.total / loop_s
    memory = {
        "peak_rss_mib_process": mib(peak_rss_bytes()),
        "peak_rss_mib_stage": mib(rss.peak),
    }
    if device.type == "cuda":
        memory["peak_cuda_allocated_mib_stage"] = mib(torch.cuda.max_memory_allocated(device))
    result = {
        "device": str(device),
        "ranks": world,
        "threads": torch.get_num_threads(),
        "model": {"path": model_dir, **{k: BENCH_TINY.__dict__[k]
                                        for k in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "vocab_size")},
                  "lora_r": args.lora_r},
        "data": data_note,
        "questions": len(records),
        "k": args.k,
        "new_tokens": args.new_tokens,
        "temperature": args.temperature,
        "batch_size": args.batch_size,
        "trajectories": n_traj,
        "generated_tokens": n_tokens,
        "finished_with_eos": n_finished,
        "loop_seconds": round(loop_s, 3),
        "stage_seconds": round(stage_s, 3),
        "trajectories_per_s": round(n_traj / loop_s, 2),
        "generated_tokens_per_s": round(n_tokens / loop_s, 1),
        "stage_trajectories_per_s": round(n_traj / stage_s, 2),
        "scoring": {
            "seconds": round(timer.total, 4),
            "share_of_loop": round(share, 5),
            "share_of_stage": round(timer.total / stage_s, 5),
            "limit": args.max_scoring_share,
            "ok": share < args.max_scoring_share,
            "by_function_s": {k: round(v, 4) for k, v in timer.seconds.items()},
            "calls": timer.calls,
            "ms_per_group": round(1000 * timer.total / max(1, len(records)), 3),
            "method": "replay of extract_answer, is_correct and score_record on the written records",
            "replay_matches_file": timer.matches,
            "replay_wall_seconds": round(timer.wall_seconds, 4),
        },
        "rollout_summary": {k: summary[k] for k in ("accuracy", "maj_at_k", "pass_at_k", "s_wm", "mean_tokens")},
        "peak_memory": memory,
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    res = main()
    sys.exit(0 if not res or (res["scoring"]["ok"] and res["scoring"]["replay_matches_file"]) else 1)
