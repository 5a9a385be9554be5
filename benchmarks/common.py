"""What the benchmark scripts share: the reference model, its data, an SFT-like adapter,
the matmul peak and peak memory.

- ``BENCH_TINY``: the reference tiny model shape (Llama, hidden 256, 4 layers, 4 heads,
  intermediate 680, BPE vocabulary 4096).
- ``data_source``: the GSM8K file of a split under ``../shared/data/gsm8k``, or ``None``
  (looper's synthetic data) with a note saying the numbers are not comparable.
- ``ensure_model``: the benchmark model, built once with its tokenizer trained on the GSM8K
  train texts, and cached in ONE temporary folder shared by every script (keyed by the
  shape and the data source).
- ``make_adapter``: an SFT-like LoRA adapter with small random non-zero B.
- ``matmul_params``: the parameters that take part in matmuls (decoder projections, LM
  head, LoRA), the base of every script's FLOP count.
- ``matmul_peak``: the best FLOP/s of several large square matmuls (fp32 on CPU, bf16 on
  GPU), by wall time and by process CPU time.
- ``peak_memory`` / ``mib``: peak RSS (and peak allocated CUDA memory) in MiB.
- ``cpu_utilization``: process CPU time over wall time x threads (CPU runs only).
- ``set_threads``: torch's intra-op thread count from a ``--threads`` flag.

The scripts put this folder and the repository root on ``sys.path`` before importing it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from typing import NamedTuple

import torch

from looper.config import LoraConfig, TinyModelConfig
from looper.data.gsm8k import load_questions
from looper.metrics import peak_memory_bytes
from looper.models import attach_lora, build_tiny_model, load_base_model, load_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GSM8K_DIR = os.path.join(REPO, "..", "shared", "data", "gsm8k")
BENCH_TINY = TinyModelConfig(
    hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=4, intermediate_size=680, vocab_size=4096
)
PEAK_REPS = 8  # timed repetitions of the peak matmul; the best one counts


def set_threads(n: int | None) -> None:
    """``--threads``: torch's intra-op threads; None or 0 keeps torch's default."""
    if n and n > 0:
        torch.set_num_threads(n)


# --------------------------------------------------------------------------- data and model


def data_source(split: str = "train") -> tuple[str | None, str]:
    """The GSM8K ``split`` file and a note for the JSON; ``None`` selects looper's synthetic data."""
    path = os.path.join(GSM8K_DIR, f"{split}.jsonl")
    if os.path.isfile(path):
        return os.path.abspath(path), f"gsm8k {split}"
    return None, f"synthetic (GSM8K {split} not found at ../shared/data/gsm8k; numbers are not comparable)"


def ensure_model(arg: str | None, source: str | None) -> str:
    """The benchmark model folder: ``arg`` if given, else one cached temporary folder keyed by
    the shape and the data source; built there (atomically) if missing. ``source`` is the
    GSM8K train file whose question+answer texts train the tokenizer (None: synthetic)."""
    tag = hashlib.sha256(json.dumps([BENCH_TINY.__dict__, "gsm8k" if source else "synthetic"]).encode())
    path = arg or os.path.join(tempfile.gettempdir(), f"looper-bench-tiny-{tag.hexdigest()[:10]}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        rows = load_questions(source, "train")
        build_tiny_model(path, BENCH_TINY, corpus=[f"{r['question']}\n{r['answer']}" for r in rows])
    return path


def make_adapter(model_dir: str, out: str, r: int) -> None:
    """An SFT-like adapter: LoRA r (alpha 2r) on every linear projection, small random
    non-zero B, seeded without touching the caller's RNG stream; saved with the tokenizer."""
    model = load_base_model(model_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = attach_lora(model, LoraConfig(r=r, alpha=2 * r, dropout=0.0))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.01)
    model.save_pretrained(out)
    load_tokenizer(model_dir).save_pretrained(out)


def matmul_params(model_dir: str, lora_r: int | None) -> dict:
    """Parameters that take part in matmuls (no embeddings), counted on a meta-device model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from looper.loops.common import keeps_logits_by_mask

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    body = head = lora = 0
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            if name.endswith("lm_head"):
                head += mod.weight.numel()
            else:
                body += mod.weight.numel()
                if lora_r:  # peft's all-linear: every decoder projection, not the head
                    lora += lora_r * (mod.in_features + mod.out_features)
    return {
        "decoder_linear": body, "lm_head": head, "lora": lora,
        "N": body + head + lora, "all_params_incl_embeddings": sum(p.numel() for p in model.parameters()),
        "layers": config.num_hidden_layers, "hidden": config.hidden_size,
        "head_on_scored_only": keeps_logits_by_mask(model),
    }


# --------------------------------------------------------------------------- peak FLOP/s and memory


class Peak(NamedTuple):
    flops_per_s: float  # by wall time
    flops_per_cpu_s: float  # by this process's CPU time, summed over threads (meaningful on CPU only)


def default_peak_size(device: torch.device) -> int:
    return 8192 if device.type == "cuda" else 2048


def matmul_peak(device: torch.device, size: int | None = None, reps: int = PEAK_REPS) -> Peak:
    """Best FLOP/s of ``size``-square matmuls (fp32 on CPU with this process's threads, bf16
    on GPU): one warm-up, then ``reps`` timings (each of 10 matmuls on GPU, one on CPU)."""
    n = size or default_peak_size(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    inner = 10 if device.type == "cuda" else 1
    torch.mm(a, b, out=c)  # warm-up
    sync()
    best = best_cpu = float("inf")
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(inner):
            torch.mm(a, b, out=c)
        sync()
        best = min(best, (time.perf_counter() - t0) / inner)
        best_cpu = min(best_cpu, (time.process_time() - c0) / inner)
    return Peak(2 * n**3 / best, 2 * n**3 / max(best_cpu, 1e-9))


def cpu_utilization(cpu_seconds: float, wall_seconds: float, device: torch.device) -> float | None:
    """Process CPU time / (wall time x torch threads), e.g. over a loop's timed steps (its
    ``TrainResult.step_cpu_seconds`` and ``step_seconds``). Well below 1: the process was
    starved of cores (a shared machine). None on GPU or without wall time."""
    if device.type != "cpu" or wall_seconds <= 0:
        return None
    return cpu_seconds / (wall_seconds * torch.get_num_threads())


def mib(n: float) -> float:
    return round(n / 2**20, 1)


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far."""
    return peak_memory_bytes("cpu")


def peak_memory(device: torch.device) -> dict:
    """Peak RSS of the process, plus the peak allocated CUDA memory on GPU, in MiB."""
    out = {"peak_rss_mib": mib(peak_rss_bytes())}
    if device.type == "cuda":
        out["peak_cuda_allocated_mib"] = mib(torch.cuda.max_memory_allocated(device))
    return out
