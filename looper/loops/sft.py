"""Supervised fine-tuning: ``train_sft(cfg)``, one function, top to bottom.

LoRA (``cfg.lora``) or full fine-tuning (``lora: null``), sharded with FSDP2 through
``looper.dist``. The loss is the sum of completion-token cross-entropies divided by the
number of completion tokens in the whole optimizer step (all accumulation micro-steps on
all ranks), so it does not depend on how the global batch is split.
"""

from __future__ import annotations


import torch

from looper import checkpoint, dist, paths
from looper.config import Config, save_config
from looper.data.gsm8k import format_completion, format_prompt, load_questions
from looper.data.tokenize import Encoded, MicroBatches, collate, encode_sft_rows
from looper.io import DataError
from looper.losses.sft import masked_cross_entropy
from looper.loops.common import (
    accepts_logits_to_keep,
    build_optimizer,
    build_policy,
    check_finite,
    equal_shards,
    loss_logits,
    lr_lambda,
    seed_everything,
    shard,
    split_val,
    stage_dirs,
    total_steps,
    trainable_params,
)
from looper.metrics import MetricsLog, Throughput, progress


def load_sft_examples(cfg: Config, tokenizer) -> tuple[list[Encoded], list[Encoded], int]:
    """Tokenized train and held-out examples, and how many rows were truncated."""
    rows = load_questions(cfg.data.train, "train", cfg.data)
    texts = [
        {
            "question_id": r["question_id"],
            "prompt": format_prompt(r["question"], cfg.data.prompt_template),
            "completion": format_completion(r["answer"], cfg.data.strip_calculator),
        }
        for r in rows
    ]
    train_rows, val_rows = split_val(texts, cfg.data.val_size, cfg.run.seed)
    train, n_trunc = encode_sft_rows(tokenizer, train_rows, cfg.data.max_length, cfg.data.truncation)
    val, n_trunc_val = encode_sft_rows(tokenizer, val_rows, cfg.data.max_length, cfg.data.truncation)
    if not train:
        raise DataError(f"the SFT dataset ({cfg.data.train or 'synthetic'}) has no training rows")
    return train, val, n_trunc + n_trunc_val


@torch.no_grad()
def eval_loss(
    model, examples: list[Encoded], batch_size: int, pad_id: int, env: dist.DistEnv, trim: bool = False
) -> float:
    """Mean completion-token loss over ``examples``, sharded across ranks."""
    model.eval()
    loss_sum = torch.zeros((), device=env.device)
    tokens = torch.zeros((), device=env.device)
    for idx in equal_shards(len(examples), batch_size, env.rank, env.world_size):
        empty = not idx  # FSDP forwards are collective: every rank runs the same count
        batch = {k: v.to(env.device) for k, v in collate([examples[i] for i in idx or [0]], pad_id).items()}
        s, n = masked_cross_entropy(*loss_logits(model, batch, trim))
        loss_sum += 0 if empty else s
        tokens += 0 if empty else n
    model.train()
    return (dist.all_reduce_sum(loss_sum) / dist.all_reduce_sum(tokens).clamp(min=1)).item()


