"""Configuration: one dataclass per stage, loaded from YAML, with dotted overrides.

Loading is strict. An unknown key or a value of the wrong type raises ``ConfigError``
naming the key and listing the valid ones, so a typo never silently falls back to a default.

This module imports only the standard library and PyYAML: ``looper.regime_w`` uses it
and must stay free of torch.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

ABEL_PROMPT = "Question:\n{question}\nAnswer:\nLet's think step by step.\n"


class ConfigError(ValueError):
    """A bad config key or value. The message names the key and what was expected."""


# --------------------------------------------------------------------------- sections


@dataclass
class TinyModelConfig:
    """Shape of the offline tiny Llama built when ``model.name_or_path: tiny``."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    intermediate_size: int = 344
    vocab_size: int = 512
    max_position_embeddings: int = 512
    split_digits: bool = True
    corpus_size: int = 4000  # synthetic problems used to train the BPE tokenizer
    seed: int = 0


@dataclass
class ModelConfig:
    # hub id, local directory, or "tiny" (built offline under <output_dir>/base_model)
    name_or_path: str = "tiny"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    attn_implementation: Optional[str] = "sdpa"
    trust_remote_code: bool = False
    revision: Optional[str] = None
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    # "all-linear" = every linear projection of the decoder (not the LM head)
    target_modules: Union[str, list[str]] = "all-linear"


@dataclass
class SyntheticConfig:
    n_train: int = 2000
    n_test: int = 200
    min_steps: int = 1
    max_steps: int = 3
    max_number: int = 20
    seed: int = 0


@dataclass
class DataConfig:
    # None: the offline synthetic generator. Otherwise a JSONL path, a HF dataset id
    # ("openai/gsm8k"), "gsm8k" (= openai/gsm8k) or "platinum" (= madrylab/gsm8k-platinum).
    train: Optional[str] = None
    test: Optional[str] = None
    hf_config: str = "main"
    prompt_template: str = ABEL_PROMPT
    strip_calculator: bool = False
    max_length: int = 512
    truncation: Literal["truncate", "error"] = "truncate"
    val_size: int = 64  # held-out rows taken from the train split for evaluation loss
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class TrainConfig:
    """Optimizer, schedule and loop settings shared by SFT and DPO."""

    batch_size: int = 4  # per device, per micro-step
    grad_accum: int = 1
    epochs: float = 1.0
    max_steps: int = -1  # optimizer steps; -1 = from epochs
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0
    activation_checkpointing: bool = False
    eval_every: int = 0  # 0 = only at the end
    save_every: int = 0  # resume-state interval in optimizer steps; 0 = only at the end
    keep_last: int = 2
    log_every: int = 1
    resume: str = "auto"  # auto | none | path to a resume state
    seed: int = 0


@dataclass
class SFTConfig(TrainConfig):
    output_name: str = "sft_lora"  # checkpoints/<output_name>
    init_adapter: Optional[str] = None  # continue from an existing adapter


@dataclass
class GenerationConfig:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    batch_size: int = 64  # sequences per forward
    max_batch_tokens: int = 65536  # bound on batch * (prompt + new tokens)
    seed: int = 0


@dataclass
class RolloutConfig:
    k: int = 8
    n_questions: int = -1  # -1 = all
    dataset: Optional[str] = None  # None = data.train (or synthetic)
    adapter: Optional[str] = "auto"  # auto = checkpoints/sft_lora; none/null = base model
    generation: GenerationConfig = field(
        default_factory=lambda: GenerationConfig(temperature=1.0, top_p=1.0)
    )


