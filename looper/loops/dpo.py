"""Direct Preference Optimization: ``train_dpo(cfg)``, one function, top to bottom.

Policy = base + SFT adapter (trainable); reference = base + SFT adapter (frozen).

Reference log-probs come from one no-grad pass before training (``dpo.reference:
precomputed``), sharded across ranks and cached on disk under a key that hashes the pair
file, the adapter weights, the tokenizer, the length limit and the base model's name and
precision. Because the policy starts as the SFT adapter, that pass runs on the freshly
built policy before any update or resume.
With ``dpo.reference: online`` the frozen adapter stays loaded beside the policy under the
name ``reference`` and is switched in for a no-grad pass at every step.

Chosen and rejected go through one concatenated forward pass. The loss is averaged over
the pairs of the whole optimizer step (all micro-steps, all ranks).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time

import torch

from looper import checkpoint, dist, fingerprint, tracking
from looper.config import Config, ConfigError, save_config
from looper.data import formats
from looper.data.tokenize import PairEncoded, collate_packed_pairs, collate_pairs, encode_pair
from looper.io import DataError, check_writable, iter_jsonl, sha256_files, write_atomic
from looper.layout import RunLayout, holds_run_lock, resolve_adapter
from looper.losses.dpo import dpo_loss, dpo_objective, num_completion_tokens, packed_sequence_logps, preference_metrics
from looper.loops.common import (
    TrainLoop, TrainResult, build_policy, equal_shards, resume_point, scored_logits, scored_token_logps,
    seed_everything, shard, split_val,
)
from looper.models import ensure_model, resolve_dtype

PAIR_FIELDS = ("pair_id", "prompt", "chosen", "rejected")
METRIC_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")


# --------------------------------------------------------------------------- setup helpers


def resolve_inputs(cfg: Config) -> tuple[str, str]:
    """The starting adapter (``auto``: the round's policy, i.e. the SFT adapter in round 1 and
    round r-1's DPO adapter in round r) and the pair file, checked before anything is built."""
    layout = RunLayout.of(cfg)
    adapter = resolve_adapter(layout, cfg.dpo.adapter, "dpo.adapter", auto=layout.policy())
    if adapter is None:
        raise ConfigError("dpo.adapter: DPO needs an adapter to start from (policy and reference both start from it)")
    pairs = cfg.dpo.pairs or layout.preferences()
    if not os.path.exists(pairs):
        raise DataError(f"{pairs}: preference file not found (run `looper prefs` first, or set dpo.pairs)")
    return adapter, pairs


def load_pairs(path: str, tokenizer, max_length: int, mode: str, fmt=None) -> tuple[list[PairEncoded], list[str], int]:
    """Encode every pair; returns examples, pair ids and the number truncated.

    ``fmt`` (``looper.data.formats.resolve``) encodes the completions the way SFT does (with
    the chat template's end-of-turn token in the chat format); None is the template format.

    A pair whose chosen and rejected texts are equal teaches nothing (its loss is a constant
    log 2): it is dropped and counted. A repeated ``pair_id`` is an error naming both lines.
    """
    examples, ids, first_line, identical = [], [], {}, 0
    for lineno, rec in iter_jsonl(path, PAIR_FIELDS):
        for key in ("prompt", "chosen", "rejected"):
            if not isinstance(rec[key], str) or (key != "prompt" and not rec[key].strip()):
                raise DataError(f"{path}:{lineno}: field '{key}' must be a non-empty string")
        pid = str(rec["pair_id"])
        if pid in first_line:
            raise DataError(f"{path}:{lineno}: pair_id {pid!r} repeats line {first_line[pid]}; pair ids must be unique")
        first_line[pid] = lineno
        if rec["chosen"] == rec["rejected"]:
            identical += 1
            continue
        examples.append(encode_pair(tokenizer, rec["prompt"], rec["chosen"], rec["rejected"], max_length, mode,
                                    f"{path}:{lineno}: ", fmt=fmt))
        ids.append(pid)
    if identical and dist.is_main():
        print(f"[dpo] {path}: dropped {identical} pair(s) whose chosen and rejected texts are identical")
    if not examples:
        dropped = f" ({identical} with identical chosen and rejected dropped)" if identical else ""
        raise DataError(f"{path}: zero preference pairs{dropped}; DPO has nothing to learn from")
    return examples, ids, sum(e.truncated for e in examples)


def reference_cache_key(
    pairs_path: str, adapter: str, tokenizer, max_length: int, truncation: str, model_id: str = ""
) -> str:
    """Hash of what the reference log-probs depend on: the pair file, the adapter weights, the
    tokenizer, the length limit and ``model_id`` (the base model and the compute precision)."""
    h = hashlib.sha256()
    sha256_files([pairs_path, os.path.join(adapter, "adapter_model.safetensors")], h)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)).encode())
    h.update(f"{tokenizer.bos_token_id}|{tokenizer.eos_token_id}|{max_length}|{truncation}|{model_id}".encode())
    return h.hexdigest()[:20]


