"""Setup helpers shared by the training loops (SFT, DPO). The loops themselves stay flat."""

from __future__ import annotations

import functools
import inspect
import math
import os
import random
import warnings
from typing import Optional

import numpy as np
import torch

from looper import dist
from looper.config import Config, TrainConfig
from looper.data.tokenize import IGNORE_INDEX
from looper.models import attach_lora, decoder_layers, ensure_base_model, load_adapter, load_base_model, load_tokenizer


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def quiet_transformers() -> None:
    """Silence per-load progress bars from transformers; looper draws its own."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    except Exception:  # pragma: no cover - cosmetic only
        pass


def build_policy(cfg: Config, env: dist.DistEnv, adapter: Optional[str], trainable: bool = True):
    """Base model (+ new LoRA, or an existing adapter), sharded with FSDP2.

    ``adapter`` given: load it (trainable or frozen). Otherwise a new LoRA from ``cfg.lora``,
    or full fine-tuning when ``cfg.lora`` is None. Every rank builds the same initial
    weights (same seed), then shards them.
    """
    quiet_transformers()
    with dist.main_first():  # rank 0 builds the offline tiny model if needed
        path = ensure_base_model(cfg)
    tokenizer = load_tokenizer(path, cfg.model)
    # master weights: fp32 on CPU; on GPU the stored dtype, gathered in bf16 by FSDP
    model = load_base_model(path, cfg.model, device="cpu", dtype=_load_dtype(cfg, env))
    if adapter is not None:
        model = load_adapter(model, adapter, trainable=trainable)
    elif cfg.lora is not None:
        torch.manual_seed(cfg.run.seed)  # identical LoRA init on every rank
        model = attach_lora(model, cfg.lora)
    if cfg.lora is not None or adapter is not None:
        for p in model.parameters():  # trainable adapter weights always in fp32
            if p.requires_grad:
                p.data = p.data.float()
    return model, tokenizer, path


def _load_dtype(cfg: Config, env: dist.DistEnv) -> torch.dtype:
    from looper.models import resolve_dtype

    full_ft = cfg.lora is None
    dtype = resolve_dtype(cfg.model.dtype, env.device)
    # full fine-tuning keeps fp32 master weights; FSDP gathers them in bf16 on GPU
    return torch.float32 if full_ft else dtype


def shard(model, env: dist.DistEnv, activation_checkpointing: bool):
    if activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    model.to(env.device)
    return dist.shard_model(model, decoder_layers(model), env.device)


def trainable_params(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def build_optimizer(params, t: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    if not params:
        raise ValueError("no trainable parameters")
    kw = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay, **kw)


def lr_lambda(t: TrainConfig, total_steps: int):
    """Linear warmup from 0, then cosine or linear decay to ``min_lr_ratio`` (or constant)."""

    def f(step: int) -> float:
        if t.warmup_steps > 0 and step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        if t.schedule == "constant":
            return 1.0
        span = max(1, total_steps - t.warmup_steps)
        progress = min(1.0, (step - t.warmup_steps) / span)
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if t.schedule == "cosine" else 1 - progress
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * decay

    return f


def total_steps(t: TrainConfig, steps_per_epoch: int) -> int:
    if t.max_steps > 0:
        return t.max_steps
    return max(1, math.ceil(t.epochs * steps_per_epoch))


def check_finite(value: float, step: int, what: str, last_ckpt: Optional[str]) -> None:
    if not math.isfinite(value):
        keep = f"; the last good checkpoint is {last_ckpt}" if last_ckpt else "; no checkpoint was written yet"
        raise FloatingPointError(f"non-finite {what} ({value}) at optimizer step {step}: stopping{keep}")


def split_val(rows: list, val_size: int, seed: int) -> tuple[list, list]:
    """A deterministic held-out split of ``val_size`` rows (0 = none)."""
    if val_size <= 0:
        return rows, []
    if val_size >= len(rows):
        from looper.io import DataError

        raise DataError(f"val_size={val_size} leaves no training rows out of {len(rows)}")
    idx = list(range(len(rows)))
    random.Random(f"val-{seed}").shuffle(idx)
    val = set(idx[:val_size])
    return [r for i, r in enumerate(rows) if i not in val], [r for i, r in enumerate(rows) if i in val]


def equal_shards(n: int, batch_size: int, rank: int, world: int) -> list[list[int]]:
    """Evaluation batches for this rank; every rank gets the same number of batches (FSDP
    forwards are collective), some possibly empty."""
    mine = list(range(rank, n, world))
    per_rank = math.ceil(math.ceil(n / world) / batch_size) if n else 0
    return [mine[i * batch_size : (i + 1) * batch_size] for i in range(per_rank)]


def stage_dirs(cfg: Config, name: str, stage: Optional[str] = None) -> dict[str, str]:
    """``out``: the stage's output folder ``checkpoints/<name>``; ``resume``: its resume
    states, ``checkpoints/<stage>/resume`` (DESIGN.md) for the stage's default output
    ``<stage>_lora``, and ``checkpoints/<name>-resume`` for any other output name (so a
    variant run never resumes another run's state).

    The resume folder never lies inside ``out``: the final save replaces ``out`` as a
    whole (an atomic rename), which would delete the resume states with it.
    """
    root = cfg.run.output_dir
    out = os.path.join(root, "checkpoints", name)
    if stage and name == f"{stage}_lora":
        resume = os.path.join(root, "checkpoints", stage, "resume")
    else:
        resume = os.path.join(root, "checkpoints", f"{name}-resume")
    return {"out": out, "resume": resume}


def accepts_logits_to_keep(model) -> bool:
    """Whether the (PEFT-wrapped) causal LM takes ``logits_to_keep`` (transformers' own models do).

    Answered once per model class, so calling it at every forward costs nothing.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _forward_takes_logits_to_keep(type(base))


@functools.lru_cache(maxsize=None)
def _forward_takes_logits_to_keep(cls: type) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return False


def loss_logits(model, batch: dict, trim: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward pass; returns ``(logits, labels)`` aligned for ``masked_cross_entropy``.

    With ``trim``, the LM head runs only from the first position that predicts a target in
    some row: the prompt prefix that every row of the batch shares never reaches the
    vocabulary projection (about a quarter of the positions on GSM8K). Same loss, less
    compute and less logits memory.
    """
    labels = batch["labels"]
    first = 0
    if trim:
        scored = (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero()
        first = int(scored[0]) if len(scored) else 0
    kw = {"logits_to_keep": labels.shape[1] - first} if first else {}
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kw)
    return out.logits, labels[:, first:]
