"""Models, tokenizers and LoRA adapters.

- ``load_tokenizer`` / ``load_base_model``: a causal LM by hub id or local directory.
- ``attach_lora`` / ``load_adapter``: PEFT adapters, trainable or frozen.
- ``build_tiny_model``: an offline Llama-architecture model with a BPE tokenizer trained
  with the ``tokenizers`` package, saved in Hugging Face format so it loads through the
  same ``from_pretrained`` path as GAIR/Abel-7B-002.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from typing import Iterable, Optional

import torch

from looper.config import ConfigError, Config, LoraConfig, ModelConfig, TinyModelConfig
from looper.io import replace_dir
from looper.layout import TINY, RunLayout, adapter_missing, resolve_base_model

_TINY_MARKER = "looper_tiny.json"


# --------------------------------------------------------------------------- dtypes


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` means bf16 on GPU, fp32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


# --------------------------------------------------------------------------- base model


def quiet_transformers() -> None:
    """Silence per-load progress bars from transformers; looper draws its own."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    except Exception:  # pragma: no cover - cosmetic only
        pass


def ensure_model(cfg: Config, for_base_stage: bool = False, announce: bool = False) -> str:
    """The model folder (or hub id) a stage starts from, building the offline tiny model first
    if the run needs it (rank 0 builds, the others wait).

    ``for_base_stage``: the tiny base stage trains the freshly built model; every other
    stage starts from the layout's base model (``RunLayout.base_model``).
    """
    from looper import dist

    layout = RunLayout.of(cfg)
    if layout.model_source == TINY:
        with dist.main_first():
            if not os.path.exists(os.path.join(layout.tiny_model, _TINY_MARKER)):
                build_tiny_model(layout.tiny_model, cfg.model.tiny, synthetic=cfg.data.synthetic)
    if for_base_stage:
        return layout.pretrained
    return resolve_base_model(layout, announce=announce and dist.is_main())


def load_tokenizer(path: str, model_cfg: Optional[ModelConfig] = None):
    from transformers import AutoTokenizer

    mc = model_cfg or ModelConfig()
    tok = AutoTokenizer.from_pretrained(
        path, trust_remote_code=mc.trust_remote_code, revision=mc.revision
    )
    if tok.eos_token_id is None:
        raise ConfigError(f"tokenizer at {path} has no EOS token; completions must end with one")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # padding is always masked, so reusing EOS is safe
    return tok


def load_base_model(
    path: str,
    model_cfg: Optional[ModelConfig] = None,
    device: torch.device | str = "cpu",
    dtype: Optional[torch.dtype] = None,
):
    """Load a causal LM from a hub id or local directory (safetensors weights)."""
    from transformers import AutoModelForCausalLM

    mc = model_cfg or ModelConfig()
    device = torch.device(device)
    dtype = dtype or resolve_dtype(mc.dtype, device)
    kwargs = dict(dtype=dtype, trust_remote_code=mc.trust_remote_code, revision=mc.revision)
    if mc.attn_implementation:
        kwargs["attn_implementation"] = mc.attn_implementation
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model.config.use_cache = False  # training default; the generation engine turns it on
    return model.to(device)


# --------------------------------------------------------------------------- LoRA


