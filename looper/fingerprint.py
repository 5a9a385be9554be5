"""What each stage's output is made from: the settings that change its result, flat.

A stage records ``stage_settings(cfg, stage)`` (and digests of its input files) beside its
output: in every resume state (SFT, DPO), in the ``.meta.json`` of a generated file
(rollouts, eval) and in ``pipeline_state.json`` (every pipeline stage). A rerun compares
the recorded settings with the current ones before doing any work, and ``changes`` names
each key that differs with its old and new value.

Input files are compared by digest (``inputs``), not by the setting that names them:
``sft.init_adapter``, ``rollout.adapter``, ``dpo.adapter``, ``dpo.pairs``, ``eval.adapter``.

Not compared, because they do not change a stage's result:
- ``run.output_dir``, ``run.progress``, ``run.device``;
- training: ``eval_every``, ``save_every``, ``keep_last``, ``log_every``, ``resume``,
  ``activation_checkpointing`` (the same gradients), ``dpo.reference`` (precomputed and
  online give the same reference log-probs), and the number of ranks, as long as
  ``grad_accum x ranks`` (the micro-batches of an optimizer step) stays the same;
- generation: ``batch_size`` and ``max_batch_tokens`` (how many sequences share a forward;
  every sample has its own seed), ``rollout.n_questions`` and ``eval.n_questions`` (a count:
  finished records are kept and reused);
- rollouts: the ``regime_w`` settings, since records are rescored with the current ones
  (``looper.regime_w.rescore``) instead of mixing two scorings;
- ``prefs.hist_bins`` (the printed histogram only).

Standard library only.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

from looper.config import Config, to_dict
from looper.io import sha256_files

_TRAIN_NOT_COMPARED = ("eval_every", "save_every", "keep_last", "log_every", "resume", "activation_checkpointing")
_GEN_NOT_COMPARED = ("batch_size", "max_batch_tokens")
_DATA_FOR_TRAINING = ("train", "hf_config", "prompt_template", "prompt_format", "system_prompt", "chat_template_kwargs", "strip_calculator",
                      "max_length", "truncation", "synthetic")
_DATA_FOR_PAIRS = ("max_length", "truncation", "prompt_format", "system_prompt", "chat_template_kwargs")
_DATA_FOR_QUESTIONS = ("train", "hf_config", "prompt_template", "prompt_format", "system_prompt", "chat_template_kwargs", "synthetic")
_DATA_FOR_EVAL = ("test", "hf_config", "prompt_template", "prompt_format", "system_prompt", "chat_template_kwargs", "synthetic")


def flatten(value: dict) -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    return _flat(value, "", {})


def _flat(value: Any, prefix: str, out: dict) -> dict:
    if isinstance(value, dict):
        for k, v in value.items():
            _flat(v, f"{prefix}.{k}" if prefix else str(k), out)
    else:
        out[prefix] = value
    return out


def _section(cfg_dict: dict, name: str, drop: tuple = (), keep: Optional[tuple] = None) -> dict:
    section = cfg_dict.get(name)
    if section is None:
        return {name: None}
    if keep is not None:
        section = {k: v for k, v in section.items() if k in keep}
    return _flat({k: v for k, v in section.items() if k not in drop}, name, {})


def _training(cfg_dict: dict, name: str, world_size: int, drop: tuple = ()) -> dict:
    out = _section(cfg_dict, name, _TRAIN_NOT_COMPARED + ("grad_accum",) + drop)
    t = cfg_dict[name]
    if t is not None:  # a missing optional section (base_train: null) is itself the setting
        out[f"{name}.grad_accum x ranks"] = t["grad_accum"] * world_size
    return out


def stage_settings(cfg: Config, stage: str, world_size: int = 1) -> dict[str, Any]:
    """``{dotted key: value}`` of every setting that changes ``stage``'s output."""
    c = to_dict(cfg)
    model = _section(c, "model")
    seed = {"run.seed": cfg.run.seed}
    if stage == "base":
        return {**model, **_section(c, "data", keep=_DATA_FOR_TRAINING), **_training(c, "base_train", world_size), **seed}
    if stage == "sft":
        return {**model, **_section(c, "lora"), **_section(c, "data", keep=_DATA_FOR_TRAINING),
                **_training(c, "sft", world_size, ("init_adapter",)), **seed}
    if stage == "rollout":
        gen = _section(c["rollout"], "generation", _GEN_NOT_COMPARED)
        first = cfg.rollout.offset + (cfg.pipeline.round - 1) * cfg.rollout.n_questions * cfg.pipeline.fresh_questions
        return {**model, **_section(c, "data", keep=_DATA_FOR_QUESTIONS), "rollout.k": cfg.rollout.k,
                "rollout.dataset": cfg.rollout.dataset, "rollout.first question": first,
                "pipeline.round (sampling seed)": cfg.pipeline.round, **{f"rollout.{k}": v for k, v in gen.items()}}
    if stage == "prefs":
        return {**_section(c, "prefs", ("hist_bins",)), **_section(c, "regime_w"),
                "data.prompt_template": cfg.data.prompt_template}
    if stage == "dpo":
        return {**model, **_section(c, "data", keep=_DATA_FOR_PAIRS),
                **_training(c, "dpo", world_size, ("reference", "adapter", "pairs")), **seed}
    if stage == "eval":
        gen = _section(c["eval"], "generation", _GEN_NOT_COMPARED)
        return {**model, **_section(c, "data", keep=_DATA_FOR_EVAL), "eval.dataset": cfg.eval.dataset,
                **{f"eval.{k}": v for k, v in gen.items()}}
    raise ValueError(f"unknown stage {stage!r}")


def changes(old: dict, new: dict) -> list[tuple[str, Any, Any]]:
    """``[(key, old value, new value)]`` for every key whose value differs (JSON-normalized)."""
    old, new = _normal(old), _normal(new)
    return [(k, old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def describe(diffs: list[tuple[str, Any, Any]], limit: int = 12) -> str:
    """``"sft.lr: 0.003 -> 1e-05; data.train: None -> 'x.jsonl'"``."""
    shown = [f"{k}: {_show(a)} -> {_show(b)}" for k, a, b in diffs[:limit]]
    if len(diffs) > limit:
        shown.append(f"... and {len(diffs) - limit} more")
    return "; ".join(shown)


def _show(v: Any) -> str:
    text = json.dumps(v) if not isinstance(v, str) else repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def _normal(d: dict) -> dict:
    return json.loads(json.dumps(d, sort_keys=True, default=str))


def folder_stamp(path: Optional[str]) -> Optional[list]:
    """A cheap fingerprint of a model folder: each config/weights file's name, size and
    modification time (a hub id, or None, stands for itself)."""
    if path is None or not os.path.isdir(path):
        return None if path is None else [path]
    files = sorted(f for f in os.listdir(path) if f.endswith((".json", ".safetensors", ".bin", ".model")))
    return [(f, os.stat(os.path.join(path, f)).st_size, os.stat(os.path.join(path, f)).st_mtime_ns) for f in files]


def adapter_digest(path: Optional[str]) -> Optional[str]:
    """SHA-256 of a PEFT adapter's config and weights (None for no adapter)."""
    if path is None:
        return None
    files = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
    return sha256_files([os.path.join(path, f) for f in files])[:20]


def file_digest(path: str) -> str:
    return sha256_files([path])[:20]


def rows_digest(rows: list) -> str:
    """SHA-256 of JSON rows (e.g. the SFT data as text), in order."""
    import hashlib

    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()[:20]
