"""``looper.checkpoint``: resume states (save, list, find, load, prune), atomic saves that
leave only ignorable ``.tmp-*`` folders behind, RNG restore, and PEFT adapters that load
with plain ``PeftModel.from_pretrained``.

One process: ``init_distributed("cpu")`` gives a size-1 gloo group, so the models here are
FSDP2-sharded exactly as in a training run (the shared tiny model + LoRA r=4, about a
second to build).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from looper import checkpoint, dist
from looper.config import ConfigError, LoraConfig, ModelConfig


@pytest.fixture(scope="module")
def env():
    return dist.init_distributed("cpu")


def build(tiny_model_dir, env, seed: int, lora_b_scale: float = 0.0):
    """A sharded PEFT model (tiny model + LoRA r=4) and its AdamW optimizer, as the loops
    build them. ``lora_b_scale`` > 0 fills lora_B with random values (a non-zero adapter)."""
    from looper.loops.common import build_optimizer, trainable_params
    from looper.config import SFTConfig
    from looper.models import attach_lora, decoder_layers, load_base_model, load_tokenizer

    model = load_base_model(str(tiny_model_dir), ModelConfig(), device="cpu", dtype=torch.float32)
    torch.manual_seed(seed)
    model = attach_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0))
    if lora_b_scale:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, lora_b_scale)
    before_shard = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model = dist.shard_model(model, decoder_layers(model), env.device)
    opt = build_optimizer(trainable_params(model), SFTConfig(lr=1e-2))
    return model, opt, load_tokenizer(str(tiny_model_dir)), before_shard


def train_step(model, opt, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 300, (2, 12), generator=g)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: dist.full_tensor(p.detach()).clone() for n, p in model.named_parameters() if p.requires_grad}


def optim_tensors(model, opt) -> dict[str, torch.Tensor]:
    out = {}
    for n, p in model.named_parameters():
        for k, v in opt.state.get(p, {}).items():
            out[f"{n}/{k}"] = dist.full_tensor(v).clone() if isinstance(v, torch.Tensor) else torch.tensor(v)
    return out


def fake_state(root: Path, step: int, complete: bool = True) -> Path:
    """A resume-state folder made by hand (only trainer_state.json matters for listing)."""
    path = root / f"step-{step}"
    path.mkdir(parents=True)
    if complete:
        (path / "trainer_state.json").write_text(json.dumps({"step": step}))
    return path


@pytest.fixture
def trained(tiny_model_dir, env):
    model, opt, tok, _ = build(tiny_model_dir, env, seed=1)
    train_step(model, opt, seed=0)
    train_step(model, opt, seed=1)
    return model, opt, tok


# --------------------------------------------------------------------------- round trip


def test_resume_state_round_trip(tmp_path, tiny_model_dir, env, trained):
    model, opt, _ = trained
    root = str(tmp_path / "ck" / "sft_lora-resume")
    params, moments = trainable(model), optim_tensors(model, opt)
    assert len(moments) == 3 * len(params)  # step, exp_avg, exp_avg_sq per parameter
    state_in = {"scheduler": {"last_epoch": 2, "base_lrs": [0.01]}, "tokens_seen": 1234, "step": -1}
    path = checkpoint.save_resume_state(root, 2, model, opt, state_in, trainable_only=True, keep_last=3)
    assert path == os.path.join(root, "step-2")
    assert sorted(os.listdir(path)) == ["model_optim", "rng_rank0.pt", "trainer_state.json"]
    assert checkpoint.list_resume_states(root) == [path]
    assert checkpoint.find_resume_state("auto", root) == path
    assert checkpoint.find_resume_state(path, root) == path
    expected_state = {"scheduler": {"last_epoch": 2, "base_lrs": [0.01]}, "tokens_seen": 1234, "step": 2, "world_size": 1}
    assert checkpoint.read_trainer_state(path) == expected_state
    assert not [n for n in os.listdir(root) if n.startswith(".tmp-")]

    # a fresh model with another LoRA init and an empty optimizer takes the saved state
    model2, opt2, _, _ = build(tiny_model_dir, env, seed=7)
    params2 = trainable(model2)
    assert any(not torch.equal(params[k], params2[k]) for k in params), "the fresh model must differ"
    got = checkpoint.load_resume_state(path, model2, opt2, trainable_only=True)
    assert got == expected_state
    after = trainable(model2)
    assert sorted(after) == sorted(params)
    for k in params:
        assert torch.equal(after[k], params[k]), k
    moments2 = optim_tensors(model2, opt2)
    assert sorted(moments2) == sorted(moments)
    for k in moments:
        assert torch.equal(moments2[k], moments[k]), k
    # and both continue identically: one more step from each ends at the same weights
    train_step(model, opt, seed=5)
    train_step(model2, opt2, seed=5)
    a, b = trainable(model), trainable(model2)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_rng_is_restored(tmp_path, env, trained):
    model, opt, _ = trained
    root = str(tmp_path / "r")
    random.seed(11), np.random.seed(11), torch.manual_seed(11)
    path = checkpoint.save_resume_state(root, 1, model, opt, {}, trainable_only=True, keep_last=1)
    after_save = (torch.rand(4), np.random.rand(3), [random.random() for _ in range(3)])
    # move every generator on, then load: the same draws come again
    torch.rand(100), np.random.rand(100), random.random()
    checkpoint.load_resume_state(path, model, opt, trainable_only=True)
    after_load = (torch.rand(4), np.random.rand(3), [random.random() for _ in range(3)])
    assert torch.equal(after_save[0], after_load[0])
    assert np.array_equal(after_save[1], after_load[1])
    assert after_save[2] == after_load[2]
    # a state written by another world size leaves the RNG alone
    ts = Path(path) / "trainer_state.json"
    ts.write_text(json.dumps(dict(json.loads(ts.read_text()), world_size=2)))
    torch.manual_seed(99)
    expect = torch.rand(4)
    torch.manual_seed(99)
    checkpoint.load_resume_state(path, model, opt, trainable_only=True)
    assert torch.equal(torch.rand(4), expect)


# --------------------------------------------------------------------------- listing and pruning


def test_keep_last_keeps_exactly_the_newest(tmp_path, env, trained):
    model, opt, _ = trained
    root = str(tmp_path / "r")
    for step in (2, 9, 10, 11):  # 10 sorts before 9 as text: the order must be numeric
        checkpoint.save_resume_state(root, step, model, opt, {}, trainable_only=True, keep_last=2)
        kept = [os.path.basename(p) for p in checkpoint.list_resume_states(root)]
        expect = {2: ["step-2"], 9: ["step-2", "step-9"], 10: ["step-9", "step-10"], 11: ["step-10", "step-11"]}[step]
        assert kept == expect
        assert sorted(os.listdir(root)) == sorted(expect)  # pruned folders are gone from disk
    assert checkpoint.find_resume_state("auto", root).endswith("step-11")
    checkpoint.save_resume_state(root, 12, model, opt, {}, trainable_only=True, keep_last=1)
    assert os.listdir(root) == ["step-12"]


def test_listing_ignores_temporary_and_incomplete_folders(tmp_path):
    root = tmp_path / "r"
    assert checkpoint.list_resume_states(str(root)) == []  # no folder at all
    assert checkpoint.find_resume_state("auto", str(root)) is None
    fake_state(root, 3)
    fake_state(root, 20)
    fake_state(root, 30, complete=False)  # killed before trainer_state.json
    tmp = root / ".tmp-step-40-123"
    tmp.mkdir()
    (tmp / "trainer_state.json").write_text("{}")
    (root / "step-x").mkdir()
    (root / "step-50.old").mkdir()
    (root / "step-50.old" / "trainer_state.json").write_text("{}")
    (root / "notes.txt").write_text("")
    assert checkpoint.list_resume_states(str(root)) == [str(root / "step-3"), str(root / "step-20")]
    assert checkpoint.find_resume_state("auto", str(root)) == str(root / "step-20")


def test_a_killed_save_is_cleaned_by_the_next(tmp_path, env, trained):
    model, opt, _ = trained
    root = tmp_path / "r"
    root.mkdir()
    for name in (".tmp-step-4-111", ".tmp-step-5-222"):  # leftovers of saves killed mid-way
        (root / name / "model_optim").mkdir(parents=True)
        (root / name / "trainer_state.json").write_text("{}")
    assert checkpoint.list_resume_states(str(root)) == []
    checkpoint.save_resume_state(str(root), 5, model, opt, {}, trainable_only=True, keep_last=3)
    assert os.listdir(root) == ["step-5"]


def test_find_resume_state_settings(tmp_path):
    root = tmp_path / "r"
    good = fake_state(root, 1)
    assert checkpoint.find_resume_state("none", str(root)) is None
    assert checkpoint.find_resume_state(str(good), str(tmp_path / "elsewhere")) == str(good)
    incomplete = fake_state(root, 2, complete=False)
    for bad in (incomplete, tmp_path / "missing"):
        with pytest.raises(ConfigError, match="trainer_state.json"):
            checkpoint.find_resume_state(str(bad), str(root))


# --------------------------------------------------------------------------- adapters


def test_saved_adapter_loads_with_peft_and_equals_the_weights(tmp_path, tiny_model_dir, env):
    from peft import PeftModel

    from looper.models import load_base_model

    model, opt, tok, before = build(tiny_model_dir, env, seed=3, lora_b_scale=0.05)
    out = tmp_path / "checkpoints" / "sft_lora"
    out.mkdir(parents=True)
    (out / "stale.txt").write_text("from an older save")
    stale_tmp = tmp_path / "checkpoints" / ".tmp-sft_lora-999"  # a killed earlier save
    stale_tmp.mkdir()
    checkpoint.save_adapter(model, tok, str(out), extra={"stage": "sft", "steps": 3})
    names = set(os.listdir(out))
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "looper_info.json"} <= names
    assert "stale.txt" not in names  # the folder was replaced as a whole
    assert json.loads((out / "looper_info.json").read_text()) == {"stage": "sft", "steps": 3}
    assert os.listdir(tmp_path / "checkpoints") == ["sft_lora"]  # no .tmp-* left, old one cleaned

    base = load_base_model(str(tiny_model_dir), ModelConfig(), device="cpu", dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, str(out))
    got = {n: p.detach() for n, p in loaded.named_parameters() if "lora_" in n}
    in_memory = trainable(model)
    assert sorted(got) == sorted(in_memory) == sorted(before)
    assert any("lora_B" in k for k in got)
    for k in got:
        assert torch.equal(got[k], in_memory[k]), k
        assert torch.equal(got[k], before[k]), k
    assert max(v.abs().max().item() for k, v in got.items() if "lora_B" in k) > 0.01  # a real, non-zero adapter