def attach_lora(model, lora_cfg: LoraConfig):
    """Wrap ``model`` with a new, trainable LoRA adapter named ``default``."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    target = lora_cfg.target_modules
    peft_cfg = PeftLoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=target,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_cfg)


def check_adapter_dir(path: str, what: str = "adapter") -> None:
    if adapter_missing(path):
        raise ConfigError(
            f"{what} not found: {path} has no adapter_config.json "
            "(expected a PEFT adapter folder such as <output_dir>/checkpoints/sft_lora)"
        )


def load_adapter(model, path: str, trainable: bool, adapter_name: str = "default"):
    """Load a PEFT adapter onto ``model`` (a base model, or a PeftModel to add a second one)."""
    from peft import PeftModel

    check_adapter_dir(path)
    if isinstance(model, PeftModel):
        model.load_adapter(path, adapter_name=adapter_name, is_trainable=trainable)
        return model
    return PeftModel.from_pretrained(model, path, adapter_name=adapter_name, is_trainable=trainable)


def merged_model(model, adapter_path: Optional[str]):
    """Base + adapter with LoRA merged into the weights, in memory only (never written back)."""
    if adapter_path is None:
        return model
    peft_model = load_adapter(model, adapter_path, trainable=False)
    return peft_model.merge_and_unload()


def load_for_generation(cfg: Config, adapter_path: Optional[str], device: torch.device | str):
    """The stages' base model (+ adapter merged into the weights, in memory only) and tokenizer.

    The adapter folder is only read; its tokenizer is used when it holds one. Returns
    ``(model, tokenizer)``, the model in eval mode with gradients off. The tokenizer is
    checked against ``data.prompt_format`` before the weights load (``chat`` needs a chat
    template: ``ConfigError``), and in the chat format the template's end-of-turn token joins
    ``model.generation_config.eos_token_id``, so generation stops on it.
    """
    from looper.data import formats

    quiet_transformers()
    if adapter_path is not None:
        check_adapter_dir(adapter_path)
    base = ensure_model(cfg)
    has_tok = adapter_path is not None and os.path.isfile(os.path.join(adapter_path, "tokenizer_config.json"))
    tokenizer = load_tokenizer(adapter_path if has_tok else base, cfg.model)
    fmt = formats.resolve(tokenizer, cfg.data)  # data.prompt_format: chat needs a chat template (before the weights)
    model = load_base_model(base, cfg.model, device)
    model = merged_model(model, adapter_path)
    formats.add_stop_ids(model, fmt)  # chat: generation stops on the end-of-turn token too
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


def unwrap_model(model):
    """The transformers model inside PEFT wrappers (PeftModel -> LoraModel -> *ForCausalLM).

    Works by type, not by name, so a wrapper that FSDP2 renamed (``FSDPPeftModelForCausalLM``)
    unwraps too; anything that is not a PEFT wrapper comes back unchanged.
    """
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTuner

    for _ in range(8):  # PeftModel -> tuner -> model: two steps in practice
        if isinstance(model, PeftModel):
            model = model.base_model
        elif isinstance(model, BaseTuner):
            model = model.model
        else:
            break
    return model


def _class_named(module, names: set) -> bool:
    # the class or a base class: FSDP2 gives a sharded module a subclass (FSDPLlamaDecoderLayer)
    return any(c.__name__ in names for c in type(module).__mro__)


def decoder_layers(model) -> list:
    """The decoder blocks of a (possibly PEFT-wrapped) causal LM, in order, for FSDP per-layer
    wrapping (``looper.dist.shard_model``) and activation checkpointing.

    Found structurally, not by attribute paths: the outermost modules whose class is in the
    model's ``_no_split_modules`` (the blocks transformers itself keeps whole for FSDP-style
    wrapping and device maps; ``post_init`` gathers the names of every sub-model); failing
    that, the ``nn.ModuleList`` of ``num_hidden_layers`` same-class blocks under the inner
    model. Raises ``ValueError`` when neither finds anything.
    """
    inner = unwrap_model(model)
    names = {n for n in (getattr(inner, "_no_split_modules", None) or ()) if isinstance(n, str)}
    if names:
        found, inside = [], []
        for name, module in inner.named_modules():
            if module is inner or any(name.startswith(p) for p in inside):
                continue  # the root, or a block nested in one already taken
            if _class_named(module, names):
                found.append(module)
                inside.append(name + ".")
        if found:
            return found
    base = getattr(inner, "base_model", inner)  # transformers: the inner *Model under *ForCausalLM
    config = getattr(inner, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n_layers = getattr(text, "num_hidden_layers", None)
    lists = [
        m for m in base.modules()
        if isinstance(m, torch.nn.ModuleList) and len(m) > 0 and len({type(x) for x in m}) == 1
        and (n_layers is None or len(m) == n_layers)
    ]
    if lists:
        return list(max(lists, key=len))  # the first of the longest
    raise ValueError(
        f"cannot find the decoder layers of {type(model).__name__}: no module of its _no_split_modules "
        f"({sorted(names) or 'none'}) and no nn.ModuleList of {n_layers or 'identical'} blocks under "
        f"{type(base).__name__}"
    )


# --------------------------------------------------------------------------- tiny model


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, split_digits: bool = True):
    """Train a byte-level BPE tokenizer offline and wrap it for ``transformers``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    pre = [pre_tokenizers.ByteLevel(add_prefix_space=False)]
    if split_digits:  # one token per digit, as Llama does: arithmetic gets regular
        pre.insert(0, pre_tokenizers.Digits(individual_digits=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(pre)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        clean_up_tokenization_spaces=False,
    )


def build_tiny_model(
    out_dir: str,
    tiny: Optional[TinyModelConfig] = None,
    corpus: Optional[Iterable[str]] = None,
    synthetic=None,
) -> str:
    """Build a small Llama and its tokenizer with no download; save in HF format.

    ``corpus`` trains the tokenizer; by default, synthetic GSM8K-style problems. The folder
    is written atomically and loads with ``AutoModelForCausalLM`` / ``AutoTokenizer``.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tiny = tiny or TinyModelConfig()
    if corpus is None:
        from looper.data.synthetic import corpus as synthetic_corpus

        kw = {}
        if synthetic is not None:
            kw = dict(min_steps=synthetic.min_steps, max_steps=synthetic.max_steps, max_number=synthetic.max_number)
        corpus = synthetic_corpus(tiny.corpus_size, seed=tiny.seed + 12345, **kw)
    tokenizer = train_bpe_tokenizer(corpus, tiny.vocab_size, tiny.split_digits)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=tiny.hidden_size,
        intermediate_size=tiny.intermediate_size,
        num_hidden_layers=tiny.num_layers,
        num_attention_heads=tiny.num_heads,
        num_key_value_heads=tiny.num_kv_heads,
        max_position_embeddings=tiny.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tiny.seed)
        model = LlamaForCausalLM(config)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tiny-", dir=parent)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, _TINY_MARKER), "w") as f:
            json.dump({"built_by": "looper.models.build_tiny_model", **tiny.__dict__}, f, indent=2)
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed build leaves nothing half-written
        raise
    return out_dir
