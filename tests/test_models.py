"""Models, tokenizers and adapters: the offline tiny model loads through the same
``from_pretrained`` path as a hub model, builds deterministically and atomically; LoRA
wraps every decoder projection; adapters saved by looper load in plain PEFT with the same
logits; merging is exact and in memory only; folder replacement is atomic; activation
checkpointing changes neither the loss nor the gradients."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from looper.config import ConfigError, LoraConfig, TinyModelConfig
from looper.models import (
    attach_lora,
    build_tiny_model,
    check_adapter_dir,
    decoder_layers,
    load_adapter,
    load_base_model,
    load_tokenizer,
    merged_model,
    train_bpe_tokenizer,
)

SMALL = dict(
    hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=2, intermediate_size=64, vocab_size=300
)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TEXTS = [
    "Question:\nTom has 12 apples. He buys 35 more. How many apples does he have?\nAnswer:\n",
    "12+35=<<12+35=47>>47\n#### 47",
    "Mia keeps a third of her 27 shells: 27/3 = 9 and 9 × 2 = 18.\n\n#### 18",
    "  leading spaces,  double  spaces and trailing\n",
]


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    from looper.data.synthetic import corpus as synthetic_corpus

    # repeated multi-digit numbers, so a tokenizer that may merge digits does merge them
    return synthetic_corpus(120, seed=3) + ["12 34 56 78 90 123 2024 1000 " * 4] * 30


def token_pieces(tok, text: str) -> list[str]:
    return [tok.decode([i]) for i in tok(text, add_special_tokens=False)["input_ids"]]


def sample_ids(tok, n_rows: int = 2) -> torch.Tensor:
    ids = [tok(t, add_special_tokens=False)["input_ids"][:16] for t in TEXTS[:n_rows]]
    width = min(len(i) for i in ids)
    return torch.tensor([[tok.bos_token_id] + i[:width] for i in ids])


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    return model(input_ids=ids).logits.float()


def randomize_lora_b(model, seed: int = 1) -> None:
    """PEFT initializes lora_B to zero (a no-op adapter); make the adapter matter."""
    g = torch.Generator().manual_seed(seed)
    n = 0
    for name, p in model.named_parameters():
        if "lora_B" in name:
            with torch.no_grad():
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            n += 1
    assert n > 0


def lora_model(model_dir, seed: int = 0):
    torch.manual_seed(seed)
    model = attach_lora(load_base_model(str(model_dir)), LoraConfig(r=4, alpha=8))
    randomize_lora_b(model, seed + 1)
    return model


def trainable_names(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


# --------------------------------------------------------------------------- tiny model


def test_tiny_model_loads_through_auto_classes(tmp_path, corpus):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    out = tmp_path / "tiny"
    assert build_tiny_model(str(out), TinyModelConfig(**SMALL), corpus=corpus) == str(out)

    model = AutoModelForCausalLM.from_pretrained(str(out))
    tok = AutoTokenizer.from_pretrained(str(out))
    assert isinstance(model, LlamaForCausalLM)
    c = model.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size) == (32, 2, 2, 64)
    assert c.vocab_size == len(tok) <= SMALL["vocab_size"]
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)

    # the in-memory model built from config.json + the safetensors file, strictly (no key
    # missing or left over), gives the same logits as the from_pretrained load
    state = load_file(str(out / "model.safetensors"))
    in_memory = LlamaForCausalLM(AutoConfig.from_pretrained(str(out)))
    in_memory.load_state_dict(state, strict=True)
    ids = sample_ids(tok)
    ref = logits(model, ids)
    assert ref.shape == (2, ids.shape[1], c.vocab_size) and torch.isfinite(ref).all()
    assert torch.equal(logits(in_memory, ids), ref)
    # loading twice gives bit-identical logits (nothing is randomly initialized on load)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(str(out)), ids), ref)
    # and looper's own loader agrees
    assert torch.equal(logits(load_base_model(str(out)), ids), ref)


def test_tiny_tokenizer(tmp_path, corpus):
    from transformers import AutoTokenizer

    out = tmp_path / "tiny"
    build_tiny_model(str(out), TinyModelConfig(**SMALL), corpus=corpus)
    tok = AutoTokenizer.from_pretrained(str(out))

    specials = [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id]
    assert None not in specials and len(set(specials)) == 3
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    assert load_tokenizer(str(out)).pad_token_id == tok.pad_token_id  # a real PAD, not EOS reused

    # digits are one token each, with or without a space before them
    for text in ("Tom has 12345 apples and 2024 pears", "12 34 56 78 90 123 1000", "#### 47"):
        pieces = token_pieces(tok, text)
        assert all(sum(ch.isdigit() for ch in p) <= 1 for p in pieces), pieces
        assert sum(ch.isdigit() for p in pieces for ch in p) == sum(ch.isdigit() for ch in text)
    # the same corpus without digit splitting does merge digits: the check above can fail
    merged = train_bpe_tokenizer(corpus, SMALL["vocab_size"], split_digits=False)
    assert any(sum(ch.isdigit() for ch in p) >= 2 for p in token_pieces(merged, "12 34 56 78 90 123 2024"))

    # text round-trips exactly through encode/decode (byte-level BPE: any text, any spacing)
    for text in TEXTS + ["café ünïcode — ok", "\t\ttabs\nand\r\nnewlines"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == text
        assert tok.decode([tok.bos_token_id] + ids + [tok.eos_token_id], skip_special_tokens=True) == text


def test_build_is_deterministic_and_atomic(tmp_path, corpus):
    a, b, c = tmp_path / "a" / "model", tmp_path / "b" / "model", tmp_path / "c" / "model"
    build_tiny_model(str(a), TinyModelConfig(**SMALL), corpus=corpus)
    build_tiny_model(str(b), TinyModelConfig(**SMALL), corpus=corpus)
    build_tiny_model(str(c), TinyModelConfig(**SMALL, seed=1), corpus=corpus)
    wa, wb, wc = (load_file(str(p / "model.safetensors")) for p in (a, b, c))
    assert sorted(wa) == sorted(wb) == sorted(wc)
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "same seed, different weights"
    assert not all(torch.equal(wa[k], wc[k]) for k in wa), "the seed has no effect"
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    # nothing but the finished folder beside it
    for p in (a, b, c):
        assert os.listdir(p.parent) == ["model"]
        assert {"config.json", "model.safetensors", "tokenizer.json", "looper_tiny.json"} <= set(os.listdir(p))

    # rebuilding over an existing folder replaces it in one step
    build_tiny_model(str(a), TinyModelConfig(**SMALL, seed=1), corpus=corpus)
    wa2 = load_file(str(a / "model.safetensors"))
    assert all(torch.equal(wa2[k], wc[k]) for k in wa2)
    assert os.listdir(a.parent) == ["model"]


def test_failed_build_leaves_nothing(tmp_path, corpus, monkeypatch):
    from transformers import LlamaForCausalLM

    def disk_full(self, *args, **kwargs):
        os.makedirs(args[0], exist_ok=True)
        Path(args[0], "model.safetensors").write_bytes(b"half")  # a partial write, then failure
        raise OSError("disk full")

    good = tmp_path / "old" / "model"
    build_tiny_model(str(good), TinyModelConfig(**SMALL), corpus=corpus)
    before = {n: (good / n).read_bytes() for n in os.listdir(good)}

    monkeypatch.setattr(LlamaForCausalLM, "save_pretrained", disk_full)
    fresh = tmp_path / "new" / "model"
    with pytest.raises(OSError, match="disk full"):
        build_tiny_model(str(fresh), TinyModelConfig(**SMALL), corpus=corpus)
    assert not fresh.exists()
    assert os.listdir(fresh.parent) == []  # no .tiny-* temporary folder either

    # a failed rebuild keeps the old folder as it was
    with pytest.raises(OSError, match="disk full"):
        build_tiny_model(str(good), TinyModelConfig(**SMALL, seed=5), corpus=corpus)
    assert os.listdir(good.parent) == ["model"]
    assert {n: (good / n).read_bytes() for n in os.listdir(good)} == before



# --------------------------------------------------------------------------- LoRA


def test_attach_lora_targets_every_decoder_projection(tiny_model_dir):
    from peft.tuners.lora import LoraLayer

    base = load_base_model(str(tiny_model_dir))
    n_base = sum(p.numel() for p in base.parameters())
    model = attach_lora(base, LoraConfig(r=4, alpha=8))  # default target: "all-linear"
    layers = decoder_layers(model)
    assert len(layers) == 2

    wrapped = {n for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    expected = set()
    for i, layer in enumerate(layers):
        for proj in PROJECTIONS:
            sub = layer.self_attn if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else layer.mlp
            assert isinstance(getattr(sub, proj), LoraLayer), f"layer {i} {proj} not wrapped"
            expected.add(next(n for n, m in model.named_modules() if m is getattr(sub, proj)))
    assert wrapped == expected  # exactly the 7 x 2 projections: no lm_head, no embeddings
    assert not any("lm_head" in n or "embed" in n for n in wrapped)
    inner = model.get_base_model()
    assert not isinstance(inner.lm_head, LoraLayer) and isinstance(inner.lm_head, torch.nn.Linear)

    names = trainable_names(model)
    assert names and all(("lora_A" in n or "lora_B" in n) for n in names)
    assert len(names) == 2 * len(expected)  # one A and one B per wrapped projection
    n_lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == n_lora
    assert sum(p.numel() for p in model.parameters() if not p.requires_grad) == n_base

    # an explicit list narrows it
    narrow = attach_lora(load_base_model(str(tiny_model_dir)), LoraConfig(r=4, alpha=8, target_modules=["q_proj"]))
    assert {n.rsplit(".", 1)[-1] for n, m in narrow.named_modules() if isinstance(m, LoraLayer)} == {"q_proj"}


@pytest.fixture(scope="module")
def saved_adapter(tiny_model_dir, tmp_path_factory):
    """A LoRA model with a non-trivial adapter, saved by ``checkpoint.save_adapter``."""
    from looper import checkpoint, dist

    dist.init_distributed("cpu")  # a size-1 process group, as the training loops have
    model = lora_model(tiny_model_dir)
    tok = load_tokenizer(str(tiny_model_dir))
    out = tmp_path_factory.mktemp("adapter") / "sft_lora"
    checkpoint.save_adapter(model, tok, str(out))
    return model, tok, out


def test_saved_adapter_loads_in_plain_peft(tiny_model_dir, saved_adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok, out = saved_adapter
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= set(os.listdir(out))
    assert os.listdir(out.parent) == ["sft_lora"]  # the temporary folder was renamed away
    check_adapter_dir(str(out))  # no error

    ids = sample_ids(tok)
    ref = logits(model, ids)
    base_only = logits(load_base_model(str(tiny_model_dir)), ids)
    assert (ref - base_only).abs().max() > 1e-2, "the adapter does not change the logits"

    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), str(out))
    torch.testing.assert_close(logits(loaded, ids), ref, rtol=1e-5, atol=1e-5)
    # every adapter tensor on disk equals the in-memory one
    saved = load_file(str(out / "adapter_model.safetensors"))
    mem = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert len(saved) == len(mem)
    for name, t in saved.items():
        match = [m for m in mem if m.replace(".default.", ".") == name]
        assert len(match) == 1, name
        assert torch.equal(t, mem[match[0]].detach())
    # the tokenizer saved beside it is the model's
    tok2 = AutoTokenizer.from_pretrained(str(out))
    assert tok2(TEXTS[1])["input_ids"] == tok(TEXTS[1])["input_ids"]


def test_load_adapter_trainable_or_frozen(tiny_model_dir, saved_adapter):
    model, tok, out = saved_adapter
    ids = sample_ids(tok)
    ref = logits(model, ids)

    frozen = load_adapter(load_base_model(str(tiny_model_dir)), str(out), trainable=False)
    assert trainable_names(frozen) == set()
    torch.testing.assert_close(logits(frozen, ids), ref, rtol=1e-5, atol=1e-5)

    trainable = load_adapter(load_base_model(str(tiny_model_dir)), str(out), trainable=True)
    assert trainable_names(trainable) == trainable_names(model)
    assert all("lora_" in n for n in trainable_names(trainable))
    torch.testing.assert_close(logits(trainable, ids), ref, rtol=1e-5, atol=1e-5)


def test_merged_model_is_exact_and_leaves_files_alone(tiny_model_dir, saved_adapter):
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    model, tok, out = saved_adapter
    ids = sample_ids(tok)
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()}

    unmerged = load_adapter(load_base_model(str(tiny_model_dir)), str(out), trainable=False)
    merged = merged_model(load_base_model(str(tiny_model_dir)), str(out))
    assert not isinstance(merged, PeftModel)
    assert not any(isinstance(m, LoraLayer) for m in merged.modules())
    torch.testing.assert_close(logits(merged, ids), logits(unmerged, ids), rtol=1e-5, atol=1e-5)
    # the merge really changed the weights (it is not the base model)
    base = load_base_model(str(tiny_model_dir))
    assert (logits(merged, ids) - logits(base, ids)).abs().max() > 1e-2

    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()}
    assert after == before
    # no adapter: the model itself
    assert merged_model(base, None) is base


def test_missing_adapter_is_a_config_error(tmp_path, tiny_model_dir):
    missing = tmp_path / "no" / "sft_lora"
    with pytest.raises(ConfigError, match=re.escape(str(missing))):
        check_adapter_dir(str(missing))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=re.escape(str(empty)) + ".*adapter_config.json"):
        check_adapter_dir(str(empty))
    with pytest.raises(ConfigError, match=re.escape(str(missing))):  # never a hub lookup for a typo'd path
        load_adapter(load_base_model(str(tiny_model_dir)), str(missing), trainable=False)


# --------------------------------------------------------------------------- activation checkpointing


def test_activation_checkpointing_parity(tiny_model_dir):
    from looper.loops.common import enable_activation_checkpointing

    tok = load_tokenizer(str(tiny_model_dir))
    rows = [tok(t, add_special_tokens=False)["input_ids"][:24] for t in TEXTS[:3]]
    width = min(len(r) for r in rows)
    ids = torch.tensor([[tok.bos_token_id] + r[:width] for r in rows])
    labels = ids.clone()
    labels[:, :4] = -100  # a prompt part, as in SFT

    def run(checkpointing: bool):
        model = lora_model(tiny_model_dir)
        if checkpointing:
            enable_activation_checkpointing(model)  # as shard() does
        model.train()
        calls = []
        for layer in decoder_layers(model):  # count MLP forwards: recomputation runs them again
            fwd = layer.mlp.forward
            layer.mlp.forward = lambda *a, _f=fwd, **k: (calls.append(1), _f(*a, **k))[1]
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        return loss.detach(), grads, len(calls)

    loss0, grads0, calls0 = run(False)
    loss1, grads1, calls1 = run(True)
    assert calls0 == 2 and calls1 == 4, "checkpointing did not recompute the layers"
    assert torch.isfinite(loss0)
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=0)
    assert sorted(grads1) == sorted(grads0) and len(grads0) == 28
    for name, g in grads0.items():
        assert g.abs().max() > 0, f"{name} got no gradient"
        torch.testing.assert_close(grads1[name], g, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")
