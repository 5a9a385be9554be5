"""looper.lora: the fused LoRA forward computes what peft's forward computes (outputs and
gradients, across model families, with dropout), and every case it does not cover runs
peft's own forward."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from transformers import AutoModelForCausalLM, LlamaConfig, Phi3Config, Qwen2Config

from looper.lora import FusedLoraLinear, fuse_lora_linears

SHAPE = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
CONFIGS = {"llama": LlamaConfig, "qwen2": Qwen2Config, "phi3": Phi3Config}  # plain, q/k/v bias, fused qkv


def pair(family: str, seed: int = 0, dtype=torch.float32, **lora):
    """Two identical peft models of ``family``: peft's forward, and the fused one."""
    models = []
    for _ in range(2):
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_config(CONFIGS[family](**SHAPE)).to(dtype)
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", **lora)
        model = get_peft_model(base, cfg)
        for name, p in model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero; a trained adapter does not
                torch.nn.init.normal_(p, std=0.1)
        models.append(model)
    n = fuse_lora_linears(models[1])
    assert n == sum(isinstance(m, PeftLoraLinear) for m in models[0].modules()) > 0
    return models


def run(model, ids, seed=0):
    torch.manual_seed(seed)
    out = model(input_ids=ids).logits
    out.pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return out.detach(), grads


@pytest.mark.parametrize("family", list(CONFIGS))
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_forward_and_gradients_match_peft(family, dropout):
    """Same logits and LoRA gradients, in training mode; with dropout the fused path draws
    the same masks (it calls the same dropout module in the same order)."""
    ref, fused = pair(family, lora_dropout=dropout)
    assert all(type(m) is FusedLoraLinear for m in fused.modules() if isinstance(m, PeftLoraLinear))
    ids = torch.randint(0, 64, (3, 11), generator=torch.Generator().manual_seed(1))
    ref.train(), fused.train()
    out_r, g_r = run(ref, ids)
    out_f, g_f = run(fused, ids)
    torch.testing.assert_close(out_f, out_r, rtol=1e-5, atol=1e-6)
    assert g_r.keys() == g_f.keys() and g_r
    for name in g_r:
        torch.testing.assert_close(g_f[name], g_r[name], rtol=1e-4, atol=1e-7, msg=name)


def test_the_fused_path_is_taken_in_the_common_case(monkeypatch):
    """Guard against a silent fallback: the plain single-adapter forward never calls peft's."""
    _, fused = pair("llama")
    calls = []
    real = PeftLoraLinear.forward
    monkeypatch.setattr(PeftLoraLinear, "forward", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    fused(input_ids=torch.zeros(1, 4, dtype=torch.long))
    assert calls == []


def test_disabled_merged_dora_and_mixed_dtypes_run_peft_forward():
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(2))

    ref, fused = pair("llama")
    with torch.no_grad():
        with ref.disable_adapter(), fused.disable_adapter():
            torch.testing.assert_close(fused(input_ids=ids).logits, ref(input_ids=ids).logits)
        fused_on = fused(input_ids=ids).logits
        fused.merge_adapter()
        torch.testing.assert_close(fused(input_ids=ids).logits, fused_on, rtol=1e-5, atol=1e-6)
        fused.unmerge_adapter()

    ref, fused = pair("qwen2", use_dora=True)  # a LoRA variant: peft's forward
    with torch.no_grad():
        torch.testing.assert_close(fused(input_ids=ids).logits, ref(input_ids=ids).logits)

    # bf16 base with fp32 adapter weights (no FSDP to cast them): peft's mixed-dtype forward
    ref, fused = pair("llama", dtype=torch.bfloat16)
    for model in (ref, fused):
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    with torch.no_grad():
        torch.testing.assert_close(fused(input_ids=ids).logits, ref(input_ids=ids).logits)


def test_two_active_adapters_and_the_saved_adapter_are_peft_s(tmp_path):
    ref, fused = pair("llama")
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))
    for model in (ref, fused):
        torch.manual_seed(5)
        model.add_adapter("second", LoraConfig(r=2, lora_alpha=2, target_modules="all-linear", init_lora_weights=False))
        model.base_model.set_adapter(["default", "second"])
    with torch.no_grad():
        torch.testing.assert_close(fused(input_ids=ids).logits, ref(input_ids=ids).logits)

    ref, fused = pair("phi3")
    fused.save_pretrained(tmp_path / "adapter")
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(Phi3Config(**SHAPE))
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    assert not any(type(m) is FusedLoraLinear for m in loaded.modules())
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=1e-5, atol=1e-6)


def test_bf16_fused_forward_is_peft_s_to_bf16_rounding(monkeypatch):
    """All in bf16 (as FSDP2 gathers a LoRA policy on GPU): the fused path is taken and
    differs from peft's only by rounding (one rounding of the sum instead of three)."""
    ref, fused = pair("qwen2", dtype=torch.bfloat16)
    for model in (ref, fused):  # peft keeps new adapter weights in fp32; FSDP2 would gather bf16
        model.to(torch.bfloat16)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(4))
    calls = []
    real = PeftLoraLinear.forward
    monkeypatch.setattr(PeftLoraLinear, "forward", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    out_f, g_f = run(fused, ids)
    assert calls == []
    monkeypatch.undo()
    out_r, g_r = run(ref, ids)
    torch.testing.assert_close(out_f, out_r, rtol=2e-2, atol=2e-2)
    for name in g_r:
        torch.testing.assert_close(g_f[name].float(), g_r[name].float(), rtol=5e-2, atol=5e-3, msg=name)
