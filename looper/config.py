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

from looper.answers import REL_TOL

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
    n_val: int = 64  # the "val" split (disjoint from train and test)
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
    prompt_template: str = ABEL_PROMPT  # the prompt of prompt_format: template
    # template: prompt_template as plain text (BOS + prompt, completion + EOS);
    # chat: the tokenizer's chat template (system?, user) with the generation prompt, the
    # completion as the assistant turn ended by the template's end-of-turn token
    # (looper/data/formats.py)
    prompt_format: Literal["template", "chat"] = "template"
    system_prompt: Optional[str] = None  # chat only: a system message before the question
    # chat only: extra variables for the template, e.g. Llama 3's {date_string: "26 Jul 2024"}
    # (without it that template writes today's date into every prompt)
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    strip_calculator: bool = False
    max_length: int = 512
    truncation: Literal["truncate", "error"] = "truncate"
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
    # held-out examples of the stage's training data (rows for SFT, pairs for DPO), for
    # evaluation metrics; the split is drawn with run.seed
    val_size: int = 0
    resume: str = "auto"  # auto | none | path to a resume state
    seed: int = 0  # data order and dropout


@dataclass
class SFTConfig(TrainConfig):
    val_size: int = 64
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
    offset: int = 0  # skip this many questions of the dataset first
    dataset: Optional[str] = None  # None = data.train (or synthetic)
    adapter: Optional[str] = "auto"  # auto = the round's policy (round 1: checkpoints/sft_lora); none = base
    generation: GenerationConfig = field(
        default_factory=lambda: GenerationConfig(temperature=1.0, top_p=1.0)
    )


@dataclass
class RegimeWConfig:
    _key: typing.ClassVar[str] = "regime_w"
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
    rel_tol: float = REL_TOL  # relative tolerance for claim results and numeric answer equality
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
        check_section(self)


@dataclass
class PrefsConfig:
    _key: typing.ClassVar[str] = "prefs"
    max_correctness_pairs: int = 8
    max_coherence_pairs: int = 4
    threshold: float = 0.01  # coherence pairs need reward(chosen) - reward(rejected) >= threshold
    coherence: bool = True
    hist_bins: int = 10  # bins of the margin / reward histograms in the printed summary

    def __post_init__(self) -> None:
        check_section(self)


@dataclass
class DPOConfig(TrainConfig):
    batch_size: int = 2
    grad_accum: int = 2
    lr: float = 5e-6
    beta: float = 0.1
    label_smoothing: float = 0.0
    nll_weight: float = 0.0  # RPO: weight of the length-normalized NLL of the chosen completion
    dpop_lambda: float = 0.0  # DPO-Positive: weight of max(0, log pi_ref(y_w) - log pi(y_w)) in the sigmoid
    reference: Literal["precomputed", "online"] = "precomputed"
    # true: one row per pair, prompt | chosen | rejected, the prompt computed once (a 4-D
    # block mask; needs model.attn_implementation: sdpa); false: chosen and rejected rows;
    # auto: packed where measured faster (CPU; see loops/dpo.use_packed)
    packed: Union[Literal["auto"], bool] = "auto"
    adapter: Optional[str] = "auto"  # auto = the round's starting policy (round 1: checkpoints/sft_lora)
    pairs: Optional[str] = None  # None = the round's pair file (data/preferences.jsonl in round 1)
    output_name: str = "dpo_lora"  # round 1's adapter; round r writes <stem>_r<r>_lora


@dataclass
class EvalConfig:
    dataset: Optional[str] = None  # None = data.test (or synthetic); "gsm8k", "platinum", a path
    name: Optional[str] = None  # output name; default from adapter/dataset
    adapter: Optional[str] = None  # path, "sft"/"dpo" shortcuts, or None/"none" = base
    n_questions: int = -1
    generation: GenerationConfig = field(default_factory=GenerationConfig)


@dataclass
class PipelineConfig:
    """Iterative rounds of on-policy DPO (Iterative RPO, Pang et al. 2024)."""

    rounds: int = 1  # rollout -> pairs -> DPO, this many times; round r starts from round r-1's policy
    round: int = 1  # the round a single stage command works on (its file names and default adapters)
    # round r samples questions [offset + (r-1)*n, offset + r*n) instead of the same n each round
    fresh_questions: bool = False


