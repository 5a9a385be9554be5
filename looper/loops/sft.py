"""Supervised fine-tuning: ``train_sft(cfg)``, one function, top to bottom.

LoRA (``cfg.lora``) or full fine-tuning (``lora: null``), sharded with FSDP2 through
``looper.dist``. The loss is the sum of completion-token cross-entropies divided by the
number of completion tokens in the whole optimizer step (all accumulation micro-steps on
all ranks), so it does not depend on how the global batch is split.
"""

from __future__ import annotations

import time
from typing import Optional

import torch

from looper import checkpoint, dist, fingerprint, tracking
from looper.config import Config, ConfigError, LoraConfig, TrainConfig, save_config
from looper.data.gsm8k import format_completion, load_questions
from looper.data.tokenize import Encoded, collate, encode_sft_rows
from looper.io import DataError, check_writable
from looper.layout import RunLayout, holds_run_lock, resolve_adapter
from looper.loops.common import (
    TrainLoop, TrainResult, build_policy, equal_shards, resume_point, scored_token_logps, seed_everything, shard,
    split_val,
)
from looper.models import ensure_model, resolve_dtype

STAGES = ("sft", "base")


def load_sft_rows(cfg: Config, tokenizer=None) -> list[dict]:
    """The SFT data as text rows: ``question_id``, ``prompt``, ``completion``, formatted by
    ``looper.data.formats`` (``data.prompt_format``).

    In the chat format the rows also carry ``messages`` (the conversation before the
    answer), which marks them as chat rows for ``encode_sft_rows`` and lets it check each
    against the template; the prompt needs the tokenizer (the base model's, loaded here when
    not given), so a tokenizer without a chat template is a ``ConfigError`` before any work.
    """
    from looper.data import formats

    if cfg.data.prompt_format == "chat" and tokenizer is None:
        from looper.models import load_tokenizer

        tokenizer = load_tokenizer(ensure_model(cfg), cfg.model)
    fmt = formats.resolve(tokenizer, cfg.data)
    rows = load_questions(cfg.data.train, "train", cfg.data)
    out = []
    for r in rows:
        row = {
            "question_id": r["question_id"],
            "prompt": fmt.prompt(r["question"]),
            "completion": format_completion(r["answer"], cfg.data.strip_calculator),
        }
        messages = fmt.messages(r["question"])
        if messages is not None:
            row["messages"] = messages
            if cfg.data.chat_template_kwargs:
                row["chat_template_kwargs"] = cfg.data.chat_template_kwargs
        out.append(row)
    return out


def load_sft_examples(
    cfg: Config, tokenizer, val_size: Optional[int] = None, rows: Optional[list[dict]] = None
) -> tuple[list[Encoded], list[Encoded], int]:
    """Tokenized train and held-out examples (``val_size``, default ``sft.val_size``, drawn
    with ``run.seed``), and how many rows were truncated."""
    val_size = cfg.sft.val_size if val_size is None else val_size
    texts = load_sft_rows(cfg) if rows is None else rows
    train_rows, val_rows = split_val(texts, val_size, cfg.run.seed)
    train, n_trunc = encode_sft_rows(tokenizer, train_rows, cfg.data.max_length, cfg.data.truncation)
    val, n_trunc_val = encode_sft_rows(tokenizer, val_rows, cfg.data.max_length, cfg.data.truncation)
    if not train:
        raise DataError(f"the SFT dataset ({cfg.data.train or 'synthetic'}) has no training rows")
    return train, val, n_trunc + n_trunc_val


@torch.no_grad()
def eval_loss(
    model, examples: list[Encoded], batch_size: int, pad_id: int, env: dist.DistEnv
) -> float:
    """Mean completion-token loss over ``examples``, sharded across ranks."""
    model.eval()
    loss_sum = torch.zeros((), device=env.device)
    tokens = torch.zeros((), device=env.device)
    for idx in equal_shards(len(examples), batch_size, env.rank, env.world_size):
        empty = not idx  # FSDP forwards are collective: every rank runs the same count
        batch = {k: v.to(env.device) for k, v in collate([examples[i] for i in idx or [0]], pad_id).items()}
        token_logps, _ = scored_token_logps(model, batch)
        loss_sum -= 0 if empty else token_logps.sum()
        tokens += 0 if empty else token_logps.numel()
    model.train()
    return (dist.all_reduce_sum(loss_sum) / dist.all_reduce_sum(tokens).clamp(min=1)).item()