@dataclass
class RegimeWConfig:
    w_end: float = 0.5
    w_path: float = 0.3
    w_cf: float = 0.2
    step_weight: float = 0.5  # cf_i = step_weight*step_i + (1-step_weight)*grounded_i
    alpha: float = 1.0
    beta: float = 0.5
    bonus: float = 0.1
    lam: float = 0.001
    free_tokens: int = 512
    scope: Literal["question", "trajectory"] = "question"
    # arithmetic claim checking (looper.regime_w.scoring)
    rel_tol: float = 1e-6  # relative tolerance for claim results and numeric answer equality
    allow_rounding: bool = True  # "10/3 = 3.33" holds: a result with d decimals may be rounded
    # final-answer line markers (ASCII letters match in any case; the last line holding one wins)
    answer_markers: list[str] = field(default_factory=lambda: ["####", "The answer is", "Answer:"])
    # bounds that keep the checker fast on long or hostile text
    max_claims: int = 128  # claims checked per trajectory (the first ones in the text)
    max_candidates: int = 256  # "=" and <<...>> spots examined per trajectory, in text order
    max_expr_chars: int = 200  # a longer expression is not read as a claim
    max_number_digits: int = 30  # a number with more digits is not read as a number
    max_depth: int = 32  # parenthesis / unary-sign nesting

    def __post_init__(self) -> None:
        weights = {"w_end": self.w_end, "w_path": self.w_path, "w_cf": self.w_cf}
        for name, w in weights.items():
            if not 0.0 <= w <= 1.0:
                raise ConfigError(f"regime_w.{name} must be in [0, 1], got {w}")
        total = self.w_end + self.w_path + self.w_cf
        if abs(total - 1.0) > 1e-6:
            raise ConfigError(
                f"regime_w weights must sum to 1: w_end + w_path + w_cf = "
                f"{self.w_end} + {self.w_path} + {self.w_cf} = {total}"
            )
        if not 0.0 <= self.step_weight <= 1.0:
            raise ConfigError(f"regime_w.step_weight must be in [0, 1], got {self.step_weight}")
        for name in ("lam", "rel_tol"):
            if getattr(self, name) < 0:
                raise ConfigError(f"regime_w.{name} must be >= 0, got {getattr(self, name)}")
        if self.free_tokens < 0:
            raise ConfigError(f"regime_w.free_tokens must be >= 0, got {self.free_tokens}")
        for name in ("max_claims", "max_candidates", "max_expr_chars", "max_number_digits", "max_depth"):
            if getattr(self, name) < 1:
                raise ConfigError(f"regime_w.{name} must be >= 1, got {getattr(self, name)}")
        if not all(isinstance(m, str) and m for m in self.answer_markers):
            raise ConfigError(f"regime_w.answer_markers must be non-empty strings, got {self.answer_markers}")


@dataclass
class PrefsConfig:
    max_correctness_pairs: int = 8
    max_coherence_pairs: int = 4
    threshold: float = 0.01  # coherence pairs need reward(chosen) - reward(rejected) >= threshold
    coherence: bool = True
    seed: int = 0  # pair building is deterministic and uses no randomness; kept for the record
    hist_bins: int = 10  # bins of the margin / reward histograms in the printed summary

    def __post_init__(self) -> None:
        for name in ("max_correctness_pairs", "max_coherence_pairs"):
            if getattr(self, name) < 0:
                raise ConfigError(f"prefs.{name} must be >= 0, got {getattr(self, name)}")
        if not self.threshold > 0:
            raise ConfigError(
                f"prefs.threshold must be > 0 (a zero threshold would pair equal rewards both ways), "
                f"got {self.threshold}"
            )
        if self.hist_bins < 1:
            raise ConfigError(f"prefs.hist_bins must be >= 1, got {self.hist_bins}")


@dataclass
class DPOConfig(TrainConfig):
    batch_size: int = 2
    grad_accum: int = 2
    lr: float = 5e-6
    beta: float = 0.1
    label_smoothing: float = 0.0
    nll_weight: float = 0.0
    reference: Literal["precomputed", "online"] = "precomputed"
    val_size: int = 0  # held-out pairs for evaluation metrics
    adapter: Optional[str] = "auto"  # auto = checkpoints/sft_lora
    pairs: Optional[str] = None  # None = data/preferences.jsonl
    output_name: str = "dpo_lora"


@dataclass
class EvalConfig:
    dataset: Optional[str] = None  # None = data.test (or synthetic); "gsm8k", "platinum", a path
    name: Optional[str] = None  # output name; default from adapter/dataset
    adapter: Optional[str] = None  # path, "sft"/"dpo" shortcuts, or None/"none" = base
    n_questions: int = -1
    generation: GenerationConfig = field(default_factory=GenerationConfig)