@dataclass
class RunConfig:
    output_dir: str = "runs/tiny"
    seed: int = 0  # LoRA init and the held-out splits
    device: Literal["auto", "cpu", "cuda"] = "auto"
    progress: bool = True
    # experiment tracking beside metrics/*.jsonl (looper.tracking); optional extras
    report_to: list[Literal["tensorboard", "wandb"]] = field(default_factory=list)
    run_name: Optional[str] = None  # trackers' run name; default: the output folder's name
    wandb_project: str = "looper"


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: Optional[LoraConfig] = field(default_factory=LoraConfig)  # null = full fine-tuning
    data: DataConfig = field(default_factory=DataConfig)
    # tiny pipeline only: full fine-tuning that gives the offline model a base ability,
    # written to checkpoints/base (RunLayout.base_checkpoint)
    base_train: Optional[TrainConfig] = None
    sft: SFTConfig = field(default_factory=SFTConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    regime_w: RegimeWConfig = field(default_factory=RegimeWConfig)
    prefs: PrefsConfig = field(default_factory=PrefsConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)


# --------------------------------------------------------------------------- bounds
#
# Every bound on a single value lives in BOUNDS, every rule that ties two values of one
# section in RULES. ``validate`` applies both to the whole tree when a config loads, before
# any model is built; sections that research code builds by hand (regime_w, prefs) also
# check themselves when they are constructed.


class Check(typing.NamedTuple):
    ok: typing.Callable[[Any], bool]
    want: str


def at_least(x) -> Check:
    return Check(lambda v: v >= x, f">= {x}")


def above(x) -> Check:
    return Check(lambda v: v > x, f"> {x}")


def between(lo, hi, hi_open: bool = False) -> Check:
    if hi_open:
        return Check(lambda v: lo <= v < hi, f"in [{lo:g}, {hi:g})")
    return Check(lambda v: lo <= v <= hi, f"in [{lo:g}, {hi:g}]")


COUNT_OR_ALL = Check(lambda v: v == -1 or v >= 1, "-1 (all) or >= 1")
STEPS_OR_EPOCHS = Check(lambda v: v == -1 or v >= 1, "-1 (from epochs) or >= 1")
PLAIN_NAME = Check(
    lambda v: v is None or (bool(v) and os.sep not in v and "/" not in v and v not in (".", "..")),
    "a plain folder or file name (no '/')",
)
NON_EMPTY = Check(lambda v: bool(str(v).strip()), "a non-empty string")
OPTIONAL_TEXT = Check(lambda v: v is None or bool(v.strip()), "null or a non-empty string")
ADAM_BETAS = Check(lambda v: len(v) == 2 and all(0.0 <= b < 1.0 for b in v), "two values in [0, 1)")
MARKERS = Check(lambda v: len(v) > 0 and all(isinstance(m, str) and m for m in v), "a list of non-empty strings")
TARGETS = Check(
    lambda v: (isinstance(v, str) and bool(v.strip())) or (isinstance(v, list) and len(v) > 0 and all(v)),
    "'all-linear', a module-name pattern, or a non-empty list of module names",
)

BOUNDS: dict[type, dict[str, Check]] = {
    RunConfig: {"output_dir": NON_EMPTY},
    TinyModelConfig: {
        "hidden_size": at_least(1), "num_layers": at_least(1), "num_heads": at_least(1),
        "num_kv_heads": at_least(1), "intermediate_size": at_least(1), "vocab_size": at_least(1),
        "max_position_embeddings": at_least(8), "corpus_size": at_least(1),
    },
    LoraConfig: {"r": at_least(1), "alpha": above(0), "dropout": between(0.0, 1.0, hi_open=True), "target_modules": TARGETS},
    SyntheticConfig: {"n_train": at_least(1), "n_test": at_least(1), "n_val": at_least(1), "min_steps": at_least(1), "max_number": at_least(2)},
    DataConfig: {"max_length": at_least(8), "system_prompt": OPTIONAL_TEXT},
    TrainConfig: {
        "batch_size": at_least(1), "grad_accum": at_least(1), "epochs": above(0), "max_steps": STEPS_OR_EPOCHS,
        "lr": above(0), "weight_decay": at_least(0), "betas": ADAM_BETAS, "warmup_steps": at_least(0),
        "min_lr_ratio": between(0.0, 1.0), "max_grad_norm": above(0), "eval_every": at_least(0),
        "save_every": at_least(0), "keep_last": at_least(1), "log_every": at_least(1), "val_size": at_least(0),
        "resume": NON_EMPTY,
    },
    SFTConfig: {"output_name": PLAIN_NAME},
    DPOConfig: {
        "beta": above(0), "label_smoothing": between(0.0, 0.5, hi_open=True), "nll_weight": at_least(0),
        "dpop_lambda": at_least(0),
        "output_name": PLAIN_NAME,
    },
    GenerationConfig: {
        "max_new_tokens": at_least(1), "temperature": at_least(0), "batch_size": at_least(1),
        "max_batch_tokens": at_least(1),
        "top_p": Check(lambda v: 0 < v <= 1, "in (0, 1]"),
    },
    RolloutConfig: {"k": at_least(1), "n_questions": COUNT_OR_ALL, "offset": at_least(0)},
    PipelineConfig: {"rounds": at_least(1), "round": at_least(1)},
    RegimeWConfig: {
        "w_end": between(0.0, 1.0), "w_path": between(0.0, 1.0), "w_cf": between(0.0, 1.0),
        "step_weight": between(0.0, 1.0), "lam": at_least(0), "free_tokens": at_least(0), "rel_tol": at_least(0),
        "max_claims": at_least(1), "max_candidates": at_least(1), "max_expr_chars": at_least(1),
        "max_number_digits": at_least(1), "max_depth": at_least(1), "answer_markers": MARKERS,
    },
    PrefsConfig: {
        "max_correctness_pairs": at_least(0), "max_coherence_pairs": at_least(0), "hist_bins": at_least(1),
        "threshold": Check(lambda v: v > 0, "> 0 (a zero threshold would pair equal rewards both ways)"),
    },
    EvalConfig: {"n_questions": COUNT_OR_ALL, "name": PLAIN_NAME},
}


def _weights_sum_to_one(c: RegimeWConfig) -> Optional[str]:
    total = c.w_end + c.w_path + c.w_cf
    if abs(total - 1.0) > 1e-6:
        return f"weights must sum to 1: w_end + w_path + w_cf = {c.w_end} + {c.w_path} + {c.w_cf} = {total}"
    return None


def _heads_divide(c: TinyModelConfig) -> Optional[str]:
    if c.hidden_size % c.num_heads or c.num_heads % c.num_kv_heads:
        return (
            f"num_heads ({c.num_heads}) must divide hidden_size ({c.hidden_size}) and num_kv_heads "
            f"({c.num_kv_heads}) must divide num_heads"
        )
    return None


def _steps_ordered(c: SyntheticConfig) -> Optional[str]:
    if c.max_steps < c.min_steps:
        return f"max_steps ({c.max_steps}) must be >= min_steps ({c.min_steps})"
    return None


def _prompts_fit_the_format(c: DataConfig) -> Optional[str]:
    if c.prompt_format == "template" and "{question}" not in c.prompt_template:
        return f"prompt_template must contain {{question}}, got {c.prompt_template!r}"
    if c.chat_template_kwargs and c.prompt_format != "chat":
        return f"chat_template_kwargs is set but prompt_format is {c.prompt_format!r}: it applies only to the chat format"
    if c.system_prompt is not None and c.prompt_format != "chat":
        return (
            f"system_prompt is set but prompt_format is {c.prompt_format!r}: a system message exists "
            "only in the chat format (set prompt_format: chat, or put the text in prompt_template)"
        )
    return None


RULES: dict[type, typing.Callable[[Any], Optional[str]]] = {
    RegimeWConfig: _weights_sum_to_one,
    TinyModelConfig: _heads_divide,
    SyntheticConfig: _steps_ordered,
    DataConfig: _prompts_fit_the_format,
}

# keys that existed once: a config that still sets one gets told where it went
MOVED = {
    "data.val_size": "moved to sft.val_size (and base_train.val_size for the tiny base stage)",
    "prefs.seed": "removed: building pairs uses no randomness",
}


def check_section(obj: Any, key: Optional[str] = None) -> None:
    """Apply BOUNDS and RULES to one section; ``key`` (e.g. ``"sft"``) prefixes the messages."""
    key = key if key is not None else getattr(obj, "_key", None)
    where = f"{key}." if key else ""
    for cls in reversed(type(obj).__mro__):
        for name, check in BOUNDS.get(cls, {}).items():
            value = getattr(obj, name)
            try:
                ok = check.ok(value)
            except TypeError:
                ok = False
            if not ok:
                raise ConfigError(f"{where}{name} must be {check.want}, got {value!r}")
        rule = RULES.get(cls)
        problem = rule(obj) if rule else None
        if problem:
            raise ConfigError(f"{key + ': ' if key else ''}{problem}")


def _walk(obj: Any, key: str):
    """Every section of a config tree with its dotted key."""
    if dataclasses.is_dataclass(obj):
        yield obj, key
        for f in dataclasses.fields(obj):
            yield from _walk(getattr(obj, f.name), f"{key}.{f.name}" if key else f.name)


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
    if origin is dict:
        return "mapping"
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
    if origin is dict:
        _, inner = typing.get_args(tp) or (str, Any)
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{key}: expected a mapping with string keys, got {value!r}")
        return {k: _convert(v, inner, f"{key}.{k}") for k, v in value.items()}
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
            if full in MOVED:
                raise ConfigError(f"config key '{full}' was {MOVED[full]}")
            raise ConfigError(f"unknown config key '{full}'. Valid keys here: {', '.join(names)}")
        kwargs[k] = _convert(_with_field_default(fields[k], v), hints[k], full)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        msg = str(e)
        if prefix and not msg.startswith(prefix):
            msg = f"{prefix}: {msg}"
        raise ConfigError(msg) from None


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
        if not os.path.isfile(path):
            raise ConfigError(f"{path}: not a file (give a YAML config file to -c)")
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not a UTF-8 text file (byte {e.start}); expected a YAML config") from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot read the config ({e.strerror})") from None
        try:
            data = yaml.safe_load(text) or {}
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
    """Every bound and rule, over the whole tree (``BOUNDS``, ``RULES``), with the full key."""
    for section, key in _walk(cfg, ""):
        if key:
            check_section(section, key)


def default_config_path() -> str:
    """The embedded default config (the tiny CPU pipeline), shipped inside the package."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "tiny_cpu.yaml")


def save_config(cfg: Config, path: str) -> None:
    """Write the resolved config as YAML (atomically), so a run can be reproduced."""
    import yaml

    from looper.io import write_text_atomic

    write_text_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))