def pair_batch(pairs: list[PairEncoded], pad_id: int, packed: bool, device) -> dict:
    """The batch of ``pairs`` on ``device``: packed rows (``dpo.packed``) or concatenated ones."""
    batch = (collate_packed_pairs if packed else collate_pairs)(pairs, pad_id)
    return {k: v.to(device) for k, v in batch.items()}


def batch_real_tokens(batch: dict) -> int:
    """Positions of the batch that are not padding."""
    return int(batch["real_tokens"]) if "real_tokens" in batch else int(batch["attention_mask"].sum())


def chosen_lengths(batch: dict, n: int) -> torch.Tensor:
    """Chosen completion tokens per pair (the NLL term's normalizer)."""
    return batch["chosen_tokens"] if "chosen_tokens" in batch else num_completion_tokens(batch["labels"][:n])


def pair_logps(model, batch: dict, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) sequence log-probs of a ``pair_batch``, packed or concatenated."""
    return packed_logps(model, batch, n) if "source" in batch else concat_logps(model, batch, n)


def packed_logps(model, batch: dict, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward over ``prompt | chosen | rejected`` rows (``collate_packed_pairs``): the
    prompt is computed once per pair. The LM head runs only at the positions that predict
    a token (the last prompt position predicts one token of each completion)."""
    source = batch["source"]
    keep = torch.zeros(batch["input_ids"].numel(), dtype=torch.bool, device=source.device)
    keep[source] = True
    row_of = keep.cumsum(0) - 1  # flat position -> its row among the kept logits
    logits = scored_logits(model, batch, keep.view_as(batch["input_ids"]))
    logps = packed_sequence_logps(logits, row_of[source], batch["target"], batch["segment"], 2 * n)
    return logps[:n], logps[n:]


