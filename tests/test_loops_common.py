"""looper.loops.common: the schedule, held-out splits, evaluation shards, the finite check
and the choice of resume state, with hand-derived values; the forward that runs the LM
head on scored positions only, against full logits."""

from __future__ import annotations

import math

import pytest
import torch

from looper.config import ConfigError, TrainConfig
from looper.io import DataError
from looper.loops.common import check_finite, equal_shards, lr_lambda, resume_point, split_val, total_steps


def test_warmup_then_cosine_to_the_floor():
    t = TrainConfig(warmup_steps=2, schedule="cosine", min_lr_ratio=0.1)
    f = lr_lambda(t, total_steps=6)
    assert [f(0), f(1)] == [0.5, 1.0]  # linear warmup from 0: (step + 1) / warmup
    # then 0.1 + 0.9 * 0.5 * (1 + cos(pi * (step - 2) / 4))
    for step in (2, 3, 4, 6):
        assert f(step) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - 2) / 4)))
    assert f(6) == pytest.approx(0.1)
    linear = lr_lambda(TrainConfig(schedule="linear"), total_steps=4)
    assert [linear(s) for s in range(5)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    assert lr_lambda(TrainConfig(schedule="constant"), 10)(7) == 1.0


def test_total_steps_from_epochs_or_max_steps():
    assert total_steps(TrainConfig(epochs=2.5), steps_per_epoch=4) == 10
    assert total_steps(TrainConfig(epochs=0.1), steps_per_epoch=4) == 1
    assert total_steps(TrainConfig(max_steps=7, epochs=3), steps_per_epoch=4) == 7


def test_split_val_is_deterministic_disjoint_and_complete():
    rows = list(range(50))
    train, val = split_val(rows, 10, seed=3)
    assert len(val) == 10 and sorted(train + val) == rows
    assert split_val(rows, 10, seed=3) == (train, val)
    assert split_val(rows, 10, seed=4)[1] != val
    assert split_val(rows, 0, seed=3) == (rows, [])
    with pytest.raises(DataError, match=r"dpo\.val_size=50 leaves no training rows out of 50"):
        split_val(rows, 50, seed=3, key="dpo.val_size")


def test_equal_shards_give_every_rank_the_same_number_of_batches():
    shards = [equal_shards(7, batch_size=2, rank=r, world=3) for r in range(3)]
    assert shards == [[[0, 3], [6]], [[1, 4], []], [[2, 5], []]]
    assert sorted(i for s in shards for b in s for i in b) == list(range(7))


def test_check_finite_names_the_step_and_the_checkpoint():
    check_finite(1.5, 3, "loss", None)
    with pytest.raises(FloatingPointError, match=r"non-finite loss \(nan\) at optimizer step 3.*ckpt/step-2"):
        check_finite(float("nan"), 3, "loss", "ckpt/step-2")
    with pytest.raises(FloatingPointError, match="no checkpoint was written yet"):
        check_finite(float("inf"), 1, "gradient norm", None)


def test_resume_point_none_auto_and_explicit(tmp_path):
    identity = {"settings": {"sft.lr": 0.1}}
    assert resume_point(TrainConfig(resume="none"), str(tmp_path), identity, "sft") is None
    assert resume_point(TrainConfig(resume="auto"), str(tmp_path / "absent"), identity, "sft") is None
    with pytest.raises(ConfigError, match="not a resume state"):
        resume_point(TrainConfig(resume=str(tmp_path)), str(tmp_path), identity, "sft")


# --------------------------------------------------------------------------- scored logits


def _ragged_batch():
    from looper.data.tokenize import Encoded, collate

    g = torch.Generator().manual_seed(0)
    rows = []
    for n, p in [(20, 7), (14, 5), (25, 11)]:
        ids = torch.randint(4, 200, (n,), generator=g).tolist()
        rows.append(Encoded(ids, [-100] * p + ids[p:], p, False))
    return rows, collate(rows, pad_id=3)


def _lora_model(tiny_model_dir):
    from looper.config import LoraConfig
    from looper.models import attach_lora, load_base_model

    torch.manual_seed(0)
    model = attach_lora(load_base_model(str(tiny_model_dir)), LoraConfig(r=4))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # a non-zero adapter, so its gradients are not trivially zero
            torch.nn.init.normal_(p, std=0.05)
    return model


def test_the_lm_head_runs_on_scored_positions_only(tiny_model_dir):
    """scored_token_logps runs the LM head on the N completion-token predictors, nothing
    else, and gives the loss and LoRA gradients of masked_cross_entropy on full logits."""
    from looper.losses.sft import masked_cross_entropy
    from looper.loops.common import keeps_logits_by_mask, scored_token_logps

    rows, batch = _ragged_batch()
    n_scored = sum(len(e.input_ids) - e.prompt_len for e in rows)
    model = _lora_model(tiny_model_dir)
    assert keeps_logits_by_mask(model)
    seen = []
    head = model.get_base_model().lm_head
    hook = head.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    token_logps, row_of = scored_token_logps(model, batch)
    hook.remove()
    assert seen == [(n_scored, head.in_features)]
    assert row_of.tolist() == sum(([i] * (len(e.input_ids) - e.prompt_len) for i, e in enumerate(rows)), [])
    (-token_logps.sum()).backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()

    full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    s, n = masked_cross_entropy(full, batch["labels"])
    s.backward()
    assert int(n) == n_scored
    assert (-token_logps.sum()).item() == pytest.approx(s.item(), rel=1e-6)
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(ours[name], p.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_a_model_without_mask_slicing_gets_full_logits_then_the_mask(tiny_model_dir, monkeypatch):
    """A model whose forward does not slice by a boolean mask is never given one: the full
    logits are computed and the scored rows taken from them, with the same result."""
    from looper.loops import common

    rows, batch = _ragged_batch()
    model = _lora_model(tiny_model_dir)
    with torch.no_grad():
        fast, row_of = common.scored_token_logps(model, batch)
        monkeypatch.setattr(common, "keeps_logits_by_mask", lambda m: False)
        seen = []
        head = model.get_base_model().lm_head
        hook = head.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
        slow, row_of_slow = common.scored_token_logps(model, batch)
        hook.remove()
    assert seen == [tuple(batch["input_ids"].shape) + (head.in_features,)]
    torch.testing.assert_close(fast, slow, rtol=1e-6, atol=1e-6)
    assert torch.equal(row_of, row_of_slow)


def test_mask_slicing_is_detected_from_the_forward():
    from looper.loops.common import _slices_logits_by_mask

    class Plain(torch.nn.Module):
        def forward(self, input_ids):
            return input_ids

    class OwnSlicing(torch.nn.Module):
        def forward(self, input_ids, logits_to_keep=0):
            return input_ids[:, -logits_to_keep:]

    assert not _slices_logits_by_mask(Plain)
    assert not _slices_logits_by_mask(OwnSlicing)
    from transformers import LlamaForCausalLM, Phi3ForCausalLM, Qwen2ForCausalLM

    assert all(_slices_logits_by_mask(c) for c in (LlamaForCausalLM, Qwen2ForCausalLM, Phi3ForCausalLM))



def test_the_policy_runs_the_fused_lora_forward_under_fsdp(micro_cfg, tmp_path, monkeypatch):
    """build_policy gives every LoRA layer the fused forward, and after FSDP2 sharding the
    training forward takes it (peft's own forward is never called)."""
    from peft.tuners.lora.layer import Linear as PeftLoraLinear

    from looper import dist
    from looper.lora import FusedLoraLinear
    from looper.loops.common import build_policy, scored_token_logps, shard

    cfg = micro_cfg(tmp_path)
    env = dist.init_distributed("cpu")
    model, _ = build_policy(cfg, env, cfg.model.name_or_path, None, cfg.lora)
    layers = [m for m in model.modules() if isinstance(m, PeftLoraLinear)]
    assert layers and all(type(m) is FusedLoraLinear for m in layers)
    model = shard(model, env, False, torch.float32)
    calls = []
    real = PeftLoraLinear.forward
    monkeypatch.setattr(PeftLoraLinear, "forward", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    _, batch = _ragged_batch()
    (-scored_token_logps(model, batch)[0].sum()).backward()
    assert calls == []


def test_a_right_padding_mask_is_left_to_causal_attention(tiny_model_dir):
    """Right padding never reaches the model (causal attention keeps real tokens from seeing
    it) and the kept logits equal those of the masked forward; any other mask is passed."""
    from looper.loops.common import scored_logits

    rows, batch = _ragged_batch()
    model = _lora_model(tiny_model_dir)
    seen = []
    base = model.get_base_model()
    hook = base.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("attention_mask")), with_kwargs=True)
    keep = batch["labels"] != -100
    with torch.no_grad():
        ours = scored_logits(model, batch, keep)
        masked = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[keep]
        torch.testing.assert_close(ours, masked, rtol=1e-5, atol=1e-5)
        assert seen[0] is None and seen[1] is not None

        left = {k: v.flip(1) for k, v in batch.items()}  # padding first: the mask matters
        seen.clear()
        scored_logits(model, left, left["labels"] != -100)
        assert torch.equal(seen[0], left["attention_mask"])
    hook.remove()