def sft_stage(cfg: Config, stage: str) -> tuple[TrainConfig, Optional[LoraConfig], Optional[str], str, str]:
    """``(train settings, LoRA, starting adapter, output name, model)`` of an SFT-loop stage.

    ``sft``: LoRA (or full fine-tuning with ``lora: null``) on the layout's base model.
    ``base``: the tiny pipeline's base stage, full fine-tuning of the freshly built tiny
    model with ``base_train``, saved as ``checkpoints/base``.
    """
    if stage not in STAGES:
        raise ConfigError(f"train_sft: unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
    if stage == "base":
        if cfg.base_train is None:
            raise ConfigError("the base stage needs a base_train section")
        return cfg.base_train, None, None, "base", ensure_model(cfg, for_base_stage=True)
    layout = RunLayout.of(cfg)
    init = resolve_adapter(layout, cfg.sft.init_adapter, "sft.init_adapter")
    return cfg.sft, cfg.lora, init, cfg.sft.output_name, ensure_model(cfg, announce=True)


@holds_run_lock
def train_sft(cfg: Config, stage: str = "sft") -> TrainResult:
    """Train and save ``checkpoints/<sft.output_name>`` (``checkpoints/base`` for the base stage).

    Returns a ``TrainResult`` (``.output_dir`` is the saved folder). ``stage`` names the
    metrics file (``metrics/<stage>.jsonl``) and the saved config.
    """
    t0 = time.perf_counter()
    env = dist.init_distributed(cfg.run.device)
    layout = RunLayout.of(cfg)
    t, lora, init_adapter, name, model_path = sft_stage(cfg, stage)
    full_ft = lora is None and init_adapter is None

    # ---- what this output is made of; a resume must match it (checked before any work)
    rows = load_sft_rows(cfg)
    identity = {
        "settings": fingerprint.stage_settings(cfg, stage, env.world_size),
        "inputs": {"model": fingerprint.folder_stamp(model_path), "init_adapter": fingerprint.adapter_digest(init_adapter),
                   "data": fingerprint.rows_digest(rows)},
    }
    check_writable([layout.checkpoint(name), layout.resume(name), layout.metrics(stage), layout.config(stage)])
    resume_from = resume_point(t, layout.resume(name), identity, "base_train" if stage == "base" else "sft")
    tracker = tracking.for_stage(cfg, layout, stage)  # a missing tracker package fails here
    seed_everything(t.seed)
    if env.is_main:
        save_config(cfg, layout.config(stage))

    # ---- model, data
    model, tokenizer = build_policy(cfg, env, model_path, adapter=init_adapter, lora=lora)
    train, val, n_truncated = load_sft_examples(cfg, tokenizer, t.val_size, rows)
    model = shard(model, env, t.activation_checkpointing, resolve_dtype(cfg.model.dtype, env.device))
    pad_id = tokenizer.pad_token_id
    loop = TrainLoop(
        model=model, lengths=[len(e.input_ids) for e in train], t=t, env=env, resume_dir=layout.resume(name),
        metrics_path=layout.metrics(stage), desc=stage, trainable_only=not full_ft, show_progress=cfg.run.progress,
        identity=identity, resume_from=resume_from, tracker=tracker,
    )
    if env.is_main:
        print(
            f"[{stage}] {len(train)} train / {len(val)} val examples ({n_truncated} truncated), "
            f"{loop.n_steps} steps of {t.batch_size}x{t.grad_accum}x{env.world_size} rows, "
            f"{loop.trainable_count:,} trainable params, base {model_path}"
            + (f", resuming at step {loop.step}" if loop.step else "")
        )
    phases = {"setup": time.perf_counter() - t0}

    # ---- loop
    t0 = time.perf_counter()
    model.train()
    while not loop.done:
        micro = [[train[i] for i in mb] for mb in loop.micro_batches()]
        local_tokens = sum(sum(l != -100 for l in e.labels[1:]) for mb in micro for e in mb)
        global_tokens = dist.all_reduce_sum(torch.tensor(float(local_tokens), device=env.device))
        loss_sum = torch.zeros((), device=env.device)
        positions = 0
        for i, rows in enumerate(micro):
            dist.set_grad_sync(model, i == len(micro) - 1)
            batch = {k: v.to(env.device) for k, v in collate(rows, pad_id).items()}
            positions += batch["input_ids"].numel()
            s = -scored_token_logps(model, batch)[0].sum()  # the LM head runs on completion tokens only
            # FSDP averages gradients over ranks; scale by world size so the result is
            # the gradient of (global loss sum / global token count).
            (s * env.world_size / global_tokens).backward()
            loss_sum += s.detach()
        loss = (dist.all_reduce_sum(loss_sum) / global_tokens).item()
        rec = loop.optimizer_step(loss, sum(len(e.input_ids) for mb in micro for e in mb), positions)
        rec["completion_tokens"] = int(global_tokens.item())
        if loop.eval_due(bool(val)):
            rec["eval_loss"] = eval_loss(model, val, t.batch_size, pad_id, env)
        loop.finish_step(rec, postfix={"loss": f"{loss:.4f}", "tok_s": f"{rec['tokens_per_s']:.0f}"})
    loop.close()
    phases["steps"] = time.perf_counter() - t0

    # ---- output
    t0 = time.perf_counter()
    out_dir = layout.checkpoint(name)
    info = {"stage": stage, "steps": loop.step, "base_model": model_path, "tokens_seen": loop.tokens_seen}
    if full_ft:
        checkpoint.save_full_model(model, tokenizer, out_dir)
    else:
        checkpoint.save_adapter(model, tokenizer, out_dir, extra=info)
    phases["save"] = time.perf_counter() - t0
    if env.is_main:
        print(f"[{stage}] saved {out_dir}")
    return loop.result(out_dir, phases=phases)
