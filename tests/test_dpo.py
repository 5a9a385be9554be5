"""The DPO loop end to end on a tiny model: the reference pass (against a naive per-token
computation), precomputed vs online reference, the on-disk cache, FSDP2 parity across
ranks, exact resume after a kill, learning, the saved adapter, the NLL term and bad input.
Every test runs a real ``train_dpo`` (in this process, under torchrun, or in a child
process that is killed)."""

from __future__ import annotations

import glob
import json
import math
import os
import shutil
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import assert_metrics_close, kill_training_run, read_jsonl, run_torchrun
from looper import checkpoint
from looper.config import ConfigError, LoraConfig
from looper.io import DataError
from looper.layout import RunLayout
from looper.loops.dpo import train_dpo

PROMPT = "Q: {q}\nA: "
N_PAIRS = 24
MAX_LEN = 160  # the pairs below are 83-130 tokens with the tiny tokenizer: nothing is cut


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tiny model gains nothing from a second thread, and on a loaded 2-core machine
    two OpenMP threads per process make every step ~10x slower. Child processes get
    OMP_NUM_THREADS=1 from conftest.subprocess_env, so both sides also compute alike."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------- assets


def pair_records(n: int = N_PAIRS, seed: int = 3) -> list[dict]:
    """Chosen is a question's own (correct) solution, rejected another question's."""
    from looper.data.synthetic import generate_problems

    probs = generate_problems(n, seed=seed, min_steps=1, max_steps=1)
    out = []
    for i, p in enumerate(probs):
        other = probs[(i + 1) % n]
        out.append(dict(
            pair_id=f"pair-{i}", question_id=p["question_id"], kind="correctness",
            prompt=PROMPT.format(q=p["question"]), chosen=p["answer"], rejected=other["answer"],
            chosen_reward=1.0, rejected_reward=0.0, margin=1.0,
        ))
    return out


