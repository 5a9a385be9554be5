"""Generation throughput: looper's engine vs. a naive Hugging Face baseline, in one run.

The baseline samples one question at a time with
``model.generate(do_sample=True, num_return_sequences=K)``; the engine samples all
questions with ``looper.engine.generate``. Both generate exactly ``--new-tokens``
tokens per sample (EOS ignored: the benchmark model is untrained), so the token counts
match and tokens/s compare fairly.

The reference setup is the tiny benchmark model (Llama, hidden 256, 4 layers, 4 heads,
intermediate 680, BPE vocabulary 4096 trained on GSM8K train), 64 GSM8K test prompts,
8 samples each, 256 new tokens. Prints one JSON object.

Decode efficiency: achieved FLOP/s against the best large square matmul measured in the
same run (``common.matmul_peak``). FLOPs per token, with N the matmul parameters
(decoder projections and LM head, ``common.matmul_params``), L layers, d the hidden size:

- prefill, once per question (the engine keeps one prompt copy per question):
  ``2N`` per prompt token plus causal attention ``2 * L * d * p * (p + 1)`` per prompt of p tokens;
- decode, each generated token at context length t (prompt + tokens so far, itself
  included): ``2N + 4 * L * d * t`` (scores and values over t positions).

The decode time is the engine's time less its time for the same questions with one new
token (prefill, planning and one sampling step), measured right after.

    python benchmarks/generation_throughput.py                       # reference setup
    python benchmarks/generation_throughput.py --questions 8 --new-tokens 64   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # common.py beside this file; looper at the repo root

from common import (  # noqa: E402
    BENCH_TINY, data_source, default_peak_size, ensure_model, matmul_params, matmul_peak, peak_memory, set_threads,
)

from looper.config import ABEL_PROMPT, GenerationConfig  # noqa: E402
from looper.data.gsm8k import format_prompt, load_questions  # noqa: E402
from looper.data.tokenize import encode_prompt  # noqa: E402
from looper.engine import generate  # noqa: E402
from looper.dist import pick_device  # noqa: E402
from looper.models import load_base_model, load_tokenizer  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--questions", type=int, default=64)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=256, help="engine rows per forward")
    p.add_argument("--max-batch-tokens", type=int, default=1 << 20)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--model-dir", default=None, help="benchmark model folder (built if missing)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--rounds", type=int, default=2,
                   help="alternate engine and baseline over this many slices of the questions, so that "
                        "drifting machine load hits both alike")
    p.add_argument("--skip-baseline", action="store_true")
    p.add_argument("--peak-size", type=int, default=0, help="square matmul size of the peak (0: 2048 CPU, 8192 GPU)")
    return p.parse_args(argv)


def run_baseline(model, tok, prompts: list[list[int]], args, device) -> tuple[int, float]:
    """One question at a time through ``model.generate``; returns (generated tokens, seconds)."""
    t0 = time.perf_counter()
    n_tokens = 0
    for ids in prompts:
        x = torch.tensor([ids], device=device)
        with torch.inference_mode():
            out = model.generate(
                x, attention_mask=torch.ones_like(x), do_sample=True, num_return_sequences=args.samples,
                max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, temperature=args.temperature,
                top_p=args.top_p, top_k=0, pad_token_id=tok.pad_token_id,
            )
        n_tokens += (out.shape[1] - x.shape[1]) * out.shape[0]
    return n_tokens, time.perf_counter() - t0


def run_engine(model, tok, items: list[dict], args, device) -> tuple[int, float]:
    """All questions through ``looper.engine.generate``; returns (generated tokens, seconds)."""
    cfg = GenerationConfig(
        max_new_tokens=args.new_tokens, temperature=args.temperature, top_p=args.top_p,
        batch_size=args.batch_size, max_batch_tokens=args.max_batch_tokens, seed=0,
    )
    t0 = time.perf_counter()
    results = generate(model, tok, items, cfg, num_samples=args.samples, device=device, ignore_eos=True)
    elapsed = time.perf_counter() - t0
    n_tokens = sum(s["num_tokens"] for _, samples in results for s in samples)
    return n_tokens, elapsed


def generation_flops(prompt_lens: list[int], samples: int, new_tokens: int, n: dict) -> dict:
    """Prefill and decode FLOPs of the run (see the module docstring)."""
    L, d, N = n["layers"], n["hidden"], n["decoder_linear"] + n["lm_head"]
    prefill = sum(2 * N * p + 2 * L * d * p * (p + 1) for p in prompt_lens)
    decode = samples * sum(2 * N * new_tokens + 4 * L * d * sum(range(p + 1, p + new_tokens + 1)) for p in prompt_lens)
    return {"prefill": prefill, "decode": decode}


def _rates(tokens: int, questions: int, seconds: float) -> dict:
    return {
        "seconds": round(seconds, 2),
        "generated_tokens": tokens,
        "tokens_per_s": round(tokens / seconds, 1),
        "questions_per_s": round(questions / seconds, 3),
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    set_threads(args.threads)
    device = pick_device(args.device)
    train, train_note = data_source("train")  # the model's tokenizer corpus
    test, test_note = data_source("test")  # the prompts
    data_note = test_note if train else train_note  # either one synthetic: not comparable
    questions = load_questions(test, "test")[: args.questions]
    path = ensure_model(args.model_dir, train)
    tok = load_tokenizer(path)
    model = load_base_model(path, device=device).eval()
    items = [{"question_id": q["question_id"], "prompt": format_prompt(q["question"], ABEL_PROMPT)} for q in questions]
    prompts = [encode_prompt(tok, it["prompt"]) for it in items]

    peak_size = args.peak_size or default_peak_size(device)
    peak_before = matmul_peak(device, peak_size).flops_per_s
    # warm-up both paths (allocator, thread pools) on a small problem
    warm = argparse.Namespace(**{**vars(args), "new_tokens": 4, "samples": 2})
    run_engine(model, tok, items[:2], warm, device)
    run_baseline(model, tok, prompts[:1], warm, device)

    totals = {"engine": [0, 0.0], "baseline": [0, 0.0]}
    rounds = max(1, min(args.rounds, len(items)))
    for r in range(rounds):
        part = slice(r * len(items) // rounds, (r + 1) * len(items) // rounds)
        runs = [("engine", lambda: run_engine(model, tok, items[part], args, device))]
        if not args.skip_baseline:
            runs.append(("baseline", lambda: run_baseline(model, tok, prompts[part], args, device)))
        for name, fn in runs:
            tokens, seconds = fn()
            totals[name][0] += tokens
            totals[name][1] += seconds
    # the same questions with one new token: the prefill part of the engine's time
    one = argparse.Namespace(**{**vars(args), "new_tokens": 1})
    prefill_seconds = min(run_engine(model, tok, items, one, device)[1] for _ in range(2))
    # best of a measurement before and one after the run: one taken while a neighbour holds
    # the cores would make the fraction look better than it is
    peak = max(peak_before, matmul_peak(device, peak_size).flops_per_s)
    n = matmul_params(path, None)
    flops = generation_flops(list(map(len, prompts)), args.samples, args.new_tokens, n)
    decode_seconds = max(totals["engine"][1] - prefill_seconds, 1e-9)
    efficiency = {
        "matmul_params_N": n["decoder_linear"] + n["lm_head"],
        "peak_flops_per_s": peak,
        "prefill_flops": flops["prefill"],
        "decode_flops": flops["decode"],
        "prefill_seconds": round(prefill_seconds, 3),
        "decode_seconds": round(decode_seconds, 3),
        "decode_flops_per_s": flops["decode"] / decode_seconds,
        "decode_fraction_of_peak": round(flops["decode"] / decode_seconds / peak, 4),
        "whole_run_fraction_of_peak": round((flops["prefill"] + flops["decode"]) / totals["engine"][1] / peak, 4),
        "convention": "decode: 2N + 4*L*d*t per generated token at context t; prefill once per question; "
                      "peak: best square matmul in this process, before and after the run",
    }
    engine = _rates(totals["engine"][0], len(items), totals["engine"][1])
    baseline = None if args.skip_baseline else _rates(totals["baseline"][0], len(items), totals["baseline"][1])
    result = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "model": {"path": path, **{k: BENCH_TINY.__dict__[k] for k in ("hidden_size", "num_layers", "vocab_size")},
                  "params": sum(p.numel() for p in model.parameters())},
        "data": data_note,
        "questions": len(items),
        "samples_per_question": args.samples,
        "new_tokens": args.new_tokens,
        "mean_prompt_tokens": round(sum(map(len, prompts)) / len(prompts), 1),
        "rounds": rounds,
        "engine": {**engine, "batch_size": args.batch_size},
        "baseline_hf_generate": baseline,
        "decode_efficiency": efficiency,
        "speedup_tokens_per_s": round(engine["tokens_per_s"] / baseline["tokens_per_s"], 2) if baseline else None,
        "peak_memory": peak_memory(device),
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
