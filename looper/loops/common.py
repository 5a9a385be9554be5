"""What the training loops (SFT, DPO) share: model setup, the optimizer-step skeleton
(``TrainLoop``) and small helpers. The loops themselves stay flat, top to bottom.
"""

from __future__ import annotations

import functools
import inspect
import math
import random
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from looper import checkpoint, dist
from looper.config import Config, ConfigError, LoraConfig, TrainConfig
from looper.data.tokenize import IGNORE_INDEX, MicroBatches
from looper.losses.sft import row_token_logps
from looper.metrics import MetricsLog, Throughput, progress
from looper.models import attach_lora, decoder_layers, load_adapter, load_base_model, load_tokenizer, quiet_transformers, resolve_dtype


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_policy(cfg: Config, env: dist.DistEnv, path: str, adapter: Optional[str], lora: Optional[LoraConfig]):
    """The model at ``path`` (+ a trainable existing ``adapter``, or a new LoRA from ``lora``,
    or neither: full fine-tuning). Every rank builds the same initial weights (same seed).
    Returns ``(model, tokenizer)``, not yet sharded.
    """
    quiet_transformers()
    tokenizer = load_tokenizer(path, cfg.model)
    full_ft = adapter is None and lora is None
    # compute dtype: model.dtype (auto: bf16 on GPU, fp32 on CPU); FSDP gathers in it (shard).
    # LoRA: the frozen base is stored in the compute dtype, the trainable adapter in fp32.
    # Full fine-tuning keeps fp32 master weights and computes in the compute dtype.
    compute_dtype = resolve_dtype(cfg.model.dtype, env.device)
    dtype = torch.float32 if full_ft else compute_dtype
    model = load_base_model(path, cfg.model, device="cpu", dtype=dtype)
    if adapter is not None:
        model = load_adapter(model, adapter, trainable=True)
    elif lora is not None:
        torch.manual_seed(cfg.run.seed)  # identical LoRA init on every rank
        model = attach_lora(model, lora)
    if not full_ft:
        for p in model.parameters():  # trainable adapter weights always in fp32
            if p.requires_grad:
                p.data = p.data.float()
        from looper.lora import fuse_lora_linears

        fuse_lora_linears(model)  # same adapter and numbers, a faster forward
    return model, tokenizer


def enable_activation_checkpointing(model) -> None:
    """Recompute each decoder layer in the backward (non-reentrant), by the name this
    transformers gives it (``activation_checkpointing_enable`` from 5.24, before that
    ``gradient_checkpointing_enable``, which 5.25 deprecates)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()


def shard(model, env: dist.DistEnv, activation_checkpointing: bool, compute_dtype: Optional[torch.dtype] = None):
    """Activation checkpointing (optional), then FSDP2 with the mixed precision of
    ``compute_dtype`` (``resolve_dtype(cfg.model.dtype, device)``; None: the device default)."""
    if activation_checkpointing:
        enable_activation_checkpointing(model)
    model.to(env.device)
    return dist.shard_model(model, decoder_layers(model), env.device, compute_dtype=compute_dtype)


def trainable_params(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def build_optimizer(params, t: TrainConfig) -> torch.optim.Optimizer:
    if not params:
        raise ValueError("no trainable parameters")
    # fused: one kernel for all parameters, on CPU as on GPU. With FSDP2's DTensor parameters
    # this is one op to shard-propagate at the first step, where foreach is nine (0.26 s
    # against 0.07 s on the SFT benchmark's LoRA, then 3.8 against 2.0 ms a step).
    return torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay, fused=True)


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


def split_val(rows: list, val_size: int, seed: int, key: str = "val_size") -> tuple[list, list]:
    """A deterministic held-out split of ``val_size`` rows (0 = none), drawn with ``seed``."""
    if val_size <= 0:
        return rows, []
    if val_size >= len(rows):
        from looper.io import DataError

        raise DataError(f"{key}={val_size} leaves no training rows out of {len(rows)}")
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


def keeps_logits_by_mask(model) -> bool:
    """Whether the (PEFT-wrapped) causal LM takes ``logits_to_keep`` as a boolean ``[B, T]``
    mask: it then runs its LM head on the kept positions only and returns logits ``[N, V]``.
    Transformers' causal LMs slice with ``slice_logits_to_keep``, which does this; a model
    with its own slicing (remote code, older releases) is given no mask. Answered once per
    model class, so calling it at every forward costs nothing."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _slices_logits_by_mask(type(base))


@functools.lru_cache(maxsize=None)
def _slices_logits_by_mask(cls: type) -> bool:
    try:
        takes = "logits_to_keep" in inspect.signature(cls.forward).parameters
        return takes and "slice_logits_to_keep(" in inspect.getsource(cls.forward)
    except (TypeError, ValueError, OSError):
        return False