def write_pairs(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def make_sft_adapter(base_dir: Path, out_dir: Path, seed: int, dropout: float = 0.0) -> Path:
    """A PEFT LoRA adapter (r=4, all linear layers) with random non-zero B, so the SFT
    policy differs from the base model, saved with the tokenizer as train_sft would."""
    from looper.models import attach_lora, load_base_model, load_tokenizer

    torch.manual_seed(seed)
    model = attach_lora(load_base_model(str(base_dir)), LoraConfig(r=4, alpha=8, dropout=dropout))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    model.save_pretrained(str(out_dir))
    load_tokenizer(str(base_dir)).save_pretrained(str(out_dir))
    return out_dir


@pytest.fixture(scope="module")
def assets(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo_assets")
    records = pair_records()
    return SimpleNamespace(
        base=tiny_model_dir,
        adapter=make_sft_adapter(tiny_model_dir, root / "sft_lora", seed=1),
        adapter_dropout=make_sft_adapter(tiny_model_dir, root / "sft_lora_dropout", seed=2, dropout=0.1),
        records=records,
        pairs=write_pairs(root / "preferences.jsonl", records),
    )


DPO_DEFAULTS = dict(
    data__max_length=MAX_LEN, dpo__batch_size=2, dpo__grad_accum=2, dpo__max_steps=4, dpo__lr=1e-3,
    dpo__beta=0.1,
)


@pytest.fixture
def dpo_overrides(micro_overrides, assets):
    def make(output_dir, *overrides, adapter=None, pairs=None, **kw):
        settings = dict(DPO_DEFAULTS, dpo__adapter=str(adapter or assets.adapter), dpo__pairs=str(pairs or assets.pairs))
        settings.update(kw)
        return micro_overrides(output_dir, *overrides, **settings)

    return make


@pytest.fixture
def dpo_cfg(dpo_overrides):
    from looper.config import load_config

    def make(output_dir, *overrides, **kw):
        return load_config(None, dpo_overrides(output_dir, *overrides, **kw))

    return make


# --------------------------------------------------------------------------- helpers


def metrics(cfg) -> list[dict]:
    return read_jsonl(Path(cfg.run.output_dir) / "metrics" / "dpo.jsonl")


def out_dir(cfg) -> str:
    return RunLayout.of(cfg).checkpoint(cfg.dpo.output_name)


def resume_root(cfg) -> str:
    return RunLayout.of(cfg).resume(cfg.dpo.output_name)


def cache_files(cfg) -> list[str]:
    return sorted(glob.glob(os.path.join(cfg.run.output_dir, "cache", "ref_logps-*.safetensors")))


def adapter_tensors(path) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(path, "adapter_model.safetensors"))


def assert_tensors_close(a: dict, b: dict, rel: float, what: str) -> float:
    """Same keys; every tensor within ``rel`` of the other, relative to its largest entry."""
    assert sorted(a) == sorted(b), f"{what}: different keys {set(a) ^ set(b)}"
    worst = 0.0
    for k in a:
        x, y = a[k].double(), b[k].double()
        assert x.shape == y.shape, f"{what}: {k} has shape {tuple(x.shape)} vs {tuple(y.shape)}"
        scale = max(x.abs().max().item(), y.abs().max().item(), 1e-12)
        diff = (x - y).abs().max().item() / scale
        worst = max(worst, diff)
        assert diff <= rel, f"{what}: {k} differs by {diff:.3g} (relative to max |x|), tolerance {rel}"
    return worst


def assert_nothing_written(cfg) -> None:
    ckpt = Path(cfg.run.output_dir) / "checkpoints"
    assert not (ckpt / cfg.dpo.output_name).exists(), "a dpo_lora folder was left after a failure"
    assert not glob.glob(str(ckpt / ".tmp-*")), "a temporary folder was left after a failure"
    assert not cache_files(cfg), "a reference cache was written for a failed run"


def naive_logps(model, tokenizer, prompt: str, completion: str) -> tuple[float, int]:
    """Summed completion log-prob of one unpadded sequence, a Python loop over positions
    in fp64: BOS + prompt tokens, then completion tokens + EOS (tokenized separately)."""
    ids = [tokenizer.bos_token_id] + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    n_prompt = len(ids)
    ids += tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    total = 0.0
    for t in range(n_prompt, len(ids)):
        total += (logits[t - 1, ids[t]] - torch.logsumexp(logits[t - 1], dim=-1)).item()
    return total, len(ids) - n_prompt


def peft_policy(base_dir, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


# --------------------------------------------------------------------------- reference pass and cache


def test_reference_logps_match_a_naive_computation_and_the_cache_is_keyed(dpo_cfg, assets, tmp_path):
    import looper.loops.dpo as dpo
    from looper.models import load_tokenizer

    cfg = dpo_cfg(tmp_path / "run", dpo__max_steps=1)
    assert train_dpo(cfg).reference == "computed"
    m = metrics(cfg)
    assert len(m) == 1
    # policy == reference at step 0: the sigmoid of 0, rewards 0
    assert m[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert abs(m[0][k]) < 1e-5, (k, m[0][k])
    assert m[0]["logps/chosen"] < -10 and m[0]["logps/rejected"] < -10

    # the cached tensor equals an independent, unbatched computation with peft's own loader
    (cache,) = cache_files(cfg)
    ref = load_file(cache)["logps"]
    assert ref.shape == (N_PAIRS, 2)
    tok = load_tokenizer(str(assets.adapter))
    model = peft_policy(assets.base, assets.adapter)
    naive = torch.tensor(
        [[naive_logps(model, tok, r["prompt"], r[k])[0] for k in ("chosen", "rejected")] for r in assets.records],
        dtype=torch.float64,
    )
    torch.testing.assert_close(ref.double(), naive, rtol=1e-5, atol=1e-4)
    assert (naive[:, 0] - naive[:, 1]).abs().max() > 1.0, "chosen and rejected should differ"

    # rerun with the same inputs: the cache is read, not recomputed or rewritten
    mtime = os.stat(cache).st_mtime_ns
    cfg_again = dpo_cfg(tmp_path / "run", dpo__max_steps=1, dpo__resume="none")
    assert train_dpo(cfg_again).reference == "cached"
    assert cache_files(cfg_again) == [cache] and os.stat(cache).st_mtime_ns == mtime
    assert metrics(cfg_again)[0]["loss"] == m[0]["loss"]

    # a changed adapter gives a new key and a new file, computed for the new adapter
    changed = tmp_path / "sft_changed"
    shutil.copytree(assets.adapter, changed)
    weights = adapter_tensors(changed)
    save_file({k: (v * 1.5 if "lora_B" in k else v) for k, v in weights.items()}, str(changed / "adapter_model.safetensors"))
    cfg_new = dpo_cfg(tmp_path / "run", dpo__max_steps=1, dpo__resume="none", adapter=changed)
    assert train_dpo(cfg_new).reference == "computed"
    files = cache_files(cfg_new)
    assert len(files) == 2 and cache in files
    new_ref = load_file([f for f in files if f != cache][0])["logps"]
    assert (new_ref - ref).abs().max() > 1e-3
    # the step-1 loss is log 2 again only if the new cache belongs to the new adapter
    assert metrics(cfg_new)[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)

    # the key also covers the pair file and the length limit
    key = dpo.reference_cache_key(str(assets.pairs), str(assets.adapter), tok, MAX_LEN, "truncate")
    other_pairs = write_pairs(tmp_path / "other.jsonl", assets.records[:-1])
    assert key == dpo.reference_cache_key(str(assets.pairs), str(assets.adapter), tok, MAX_LEN, "truncate")
    assert key != dpo.reference_cache_key(str(other_pairs), str(assets.adapter), tok, MAX_LEN, "truncate")
    assert key != dpo.reference_cache_key(str(assets.pairs), str(assets.adapter), tok, MAX_LEN - 1, "truncate")
    # ... and the base model and precision (the same adapter file on another base is another reference)
    assert key != dpo.reference_cache_key(str(assets.pairs), str(assets.adapter), tok, MAX_LEN, "truncate", "other|bf16")
    base_copy = tmp_path / "base_copy"
    shutil.copytree(assets.base, base_copy)
    moved_cfg = dpo_cfg(tmp_path / "run", dpo__max_steps=1, dpo__resume="none", model__name_or_path=str(base_copy))
    assert train_dpo(moved_cfg).reference == "computed" and len(cache_files(moved_cfg)) == 3


def test_online_reference_gives_the_precomputed_trajectory(dpo_cfg, assets, tmp_path):
    """LoRA dropout (0.1) in the adapter: the reference must be computed without dropout in
    both modes, and the online reference pass must not change the policy's RNG stream."""
    settings = dict(dpo__max_steps=6, dpo__val_size=4, dpo__eval_every=3, dpo__lr=3e-3, adapter=assets.adapter_dropout)
    cfg_p = dpo_cfg(tmp_path / "pre", **settings)
    cfg_o = dpo_cfg(tmp_path / "online", dpo__reference="online", **settings)
    out_p, out_o = train_dpo(cfg_p).output_dir, train_dpo(cfg_o).output_dir
    m_p, m_o = metrics(cfg_p), metrics(cfg_o)
    assert len(m_p) == 6 and "eval/loss" in m_p[2] and "eval/loss" in m_p[5]
    assert_metrics_close(m_p, m_o, rel=1e-4, abs_=1e-5)
    assert abs(m_p[-1]["loss"] - m_p[0]["loss"]) > 1e-3, "the trajectory should move"
    assert_tensors_close(adapter_tensors(out_p), adapter_tensors(out_o), rel=1e-4, what="adapter")
    assert len(cache_files(cfg_p)) == 1 and not cache_files(cfg_o), "online mode reads and writes no cache"


# --------------------------------------------------------------------------- FSDP2 parity


@pytest.mark.slow
def test_two_ranks_match_one_rank_with_the_same_global_batch(dpo_overrides, dpo_cfg, tmp_path):
    common = dict(dpo__max_steps=4, dpo__lr=3e-3, dpo__warmup_steps=1, dpo__val_size=4, dpo__eval_every=2)
    two = dpo_overrides(tmp_path / "w2", dpo__batch_size=2, dpo__grad_accum=1, **common)
    two_online = dpo_overrides(tmp_path / "w2_online", dpo__batch_size=2, dpo__grad_accum=1, dpo__reference="online", **common)
    # one launch runs both (process start-up dominates on 2 cores)
    run_torchrun(
        f"""
        from looper.config import load_config
        from looper.loops.dpo import train_dpo
        for overrides in {json.dumps([two, two_online])}:
            train_dpo(load_config(None, overrides))
        """,
        workdir=tmp_path,
    )
    cfg1 = dpo_cfg(tmp_path / "w1", dpo__batch_size=2, dpo__grad_accum=2, **common)
    cfg2 = dpo_cfg(tmp_path / "w2", dpo__batch_size=2, dpo__grad_accum=1, **common)
    out1 = train_dpo(cfg1).output_dir
    m1, m2 = metrics(cfg1), metrics(cfg2)
    assert len(m1) == 4 and all("eval/loss" in r for r in m1[1::2])
    assert [r["tokens"] for r in m1] == [r["tokens"] for r in m2]  # the same pairs per step
    assert_metrics_close(m1, m2, rel=1e-5, abs_=1e-6)
    # the sharded reference pass equals the single-process one
    (c1,), (c2,) = cache_files(cfg1), cache_files(cfg2)
    assert Path(c1).name == Path(c2).name
    torch.testing.assert_close(load_file(c1)["logps"], load_file(c2)["logps"], rtol=1e-6, atol=1e-5)
    a1, a2 = adapter_tensors(out1), adapter_tensors(out_dir(cfg2))
    assert_tensors_close(a1, a2, rel=1e-5, what="dpo adapter")
    # the online reference (a second adapter switched in on sharded layers) agrees too
    cfg2o = dpo_cfg(tmp_path / "w2_online", dpo__batch_size=2, dpo__grad_accum=1, dpo__reference="online", **common)
    assert_metrics_close(m1, metrics(cfg2o), rel=1e-4, abs_=1e-5)
    assert_tensors_close(a1, adapter_tensors(out_dir(cfg2o)), rel=1e-4, what="online dpo adapter")
    sft = adapter_tensors(cfg1.dpo.adapter)
    assert max((a1[k] - sft[k]).abs().max().item() for k in sft) > 1e-4, "the policy did not train"


# --------------------------------------------------------------------------- resume after a kill

# Stall inside the training micro-step STALL_CALL (counting grad-enabled dpo_loss calls only,
# not eval passes), signal the parent, and wait to be killed.
@pytest.mark.slow
def test_killed_run_resumes_to_the_same_adapter_and_metrics(dpo_overrides, dpo_cfg, assets, tmp_path):
    # 20 train pairs / (2 x 2) = 5 steps per epoch: the resumed part crosses an epoch;
    # LoRA dropout makes the result depend on the restored RNG state.
    settings = dict(dpo__max_steps=8, dpo__save_every=3, dpo__val_size=4, dpo__eval_every=4, dpo__lr=3e-3,
                    dpo__warmup_steps=2, adapter=assets.adapter_dropout)
    killed, full = tmp_path / "killed", tmp_path / "full"
    cfg_k = dpo_cfg(killed, **settings)
    stall_step = 7
    proc = kill_training_run(tmp_path, "looper.loops.dpo", "dpo_objective", "train_dpo", dpo_overrides(killed, **settings),
                             stall_call=(stall_step - 1) * 2 + 1)
    assert proc.returncode == -signal.SIGKILL

    root = resume_root(cfg_k)
    assert root == os.path.join(str(killed), "checkpoints", "dpo_lora-resume")  # RunLayout.resume: beside the output
    assert [Path(p).name for p in checkpoint.list_resume_states(root)] == ["step-3", "step-6"]
    assert [r["step"] for r in metrics(cfg_k)] == list(range(1, stall_step))
    assert not os.path.exists(out_dir(cfg_k))

    out_k = train_dpo(cfg_k).output_dir  # resume=auto continues from step-6 (the reference comes from the cache)
    cfg_f = dpo_cfg(full, **settings)
    out_f = train_dpo(cfg_f).output_dir

    assert_tensors_close(adapter_tensors(out_k), adapter_tensors(out_f), rel=1e-6, what="adapter")
    assert_metrics_close(metrics(cfg_k), metrics(cfg_f), rel=1e-6, abs_=1e-9)
    assert [r["step"] for r in metrics(cfg_k)] == list(range(1, 9))
    assert "eval/loss" in metrics(cfg_k)[7]
    states_k, states_f = checkpoint.list_resume_states(root), checkpoint.list_resume_states(resume_root(cfg_f))
    assert [Path(p).name for p in states_k] == [Path(p).name for p in states_f] == ["step-6", "step-8"]
    tk, tf = (json.loads(Path(p[-1], "trainer_state.json").read_text()) for p in (states_k, states_f))
    assert tk == tf


def test_resume_refuses_a_state_from_other_inputs(dpo_cfg, assets, tmp_path):
    """A resume state belongs to one (pairs, adapter) reference: continuing it against a
    different pair file would silently mix two reference models."""
    cfg = dpo_cfg(tmp_path / "run", dpo__max_steps=2, dpo__save_every=1)
    train_dpo(cfg)
    other = write_pairs(tmp_path / "other.jsonl", list(reversed(assets.records)))
    cfg2 = dpo_cfg(tmp_path / "run", dpo__max_steps=4, pairs=other)
    with pytest.raises(ConfigError, match=r"dpo\.resume"):
        train_dpo(cfg2)
    train_dpo(dpo_cfg(tmp_path / "run", dpo__max_steps=4, dpo__resume="none", pairs=other))
    assert [r["step"] for r in metrics(cfg)] == [1, 2, 3, 4]


# --------------------------------------------------------------------------- it learns; the output loads


def test_training_raises_rewards_and_the_saved_adapter_loads_with_peft(dpo_cfg, assets, tmp_path):
    from looper.models import load_tokenizer

    beta = 0.5
    # 40 steps of 4 pairs: about 7 epochs of the 24 pairs
    cfg = dpo_cfg(tmp_path, dpo__max_steps=40, dpo__batch_size=4, dpo__grad_accum=1, dpo__lr=5e-3,
                  dpo__beta=beta, dpo__schedule="constant")
    out = train_dpo(cfg).output_dir
    m = metrics(cfg)
    assert len(m) == 40

    def mean(key, rows):
        return sum(r[key] for r in rows) / len(rows)

    first, last = m[:3], m[-3:]
    assert mean("rewards/margins", last) > mean("rewards/margins", first) + 0.5, [r["rewards/margins"] for r in m]
    assert mean("rewards/accuracies", last) >= 0.75, [r["rewards/accuracies"] for r in m]
    assert mean("loss", last) < mean("loss", first) - 0.15, [r["loss"] for r in m]
    assert mean("rewards/chosen", last) > mean("rewards/rejected", last)

    # the folder is a plain PEFT adapter of the same shape, with new weights
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "looper_info.json"):
        assert os.path.isfile(os.path.join(out, name)), name
    sft_cfg = json.loads((assets.adapter / "adapter_config.json").read_text())
    dpo_cfg_json = json.loads(Path(out, "adapter_config.json").read_text())
    assert dpo_cfg_json["r"] == sft_cfg["r"] and sorted(dpo_cfg_json["target_modules"]) == sorted(sft_cfg["target_modules"])
    trained, sft = adapter_tensors(out), adapter_tensors(assets.adapter)
    assert sorted(trained) == sorted(sft)
    assert max((trained[k] - sft[k]).abs().max().item() for k in sft) > 1e-3

    # evaluated independently with peft's loader on the training pairs: the implicit reward
    # (policy minus the SFT reference) now prefers the chosen answers
    tok = load_tokenizer(out)
    policy, reference = peft_policy(assets.base, out), peft_policy(assets.base, assets.adapter)
    margins = []
    for r in assets.records:
        pc, pr = (naive_logps(policy, tok, r["prompt"], r[k])[0] for k in ("chosen", "rejected"))
        rc, rr = (naive_logps(reference, tok, r["prompt"], r[k])[0] for k in ("chosen", "rejected"))
        margins.append(beta * ((pc - rc) - (pr - rr)))
    assert sum(x > 0 for x in margins) / len(margins) >= 0.8, margins
    assert sum(margins) / len(margins) > 0.5, margins


# --------------------------------------------------------------------------- the NLL term


def test_nll_weight_adds_the_chosen_nll_to_the_objective(dpo_cfg, assets, tmp_path):
    from looper.data.tokenize import MicroBatches
    from looper.loops.dpo import load_pairs
    from looper.models import load_tokenizer

    cfg0 = dpo_cfg(tmp_path / "w0", dpo__max_steps=3, dpo__lr=3e-3)
    cfg1 = dpo_cfg(tmp_path / "w1", dpo__max_steps=3, dpo__lr=3e-3, dpo__nll_weight=1.0)
    out0, out1 = train_dpo(cfg0).output_dir, train_dpo(cfg1).output_dir
    m0, m1 = metrics(cfg0), metrics(cfg1)
    assert all("nll" in r for r in m0 + m1)

    # step 1: the policy is the reference, so nll = mean over the step's pairs of
    # -log p(chosen) / (chosen tokens), from the reference log-probs
    tok = load_tokenizer(str(assets.adapter))
    examples, _, _ = load_pairs(str(assets.pairs), tok, MAX_LEN, "truncate")
    step0 = [i for mb in MicroBatches([e.length for e in examples], 2, 2, cfg1.dpo.seed).step(0) for i in mb]
    ref = load_file(cache_files(cfg1)[0])["logps"]
    expected = sum(-ref[i, 0].item() / len(examples[i].chosen_ids) for i in step0) / len(step0)
    assert m1[0]["nll"] == pytest.approx(expected, rel=1e-5)
    assert m0[0]["nll"] == pytest.approx(expected, rel=1e-5)  # logged even with weight 0

    # the logged "loss" is the DPO term (log 2 at step 1 either way); the objective differs
    assert m0[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and m1[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert m1[0]["grad_norm"] != pytest.approx(m0[0]["grad_norm"], rel=1e-2), (m0[0]["grad_norm"], m1[0]["grad_norm"])
    assert m1[1]["loss"] != pytest.approx(m0[1]["loss"], rel=1e-4)
    assert m1[-1]["nll"] < m0[-1]["nll"], "the NLL term should lower the chosen NLL"
    a0, a1 = adapter_tensors(out0), adapter_tensors(out1)
    assert max((a0[k] - a1[k]).abs().max().item() for k in a0) > 1e-4


# --------------------------------------------------------------------------- bad input


def test_missing_field_exits_2_naming_file_and_line(dpo_overrides, dpo_cfg, assets, tmp_path, capsys):
    from looper.cli import main

    recs = [dict(r) for r in assets.records[:6]]
    del recs[2]["rejected"]
    bad = write_pairs(tmp_path / "missing.jsonl", recs)
    code = main(["dpo", *dpo_overrides(tmp_path / "run", pairs=bad)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"{bad}:3" in err and "rejected" in err, err
    assert_nothing_written(dpo_cfg(tmp_path / "run", pairs=bad))

    malformed = tmp_path / "malformed.jsonl"
    malformed.write_text(json.dumps(assets.records[0]) + "\n{not json\n")
    with pytest.raises(DataError, match=rf"{malformed}:2: malformed JSON"):
        train_dpo(dpo_cfg(tmp_path / "run2", pairs=malformed))


@pytest.mark.parametrize("case", ["empty_chosen", "blank_rejected", "no_pairs"])
def test_empty_completion_or_zero_pairs_is_a_clear_error(case, dpo_cfg, assets, tmp_path):
    recs = [dict(r) for r in assets.records[:6]]
    if case == "empty_chosen":
        recs[1]["chosen"] = ""
        match = r"empty\.jsonl:2: field 'chosen' must be a non-empty string"
    elif case == "blank_rejected":
        recs[4]["rejected"] = "  \n"
        match = r"empty\.jsonl:5: field 'rejected' must be a non-empty string"
    else:
        recs = []
        match = r"empty\.jsonl: zero preference pairs"
    cfg = dpo_cfg(tmp_path / "run", pairs=write_pairs(tmp_path / "empty.jsonl", recs))
    with pytest.raises(DataError, match=match):
        train_dpo(cfg)
    assert_nothing_written(cfg)


def test_long_prompt_is_rejected_or_truncated_and_counted(dpo_overrides, dpo_cfg, assets, tmp_path, capsys):
    from looper.cli import main

    recs = [dict(r) for r in assets.records]
    recs[5]["prompt"] = "Q: " + " ".join(["Tom has 5 apples and buys 3 more."] * 30) + "\nA: "
    pairs = write_pairs(tmp_path / "long.jsonl", recs)

    cfg = dpo_cfg(tmp_path / "err", pairs=pairs, data__truncation="error")
    with pytest.raises(DataError, match=rf"long\.jsonl:6: .*data\.max_length={MAX_LEN}"):
        train_dpo(cfg)
    assert_nothing_written(cfg)
    assert main(["dpo", *dpo_overrides(tmp_path / "err2", pairs=pairs, data__truncation="error")]) == 2
    assert f"{pairs}:6" in capsys.readouterr().err

    cfg = dpo_cfg(tmp_path / "cut", pairs=pairs, data__truncation="truncate", dpo__max_steps=6,
                  dpo__batch_size=4, dpo__grad_accum=1)
    out = train_dpo(cfg).output_dir
    assert "(1 truncated)" in capsys.readouterr().out
    m = metrics(cfg)
    assert len(m) == 6 and all(math.isfinite(r["loss"]) for r in m)
    # every row of every step fits: tokens per step <= 4 pairs x 2 rows x max_length
    steps = [b["tokens"] - a for a, b in zip([0] + [r["tokens"] for r in m[:-1]], m)]
    assert all(0 < s <= 4 * 2 * MAX_LEN for s in steps)
    assert os.path.isfile(os.path.join(out, "adapter_model.safetensors"))


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(dpo_cfg, tmp_path, monkeypatch):
    import looper.loops.dpo as dpo

    cfg = dpo_cfg(tmp_path, dpo__max_steps=5, dpo__save_every=2, dpo__batch_size=4, dpo__grad_accum=1)
    real = dpo.dpo_objective
    calls = [0]

    def nan_from_step_3(*args, **kwargs):
        out = real(*args, **kwargs)
        calls[0] += 1  # one training call per step
        if calls[0] >= 3:
            out = {**out, "total": out["total"] * float("nan"), "dpo": out["dpo"] * float("nan")}
        return out

    monkeypatch.setattr(dpo, "dpo_objective", nan_from_step_3)
    with pytest.raises(FloatingPointError, match=r"step 3\b") as info:
        train_dpo(cfg)
    assert os.path.join(resume_root(cfg), "step-2") in str(info.value)
    assert [Path(p).name for p in checkpoint.list_resume_states(resume_root(cfg))] == ["step-2"]
    assert [r["step"] for r in metrics(cfg)] == [1, 2]
    assert not os.path.exists(out_dir(cfg))
    monkeypatch.undo()
    train_dpo(cfg)  # the kept checkpoint resumes cleanly
    assert [r["step"] for r in metrics(cfg)] == [1, 2, 3, 4, 5]


def test_missing_sft_adapter_is_a_config_error(dpo_overrides, dpo_cfg, tmp_path, capsys):
    from looper.cli import main

    missing = tmp_path / "no_such_adapter"
    code = main(["dpo", *dpo_overrides(tmp_path / "run", adapter=missing)])
    err = capsys.readouterr().err
    assert code == 2 and "dpo.adapter" in err and str(missing) in err, err
    # the default (auto) is <output_dir>/checkpoints/sft_lora, absent here
    cfg = dpo_cfg(tmp_path / "run2", dpo__adapter="auto")
    with pytest.raises(ConfigError, match=r"dpo\.adapter.*checkpoints/sft_lora"):
        train_dpo(cfg)
    for c in (dpo_cfg(tmp_path / "run", adapter=missing), cfg):
        assert_nothing_written(c)


def test_a_step_that_evaluated_is_logged_off_the_log_interval(dpo_cfg, tmp_path):
    """Regression: DPO computed held-out metrics at step 5 with log_every=10 and dropped them."""
    cfg = dpo_cfg(tmp_path / "run", dpo__max_steps=10, dpo__log_every=10, dpo__eval_every=5, dpo__val_size=4)
    train_dpo(cfg)
    m = metrics(cfg)
    assert [r["step"] for r in m] == [5, 10]
    assert all("eval/loss" in r and "eval/rewards/accuracies" in r for r in m)


# --------------------------------------------------------------------------- the run folder contract


def _snapshot(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()}


def test_a_finished_run_refuses_another_beta_and_leaves_the_folder_alone(dpo_cfg, tmp_path):
    cfg = dpo_cfg(tmp_path / "run", dpo__max_steps=2)
    train_dpo(cfg)
    before = _snapshot(tmp_path / "run")
    assert "configs/dpo.yaml" in before and "checkpoints/dpo_lora/looper_info.json" in before
    with pytest.raises(ConfigError) as info:
        train_dpo(dpo_cfg(tmp_path / "run", dpo__max_steps=2, dpo__beta=0.2))
    msg = str(info.value)
    assert "dpo.beta: 0.1 -> 0.2" in msg and "dpo.resume=none" in msg, msg
    assert "beta: 0.1" in (tmp_path / "run" / "configs" / "dpo.yaml").read_text()
    assert json.loads((tmp_path / "run" / "checkpoints" / "dpo_lora" / "looper_info.json").read_text())["beta"] == 0.1
    assert _snapshot(tmp_path / "run") == before


def test_identical_pairs_are_dropped_with_a_count(dpo_cfg, assets, tmp_path, capsys):
    recs = [dict(r) for r in assets.records]
    for i in (3, 7):
        recs[i]["rejected"] = recs[i]["chosen"]
    pairs = write_pairs(tmp_path / "same.jsonl", recs)
    cfg = dpo_cfg(tmp_path / "run", pairs=pairs, dpo__max_steps=2)
    result = train_dpo(cfg)
    out = capsys.readouterr().out
    assert f"[dpo] {pairs}: dropped 2 pair(s) whose chosen and rejected texts are identical" in out, out
    assert f"[dpo] {N_PAIRS - 2} train / 0 val pairs" in out, out
    assert result.steps == 2 and [r["step"] for r in metrics(cfg)] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in metrics(cfg))


def test_a_repeated_pair_id_names_both_lines(dpo_cfg, assets, tmp_path):
    recs = [dict(r) for r in assets.records[:6]]
    recs[4]["pair_id"] = recs[1]["pair_id"]
    pairs = write_pairs(tmp_path / "dup.jsonl", recs)
    cfg = dpo_cfg(tmp_path / "run", pairs=pairs)
    with pytest.raises(DataError, match=rf"{pairs}:5: pair_id 'pair-1' repeats line 2"):
        train_dpo(cfg)
    assert_nothing_written(cfg)


def test_a_non_utf8_pair_file_names_the_line(dpo_cfg, assets, tmp_path):
    pairs = tmp_path / "bytes.jsonl"
    lines = [json.dumps(r).encode() for r in assets.records[:4]]
    lines[1] = lines[1].replace(b'"pair-1"', b'"pair-\xff"')
    pairs.write_bytes(b"\n".join(lines) + b"\n")
    cfg = dpo_cfg(tmp_path / "run", pairs=pairs)
    with pytest.raises(DataError, match=rf"{pairs}:2: not UTF-8"):
        train_dpo(cfg)
    assert_nothing_written(cfg)


# --------------------------------------------------------------------------- bf16 on CPU

BF16_TOL = 2e-2  # relative: bf16 keeps 8 mantissa bits (~4e-3 per rounding)
VOLATILE_BF16 = ("tokens_per_s", "rewards/accuracies")

_FP32_MASTERS_HOOK = """
import torch
from looper.loops import common
_real_step = common.TrainLoop.optimizer_step
def _checked_step(self, *a, **kw):  # the optimizer steps fp32 masters with fp32 grads
    for p in self.params:
        local = p.to_local() if hasattr(p, "to_local") else p
        grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
        assert local.dtype == torch.float32 and grad.dtype == torch.float32, (local.dtype, grad.dtype)
    return _real_step(self, *a, **kw)
common.TrainLoop.optimizer_step = _checked_step
"""


@pytest.mark.slow
def test_bf16_dpo_on_cpu_two_ranks_match_one_rank(dpo_overrides, dpo_cfg, assets, tmp_path, monkeypatch):
    """model.dtype=bfloat16 on CPU: FSDP2 computes in bf16 (as on GPU), the LoRA masters and
    their gradients stay fp32, the logged losses are fp32 values, and 2 ranks match 1."""
    from looper.loops import common

    kw = dict(dpo__max_steps=4, dpo__lr=3e-3, dpo__warmup_steps=1, dpo__val_size=4, dpo__eval_every=2, dpo__batch_size=2)
    two = dpo_overrides(tmp_path / "w2", "model.dtype=bfloat16", dpo__grad_accum=1, **kw)
    two_online = dpo_overrides(tmp_path / "w2_online", "model.dtype=bfloat16", dpo__grad_accum=1,
                               dpo__reference="online", **kw)
    run_torchrun(
        _FP32_MASTERS_HOOK + f"""
from looper.config import load_config
from looper.loops.dpo import train_dpo
for overrides in {json.dumps([two, two_online])}:
    train_dpo(load_config(None, overrides))
""",
        workdir=tmp_path,
    )
    real_step = common.TrainLoop.optimizer_step
    checked = []

    def checked_step(self, *a, **k):
        for p in self.params:
            local = p.to_local() if hasattr(p, "to_local") else p
            grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
            assert local.dtype == torch.float32 and grad.dtype == torch.float32
        checked.append(1)
        return real_step(self, *a, **k)

    monkeypatch.setattr(common.TrainLoop, "optimizer_step", checked_step)
    cfg1 = dpo_cfg(tmp_path / "w1", "model.dtype=bfloat16", dpo__grad_accum=2, **kw)
    out1 = train_dpo(cfg1).output_dir
    assert len(checked) == 4
    cfg2 = dpo_cfg(tmp_path / "w2", "model.dtype=bfloat16", dpo__grad_accum=1, **kw)
    m1, m2 = metrics(cfg1), metrics(cfg2)
    assert len(m1) == 4 and all("eval/loss" in r for r in m1[1::2])
    assert [r["tokens"] for r in m1] == [r["tokens"] for r in m2]
    losses = [r["loss"] for r in m1]
    assert all(math.isfinite(v) for v in losses)
    # the policy starts as the reference: ln 2 up to bf16 rounding of the two passes' logits
    assert losses[0] == pytest.approx(math.log(2), abs=1e-2)
    # 4 steps of different pairs need not lower the loss; the policy must move, and 2 ranks match 1
    assert any(abs(r["rewards/margins"]) > 1e-3 for r in m1[1:]), m1
    # rewards/accuracies counts margins > 0: at step 1 every margin is bf16 rounding noise around
    # 0 (policy == reference, computed in differently shaped batches), so its sign is not compared
    assert_metrics_close(m1, m2, rel=BF16_TOL, abs_=2e-3, volatile=VOLATILE_BF16)
    # the bf16 reference log-probs (stored fp32) agree between the sharded and single passes
    (c1,), (c2,) = cache_files(cfg1), cache_files(cfg2)
    assert Path(c1).name == Path(c2).name
    ref1 = load_file(c1)["logps"]
    assert ref1.dtype in (torch.float32, torch.float64)
    torch.testing.assert_close(ref1, load_file(c2)["logps"], rtol=BF16_TOL, atol=0.1)
    a1, a2 = adapter_tensors(out1), adapter_tensors(out_dir(cfg2))
    assert all(v.dtype == torch.float32 for v in (*a1.values(), *a2.values())), "adapters are saved in fp32"
    assert_tensors_close(a1, a2, rel=5e-2, what="bf16 dpo adapter")
    start = adapter_tensors(assets.adapter)
    assert max((a1[k] - start[k]).abs().max().item() for k in start) > 1e-4, "the adapter did not train"
    cfg2o = dpo_cfg(tmp_path / "w2_online", "model.dtype=bfloat16", dpo__grad_accum=1, dpo__reference="online", **kw)
    assert_metrics_close(m1, metrics(cfg2o), rel=BF16_TOL, abs_=2e-3, volatile=VOLATILE_BF16)
    assert all(v.dtype == torch.float32 for v in adapter_tensors(out_dir(cfg2o)).values())


# --------------------------------------------------------------------------- packed pairs


def test_packed_rows_give_the_same_trajectory_on_one_and_two_ranks(dpo_overrides, dpo_cfg, tmp_path):
    """``dpo.packed`` (prompt | chosen | rejected in one row) against the concatenated rows:
    the same losses, metrics, reference log-probs and adapter within fp32 tolerance, on one
    rank and on two (the adapter has no LoRA dropout: a packed row draws other masks)."""
    common = dict(dpo__max_steps=4, dpo__lr=3e-3, dpo__warmup_steps=1, dpo__val_size=4, dpo__eval_every=2,
                  dpo__batch_size=2)
    packed2 = dpo_overrides(tmp_path / "packed2", dpo__grad_accum=1, dpo__packed=True, **common)
    run_torchrun(
        f"""
        from looper.config import load_config
        from looper.loops.dpo import train_dpo
        train_dpo(load_config(None, {json.dumps(packed2)}))
        """,
        workdir=tmp_path,
    )
    plain = dpo_cfg(tmp_path / "plain1", dpo__grad_accum=2, dpo__packed=False, **common)
    packed = dpo_cfg(tmp_path / "packed1", dpo__grad_accum=2, dpo__packed=True, **common)
    for cfg in (plain, packed):
        train_dpo(cfg)
    two = dpo_cfg(tmp_path / "packed2", dpo__grad_accum=1, dpo__packed=True, **common)
    m_plain, m_packed, m_two = metrics(plain), metrics(packed), metrics(two)
    assert len(m_plain) == 4 and all("eval/loss" in r for r in m_plain[1::2])
    assert [r["step"] for r in m_packed] == [1, 2, 3, 4]
    assert_metrics_close(m_plain, m_packed, rel=1e-5, abs_=1e-5, volatile=("tokens", "tokens_per_s"))
    assert_metrics_close(m_packed, m_two, rel=1e-5, abs_=1e-5, volatile=("tokens_per_s",))
    # packing computes each prompt once: fewer positions for the same pairs
    assert all(p["tokens"] < c["tokens"] for p, c in zip(m_packed, m_plain))
    (c_plain,), (c_packed,) = cache_files(plain), cache_files(packed)
    assert Path(c_plain).name != Path(c_packed).name  # keyed apart: computed in another order
    torch.testing.assert_close(load_file(c_plain)["logps"], load_file(c_packed)["logps"], rtol=1e-6, atol=1e-5)
    assert_tensors_close(adapter_tensors(out_dir(plain)), adapter_tensors(out_dir(packed)), rel=1e-4, what="packed adapter")
    assert_tensors_close(adapter_tensors(out_dir(packed)), adapter_tensors(out_dir(two)), rel=1e-4, what="2-rank packed adapter")


def test_packed_rows_need_sdpa_and_auto_packs_on_cpu(dpo_cfg, tmp_path):
    import torch as _torch

    from looper.loops.dpo import use_packed

    with pytest.raises(ConfigError, match="dpo.packed needs model.attn_implementation: sdpa"):
        train_dpo(dpo_cfg(tmp_path / "run", dpo__packed=True, model__attn_implementation="eager"))
    cpu, cuda = _torch.device("cpu"), _torch.device("cuda")
    assert use_packed(dpo_cfg(tmp_path / "a"), cpu) is True  # the default, auto
    assert use_packed(dpo_cfg(tmp_path / "a"), cuda) is False  # not measured on GPU yet
    assert use_packed(dpo_cfg(tmp_path / "a", model__attn_implementation="eager"), cpu) is False
    assert use_packed(dpo_cfg(tmp_path / "a", dpo__packed=False), cpu) is False
