"""DPO training throughput and MFU, measured through ``train_dpo`` itself.

The run is what a user runs: ``looper.loops.dpo.train_dpo`` on a preference file, with the
reference log-probs precomputed (one no-grad pass) and LoRA policy steps after it. The
benchmark only wraps two of the loop's own functions to time the reference pass and to
count real vs padded tokens; the per-step times come from ``metrics/dpo.jsonl``.

Reference setup (the defaults): the tiny benchmark Llama (hidden 256, 4 layers, 4 heads,
intermediate 680, BPE vocabulary 4096 trained on GSM8K train), an SFT adapter with r=16 on
all linear projections, 128 pairs from GSM8K train (chosen = the question's own solution,
rejected = another question's solution), 8 pairs per optimizer step (batch_size 8,
grad_accum 1), one epoch (16 steps), fp32 on CPU.

FLOP convention (stated in the output too): N = non-embedding parameters, lm_head
included, plus the LoRA parameters. The reference pass costs 2N FLOPs per token (forward);
a LoRA policy step costs 4N per token: forward 2N plus the backward pass through the frozen
weights for the activation gradients, 2N (weight gradients exist only for LoRA and are
inside the N term). Causal attention-score FLOPs are counted as in sft_throughput.py:
2·L·h·t(t+1) per row of t real tokens forward, three times that for a training step. Tokens are real (non-padding)
tokens of the chosen and rejected rows, the prompt counted in both; padding is computed
but not credited, so padding waste lowers MFU. MFU = achieved FLOP/s / the peak measured
in the same run by timing large square matmuls (fp32 on CPU, bf16 on GPU), best of several.

    python benchmarks/dpo_throughput.py                               # reference setup
    python benchmarks/dpo_throughput.py --pairs 32 --max-length 256   # quick check
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
    BENCH_TINY, data_source, default_peak_size, ensure_model, make_adapter, matmul_peak, peak_memory, set_threads,
)

from looper.config import ABEL_PROMPT, LoraConfig, load_config  # noqa: E402
from looper.data.gsm8k import format_completion, format_prompt, load_questions  # noqa: E402
from looper.models import attach_lora, load_base_model, pick_device  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8, help="pairs per micro-step")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=-1, help="optimizer steps (-1: one epoch of the pairs)")
    p.add_argument("--skip-steps", type=int, default=1, help="first steps left out of the step rate (warm-up)")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--reference", choices=["precomputed", "online"], default="precomputed")
    p.add_argument("--matmul-size", type=int, default=0, help="square matmul size for the peak (0: 2048 CPU, 8192 GPU)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--model-dir", default=None, help="benchmark model folder (built if missing)")
    p.add_argument("--work-dir", default=None, help="run folder (default: a fresh temporary one, removed)")
    p.add_argument("--device", default="auto")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- setup


def write_pairs(path: str, rows: list[dict]) -> None:
    """Chosen: the question's own solution; rejected: the next question's solution."""
    with open(path, "w") as f:
        for i, q in enumerate(rows):
            other = rows[(i + 1) % len(rows)]
            f.write(json.dumps({
                "pair_id": f"bench-{i}", "question_id": q["question_id"], "kind": "correctness",
                "prompt": format_prompt(q["question"], ABEL_PROMPT),
                "chosen": format_completion(q["answer"]), "rejected": format_completion(other["answer"]),
                "chosen_reward": 1.0, "rejected_reward": 0.0, "margin": 1.0,
            }) + "\n")


def flop_params(base: str, r: int) -> dict:
    """N for the FLOP convention: non-embedding weights (lm_head included) plus LoRA."""
    model = load_base_model(base)
    total = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight.numel()
    lora = attach_lora(model, LoraConfig(r=r, alpha=2 * r))
    n_lora = sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n)
    return {"total_base": total, "embedding": emb, "non_embedding_incl_lm_head": total - emb, "lora": n_lora,
            "N": total - emb + n_lora}


# --------------------------------------------------------------------------- the measured run


class Probe:
    """Wraps ``reference_pass`` (time) and ``collate_pairs`` (real vs padded tokens)."""

    def __init__(self, dpo_module, device: torch.device):
        self.mod, self.device = dpo_module, device
        self.ref_seconds = 0.0
        self.phase = "train"
        self.tokens = {"reference": [0, 0], "train": [0, 0]}  # [real, padded]
        self.attn = {"reference": 0, "train": 0}  # sum over rows of t * (t + 1), t = real tokens
        self._ref, self._collate = dpo_module.reference_pass, dpo_module.collate_pairs

    def __enter__(self):
        probe = self

        def reference_pass(*a, **k):
            probe.phase = "reference"
            if probe.device.type == "cuda":
                torch.cuda.synchronize(probe.device)
            t0 = time.perf_counter()
            try:
                return probe._ref(*a, **k)
            finally:
                if probe.device.type == "cuda":
                    torch.cuda.synchronize(probe.device)
                probe.ref_seconds += time.perf_counter() - t0
                probe.phase = "train"

        def collate_pairs(pairs, pad_id):
            batch = probe._collate(pairs, pad_id)
            counts = probe.tokens[probe.phase]
            counts[0] += int(batch["attention_mask"].sum())
            counts[1] += batch["attention_mask"].numel()
            t = batch["attention_mask"].sum(1)
            probe.attn[probe.phase] += int((t * (t + 1)).sum())
            return batch

        self.mod.reference_pass, self.mod.collate_pairs = reference_pass, collate_pairs
        return self

    def __exit__(self, *exc):
        self.mod.reference_pass, self.mod.collate_pairs = self._ref, self._collate


def main(argv=None) -> dict:
    import looper.loops.dpo as dpo

    args = parse_args(argv)
    set_threads(args.threads)
    device = pick_device(args.device)
    source, data_note = data_source()
    rows = load_questions(source, "train")[: args.pairs]  # the questions the pairs are made of
    base = ensure_model(args.model_dir, source)
    work = args.work_dir or tempfile.mkdtemp(prefix="looper-bench-dpo-")
    os.makedirs(work, exist_ok=True)
    try:
        adapter = os.path.join(work, "sft_lora")
        make_adapter(base, adapter, args.lora_r)
        pairs = os.path.join(work, "preferences.jsonl")
        write_pairs(pairs, rows)
        n = flop_params(base, args.lora_r)
        per_step = args.batch_size * args.grad_accum
        steps = args.steps if args.steps > 0 else max(1, len(rows) // per_step)
        cfg = load_config(None, [
            f"run.output_dir={os.path.join(work, 'run')}", "run.progress=false", f"run.device={device.type}",
            f"model.name_or_path={base}", f"data.max_length={args.max_length}", "data.truncation=truncate",
            f"dpo.adapter={adapter}", f"dpo.pairs={pairs}", f"dpo.batch_size={args.batch_size}",
            f"dpo.grad_accum={args.grad_accum}", f"dpo.max_steps={steps}", f"dpo.reference={args.reference}",
            "dpo.lr=1e-4", "dpo.val_size=0", "dpo.save_every=0", "dpo.log_every=1", "dpo.resume=none",
        ])
        size = args.matmul_size or default_peak_size(device)
        peak_before = matmul_peak(device, size).flops_per_s

        t0 = time.perf_counter()
        with Probe(dpo, device) as probe, contextlib.redirect_stdout(sys.stderr):  # stdout: the JSON only
            dpo.train_dpo(cfg).output_dir
        wall = time.perf_counter() - t0
        peak_after = matmul_peak(device, size).flops_per_s
        peak = max(peak_before, peak_after)

        with open(os.path.join(cfg.run.output_dir, "metrics", "dpo.jsonl")) as f:
            recs = [json.loads(line) for line in f if line.strip()]
        prev = [0] + [r["tokens"] for r in recs[:-1]]
        step_tokens = [r["tokens"] - p for r, p in zip(recs, prev)]
        step_seconds = [t / r["tokens_per_s"] for t, r in zip(step_tokens, recs)]
        skip = min(args.skip_steps, len(recs) - 1)
        train_tokens, train_seconds = sum(step_tokens[skip:]), sum(step_seconds[skip:])
        ref_tokens, ref_seconds = probe.tokens["reference"][0], probe.ref_seconds
        if args.reference == "online":  # the reference forward is inside every step
            ref_tokens, ref_seconds = 0, 0.0
        # when the cache already existed the pass did not run: count only what ran
        lh = BENCH_TINY.num_layers * BENCH_TINY.hidden_size
        ref_attn = probe.attn["reference"] if ref_tokens else 0
        ref_flops = 2 * n["N"] * ref_tokens + 2 * lh * ref_attn
        train_fwd = 6 if args.reference == "online" else 4  # online adds a 2N reference forward
        attn_mult = 8 if args.reference == "online" else 6
        # attention over the timed steps only: scale the probe's total by the timed share of tokens
        timed_share = train_tokens / max(1, probe.tokens["train"][0])
        train_flops = train_fwd * n["N"] * train_tokens + attn_mult * lh * probe.attn["train"] * timed_share
        total_seconds = ref_seconds + train_seconds
        achieved = (ref_flops + train_flops) / total_seconds
        real_t, pad_t = probe.tokens["train"]
        real_r, pad_r = probe.tokens["reference"]
        result = {
            "device": str(device),
            "threads": torch.get_num_threads(),
            "data": data_note,
            "model": {**{k: BENCH_TINY.__dict__[k] for k in ("hidden_size", "num_layers", "intermediate_size", "vocab_size")},
                      "params": n, "lora_r": args.lora_r, "dtype": "bf16" if device.type == "cuda" else "fp32"},
            "setup": {"pairs": len(rows), "pairs_per_step": per_step, "batch_size": args.batch_size,
                      "grad_accum": args.grad_accum, "steps": steps, "steps_timed": len(recs) - skip,
                      "max_length": args.max_length, "reference": args.reference},
            "tokens_per_s": round((ref_tokens + train_tokens) / total_seconds, 1),
            "train_tokens_per_s": round(train_tokens / train_seconds, 1),
            "reference_tokens_per_s": round(ref_tokens / ref_seconds, 1) if ref_seconds else None,
            "achieved_gflops": round(achieved / 1e9, 2),
            "peak_matmul_gflops": round(peak / 1e9, 2),
            "peak_matmul_gflops_before_after": [round(peak_before / 1e9, 2), round(peak_after / 1e9, 2)],
            "mfu": round(achieved / peak, 4),
            "mfu_train_steps": round(train_flops / train_seconds / peak, 4),
            "mfu_reference_pass": round(ref_flops / ref_seconds / peak, 4) if ref_seconds else None,
            "reference_pass_seconds": round(ref_seconds, 3),
            "train_seconds": round(train_seconds, 3),
            "reference_share_of_total": round(ref_seconds / total_seconds, 4),
            "mean_step_seconds": round(train_seconds / max(1, len(recs) - skip), 4),
            "padding_efficiency": {"train": round(real_t / max(1, pad_t), 4), "reference": round(real_r / max(1, pad_r), 4)},
            "mean_row_tokens": round(real_t / max(1, 2 * per_step * len(recs)), 1),
            "wall_seconds_train_dpo": round(wall, 2),
            "peak_memory": peak_memory(device),
            "flop_convention": (
                "N = non-embedding params incl. lm_head + LoRA params; reference pass 2N/token (forward); "
                "LoRA policy step 4N/token (forward 2N + backward 2N through frozen weights)"
                + ("; online reference adds 2N/token per step" if args.reference == "online" else "")
                + "; causal attention 2*L*h*t*(t+1) per row forward, x3 for a training step; tokens = non-padding chosen+rejected tokens"
            ),
        }
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
