"""SFT throughput and MFU of the real loop (``looper.loops.sft.train_sft``). Prints JSON.

The benchmark runs ``train_sft`` itself on a config and reads the ``TrainResult`` it
returns: the wall and process CPU time, real tokens and computed positions (padding
included) of each optimizer step. The steps after ``--warmup`` are measured; a step is
what a user's run does (collation, forward, loss, backward, clipping, optimizer step),
without logging and saving. The FLOP count needs each row's length, which the result
does not give: the benchmark replays the run's schedule (``MicroBatches`` over the same
examples) and checks that the replay has the step's real tokens and positions.

Reference setup: the tiny benchmark model (Llama, hidden 256, 4 layers, 4 heads,
intermediate 680, BPE vocabulary 4096 trained on the GSM8K train texts), LoRA r=16 on
every linear projection, GSM8K train rows with the default prompt, 16 sequences per
optimizer step (batch 16, no accumulation), fp32 on CPU / bf16 on GPU.

FLOP convention (stated in the JSON as well):
- N = the parameters that take part in matmuls: every decoder linear projection plus the
  LM head (embeddings excluded), plus the LoRA A/B matrices when present.
- forward: 2N per token; backward: 2N per token for the frozen base (input gradients
  only) and 4N for trainable weights (LoRA, or everything with ``--full``).
- attention scores/values, causal, on each row's real length: forward
  ``2 * L * d * n(n+1)`` per row of n tokens, backward twice that.
- "model" FLOPs count the real tokens only; padded positions are work the hardware does
  but the model does not need (``mfu_incl_padding`` counts them).
- peak: the best of several large square matmuls in the same process (fp32 on CPU with
  this process's thread count, bf16 on GPU); MFU = achieved / peak.

    python benchmarks/sft_throughput.py                     # reference LoRA setup
    python benchmarks/sft_throughput.py --full              # full fine-tuning
    python benchmarks/sft_throughput.py --steps 4 --warmup 1 --profile
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # common.py beside this file; looper at the repo root

from common import (  # noqa: E402
    PEAK_REPS, cpu_utilization, data_source, default_peak_size, ensure_model, matmul_params, matmul_peak, set_threads,
)

from looper.config import load_config  # noqa: E402
from looper.data.tokenize import MicroBatches  # noqa: E402
from looper.dist import pick_device  # noqa: E402
from looper.loops.sft import load_sft_examples, train_sft  # noqa: E402
from looper.metrics import peak_memory_bytes  # noqa: E402
from looper.models import load_tokenizer  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10, help="measured optimizer steps")
    p.add_argument("--warmup", type=int, default=2, help="optimizer steps run before measuring")
    p.add_argument("--rows", type=int, default=None,
                   help="train on the first N rows only, as many epochs as the steps need (default: all rows, "
                        "one pass). With N = batch x steps per epoch and whole epochs of warm-up and measured "
                        "steps, runs of any length measure the same tokens per epoch (scaling.py)")
    p.add_argument("--full", action="store_true", help="full fine-tuning (lora=null)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--peak-size", type=int, default=None, help="matmul size for the peak (2048 CPU, 8192 GPU)")
    p.add_argument("--model-dir", default=None, help="benchmark model folder (built there if missing)")
    p.add_argument("--work-dir", default=None, help="run folder (default: a temporary one)")
    p.add_argument("--profile", action="store_true", help="also print a torch.profiler table to stderr")
    p.add_argument("overrides", nargs="*", help="extra looper config overrides, e.g. sft.activation_checkpointing=true")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- setup


def first_rows(source: str | None, n: int, work: str) -> str | None:
    """A JSONL file of the first ``n`` rows of ``source`` in ``work`` (``None``, the synthetic
    data, stays ``None``: ``data.synthetic.n_train`` limits it)."""
    if source is None:
        return None
    os.makedirs(work, exist_ok=True)
    path = os.path.join(work, f"first_{n}_rows.jsonl")
    with open(source) as f, open(path, "w") as out:
        lines = [line for line, _ in zip(f, range(n))]
        if len(lines) < n:
            raise SystemExit(f"--rows {n}: {source} has only {len(lines)} rows")
        out.writelines(lines)
    return path


def replay_steps(cfg, model_dir: str, first: int, last: int) -> tuple[list[list[list[tuple[int, int]]]], int]:
    """Optimizer steps ``first .. last - 1`` of the run, replayed from the same data and
    schedule as ``train_sft``: per step, its micro-batches of (length, prompt_len) rows.
    Also returns the number of truncated rows."""
    tok = load_tokenizer(model_dir, cfg.model)
    train, _, n_trunc = load_sft_examples(cfg, tok)
    lengths = [len(e.input_ids) for e in train]
    sched = MicroBatches(lengths, cfg.sft.batch_size, cfg.sft.grad_accum, cfg.sft.seed)  # one rank
    steps = [[[(lengths[i], train[i].prompt_len) for i in mb] for mb in sched.step(s)] for s in range(first, last)]
    return steps, n_trunc


def step_flops(micro: list[list[tuple[int, int]]], n: dict, full: bool, kind: str) -> float:
    """Training FLOPs of one optimizer step; ``micro`` = micro-batches of (length, prompt_len).

    kind "model": real tokens, LM head on every token (the usual convention);
    "executed": real tokens, LM head only where the loop runs it (on the positions that
    predict a completion token); "padded": "executed" plus the padded positions.
    """
    body_tok = 2 * (n["decoder_linear"] + n["lora"])  # forward
    body_tok += 4 * n["decoder_linear"] if full else 2 * n["decoder_linear"] + 4 * n["lora"]  # backward
    head_tok = 2 * n["lm_head"] + (4 if full else 2) * n["lm_head"]
    attn = lambda t: 3 * 2 * n["layers"] * n["hidden"] * t * (t + 1)  # causal, fwd + 2x bwd
    total = 0.0
    for mb in micro:
        width = max(t for t, _ in mb)
        for t, p in mb:
            head_rows = t - p if (n["head_on_scored_only"] and kind != "model") else t
            t = width if kind == "padded" else t
            total += body_tok * t + head_tok * head_rows + attn(t)
    return total


# --------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    args = parse_args(argv)
    set_threads(args.threads)
    device = pick_device(args.device)
    source, data_note = data_source()
    model_dir = ensure_model(args.model_dir, source)
    work = args.work_dir or tempfile.mkdtemp(prefix="looper-bench-sft-")
    n_steps = args.warmup + args.steps
    train_data = first_rows(source, args.rows, work) if args.rows else source
    overrides = [
        f"run.output_dir={os.path.join(work, 'run')}", "run.progress=false", f"run.device={args.device}",
        f"model.name_or_path={model_dir}", f"data.train={train_data if train_data else 'null'}", "sft.val_size=0",
        f"data.max_length={args.max_length}", f"sft.batch_size={args.batch_size}",
        f"sft.grad_accum={args.grad_accum}", f"sft.max_steps={n_steps}", "sft.eval_every=0",
        "sft.save_every=0", "sft.log_every=1", "sft.resume=none",
    ]
    overrides += ["lora=null"] if args.full else [f"lora.r={args.lora_r}", f"lora.alpha={2 * args.lora_r}"]
    if args.rows and not source:
        overrides += [f"data.synthetic.n_train={args.rows}"]  # max_steps runs past the epoch's end
    cfg = load_config(None, overrides + list(args.overrides))

    peak_size = args.peak_size or default_peak_size(device)
    peak_before, peak_cpu_before = matmul_peak(device, peak_size)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # the peak's matmul buffers are not the loop's
    t0 = time.perf_counter()
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof, contextlib.redirect_stdout(sys.stderr):  # stdout: the JSON only
            result = train_sft(cfg)
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=30), file=sys.stderr)
    else:
        with contextlib.redirect_stdout(sys.stderr):  # stdout: the JSON only
            result = train_sft(cfg)
    wall = time.perf_counter() - t0
    peak_after, peak_cpu_after = matmul_peak(device, peak_size)
    peak, peak_cpu = max(peak_before, peak_after), max(peak_cpu_before, peak_cpu_after)

    # ---- what the loop measured, for the steps after the warm-up
    w = args.warmup
    step_seconds, step_tokens, step_positions = result.step_seconds[w:], result.step_tokens[w:], result.step_positions[w:]
    seconds, cpu_seconds = sum(step_seconds), sum(result.step_cpu_seconds[w:])
    real, padded = sum(step_tokens), sum(step_positions)

    # ---- replay the same steps for each row's length (FLOPs); it must agree with the run
    steps_rows, n_trunc = replay_steps(cfg, model_dir, w, result.steps)
    replayed = [(sum(t for mb in s for t, _ in mb), sum(max(t for t, _ in mb) * len(mb) for mb in s)) for s in steps_rows]
    assert replayed == list(zip(step_tokens, step_positions)), (replayed, step_tokens, step_positions)
    n = matmul_params(model_dir, None if args.full else args.lora_r)
    flops = {k: sum(step_flops(s, n, args.full, k) for s in steps_rows) for k in ("model", "executed", "padded")}
    achieved = flops["model"] / seconds

    out = {
        "benchmark": "sft_throughput",
        "mode": "full" if args.full else f"lora r={args.lora_r} all-linear",
        "device": str(device),
        "torch_threads": torch.get_num_threads() if device.type == "cpu" else None,
        "dtype": "bf16 params, fp32 master/loss" if device.type == "cuda" else "fp32",
        "data": data_note,
        "sequences_per_step": cfg.sft.batch_size * cfg.sft.grad_accum,
        "rows": args.rows or "all",
        "sequence_length": cfg.data.max_length,
        "warmup_steps": args.warmup,
        "measured_steps": len(step_seconds),
        "mean_seq_len": real / sum(len(mb) for s in steps_rows for mb in s),
        "truncated_rows": n_trunc,
        "tokens_per_s": real / seconds,
        "step_time_s": seconds / len(step_seconds),
        "padding_fraction": 1 - real / padded,
        "params": n,
        "flop_convention": (
            "N = decoder linear weights + lm_head + LoRA A/B (no embeddings); per token fwd 2N, bwd 2N for frozen "
            "weights and 4N for trainable ones; plus causal attention 2*L*d*n(n+1) fwd per row of n tokens, x3 "
            "with bwd. mfu: real tokens, LM head on every token (the usual convention). mfu_executed: the LM head "
            "only where the loop runs it (on the positions that predict a completion token). mfu_incl_padding: "
            "executed work including padded positions"
        ),
        "model_flops_per_token": flops["model"] / real,
        "achieved_flops_per_s": achieved,
        "peak_flops_per_s": peak,
        "peak_measurement": (
            f"best of {PEAK_REPS} {'bf16' if device.type == 'cuda' else 'fp32'} {peak_size}^3 "
            f"matmuls; before run {peak_before:.3g}, after run {peak_after:.3g}"
        ),
        "mfu": achieved / peak,
        "mfu_executed": flops["executed"] / seconds / peak,
        "mfu_incl_padding": flops["padded"] / seconds / peak,
        "peak_memory_bytes": peak_memory_bytes(device),
        "peak_memory_note": "max RSS of the process" if device.type == "cpu" else "torch.cuda.max_memory_allocated",
        "wall_s_total_run": wall,
        "phases_s": {k: round(v, 3) for k, v in result.phases.items()},
        "process_cpu_s_per_step": cpu_seconds / len(step_seconds),
        "cpu_utilization": cpu_utilization(cpu_seconds, seconds, device),
        "mfu_cpu_time": flops["model"] / cpu_seconds / peak_cpu if device.type == "cpu" and cpu_seconds else None,
        "mfu_cpu_time_note": "FLOPs per process CPU-second of the measured steps over the matmul peak per CPU-second: "
        "insensitive to other processes taking the cores; exact with --threads 1 (with more threads, idle "
        "OpenMP spinning counts as CPU time, so it is a lower bound)",
        "cpu_utilization_note": "process CPU time / (wall time x threads) over the measured steps; well below 1 "
        "means the process was starved (a shared machine) and the wall-clock numbers understate the loop",
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "per_step_tokens_per_s": [round(t / dt, 1) for t, dt in zip(step_tokens, step_seconds)],
    }
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
