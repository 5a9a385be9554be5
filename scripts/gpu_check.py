"""One-shot GPU check of looper on one CUDA device. Prints ONE JSON summary on stdout.

    python scripts/gpu_check.py                  # on a machine with one CUDA device (< 8 min on an H200)
    python scripts/gpu_check.py --dry-run-cpu    # the same flow on CPU with a tiny fp32 model, 2 steps each

What it does, in order (each part is one function below):

1. ``measure_peak``: the bf16 matmul peak of this device (best of several 8192^3 matmuls;
   fp32 2048^3 on CPU), the denominator of every MFU below.
2. ``build_model``: a Llama with random weights from a config, no download (GPU: hidden
   2048, 16 layers, 16 heads / 4 KV heads, intermediate 5632, 32k vocabulary, about 0.85B
   parameters; CPU dry run: hidden 64, 2 layers), with a byte-level BPE tokenizer trained
   offline (``looper.models.train_bpe_tokenizer``) on synthetic problems plus random
   pseudo-words, so that the vocabulary really reaches 32k. Saved (bf16 on GPU) to a temp folder.
3. ``run_sft``: a few LoRA SFT steps through ``looper.loops.sft.train_sft`` (bf16 on GPU).
4. ``run_dpo``: preference pairs sampled with the engine from that adapter, then a few
   ``train_dpo`` steps starting from it.
5. ``check_generation``: ``looper.engine.generate`` greedy against HF ``model.generate``
   greedy, token for token, on a few prompts (bf16 on GPU). A divergence is a failure;
   the JSON gives its position and the HF logit gap between the two tokens there.
6. ``run_benchmarks``: the four ``benchmarks/*.py`` scripts as subprocesses with
   ``--device cuda`` (cpu in the dry run), short settings and ``--model-dir`` the model of
   step 2; their JSON is captured whole. DPO runs twice, on concatenated and on packed rows
   (``--packed false`` / ``true``), which decides what ``dpo.packed: auto`` should do on GPU.

Every part runs even when an earlier one failed (as far as its inputs exist); the summary
names the failed parts in ``failed`` and the exit status is 1 if any failed. Without CUDA
(and without ``--dry-run-cpu``) it exits with status 2 and a message saying so.

FLOP convention (approximate, stated in the JSON): N = decoder linear weights + lm_head
(no embeddings, no LoRA, no attention scores); LoRA training 4N per real token (forward
2N, backward 2N for input gradients), a forward-only pass 2N per token. The benchmarks'
own, finer MFU figures are in their JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

NO_CUDA_EXIT = 2

GPU_SHAPE = dict(hidden_size=2048, num_layers=16, num_heads=16, num_kv_heads=4, intermediate_size=5632,
                 vocab_size=32000, max_position_embeddings=2048)
CPU_SHAPE = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=172,
                 vocab_size=512, max_position_embeddings=512)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run-cpu", action="store_true",
                   help="run the same flow on CPU with a tiny fp32 model (hidden 64, 2 layers), 2 steps each")
    p.add_argument("--steps", type=int, default=None, help="SFT and DPO optimizer steps (default 6 GPU, 2 CPU)")
    p.add_argument("--work-dir", default=None, help="folder for the model and runs (default: a temporary one, removed)")
    p.add_argument("--skip-benchmarks", action="store_true", help="leave out part (d), the benchmark scripts")
    p.add_argument("--bench-timeout", type=int, default=None, help="seconds per benchmark (default 100 GPU, 120 CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (dry run; default: torch's)")
    return p.parse_args(argv)


def settings(cpu: bool, steps: int | None) -> dict:
    """Sizes of every part: short on GPU (the whole check < 8 min), tiny on CPU."""
    if cpu:
        return dict(device="cpu", dtype="float32", shape=CPU_SHAPE, steps=steps or 2, batch=4, max_length=128,
                    lora_r=8, pairs=8, pair_tokens=16, gen_prompts=4, gen_tokens=16, peak_size=1024, peak_reps=3,
                    bench_timeout=120)
    return dict(device="cuda", dtype="bfloat16", shape=GPU_SHAPE, steps=steps or 6, batch=16, max_length=512,
                lora_r=16, pairs=32, pair_tokens=64, gen_prompts=8, gen_tokens=48, peak_size=8192, peak_reps=10,
                bench_timeout=100)


# --------------------------------------------------------------------------- helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device: torch.device) -> float | None:
    """torch.cuda.max_memory_allocated since the last reset_memory (None on CPU)."""
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


def matmul_params(model_dir: str) -> int:
    """N: the weights of every decoder linear projection plus the LM head (meta device, no memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def run_config(work: str, name: str, model_dir: str, s: dict, extra: list[str]):
    from looper.config import load_config

    return load_config(None, [
        f"run.output_dir={os.path.join(work, name)}", "run.progress=false", f"run.device={s['device']}",
        f"model.name_or_path={model_dir}", f"model.dtype={s['dtype']}", "data.train=null",
        "data.synthetic.n_train=512", f"data.max_length={s['max_length']}", f"lora.r={s['lora_r']}",
        f"lora.alpha={2 * s['lora_r']}",
    ] + extra)


def train_rates(result, n: int, peak: float, skip: int, fwd_tokens: int = 0, fwd_seconds: float = 0.0) -> dict:
    """tokens/s and MFU of a TrainResult's steps after the first ``skip`` (warm-up), plus an
    optional forward-only part (DPO's reference pass)."""
    skip = min(skip, max(0, result.steps - 1))
    tokens, seconds = sum(result.step_tokens[skip:]), sum(result.step_seconds[skip:])
    flops = 4 * n * tokens + 2 * n * fwd_tokens
    total = seconds + fwd_seconds
    return {
        "steps": result.steps, "steps_timed": result.steps - skip, "tokens_timed": tokens + fwd_tokens,
        "seconds_timed": round(total, 3), "tokens_per_s": round((tokens + fwd_tokens) / total, 1),
        "mfu": round(flops / total / peak, 4), "step_seconds": [round(x, 3) for x in result.step_seconds],
        "phases_s": {k: round(v, 3) for k, v in result.phases.items()},
    }


# --------------------------------------------------------------------------- (0) environment and peak


def require_device(cpu: bool) -> torch.device:
    """cuda:0, or exit 2 with a message when there is no CUDA device (unless the dry run)."""
    if cpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        print("gpu_check: a CUDA device is needed (torch.cuda.is_available() is False on this machine). "
              "Run it where one CUDA device is visible, or use --dry-run-cpu to exercise the flow on CPU.",
              file=sys.stderr)
        sys.exit(NO_CUDA_EXIT)
    return torch.device("cuda", 0)


def environment(device: torch.device) -> dict:
    import transformers

    out = {"device": str(device), "torch": torch.__version__, "transformers": transformers.__version__,
           "python": platform.python_version()}
    try:
        import peft

        out["peft"] = peft.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out.update(device_name=props.name, device_memory_gib=round(props.total_memory / 2**30, 1),
                   cuda=torch.version.cuda, device_count=torch.cuda.device_count())
    else:
        out.update(device_name=platform.processor() or platform.machine(), torch_threads=torch.get_num_threads())
    return out


def measure_peak(device: torch.device, s: dict) -> dict:
    """Best FLOP/s of square matmuls: bf16 on GPU (10 per timing), fp32 on CPU."""
    n, dtype = s["peak_size"], (torch.bfloat16 if device.type == "cuda" else torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    inner = 10 if device.type == "cuda" else 1
    for _ in range(3):  # warm-up (clocks, cuBLAS heuristics)
        torch.mm(a, b, out=c)
    sync(device)
    times = []
    for _ in range(s["peak_reps"]):
        t0 = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b, out=c)
        sync(device)
        times.append((time.perf_counter() - t0) / inner)
    del a, b, c
    best = min(times)
    return {"flops_per_s": 2 * n**3 / best, "tflops": round(2 * n**3 / best / 1e12, 2),
            "how": f"best of {len(times)} timings of {inner} {str(dtype).replace('torch.', '')} {n}^3 matmuls",
            "median_tflops": round(2 * n**3 / sorted(times)[len(times) // 2] / 1e12, 2)}


# --------------------------------------------------------------------------- (1) the model


def build_tokenizer(vocab_size: int, seed: int = 0):
    """Byte-level BPE trained offline on synthetic problems plus random pseudo-words (the
    problems alone have too few distinct words to fill a 32k vocabulary)."""
    from looper.data.synthetic import corpus
    from looper.models import train_bpe_tokenizer

    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    n_words = 4000 if vocab_size > 4096 else 200
    words = [" ".join("".join(rng.choice(letters) for _ in range(rng.randint(3, 9))) for _ in range(50))
             for _ in range(n_words)]
    return train_bpe_tokenizer(corpus(2000, seed=seed + 1) + words, vocab_size)


def build_model(out_dir: str, device: torch.device, s: dict) -> dict:
    """A Llama with random weights from a config (initialized on ``device``), saved with its
    tokenizer in HF format (bf16 on GPU, fp32 on CPU)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    t0 = time.perf_counter()
    shape = s["shape"]
    tok = build_tokenizer(shape["vocab_size"])
    t_tok = time.perf_counter() - t0
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=shape["hidden_size"], intermediate_size=shape["intermediate_size"],
        num_hidden_layers=shape["num_layers"], num_attention_heads=shape["num_heads"],
        num_key_value_heads=shape["num_kv_heads"], max_position_embeddings=shape["max_position_embeddings"],
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model = model.to(torch.bfloat16 if device.type == "cuda" else torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    del model
    reset_memory(device)
    return {"path": out_dir, "architecture": "LlamaForCausalLM (random weights)", **shape,
            "tokenizer_vocab": len(tok), "params": n_params, "matmul_params_N": matmul_params(out_dir),
            "saved_dtype": "bfloat16" if device.type == "cuda" else "float32",
            "seconds": round(time.perf_counter() - t0, 2), "tokenizer_seconds": round(t_tok, 2)}


# --------------------------------------------------------------------------- (a) SFT


def run_sft(model_dir: str, work: str, device: torch.device, s: dict, n: int, peak: float) -> dict:
    """A few LoRA SFT steps through train_sft on synthetic problems; the adapter is kept."""
    from looper.loops.sft import train_sft

    cfg = run_config(work, "sft", model_dir, s, [
        "sft.val_size=0", f"sft.batch_size={s['batch']}", "sft.grad_accum=1", f"sft.max_steps={s['steps']}",
        "sft.eval_every=0", "sft.save_every=0", "sft.log_every=1", "sft.resume=none", "sft.lr=1e-4",
        "sft.warmup_steps=0",
    ])
    reset_memory(device)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # stdout: the JSON only
        result = train_sft(cfg)
    wall = time.perf_counter() - t0
    if not os.path.isfile(os.path.join(result.output_dir, "adapter_config.json")):
        raise RuntimeError(f"train_sft saved no adapter in {result.output_dir}")
    return {"adapter": result.output_dir, "wall_s": round(wall, 2), "lora_r": s["lora_r"],
            "sequences_per_step": s["batch"], **train_rates(result, n, peak, skip=1),
            "peak_cuda_allocated_mib": peak_memory_mib(device)}


# --------------------------------------------------------------------------- (b) DPO


def write_generated_pairs(model_dir: str, adapter: str, path: str, device: torch.device, s: dict) -> dict:
    """Two engine samples per synthetic question from base + SFT adapter: the first is
    'chosen', the second 'rejected' (the pairs only need to differ)."""
    from looper.config import ABEL_PROMPT, GenerationConfig
    from looper.data.gsm8k import format_prompt, load_questions
    from looper.engine import generate
    from looper.models import load_base_model, load_tokenizer, merged_model

    tok = load_tokenizer(model_dir)
    model = merged_model(load_base_model(model_dir, device=device), adapter).eval()
    questions = load_questions(None, "train")[: s["pairs"]]
    items = [{"question_id": q["question_id"], "prompt": format_prompt(q["question"], ABEL_PROMPT)} for q in questions]
    cfg = GenerationConfig(max_new_tokens=s["pair_tokens"], temperature=1.0, top_p=1.0, batch_size=64, seed=0)
    t0 = time.perf_counter()
    with torch.inference_mode():
        results = generate(model, tok, items, cfg, num_samples=2, device=device)
    sync(device)
    seconds = time.perf_counter() - t0
    written = 0
    with open(path, "w") as f:
        for item, (a, b) in results:
            if a["text"].strip() and b["text"].strip() and a["text"] != b["text"]:
                f.write(json.dumps({"pair_id": f"check-{item['question_id']}", "prompt": item["prompt"],
                                    "chosen": a["text"], "rejected": b["text"]}) + "\n")
                written += 1
    tokens = sum(x["num_tokens"] for _, pair in results for x in pair)
    del model
    if written == 0:
        raise RuntimeError("no usable preference pair: every sampled pair was empty or identical")
    return {"pairs": written, "sampled_tokens": tokens, "sampling_seconds": round(seconds, 2),
            "sampling_tokens_per_s": round(tokens / seconds, 1)}


def run_dpo(model_dir: str, adapter: str, work: str, device: torch.device, s: dict, n: int, peak: float) -> dict:
    """Pairs generated from the SFT adapter, then a few train_dpo steps starting from it."""
    from looper.loops.dpo import train_dpo

    os.makedirs(os.path.join(work, "dpo"), exist_ok=True)
    pairs_path = os.path.join(work, "dpo", "pairs.jsonl")
    reset_memory(device)
    pairs = write_generated_pairs(model_dir, adapter, pairs_path, device, s)
    reset_memory(device)
    batch = max(1, min(s["batch"] // 2, pairs["pairs"] // 2 or 1))
    cfg = run_config(work, "dpo_run", model_dir, s, [
        f"dpo.adapter={adapter}", f"dpo.pairs={pairs_path}", "data.truncation=truncate",
        f"dpo.batch_size={batch}", "dpo.grad_accum=1", f"dpo.max_steps={s['steps']}", "dpo.reference=precomputed",
        "dpo.lr=1e-5", "dpo.val_size=0", "dpo.eval_every=0", "dpo.save_every=0", "dpo.log_every=1",
        "dpo.resume=none", "dpo.warmup_steps=0",
    ])
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        result = train_dpo(cfg)
    wall = time.perf_counter() - t0
    # the reference pass (forward only, chosen + rejected once): its tokens are those of one epoch of pairs
    ref_seconds = result.phases.get("reference", 0.0) if result.reference == "computed" else 0.0
    ref_tokens = reference_tokens(pairs_path, model_dir, s) if ref_seconds else 0
    return {"pair_generation": pairs, "pairs_per_step": batch, "wall_s": round(wall, 2),
            "reference": result.reference, "reference_tokens": ref_tokens, "reference_seconds": round(ref_seconds, 3),
            **train_rates(result, n, peak, skip=1, fwd_tokens=ref_tokens, fwd_seconds=ref_seconds),
            "train_only": train_rates(result, n, peak, skip=1),
            "peak_cuda_allocated_mib": peak_memory_mib(device)}


def reference_tokens(pairs_path: str, model_dir: str, s: dict) -> int:
    """Real tokens of the reference pass: every pair's chosen and rejected rows."""
    from looper.loops.dpo import load_pairs
    from looper.models import load_tokenizer

    examples, _, _ = load_pairs(pairs_path, load_tokenizer(model_dir), s["max_length"], "truncate")
    return sum(2 * len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids) for e in examples)


# --------------------------------------------------------------------------- (c) engine vs HF generate


def first_divergence(model, prompt_ids: list[int], ref: list[int], got: list[int], device) -> dict:
    """Where two greedy continuations part, and the HF logit gap between the two tokens there
    (a gap near 0 is a near-tie that bf16 rounding can flip)."""
    k = next((i for i, (x, y) in enumerate(zip(ref, got)) if x != y), min(len(ref), len(got)))
    out = {"position": k, "hf_len": len(ref), "engine_len": len(got)}
    if k < len(ref) and k < len(got):
        ids = torch.tensor([prompt_ids + ref[:k]], device=device)
        with torch.inference_mode():
            logits = model(ids).logits[0, -1].float()
        out.update(hf_token=ref[k], engine_token=got[k],
                   logit_gap=round(float(logits[ref[k]] - logits[got[k]]), 5),
                   logit_scale=round(float(logits.abs().max()), 3))
    return out


def check_generation(model_dir: str, device: torch.device, s: dict) -> dict:
    """looper.engine.generate greedy == HF model.generate greedy, token for token (EOS included)."""
    from looper.config import ABEL_PROMPT, GenerationConfig
    from looper.data.gsm8k import format_prompt, load_questions
    from looper.data.tokenize import encode_prompt
    from looper.engine import generate
    from looper.models import load_base_model, load_tokenizer

    reset_memory(device)
    tok = load_tokenizer(model_dir)
    model = load_base_model(model_dir, device=device).eval()
    questions = load_questions(None, "test")[: s["gen_prompts"]]
    items = [{"question_id": q["question_id"], "prompt": format_prompt(q["question"], ABEL_PROMPT)} for q in questions]
    cfg = GenerationConfig(max_new_tokens=s["gen_tokens"], temperature=0.0, batch_size=len(items))
    generate(model, tok, items[:1], GenerationConfig(max_new_tokens=4), device=device)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    results = generate(model, tok, items, cfg, device=device)
    sync(device)
    engine_s = time.perf_counter() - t0

    hf_s, hf_tokens, rows = 0.0, 0, []
    for item, samples in results:
        sample = samples[0]
        got = sample["token_ids"] + ([tok.eos_token_id] if sample["finished"] else [])
        prompt_ids = encode_prompt(tok, item["prompt"])
        ids = torch.tensor([prompt_ids], device=device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=s["gen_tokens"], pad_token_id=tok.pad_token_id)
        sync(device)
        hf_s += time.perf_counter() - t0
        ref = out[0, ids.shape[1]:].tolist()
        hf_tokens += len(ref)
        row = {"question_id": item["question_id"], "prompt_tokens": len(prompt_ids), "tokens": len(got),
               "match": ref == got}
        if ref != got:
            row["divergence"] = first_divergence(model, prompt_ids, ref, got, device)
        rows.append(row)
    engine_tokens = sum(s_["num_tokens"] for _, ss in results for s_ in ss)
    del model
    return {"dtype": s["dtype"], "prompts": len(items), "max_new_tokens": s["gen_tokens"],
            "matched": all(r["match"] for r in rows), "n_matched": sum(r["match"] for r in rows), "rows": rows,
            "engine_tokens_per_s": round(engine_tokens / engine_s, 1),
            "hf_generate_tokens_per_s": round(hf_tokens / hf_s, 1),
            "note": "engine: all prompts in one batch; HF: one prompt at a time",
            "peak_cuda_allocated_mib": peak_memory_mib(device)}


# --------------------------------------------------------------------------- (d) the benchmark scripts


def benchmark_commands(model_dir: str, s: dict, threads: int | None) -> dict[str, list[str]]:
    """Short settings of the four benchmarks (DPO on concatenated and on packed rows), on the model built above."""
    gpu = s["device"] == "cuda"
    common = ["--device", s["device"], "--model-dir", model_dir]
    if threads:
        common += ["--threads", str(threads)]
    tokens = "64" if gpu else "8"
    dpo = common + ["--pairs", "64" if gpu else "8", "--batch-size", "8" if gpu else "2", "--steps", "5" if gpu else "2",
                    "--skip-steps", "1", "--max-length", "512" if gpu else "128"]
    return {
        "sft_throughput": common + ["--steps", "4" if gpu else "2", "--warmup", "1", "--batch-size",
                                    "16" if gpu else "4", "--max-length", "512" if gpu else "128"],
        "dpo_throughput": dpo + ["--packed", "false"],
        # dpo.packed: auto keeps concatenated rows on GPU until this pair of runs says otherwise
        "dpo_throughput_packed": dpo + ["--packed", "true"],
        "generation_throughput": common + ["--questions", "32" if gpu else "4", "--samples", "4" if gpu else "2",
                                           "--new-tokens", tokens, "--rounds", "1", "--batch-size", "128"],
        "rollout_throughput": common + ["--questions", "16" if gpu else "4", "--k", "4" if gpu else "2",
                                        "--new-tokens", tokens, "--max-scoring-share", "1.0"],
    }


def run_benchmark(name: str, args: list[str], timeout: int) -> dict:
    """One benchmark as a subprocess; its stdout must be one JSON object."""
    script = name.removesuffix("_packed")  # dpo_throughput_packed: dpo_throughput --packed true
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", f"{script}.py")] + args
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout} s", "command": cmd[1:]}
    wall = round(time.perf_counter() - t0, 2)
    out = {"ok": proc.returncode == 0, "returncode": proc.returncode, "wall_s": wall, "command": cmd[1:]}
    try:
        out["result"] = json.loads(proc.stdout)
    except json.JSONDecodeError:
        out["ok"] = False
        out["stdout_tail"] = proc.stdout[-1500:]
    if not out["ok"]:
        out["stderr_tail"] = proc.stderr[-3000:]
    return out


def run_benchmarks(model_dir: str, s: dict, threads: int | None, timeout: int) -> dict:
    return {name: run_benchmark(name, args, timeout) for name, args in benchmark_commands(model_dir, s, threads).items()}


def bench_summary(bench: dict) -> dict:
    """The headline numbers of each benchmark's JSON (the whole JSON stays under 'benchmarks')."""
    pick = {
        "sft_throughput": lambda r: {"tokens_per_s": r.get("tokens_per_s"), "mfu": r.get("mfu"),
                                     "peak_memory_mib": (r.get("peak_memory_bytes") or 0) / 2**20},
        "dpo_throughput": lambda r: {"pairs_per_s": r.get("pairs_per_s"), "tokens_per_s": r.get("tokens_per_s"),
                                     "mfu": r.get("mfu"), "peak_memory": r.get("peak_memory")},
        "generation_throughput": lambda r: {"engine_tokens_per_s": (r.get("engine") or {}).get("tokens_per_s"),
                                            "hf_tokens_per_s": (r.get("baseline_hf_generate") or {}).get("tokens_per_s"),
                                            "speedup": r.get("speedup_tokens_per_s"), "peak_memory": r.get("peak_memory")},
        "rollout_throughput": lambda r: {k: r.get(k) for k in ("trajectories_per_s", "generated_tokens_per_s",
                                                                   "peak_memory")},
    }
    out = {}
    for name, b in bench.items():
        try:
            out[name] = pick[name.removesuffix("_packed")](b["result"]) if "result" in b else None
        except Exception as e:  # a changed JSON layout: keep the check going
            out[name] = {"error": repr(e)}
    return out


def headline(summary: dict) -> dict:
    """Per in-process stage: tokens/s, MFU and peak CUDA memory, in one place."""
    out = {}
    for part, keys in (("sft", ("tokens_per_s", "mfu")), ("dpo", ("tokens_per_s", "mfu")),
                       ("generation", ("engine_tokens_per_s", "hf_generate_tokens_per_s", "matched"))):
        r = summary.get(part)
        if r:
            out[part] = {**{k: r[k] for k in keys}, "peak_cuda_allocated_mib": r["peak_cuda_allocated_mib"]}
    return out


# --------------------------------------------------------------------------- main


def attempt(summary: dict, part: str, fn, *args):
    """Run one part; on an exception, record it under summary['errors'] and name the part in 'failed'."""
    t0 = time.perf_counter()
    try:
        return fn(*args)
    except Exception as e:
        summary["failed"].append(part)
        summary["errors"][part] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
        return None
    finally:
        summary["part_seconds"][part] = round(time.perf_counter() - t0, 2)


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    device = require_device(args.dry_run_cpu)
    if args.threads:
        torch.set_num_threads(args.threads)
    s = settings(args.dry_run_cpu, args.steps)
    from looper.models import quiet_transformers

    quiet_transformers()
    work = args.work_dir or tempfile.mkdtemp(prefix="looper-gpu-check-")
    os.makedirs(work, exist_ok=True)
    summary: dict = {"check": "gpu_check", "mode": "dry-run-cpu (tiny fp32 model)" if args.dry_run_cpu else "cuda",
                     "ok": False, "failed": [], "errors": {}, "part_seconds": {}, "work_dir": work}
    try:
        summary["environment"] = environment(device)
        peak = attempt(summary, "peak", measure_peak, device, s)
        summary["matmul_peak"] = peak
        peak_flops = peak["flops_per_s"] if peak else float("nan")

        model_dir = os.path.join(work, "model")
        model = attempt(summary, "build_model", build_model, model_dir, device, s)
        summary["model"] = model
        if model:
            n = model["matmul_params_N"]
            sft = attempt(summary, "sft", run_sft, model_dir, work, device, s, n, peak_flops)
            summary["sft"] = sft
            if sft:
                summary["dpo"] = attempt(summary, "dpo", run_dpo, model_dir, sft["adapter"], work, device, s, n,
                                         peak_flops)
            gen = attempt(summary, "generation", check_generation, model_dir, device, s)
            summary["generation"] = gen
            if gen and not gen["matched"]:
                summary["failed"].append("generation_mismatch")
            summary["engine_matches_hf_generate"] = gen["matched"] if gen else None
            if not args.skip_benchmarks:
                reset_memory(device)
                timeout = args.bench_timeout or s["bench_timeout"]
                bench = attempt(summary, "benchmarks", run_benchmarks, model_dir, s, args.threads, timeout) or {}
                summary["benchmarks"] = bench
                summary["benchmark_headlines"] = bench_summary(bench)
                summary["failed"] += [f"benchmark:{k}" for k, v in bench.items() if not v["ok"]]
        summary["headline"] = headline(summary)
        summary["flop_convention"] = ("N = decoder linear weights + lm_head; LoRA training 4N per real token, "
                                      "forward-only (DPO reference pass) 2N per token; attention scores not "
                                      "counted; MFU = achieved / matmul_peak of this run")
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
        summary["ok"] = not summary["failed"]
        summary["wall_s"] = round(time.perf_counter() - t_start, 1)
        print(json.dumps(summary, indent=2, default=str))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