@dataclass
class RunConfig:
    output_dir: str = "runs/tiny"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    progress: bool = True


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: Optional[LoraConfig] = field(default_factory=LoraConfig)  # null = full fine-tuning
    data: DataConfig = field(default_factory=DataConfig)
    base_train: Optional[SFTConfig] = None  # tiny pipeline: full fine-tune that gives the base ability
    sft: SFTConfig = field(default_factory=SFTConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    regime_w: RegimeWConfig = field(default_factory=RegimeWConfig)
    prefs: PrefsConfig = field(default_factory=PrefsConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# --------------------------------------------------------------------------- building


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        return f"list[{_type_name(inner)}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against type ``tp`` and return it (dataclasses built from dicts)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{key}: null is not allowed, expected {_type_name(tp)}")
        members = [a for a in args if a is not type(None)]
        if len(members) == 1:
            # Optional[X]: X's own error is the precise one (for an optional section such as
            # `lora` or `base_train`, it names the unknown nested key and the valid keys)
            return _convert(value, members[0], key)
        # a dataclass section given as a dict, or a plain value: try each member in order
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: expected one of {list(allowed)}, got {value!r}")
        return value
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return [_convert(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for section {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp}")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _with_field_default(f: dataclasses.Field, value: Any) -> Any:
    """Complete a partial mapping for a section from the field's own default.

    A field's default can differ from its section class's defaults (``rollout.generation``
    samples at temperature 1, ``GenerationConfig`` is greedy), so setting one key of such a
    section must not reset the others to the class defaults.
    """
    if not isinstance(value, dict) or f.default_factory is dataclasses.MISSING:
        return value
    default = f.default_factory()
    if not dataclasses.is_dataclass(default):
        return value
    return _deep_merge(to_dict(default), value)


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, strictly."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = list(fields)
    kwargs = {}
    for k, v in data.items():
        full = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            raise ConfigError(f"unknown config key '{full}'. Valid keys here: {', '.join(names)}")
        kwargs[k] = _convert(_with_field_default(fields[k], v), hints[k], full)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{prefix + ': ' if prefix else ''}{e}") from None


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def _parse_scalar(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` strings to a nested dict (values parsed as YAML scalars)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.sub=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override '{item}' has an empty key")
        parts = key.split(".")
        node = data
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {} if node.get(p) is None else node[p]
                if not isinstance(node[p], dict):
                    raise ConfigError(f"override '{item}': '{p}' is not a section")
            node = node[p]
        node[parts[-1]] = _parse_scalar(raw)
    return data


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    """Load a ``Config`` from a YAML file (or defaults) and apply dotted overrides."""
    import yaml

    data: dict = {}
    if path is not None:
        if not os.path.exists(path):
            raise ConfigError(f"config file not found: {path}")
        with open(path) as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{path}: invalid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    data = apply_overrides(data, list(overrides or []))
    try:
        cfg = from_dict(Config, data)
    except ConfigError as e:
        where = f"{path}: " if path else ""
        raise ConfigError(f"{where}{e}") from None
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field checks with clear messages."""
    for name in ("sft", "dpo", "base_train"):
        t = getattr(cfg, name)
        if t is None:
            continue
        for key in ("batch_size", "grad_accum", "keep_last"):
            if getattr(t, key) < 1:
                raise ConfigError(f"{name}.{key} must be >= 1, got {getattr(t, key)}")
        if t.lr <= 0:
            raise ConfigError(f"{name}.lr must be > 0, got {t.lr}")
        if t.max_steps == 0 or t.max_steps < -1:
            raise ConfigError(f"{name}.max_steps must be -1 or >= 1, got {t.max_steps}")
        if len(t.betas) != 2:
            raise ConfigError(f"{name}.betas must have two values, got {t.betas}")
    if cfg.rollout.k < 1:
        raise ConfigError(f"rollout.k must be >= 1, got {cfg.rollout.k}")
    for name in ("rollout", "eval"):
        n = getattr(cfg, name).n_questions
        if n == 0 or n < -1:
            raise ConfigError(f"{name}.n_questions must be -1 (all) or >= 1, got {n}")
    if cfg.data.max_length < 8:
        raise ConfigError(f"data.max_length must be >= 8, got {cfg.data.max_length}")
    if cfg.lora is not None and cfg.lora.r < 1:
        raise ConfigError(f"lora.r must be >= 1, got {cfg.lora.r}")
    if not 0.0 <= cfg.dpo.label_smoothing < 0.5:
        raise ConfigError(f"dpo.label_smoothing must be in [0, 0.5), got {cfg.dpo.label_smoothing}")
    for name in ("rollout", "eval"):
        g = getattr(cfg, name).generation
        if g.temperature < 0 or not 0 < g.top_p <= 1:
            raise ConfigError(f"{name}.generation: temperature must be >= 0 and top_p in (0, 1]")
        if g.batch_size < 1 or g.max_new_tokens < 1:
            raise ConfigError(f"{name}.generation: batch_size and max_new_tokens must be >= 1")


def default_config_path() -> str:
    """The embedded default config (the tiny CPU pipeline), shipped inside the package."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "tiny_cpu.yaml")


def save_config(cfg: Config, path: str) -> None:
    """Write the resolved config as YAML (atomically), so a run can be reproduced."""
    import yaml

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
    os.replace(tmp, path)