def scored_logits(model, batch: dict, keep: torch.Tensor) -> torch.Tensor:
    """One forward over ``batch`` (``input_ids``, ``attention_mask``, optional
    ``position_ids``); returns the logits ``[N, V]`` of the positions where ``keep``
    ``[B, T]`` is True, in row-major order. Where the model allows it
    (``keeps_logits_by_mask``), the LM head runs on those positions only: prompt and
    padding positions never reach the vocabulary projection, and no ``[B, T, V]`` tensor
    is built.

    A right-padding mask (``[B, T]``, each row ones then zeros) is not passed on: under
    causal attention a real token never sees the padding after it, so only the outputs at
    padded positions change, and those are never kept. The model then attends with its
    plain causal mask (sdpa's ``is_causal`` kernels, which skip the masked blocks) instead
    of a ``[B, 1, T, T]`` mask built from the padding. Other masks go to the model as they
    are."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    mask = inputs.get("attention_mask")
    if mask is not None and mask.dim() == 2 and bool((mask[:, 1:] <= mask[:, :-1]).all() & (mask[:, 0] > 0).all()):
        del inputs["attention_mask"]
    if keeps_logits_by_mask(model):
        return model(**inputs, logits_to_keep=keep).logits
    return model(**inputs).logits[keep]


def scored_token_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of the scored tokens of ``batch`` (``labels[b, t + 1] !=
    IGNORE_INDEX``, predicted at position ``t``) and the batch row of each, in row-major
    order, from one forward (``scored_logits``). Returns ``(token_logps [N], rows [N])``;
    differentiable in the model's parameters."""
    labels = batch["labels"]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    rows, cols = keep.nonzero(as_tuple=True)
    return row_token_logps(scored_logits(model, batch, keep), labels[rows, cols + 1]), rows


# --------------------------------------------------------------------------- the step skeleton


@dataclass
class TrainResult:
    """What a training stage returns: where it saved, and how its time went.

    ``step_seconds`` / ``step_cpu_seconds``: wall and process CPU time of each optimizer step
    (forward, backward, optimizer; not evaluation or saving); ``step_tokens`` /
    ``step_positions``: real tokens and computed positions (padding included) of each step,
    summed over ranks. ``phases``: seconds spent in setup, the reference pass (DPO), the
    steps and the final save. ``reference``: ``computed`` or ``cached`` (DPO, precomputed).
    """

    output_dir: str
    steps: int
    resumed_from: Optional[str] = None
    step_seconds: list[float] = field(default_factory=list)
    step_cpu_seconds: list[float] = field(default_factory=list)
    step_tokens: list[int] = field(default_factory=list)
    step_positions: list[int] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)
    reference: Optional[str] = None