def concat_logps(model, batch: dict, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward over chosen+rejected rows; returns (chosen, rejected) sequence log-probs.
    The LM head runs on completion tokens only (``scored_token_logps``)."""
    token_logps, rows = scored_token_logps(model, batch)
    logps = torch.zeros(2 * n, dtype=token_logps.dtype, device=token_logps.device).index_add(0, rows, token_logps)
    return logps[:n], logps[n:]


@torch.no_grad()
def reference_pass(model, examples: list[PairEncoded], batch_size: int, pad_id: int, env: dist.DistEnv,
                   packed: bool = False) -> torch.Tensor:
    """Log-probs ``[n, 2]`` (chosen, rejected) of every pair, sharded across ranks."""
    model.eval()
    # length order: each batch holds rows of similar length, so little padding is computed
    order = sorted(range(len(examples)), key=lambda i: (examples[i].length, i))
    mine: dict[int, tuple[float, float]] = {}
    for pos in equal_shards(len(examples), batch_size, env.rank, env.world_size):
        idx = [order[j] for j in pos]
        batch = pair_batch([examples[i] for i in idx or [0]], pad_id, packed, env.device)
        c, r = pair_logps(model, batch, len(idx or [0]))
        mine.update(zip(idx, zip(c.tolist(), r.tolist())))  # one device sync per batch, not per pair
    model.train()
    merged: dict[int, tuple[float, float]] = {}
    for part in dist.all_gather_object(mine):
        merged.update(part)
    return torch.tensor([merged[i] for i in range(len(examples))], dtype=torch.float64)


def cached_reference(path: str, compute) -> tuple[torch.Tensor, str]:
    """Load the cached log-probs at ``path`` (rank 0 reads, then broadcasts), or compute them
    on all ranks and save them from rank 0. The decision is rank 0's, so every rank takes
    the same path. Returns the log-probs and ``"cached"`` or ``"computed"``."""
    from safetensors.torch import load_file, save_file

    if dist.broadcast_object(os.path.exists(path) if dist.is_main() else None):
        return dist.broadcast_object(load_file(path)["logps"] if dist.is_main() else None), "cached"
    logps = compute()
    if dist.is_main():
        write_atomic(path, lambda tmp: save_file({"logps": logps}, tmp))
    dist.barrier()
    return logps, "computed"


@contextlib.contextmanager
def reference_adapter(model):
    """Online mode: switch the frozen ``reference`` adapter in, then the policy back.

    peft's ``set_adapter`` marks the activated adapter trainable; we switch with
    ``inference_mode`` and assert that the trainable set is unchanged afterwards. The
    reference forward runs in eval mode (no LoRA dropout), as the precomputed pass does.
    """
    before = {n for n, p in model.named_parameters() if p.requires_grad}
    was_training = model.training
    model.base_model.set_adapter("reference", inference_mode=True)
    model.eval()  # the reference is deterministic: no LoRA dropout, and no RNG draws
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)
        model.base_model.set_adapter("default", inference_mode=True)
        for n, p in model.named_parameters():
            p.requires_grad_(n in before)
        after = {n for n, p in model.named_parameters() if p.requires_grad}
        assert after == before, "the trainable parameter set changed across a reference pass"


def pair_metrics(model, examples, ref, idx: list[int], pad_id: int, env, beta: float, ls: float,
                 packed: bool = False) -> dict[str, torch.Tensor]:
    """Summed loss and preference metrics for the pairs ``idx`` (no grad)."""
    batch = pair_batch([examples[i] for i in idx], pad_id, packed, env.device)
    c, r = pair_logps(model, batch, len(idx))
    ref_c, ref_r = ref[idx, 0].to(c), ref[idx, 1].to(c)
    losses, cr, rr = dpo_loss(c, r, ref_c, ref_r, beta=beta, label_smoothing=ls)
    out = {k: v.sum() for k, v in preference_metrics(cr, rr, c, r).items()}
    out["loss"] = losses.detach().sum()
    return out


@torch.no_grad()
def eval_pairs(model, examples, ref, batch_size: int, pad_id: int, env, beta: float, ls: float,
               packed: bool = False) -> dict[str, float]:
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    for idx in equal_shards(len(examples), batch_size, env.rank, env.world_size):
        m = pair_metrics(model, examples, ref, idx or [0], pad_id, env, beta, ls, packed)
        for k, v in m.items():
            sums[k] = sums.get(k, 0) + (0 * v if not idx else v)
    model.train()
    return {f"eval/{k}": (dist.all_reduce_sum(v) / len(examples)).item() for k, v in sums.items()}


def use_packed(cfg: Config, device: torch.device) -> bool:
    """``dpo.packed``: true, false, or auto, which packs where it was measured faster.

    On CPU, packed rows ran 1.07-1.35x the pairs/s of concatenated ones for pairs of 350 to
    2,300 tokens (``benchmarks/dpo_throughput.py --packed``); on GPU it has not been
    measured, and the dense mask keeps sdpa off its flash kernel, so auto packs on CPU only.
    Packing needs sdpa attention (a 4-D block mask): true with another one is a
    ``ConfigError``, auto falls back to concatenated rows.
    """
    mode = cfg.dpo.packed
    sdpa = cfg.model.attn_implementation in (None, "sdpa")
    if mode is True and not sdpa:
        raise ConfigError(
            f"dpo.packed needs model.attn_implementation: sdpa (its 4-D block mask), got {cfg.model.attn_implementation!r}"
        )
    if mode == "auto":
        return sdpa and device.type == "cpu"
    return bool(mode)


def reference_model_id(cfg: Config, model_path: str, device: torch.device, packed: bool = False) -> str:
    """What makes one adapter a different reference: the base model it is applied to (name,
    revision, the local config and weight files' sizes and dates), the compute precision, and
    how completions are encoded (the prompt format)."""
    stamp = fingerprint.folder_stamp(model_path)
    parts = [model_path, cfg.model.revision, str(resolve_dtype(cfg.model.dtype, device)), stamp,
             cfg.data.prompt_format, cfg.data.system_prompt]
    if cfg.data.chat_template_kwargs:
        parts.append(cfg.data.chat_template_kwargs)
    if packed:  # the same log-probs to ~1e-6, computed in another order
        parts.append("packed")
    # the forward that computes them: the LM head on scored positions, the fused LoRA layer
    # (same values in fp32, other roundings in bf16); a cache from another one is not reused
    parts.append("logps-v2")
    return json.dumps(parts)


# --------------------------------------------------------------------------- the loop


@holds_run_lock
def train_dpo(cfg: Config) -> TrainResult:
    """Train the policy adapter with DPO and save ``checkpoints/<dpo.output_name>``.

    Returns a ``TrainResult`` (``.output_dir`` is the saved adapter).
    """
    t0 = time.perf_counter()
    t = cfg.dpo
    env = dist.init_distributed(cfg.run.device)
    layout = RunLayout.of(cfg)
    adapter, pairs_path = resolve_inputs(cfg)
    packed = use_packed(cfg, env.device)
    name = layout.dpo_output_name()  # dpo.output_name in round 1, <stem>_r<r>_lora after
    model_path = ensure_model(cfg, announce=True)

    # ---- what this output is made of; a resume must match it (checked before any work)
    identity = {
        "settings": fingerprint.stage_settings(cfg, "dpo", env.world_size),
        "inputs": {"model": fingerprint.folder_stamp(model_path), "adapter": fingerprint.adapter_digest(adapter),
                   "pairs": fingerprint.file_digest(pairs_path)},
    }
    check_writable([layout.checkpoint(name), layout.resume(name), layout.metrics("dpo"), layout.config("dpo"), layout.cache])
    resume_from = resume_point(t, layout.resume(name), identity, "dpo")
    tracker = tracking.for_stage(cfg, layout, layout.stage_name("dpo"))  # a missing tracker package fails here
    seed_everything(t.seed)
    if env.is_main:
        save_config(cfg, layout.config("dpo"))

    # ---- model, data
    model, tokenizer = build_policy(cfg, env, model_path, adapter=adapter, lora=None)
    examples, pair_ids, n_truncated = load_pairs(
        pairs_path, tokenizer, cfg.data.max_length, cfg.data.truncation, fmt=formats.resolve(tokenizer, cfg.data),
    )
    if t.reference == "online":
        # creating the adapter's layers draws random init weights: keep them off the RNG
        # stream, so LoRA dropout in training sees the same masks as with a precomputed reference
        with torch.random.fork_rng(devices=[]):
            model.load_adapter(adapter, adapter_name="reference", is_trainable=False)
        model.base_model.set_adapter("default", inference_mode=False)
    model = shard(model, env, t.activation_checkpointing, resolve_dtype(cfg.model.dtype, env.device))
    pad_id = tokenizer.pad_token_id
    phases = {"setup": time.perf_counter() - t0}

    # ---- reference log-probs: the policy is still exactly the starting adapter here
    t0 = time.perf_counter()
    model_id = reference_model_id(cfg, model_path, env.device, packed)
    key = reference_cache_key(pairs_path, adapter, tokenizer, cfg.data.max_length, cfg.data.truncation, model_id)
    ref, reference = None, None
    if t.reference == "precomputed":
        ref, reference = cached_reference(
            layout.reference_cache(key), lambda: reference_pass(model, examples, t.batch_size, pad_id, env, packed),
        )
    train_idx, val_idx = split_val(list(range(len(examples))), t.val_size, cfg.run.seed, "dpo.val_size")
    val = [examples[i] for i in val_idx]
    val_ref = ref[val_idx] if ref is not None and val_idx else None
    if t.reference == "online" and val_idx:
        with reference_adapter(model):  # held-out metrics only: just the held-out pairs
            val_ref = reference_pass(model, val, t.batch_size, pad_id, env, packed)
    train = [examples[i] for i in train_idx]
    train_ref = ref[train_idx] if ref is not None else None
    phases["reference"] = time.perf_counter() - t0

    # ---- optimizer, schedule, resume
    t0 = time.perf_counter()
    loop = TrainLoop(
        model=model, lengths=[e.length for e in train], t=t, env=env, resume_dir=layout.resume(name),
        metrics_path=layout.metrics("dpo"), desc="dpo", trainable_only=True, show_progress=cfg.run.progress,
        identity={**identity, "reference_key": key}, resume_from=resume_from, tracker=tracker,
    )
    if env.is_main:
        print(
            f"[{layout.stage_name('dpo')}] {len(train)} train / {len(val)} val pairs ({n_truncated} truncated), {loop.n_steps} steps of "
            f"{t.batch_size}x{t.grad_accum}x{env.world_size} pairs, reference {t.reference} (key {key}), "
            f"adapter {adapter}" + (f", resuming at step {loop.step}" if loop.step else "")
        )
    phases["setup"] += time.perf_counter() - t0

    t0 = time.perf_counter()
    model.train()
    while not loop.done:
        micro = loop.micro_batches()
        global_pairs = dist.all_reduce_sum(torch.tensor(float(sum(map(len, micro))), device=env.device))
        sums = {k: torch.zeros((), device=env.device) for k in ("loss", "nll", *METRIC_KEYS)}
        local_tokens, positions = 0, 0
        for i, idx in enumerate(micro):
            rows = [train[j] for j in idx]
            batch = pair_batch(rows, pad_id, packed, env.device)
            local_tokens += batch_real_tokens(batch)
            positions += batch["input_ids"].numel()
            if t.reference == "online":
                with reference_adapter(model):
                    ref_c, ref_r = pair_logps(model, batch, len(idx))
            else:
                ref_c, ref_r = train_ref[idx, 0].to(env.device), train_ref[idx, 1].to(env.device)
            dist.set_grad_sync(model, i == len(micro) - 1)
            pol_c, pol_r = pair_logps(model, batch, len(idx))
            out = dpo_objective(
                pol_c, pol_r, ref_c, ref_r, chosen_lengths(batch, len(idx)), beta=t.beta,
                label_smoothing=t.label_smoothing, dpop_lambda=t.dpop_lambda, nll_weight=t.nll_weight,
            )
            # FSDP averages gradients over ranks: scale so the result is d(mean over global pairs)
            (out["total"].sum() * env.world_size / global_pairs).backward()
            sums["loss"] += out["dpo"].detach().sum()
            sums["nll"] += out["nll"].detach().sum()
            for k, v in preference_metrics(out["chosen_rewards"], out["rejected_rewards"], pol_c, pol_r).items():
                sums[k] += v.sum()
        # one collective and one device sync for all the step's metrics
        means = dict(zip(sums, (dist.all_reduce_sum(torch.stack(list(sums.values()))) / global_pairs).tolist()))
        rec = loop.optimizer_step(means.pop("loss"), local_tokens, positions)
        rec.update(means)
        if loop.eval_due(bool(val)):
            rec.update(eval_pairs(model, val, val_ref, t.batch_size, pad_id, env, t.beta, t.label_smoothing, packed))
        postfix = {"loss": f"{rec['loss']:.4f}", "acc": f"{rec['rewards/accuracies']:.2f}",
                   "margin": f"{rec['rewards/margins']:.3f}"}
        loop.finish_step(rec, postfix)
    loop.close()
    phases["steps"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    out_dir = layout.checkpoint(name)
    info = {"stage": layout.stage_name("dpo"), "steps": loop.step, "base_model": model_path, "start_adapter": adapter,
            "reference_adapter": adapter, "beta": t.beta}
    checkpoint.save_adapter(model, tokenizer, out_dir, extra=info, adapter_name="default")
    phases["save"] = time.perf_counter() - t0
    if env.is_main:
        print(f"[{layout.stage_name('dpo')}] saved {out_dir}")
    return loop.result(out_dir, phases=phases, reference=reference)
