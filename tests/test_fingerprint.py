"""looper.fingerprint: which settings make up each stage's output, and how a difference is named.

``stage_settings`` decides what a rerun compares before it resumes, skips or refuses: a key
left out would let a changed setting silently mix two results; a key put in would refuse a
harmless change (a logging interval, a batch size of generation). Torch-free, fast.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import subprocess_env
from looper.config import load_config
from looper.fingerprint import changes, describe, flatten, stage_settings

STAGES = ("base", "sft", "rollout", "prefs", "dpo", "eval")


def cfg(*overrides: str):
    # base_train set, so every stage (the tiny model's base stage too) has settings
    return load_config(None, ["base_train={max_steps: 10, lr: 1.0e-3}", *overrides])


def test_the_module_imports_without_torch():
    code = "import sys, looper.fingerprint; assert 'torch' not in sys.modules, 'torch was imported'"
    proc = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# --------------------------------------------------------------------------- what each stage compares

# (stage, keys that change its result, keys that must not be compared)
EXPECTED = {
    "base": (
        ["model.name_or_path", "model.tiny.hidden_size", "base_train.lr", "base_train.max_steps",
         "base_train.grad_accum x ranks", "data.max_length", "data.synthetic.seed", "run.seed"],
        ["base_train.log_every", "base_train.save_every", "base_train.eval_every", "base_train.keep_last",
         "base_train.resume", "base_train.activation_checkpointing", "base_train.grad_accum", "lora.r", "sft.lr",
         "run.progress", "run.output_dir", "run.device"],
    ),
    "sft": (
        ["sft.lr", "sft.max_steps", "sft.batch_size", "sft.seed", "sft.val_size", "sft.warmup_steps",
         "sft.output_name", "lora.r", "lora.alpha", "lora.dropout", "lora.target_modules", "data.train",
         "data.prompt_template", "data.max_length", "data.truncation", "data.strip_calculator",
         "data.synthetic.seed", "data.synthetic.n_train", "model.name_or_path", "model.dtype", "run.seed",
         "sft.grad_accum x ranks"],
        ["sft.log_every", "sft.save_every", "sft.eval_every", "sft.keep_last", "sft.resume",
         "sft.activation_checkpointing", "sft.grad_accum", "sft.init_adapter", "run.progress", "run.output_dir",
         "run.device", "data.test", "dpo.lr", "rollout.k", "regime_w.w_end"],
    ),
    "rollout": (
        ["rollout.k", "rollout.dataset", "rollout.generation.temperature", "rollout.generation.top_p",
         "rollout.generation.max_new_tokens", "rollout.generation.seed", "model.name_or_path", "data.train",
         "data.prompt_template", "data.synthetic.seed"],
        ["rollout.generation.batch_size", "rollout.generation.max_batch_tokens", "rollout.n_questions",
         "rollout.adapter", "regime_w.w_end", "regime_w.w_path", "regime_w.w_cf", "regime_w.scope",
         "regime_w.alpha", "prefs.threshold", "run.progress", "run.output_dir", "run.device", "run.seed",
         "sft.lr", "lora.r", "data.max_length", "data.test"],
    ),
    "prefs": (
        ["prefs.max_correctness_pairs", "prefs.max_coherence_pairs", "prefs.threshold", "prefs.coherence",
         "regime_w.w_end", "regime_w.w_path", "regime_w.w_cf", "regime_w.scope", "regime_w.alpha",
         "regime_w.beta", "regime_w.bonus", "data.prompt_template"],
        ["prefs.hist_bins", "rollout.k", "rollout.generation.temperature", "run.progress", "run.output_dir",
         "run.device", "sft.lr", "dpo.beta"],
    ),
    "dpo": (
        ["dpo.beta", "dpo.lr", "dpo.max_steps", "dpo.batch_size", "dpo.label_smoothing", "dpo.nll_weight",
         "dpo.val_size", "dpo.seed", "dpo.output_name", "dpo.grad_accum x ranks", "data.max_length",
         "data.truncation", "model.name_or_path", "run.seed"],
        ["dpo.reference", "dpo.adapter", "dpo.pairs", "dpo.log_every", "dpo.save_every", "dpo.eval_every",
         "dpo.keep_last", "dpo.resume", "dpo.activation_checkpointing", "dpo.grad_accum", "run.progress",
         "run.output_dir", "run.device", "sft.lr", "lora.r", "regime_w.w_end", "prefs.threshold"],
    ),
    "eval": (
        ["eval.dataset", "eval.generation.temperature", "eval.generation.top_p", "eval.generation.max_new_tokens",
         "eval.generation.seed", "model.name_or_path", "data.test", "data.prompt_template", "data.synthetic.seed"],
        ["eval.generation.batch_size", "eval.generation.max_batch_tokens", "eval.n_questions", "eval.adapter",
         "eval.name", "run.progress", "run.output_dir", "run.device", "data.train", "sft.lr", "lora.r"],
    ),
}


@pytest.mark.parametrize("stage", STAGES)
def test_stage_settings_hold_what_changes_the_result_and_nothing_else(stage):
    want, excluded = EXPECTED[stage]
    settings = stage_settings(cfg(), stage)
    assert all(isinstance(k, str) for k in settings)
    missing = [k for k in want if k not in settings]
    assert not missing, f"{stage}: settings that change the result are not compared: {missing}"
    extra = [k for k in excluded if k in settings]
    assert not extra, f"{stage}: settings that do not change the result are compared: {extra}"
    # values are the config's own, flat (no nested sections)
    assert not any(isinstance(v, dict) for v in settings.values()), settings
    c = cfg()
    own = {"base": ("base_train.lr", c.base_train.lr), "sft": ("sft.lr", c.sft.lr), "dpo": ("dpo.lr", c.dpo.lr),
           "rollout": ("rollout.k", c.rollout.k), "prefs": ("prefs.threshold", c.prefs.threshold),
           "eval": ("eval.generation.max_new_tokens", c.eval.generation.max_new_tokens)}
    key, value = own[stage]
    assert settings[key] == value


@pytest.mark.parametrize(
    "stage, key, override",
    [
        ("sft", "sft.lr", "sft.lr=1e-5"),
        ("sft", "lora.r", "lora.r=8"),
        ("sft", "data.synthetic.seed", "data.synthetic.seed=7"),
        ("sft", "run.seed", "run.seed=3"),
        ("base", "base_train.lr", "base_train.lr=2e-3"),
        ("rollout", "rollout.generation.temperature", "rollout.generation.temperature=0.5"),
        ("rollout", "rollout.k", "rollout.k=3"),
        ("prefs", "prefs.max_correctness_pairs", "prefs.max_correctness_pairs=2"),
        ("prefs", "regime_w.scope", "regime_w.scope=trajectory"),
        ("dpo", "dpo.beta", "dpo.beta=0.2"),
        ("eval", "eval.generation.max_new_tokens", "eval.generation.max_new_tokens=9"),
    ],
)
def test_a_result_changing_override_is_a_named_change(stage, key, override):
    diffs = changes(stage_settings(cfg(), stage), stage_settings(cfg(override), stage))
    assert [d[0] for d in diffs] == [key]


@pytest.mark.parametrize(
    "stage, override",
    [
        ("sft", "sft.log_every=5"), ("sft", "sft.save_every=3"), ("sft", "sft.eval_every=2"), ("sft", "sft.keep_last=5"),
        ("sft", "sft.resume=none"), ("sft", "sft.activation_checkpointing=true"), ("sft", "run.progress=false"),
        ("sft", "run.output_dir=/elsewhere"), ("sft", "run.device=cpu"),
        ("base", "run.progress=false"),
        ("rollout", "rollout.generation.batch_size=3"), ("rollout", "rollout.generation.max_batch_tokens=999"),
        ("rollout", "rollout.n_questions=5"), ("rollout", "regime_w.w_end=0.6"), ("rollout", "regime_w.scope=trajectory"),
        ("prefs", "prefs.hist_bins=3"),
        ("dpo", "dpo.reference=online"), ("dpo", "dpo.log_every=7"), ("dpo", "dpo.save_every=2"),
        ("eval", "eval.generation.batch_size=2"), ("eval", "eval.n_questions=3"),
    ],
)
def test_a_harmless_override_changes_nothing(stage, override):
    if override.startswith("regime_w.w_end"):
        override = [override, "regime_w.w_path=0.2"]  # weights sum to 1
    extra = override if isinstance(override, list) else [override]
    assert changes(stage_settings(cfg(), stage), stage_settings(cfg(*extra), stage)) == []


@pytest.mark.parametrize("stage, section", [("sft", "sft"), ("dpo", "dpo"), ("base", "base_train")])
def test_ranks_times_accumulation_is_what_counts(stage, section):
    one_rank = stage_settings(cfg(f"{section}.grad_accum=2" if section != "base_train" else
                                  "base_train={max_steps: 10, lr: 1.0e-3, grad_accum: 2}"), stage, world_size=1)
    two_ranks = stage_settings(cfg(f"{section}.grad_accum=1" if section != "base_train" else
                                   "base_train={max_steps: 10, lr: 1.0e-3, grad_accum: 1}"), stage, world_size=2)
    assert one_rank == two_ranks
    assert one_rank[f"{section}.grad_accum x ranks"] == 2
    # the same accumulation on more ranks is a bigger step: a change, named
    four = stage_settings(cfg(f"{section}.grad_accum=2" if section != "base_train" else
                              "base_train={max_steps: 10, lr: 1.0e-3, grad_accum: 2}"), stage, world_size=2)
    assert changes(one_rank, four) == [(f"{section}.grad_accum x ranks", 2, 4)]


def test_unknown_stage_is_an_error():
    with pytest.raises(ValueError, match="unknown stage 'sfft'"):
        stage_settings(cfg(), "sfft")


# --------------------------------------------------------------------------- changes, describe, flatten


def test_changes_name_key_old_and_new_value():
    old = {"sft.lr": 0.003, "lora.r": 4, "data.train": None, "same": [1, 2], "gone": "x"}
    new = {"sft.lr": 1e-05, "lora.r": 4, "data.train": "x.jsonl", "same": (1, 2), "added": True}
    assert changes(old, new) == [
        ("added", None, True),
        ("data.train", None, "x.jsonl"),
        ("gone", "x", None),
        ("sft.lr", 0.003, 1e-05),
    ]  # sorted by key; a tuple equals its list (JSON-normalized)
    assert changes(old, dict(old)) == []


def test_describe_names_each_key_with_old_and_new_value():
    text = describe([("sft.lr", 0.003, 1e-05), ("data.train", None, "x.jsonl"), ("lora.r", 4, 8)])
    assert text == "sft.lr: 0.003 -> 1e-05; data.train: null -> 'x.jsonl'; lora.r: 4 -> 8"
    many = [(f"k{i:02d}", i, i + 1) for i in range(15)]
    text = describe(many, limit=12)
    assert "k11: 11 -> 12" in text and "k12" not in text and text.endswith("... and 3 more")
    long = describe([("data.prompt_template", "a" * 200, "b")])
    assert len(long) < 120 and long.endswith("-> 'b'") and "..." in long


def test_flatten_joins_nested_keys_with_dots():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None}) == {"a.b": 1, "a.c.d": [1, 2], "e": None}
    assert flatten({}) == {}
    assert flatten({"x": 1}) == {"x": 1}


def test_a_missing_training_section_is_a_named_change_not_a_crash():
    # regression: a null base_train crashed stage_settings instead of being a named change
    without = stage_settings(load_config(None, ["base_train=null"]), "base")
    assert "base_train.lr" not in without
    diffs = changes(stage_settings(cfg(), "base"), without)
    assert diffs and any(key.startswith("base_train") for key, _, _ in diffs)
    # the same shape for a null LoRA section (full fine-tuning), which already works
    assert stage_settings(load_config(None, ["lora=null"]), "sft")["lora"] is None