class TrainLoop:
    """The optimizer-step skeleton of both training loops, so a fix lands in both.

    The loop owns its forward and backward passes; around them this object does, in order:
    resume (``__init__``), then at each step ``optimizer_step`` (reduce the step's loss,
    check it is finite, clip, step, schedule, count tokens and time) and ``finish_step``
    (log, progress bar, resume state). Evaluation is the loop's own call, made when
    ``eval_due`` says so; a step that evaluated is always logged.
    """

    def __init__(
        self, *, model, lengths: list[int], t: TrainConfig, env: dist.DistEnv, resume_dir: str,
        metrics_path: str, desc: str, trainable_only: bool, show_progress: bool = True,
        identity: Optional[dict] = None, resume_from: Optional[str] = None, tracker=None,
    ):
        """``model`` is sharded; ``lengths`` are the training examples' token counts (they
        group examples of similar length into micro-batches); ``resume_from`` is the state
        ``resume_point`` chose; ``identity`` is recorded in every resume state written;
        ``tracker`` (``looper.tracking.for_stage``) receives what the metrics log writes."""
        self.model, self.t, self.env = model, t, env
        self.params = trainable_params(model)
        self.batches = MicroBatches(lengths, t.batch_size, t.grad_accum * env.world_size, t.seed)
        self.n_steps = n_steps = total_steps(t, self.batches.steps_per_epoch)
        self.resume_dir, self.desc, self.trainable_only = resume_dir, desc, trainable_only
        self.identity = identity or {}  # saved in every resume state, checked on resume
        self.optimizer = build_optimizer(self.params, t)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(t, n_steps))
        self.step, self.tokens_seen, self.last_ckpt = 0, 0, None
        self.resumed_from = resume_from
        if self.resumed_from is not None:
            state = checkpoint.load_resume_state(self.resumed_from, model, self.optimizer, trainable_only)
            self.scheduler.load_state_dict(state["scheduler"])
            self.step, self.tokens_seen, self.last_ckpt = state["step"], state["tokens_seen"], self.resumed_from
        self.metrics = MetricsLog(metrics_path, resume_step=self.step, tracker=tracker)
        self.bar = progress(n_steps, desc, initial=self.step, enabled=show_progress)
        self.clock = Throughput()
        self.result_steps: dict[str, list] = {"wall": [], "cpu": [], "tokens": [], "positions": []}
        self._t0, self._c0 = time.perf_counter(), time.process_time()

    @property
    def done(self) -> bool:
        return self.step >= self.n_steps

    def micro_batches(self) -> list[list[int]]:
        """This rank's micro-batches of the coming step (example indices)."""
        return self.batches.for_rank(self.step, self.env.rank, self.env.world_size)

    @property
    def trainable_count(self) -> int:
        return sum(p.numel() for p in self.params)

    def optimizer_step(self, loss: float, local_tokens: int, local_positions: int) -> dict:
        """Finite check, clip, optimizer and scheduler step; returns the step's base record.

        ``loss`` is already reduced over the global batch; the token counts are this rank's.
        """
        check_finite(loss, self.step + 1, "loss", self.last_ckpt)
        grad_norm = dist.clip_grad_norm(self.params, self.t.max_grad_norm).item()
        check_finite(grad_norm, self.step + 1, "gradient norm", self.last_ckpt)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.step += 1
        counts = torch.tensor([float(local_tokens), float(local_positions)], device=self.env.device)
        tokens, positions = (int(v) for v in dist.all_reduce_sum(counts).tolist())
        self.tokens_seen += tokens
        wall, cpu = time.perf_counter() - self._t0, time.process_time() - self._c0
        for k, v in zip(("wall", "cpu", "tokens", "positions"), (wall, cpu, tokens, positions)):
            self.result_steps[k].append(v)
        return {"step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": self.tokens_seen,
                "tokens_per_s": self.clock.step(tokens)}

    def eval_due(self, have_val: bool) -> bool:
        every = self.t.eval_every
        return have_val and ((every and self.step % every == 0) or self.step == self.n_steps)

    def finish_step(self, rec: dict, postfix: dict, trainer_state: Optional[dict] = None) -> None:
        """Log (every ``log_every`` steps, the last step, and any step that evaluated), update
        the progress bar, and write a resume state when one is due."""
        evaluated = any(k == "eval_loss" or k.startswith("eval/") for k in rec)
        if self.step % self.t.log_every == 0 or self.step == self.n_steps or evaluated:
            self.metrics.log(rec)
        self.bar.set_postfix(**postfix)
        self.bar.update(1)
        if (self.t.save_every and self.step % self.t.save_every == 0) or self.step == self.n_steps:
            state = {"scheduler": self.scheduler.state_dict(), "tokens_seen": self.tokens_seen, **self.identity,
                     **(trainer_state or {})}
            self.last_ckpt = checkpoint.save_resume_state(
                self.resume_dir, self.step, self.model, self.optimizer, state,
                trainable_only=self.trainable_only, keep_last=self.t.keep_last,
            )
        self.clock.reset()  # evaluation, logging and saving are not part of the next step's time
        self._t0, self._c0 = time.perf_counter(), time.process_time()

    def close(self) -> None:
        self.bar.close()
        self.metrics.close()

    def result(self, output_dir: str, **kw) -> TrainResult:
        r = self.result_steps
        return TrainResult(
            output_dir=output_dir, steps=self.step, resumed_from=self.resumed_from, step_seconds=r["wall"],
            step_cpu_seconds=r["cpu"], step_tokens=r["tokens"], step_positions=r["positions"], **kw,
        )


def resume_point(t: TrainConfig, resume_dir: str, identity: dict, key: str) -> Optional[str]:
    """The resume state a run continues from (None: from the start), decided before any work.

    ``{key}.resume``: ``auto`` takes the newest intact state (a damaged one, e.g. with a
    missing shard file, is skipped with a note, falling back to the one kept before it);
    ``none`` starts over; a path must be an intact state. The state's recorded ``identity``
    (settings and input digests) must equal the current one: a changed setting is a
    ``ConfigError`` naming each key with its old and new value.
    """
    if t.resume == "none":
        return None
    explicit = t.resume != "auto"
    candidates = [checkpoint.find_resume_state(t.resume, resume_dir)] if explicit else checkpoint.list_resume_states(resume_dir)[::-1]
    for path in candidates:
        problem = checkpoint.damage(path)
        if problem and explicit:
            raise ConfigError(f"{key}.resume: {path} is damaged ({problem})")
        if problem:
            if dist.is_main():
                print(f"[{key}] resume state {path} is damaged ({problem}); falling back to the one before it")
            continue
        _check_identity(path, identity, key)
        return path
    if candidates and dist.is_main():
        print(f"[{key}] no intact resume state under {resume_dir}; starting from step 0")
    return None


def _check_identity(resume_from: str, identity: dict, key: str) -> None:
    """A resume state continues one run: its recorded settings and inputs must be today's."""
    from looper.fingerprint import changes, describe

    saved = checkpoint.read_trainer_state(resume_from)
    diffs = []
    for name, value in identity.items():
        old = saved.get(name)
        if old is None:
            continue  # a state written before this was recorded
        if isinstance(value, dict) and isinstance(old, dict):
            diffs += changes(old, value)
        elif changes({name: old}, {name: value}):
            diffs.append((name, old, value))
    if diffs:
        raise ConfigError(
            f"{key}: the resume state {resume_from} was made with other settings or inputs ({describe(diffs)}). "
            f"Restore them to continue it; set {key}.resume=none to start over (in the pipeline: --force "
            f"{'base' if key == 'base_train' else key}); or write to another output name"
        )
