"""DPO training throughput and MFU, measured through ``train_dpo`` itself.

The run is what a user runs: ``looper.loops.dpo.train_dpo`` on a preference file, with the
reference log-probs precomputed (one no-grad pass) and LoRA policy steps after it. Times
and token counts come from the ``TrainResult`` it returns: each optimizer step's wall and
CPU time, real tokens and computed positions, and the ``reference`` phase (the reference
pass with its cache lookup and the validation split, which cost little next to the pass;
with a cache hit the pass did not run and counts as zero). What the result does not
give, each row's length (attention FLOPs) and the reference pass's real and padded
tokens, comes from replaying the run's batches from the same pairs (``replay``); the
replay must agree with the result's per-step tokens and positions.

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
2·L·h·t(t+1) per row of t real tokens forward, three times that for a training step.
Tokens are real (non-padding) tokens of the chosen and rejected rows, the prompt counted in
both; padding is computed but not credited, so padding waste lowers MFU. MFU = achieved FLOP/s / the peak measured
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
    BENCH_TINY, cpu_utilization, data_source, default_peak_size, ensure_model, make_adapter, matmul_peak,
    peak_memory, set_threads,
)

from looper.config import ABEL_PROMPT, Config, LoraConfig, load_config  # noqa: E402
from looper.data.gsm8k import format_completion, format_prompt, load_questions  # noqa: E402
from looper.data.tokenize import MicroBatches, PairEncoded  # noqa: E402
from looper.dist import pick_device  # noqa: E402
from looper.loops.common import split_val  # noqa: E402
from looper.loops.dpo import load_pairs, train_dpo, use_packed  # noqa: E402
from looper.models import attach_lora, load_base_model, load_tokenizer  # noqa: E402


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
    p.add_argument("--packed", choices=["auto", "true", "false"], default="auto",
                   help="dpo.packed: prompt | chosen | rejected in one row (auto: on CPU)")
    p.add_argument("--repeat-completions", type=int, default=1, help="each completion written this many times over")
    p.add_argument("--matmul-size", type=int, default=0, help="square matmul size for the peak (0: 2048 CPU, 8192 GPU)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--model-dir", default=None, help="benchmark model folder (built if missing)")
    p.add_argument("--work-dir", default=None, help="run folder (default: a fresh temporary one, removed)")
    p.add_argument("--device", default="auto")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- setup


def write_pairs(path: str, rows: list[dict], repeat: int = 1) -> None:
    """Chosen: the question's own solution; rejected: the next question's solution; each
    written ``repeat`` times over (longer rows, for the packed/concatenated crossover)."""
    with open(path, "w") as f:
        for i, q in enumerate(rows):
            other = rows[(i + 1) % len(rows)]
            f.write(json.dumps({
                "pair_id": f"bench-{i}", "question_id": q["question_id"], "kind": "correctness",
                "prompt": format_prompt(q["question"], ABEL_PROMPT),
                "chosen": "\n".join([format_completion(q["answer"])] * repeat),
                "rejected": "\n".join([format_completion(other["answer"])] * repeat),
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


# --------------------------------------------------------------------------- the run's batches, replayed


def tally(batches: list[list[PairEncoded]], packed: bool = False) -> dict[str, int]:
    """What the loop computes for these batches of pairs, each one ``collate_pairs`` batch
    (chosen rows, then rejected rows, right-padded to the longest): real tokens, computed
    positions (padding included), and the attention term, the sum over rows of t(t+1) for
    t real tokens (twice the summed context lengths).

    ``packed``: ``collate_packed_pairs`` batches, one ``prompt | chosen | rejected`` row per
    pair: the prompt counts once, and the attention term is twice the context each token
    needs (prompt causal; chosen and rejected tokens each over the prompt and their own
    segment), not the dense block the kernel computes."""
    real = padded = attn = 0
    for pairs in batches:
        if packed:
            sizes = [(len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)) for p in pairs]
            real += sum(a + b + c for a, b, c in sizes)
            padded += max(a + b + c for a, b, c in sizes) * len(sizes)
            attn += sum(a * (a + 1) + 2 * b * a + b * (b + 1) + 2 * c * a + c * (c + 1) for a, b, c in sizes)
            continue
        rows = [len(p.prompt_ids) + len(p.chosen_ids) for p in pairs]
        rows += [len(p.prompt_ids) + len(p.rejected_ids) for p in pairs]
        real += sum(rows)
        padded += max(rows) * len(rows)
        attn += sum(t * (t + 1) for t in rows)
    return {"real": real, "padded": padded, "attn": attn}


def replay(cfg: Config, n_steps: int) -> tuple[dict[str, int], list[dict[str, int]]]:
    """The reference pass's ``tally`` and one per training step, rebuilt from the same pairs
    and schedule as ``train_dpo`` on one rank (no resume)."""
    t = cfg.dpo
    packed = use_packed(cfg, pick_device(cfg.run.device))  # as train_dpo decides it
    tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model)
    examples, _, _ = load_pairs(t.pairs, tokenizer, cfg.data.max_length, cfg.data.truncation)
    # the reference pass: every pair once, in batches of batch_size over pairs sorted by (length, index)
    order = sorted(range(len(examples)), key=lambda i: (examples[i].length, i))
    reference = tally([[examples[i] for i in order[k : k + t.batch_size]] for k in range(0, len(order), t.batch_size)],
                      packed)
    # the training steps: the length-grouped schedule over the pairs left after the held-out split
    train_idx, _ = split_val(list(range(len(examples))), t.val_size, cfg.run.seed, "dpo.val_size")
    train = [examples[i] for i in train_idx]
    schedule = MicroBatches([e.length for e in train], t.batch_size, t.grad_accum, t.seed)
    steps = [tally([[train[i] for i in mb] for mb in schedule.step(s)], packed) for s in range(n_steps)]
    return reference, steps


# --------------------------------------------------------------------------- the measured run


def main(argv=None) -> dict:
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
        write_pairs(pairs, rows, args.repeat_completions)
        n = flop_params(base, args.lora_r)
        per_step = args.batch_size * args.grad_accum
        steps = args.steps if args.steps > 0 else max(1, len(rows) // per_step)
        cfg = load_config(None, [
            f"run.output_dir={os.path.join(work, 'run')}", "run.progress=false", f"run.device={device.type}",
            f"model.name_or_path={base}", f"data.max_length={args.max_length}", "data.truncation=truncate",
            f"dpo.adapter={adapter}", f"dpo.pairs={pairs}", f"dpo.batch_size={args.batch_size}",
            f"dpo.grad_accum={args.grad_accum}", f"dpo.max_steps={steps}", f"dpo.reference={args.reference}",
            "dpo.lr=1e-4", "dpo.val_size=0", "dpo.save_every=0", "dpo.log_every=1", "dpo.resume=none",
            f"dpo.packed={args.packed}",
        ])
        size = args.matmul_size or default_peak_size(device)
        peak_before = matmul_peak(device, size).flops_per_s

        t0 = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # stdout: the JSON only
            run = train_dpo(cfg)
        wall = time.perf_counter() - t0
        peak_after = matmul_peak(device, size).flops_per_s
        peak = max(peak_before, peak_after)

        ref_tally, step_tallies = replay(cfg, run.steps)
        replayed = [(s["real"], s["padded"]) for s in step_tallies]
        assert replayed == list(zip(run.step_tokens, run.step_positions)), (replayed, run.step_tokens, run.step_positions)

        # the training steps after the warm-up ones
        skip = min(args.skip_steps, run.steps - 1)
        timed = step_tallies[skip:]
        train_tokens, train_seconds = sum(run.step_tokens[skip:]), sum(run.step_seconds[skip:])
        train_cpu_utilization = cpu_utilization(sum(run.step_cpu_seconds[skip:]), train_seconds, device)
        # the reference pass, when it ran (online: the reference forward is inside every
        # step; a cache hit: it did not run): count only what ran
        ran_reference = run.reference == "computed"
        ref_tokens = ref_tally["real"] if ran_reference else 0
        ref_seconds = run.phases["reference"] if ran_reference else 0.0
        lh = BENCH_TINY.num_layers * BENCH_TINY.hidden_size
        ref_attn = ref_tally["attn"] if ran_reference else 0
        ref_flops = 2 * n["N"] * ref_tokens + 2 * lh * ref_attn
        train_fwd = 6 if args.reference == "online" else 4  # online adds a 2N reference forward
        attn_mult = 8 if args.reference == "online" else 6
        train_flops = train_fwd * n["N"] * train_tokens + attn_mult * lh * sum(s["attn"] for s in timed)
        total_seconds = ref_seconds + train_seconds
        achieved = (ref_flops + train_flops) / total_seconds
        real_t, pad_t = sum(run.step_tokens), sum(run.step_positions)  # every step, as padding_efficiency
        result = {
            "device": str(device),
            "threads": torch.get_num_threads(),
            "data": data_note,
            "model": {**{k: BENCH_TINY.__dict__[k] for k in ("hidden_size", "num_layers", "intermediate_size", "vocab_size")},
                      "params": n, "lora_r": args.lora_r, "dtype": "bf16" if device.type == "cuda" else "fp32"},
            "setup": {"pairs": len(rows), "pairs_per_step": per_step, "batch_size": args.batch_size,
                      "grad_accum": args.grad_accum, "steps": steps, "steps_timed": run.steps - skip,
                      "max_length": args.max_length, "reference": args.reference},
            "packed": {"setting": args.packed, "used": use_packed(cfg, device)},
            "pairs_per_s": round((len(rows) * ran_reference + len(timed) * per_step) / total_seconds, 2),
            "train_pairs_per_s": round(len(timed) * per_step / train_seconds, 2),
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
            "mean_step_seconds": round(train_seconds / max(1, run.steps - skip), 4),
            "padding_efficiency": {
                "train": round(real_t / max(1, pad_t), 4),
                "reference": round(ref_tally["real"] / ref_tally["padded"], 4) if ran_reference else None,
            },
            "mean_pair_tokens": round(real_t / max(1, per_step * run.steps), 1),
            "wall_seconds_train_dpo": round(wall, 2),
            "phases_seconds": {k: round(v, 3) for k, v in run.phases.items()},
            "reference_status": run.reference,
            "step_seconds": [round(x, 4) for x in run.step_seconds],
            "cpu_utilization_train_steps": train_cpu_utilization,
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