def train_sft(cfg: Config, stage: str = "sft") -> str:
    """Train and save ``checkpoints/<sft.output_name>``; returns that folder.

    ``stage`` names the metrics file (``metrics/<stage>.jsonl``) and the saved config.
    """
    t = cfg.sft
    env = dist.init_distributed(cfg.run.device)
    seed_everything(t.seed)
    dirs = stage_dirs(cfg, t.output_name, stage)
    full_ft = cfg.lora is None and t.init_adapter is None
    if env.is_main:
        save_config(cfg, paths.resolved_config_path(cfg, stage))

    # ---- model, data, optimizer
    model, tokenizer, base_path = build_policy(cfg, env, adapter=t.init_adapter, trainable=True)
    train, val, n_truncated = load_sft_examples(cfg, tokenizer)
    trim = accepts_logits_to_keep(model)  # skip the LM head on the shared prompt prefix
    model = shard(model, env, t.activation_checkpointing)
    params = trainable_params(model)
    optimizer = build_optimizer(params, t, env.device)
    batches = MicroBatches([len(e.input_ids) for e in train], t.batch_size, t.grad_accum * env.world_size, t.seed)
    n_steps = total_steps(t, batches.steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t, n_steps))
    pad_id = tokenizer.pad_token_id

    # ---- resume
    step, tokens_seen, last_ckpt = 0, 0, None
    resume_from = checkpoint.find_resume_state(t.resume, dirs["resume"])
    if resume_from is not None:
        state = checkpoint.load_resume_state(resume_from, model, optimizer, trainable_only=not full_ft)
        scheduler.load_state_dict(state["scheduler"])
        step, tokens_seen, last_ckpt = state["step"], state["tokens_seen"], resume_from
    metrics = MetricsLog(paths.metrics_path(cfg, stage), resume_step=step)
    if env.is_main:
        print(
            f"[{stage}] {len(train)} train / {len(val)} val examples ({n_truncated} truncated), "
            f"{n_steps} steps of {t.batch_size}x{t.grad_accum}x{env.world_size} rows, "
            f"{sum(p.numel() for p in params):,} trainable params, base {base_path}"
            + (f", resuming at step {step}" if step else "")
        )

    # ---- loop
    bar = progress(n_steps, stage, cfg.run.progress, initial=step)
    clock = Throughput()
    model.train()
    while step < n_steps:
        micro = [[train[i] for i in mb] for mb in batches.for_rank(step, env.rank, env.world_size)]
        local_tokens = sum(sum(l != -100 for l in e.labels[1:]) for mb in micro for e in mb)
        global_tokens = dist.all_reduce_sum(torch.tensor(float(local_tokens), device=env.device))
        loss_sum = torch.zeros((), device=env.device)
        for i, rows in enumerate(micro):
            dist.set_grad_sync(model, i == len(micro) - 1)
            batch = {k: v.to(env.device) for k, v in collate(rows, pad_id).items()}
            s, _ = masked_cross_entropy(*loss_logits(model, batch, trim))
            # FSDP averages gradients over ranks; scale by world size so the result is
            # the gradient of (global loss sum / global token count).
            (s * env.world_size / global_tokens).backward()
            loss_sum += s.detach()
        loss = (dist.all_reduce_sum(loss_sum) / global_tokens).item()
        check_finite(loss, step + 1, "loss", last_ckpt)
        grad_norm = dist.clip_grad_norm(params, t.max_grad_norm).item()
        check_finite(grad_norm, step + 1, "gradient norm", last_ckpt)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        step += 1

        local_all = float(sum(len(e.input_ids) for mb in micro for e in mb))
        step_tokens = int(dist.all_reduce_sum(torch.tensor(local_all, device=env.device)).item())
        tokens_seen += step_tokens
        rec = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens_seen,
               "completion_tokens": int(global_tokens.item()), "tokens_per_s": clock.step(step_tokens)}
        if (t.eval_every and step % t.eval_every == 0 or step == n_steps) and val:
            rec["eval_loss"] = eval_loss(model, val, t.batch_size, pad_id, env, trim)
            clock.reset()
        if step % t.log_every == 0 or step == n_steps or "eval_loss" in rec:
            metrics.log(rec)
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}")
        bar.update(1)

        if (t.save_every and step % t.save_every == 0) or step == n_steps:
            trainer_state = {"scheduler": scheduler.state_dict(), "tokens_seen": tokens_seen}
            last_ckpt = checkpoint.save_resume_state(
                dirs["resume"], step, model, optimizer, trainer_state, trainable_only=not full_ft, keep_last=t.keep_last
            )
            clock.reset()
    bar.close()
    metrics.close()

    # ---- output
    info = {"stage": stage, "steps": step, "base_model": base_path, "tokens_seen": tokens_seen}
    if full_ft:
        checkpoint.save_full_model(model, tokenizer, dirs["out"])
    else:
        checkpoint.save_adapter(model, tokenizer, dirs["out"], extra=info)
    if env.is_main:
        print(f"[{stage}] saved {dirs['out']}")
    return dirs["out"]
