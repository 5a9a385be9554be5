"""The SFT loop end to end on a tiny model: FSDP2 parity across ranks, exact resume after a
kill, atomic saves, loss normalization, learning, loadable outputs, full fine-tuning and
bad input. Every test runs a real ``train_sft`` (in this process, or under torchrun)."""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_metrics_close, kill_training_run, read_jsonl, run_python, run_torchrun
from looper import checkpoint
from looper.layout import RunLayout
from looper.loops.sft import train_sft


# --------------------------------------------------------------------------- helpers


def adapter_tensors(out_dir) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(out_dir, "adapter_model.safetensors"))


def metrics(cfg, stage: str = "sft") -> list[dict]:
    return read_jsonl(Path(cfg.run.output_dir) / "metrics" / f"{stage}.jsonl")


def resume_root(cfg, stage: str = "sft") -> str:
    return RunLayout.of(cfg).resume(cfg.sft.output_name if stage == "sft" else stage)


def assert_tensors_close(a: dict, b: dict, rel: float, what: str, elem_rel: float | None = None) -> float:
    """Same keys and shapes; ``||a - b|| <= rel * ||a||`` over all tensors together, and no
    single entry off by more than ``elem_rel`` (default ``10 * rel``) times the largest |a|.

    Why not per-entry relative: Adam divides each gradient entry by its own running RMS, so
    an entry whose gradient is nearly zero (a sum that cancels) turns fp32 rounding noise
    of different-but-equivalent computations (padding shapes, summation order across
    ranks) into an update of up to ``lr``. The bulk of the tensor agrees to ~1e-8; a
    handful of such entries differ by ~1e-6. Returns the relative norm difference."""
    assert sorted(a) == sorted(b), f"{what}: different keys {set(a) ^ set(b)}"
    elem_rel = 10 * rel if elem_rel is None else elem_rel
    diff2 = norm2 = 0.0
    worst_elem, scale = 0.0, 1e-30
    for k in a:
        x, y = a[k].double(), b[k].double()
        assert x.shape == y.shape, f"{what}: {k} has shape {tuple(x.shape)} vs {tuple(y.shape)}"
        diff2 += (x - y).pow(2).sum().item()
        norm2 += x.pow(2).sum().item()
        scale = max(scale, x.abs().max().item() if x.numel() else 0.0)
    for k in a:
        d = (a[k].double() - b[k].double()).abs().max().item() if a[k].numel() else 0.0
        worst_elem = max(worst_elem, d / scale)
        assert d <= elem_rel * scale, f"{what}: {k} is off by {d:.3g} (largest |entry| {scale:.3g})"
    rel_norm = (diff2 ** 0.5) / max(norm2 ** 0.5, 1e-30)
    assert rel_norm <= rel, f"{what}: relative difference {rel_norm:.3g} > {rel}"
    return rel_norm


def flat_items(obj, prefix=""):
    """(path, leaf) pairs of a nested dict/list state."""
    if isinstance(obj, dict):
        for k in sorted(obj, key=str):
            yield from flat_items(obj[k], f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from flat_items(v, f"{prefix}[{i}]")
    else:
        yield prefix, obj


def load_resume_dict(state_dir: str, tmp_path: Path) -> dict:
    """A resume state's model and optimizer state as plain tensors (no model needed)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp_path / f"{Path(state_dir).parent.parent.name}-{Path(state_dir).name}-{time.time_ns()}.pt"
    dcp_to_torch_save(os.path.join(state_dir, "model_optim"), str(out))
    return torch.load(out, weights_only=True)


def assert_states_close(a: dict, b: dict, rel: float, what: str) -> None:
    """Resume states (model + optimizer) agree: tensors per kind (parameter, exp_avg,
    exp_avg_sq, step) within ``rel``; everything else (param groups) equal."""
    fa, fb = dict(flat_items(a)), dict(flat_items(b))
    assert sorted(fa) == sorted(fb), f"{what}: different entries {set(fa) ^ set(fb)}"
    kinds: dict[str, list[str]] = {}
    for k, v in fa.items():
        if isinstance(v, torch.Tensor):
            kinds.setdefault(k.rsplit("/", 1)[-1] if k.startswith("/optim") else "param", []).append(k)
    assert {"exp_avg", "exp_avg_sq", "step", "param"} <= set(kinds), f"{what}: kinds {sorted(kinds)}"
    for kind, keys in kinds.items():
        assert_tensors_close({k: fa[k] for k in keys}, {k: fb[k] for k in keys}, rel, f"{what} {kind}")
    for k, v in fa.items():
        if isinstance(v, float):
            assert v == pytest.approx(fb[k], rel=1e-12), f"{what}: {k}"
        elif not isinstance(v, torch.Tensor):
            assert v == fb[k], f"{what}: {k}"


# --------------------------------------------------------------------------- FSDP2 parity

PARITY_CASES = {
    # name: (batch_size, grad_accum on 2 ranks); the 1-rank reference uses 2x the accumulation
    "b4_a1": (4, 1),
    "b2_a2": (2, 2),
}


@pytest.mark.slow
def test_two_ranks_match_one_rank_with_the_same_global_batch(micro_overrides, micro_cfg, tmp_path):
    common = dict(sft__max_steps=4, sft__lr=5e-3, sft__warmup_steps=1, sft__eval_every=2, sft__save_every=2)
    two_rank = {
        name: micro_overrides(tmp_path / f"w2_{name}", sft__batch_size=b, sft__grad_accum=a, **common)
        for name, (b, a) in PARITY_CASES.items()
    }
    # one torchrun launch runs both cases (process start-up dominates on 2 cores)
    run_torchrun(
        f"""
        from looper.config import load_config
        from looper.loops.sft import train_sft
        for overrides in {json.dumps(list(two_rank.values()))}:
            train_sft(load_config(None, overrides))
        """,
        workdir=tmp_path,
    )
    for name, (b, a) in PARITY_CASES.items():
        cfg1 = micro_cfg(tmp_path / f"w1_{name}", sft__batch_size=b, sft__grad_accum=2 * a, **common)
        out1 = train_sft(cfg1).output_dir
        cfg2 = micro_cfg(tmp_path / f"w2_{name}", sft__batch_size=b, sft__grad_accum=a, **common)
        m1, m2 = metrics(cfg1), metrics(cfg2)
        assert len(m1) == 4 and all("eval_loss" in r for r in m1[1::2])
        # the same rows per step: token counts agree exactly
        assert [r["completion_tokens"] for r in m1] == [r["completion_tokens"] for r in m2]
        assert_metrics_close(m1, m2, rel=1e-5)
        a1, a2 = adapter_tensors(out1), adapter_tensors(RunLayout.of(cfg2).sft_adapter)
        assert max(v.abs().max().item() for k, v in a1.items() if "lora_B" in k) > 1e-3, "adapter did not train"
        assert_tensors_close(a1, a2, rel=1e-5, what=f"adapter {name}")
        # both worlds also wrote the same (resharded-on-load) optimizer state
        s1 = load_resume_dict(checkpoint.list_resume_states(resume_root(cfg1))[-1], tmp_path)
        s2 = load_resume_dict(checkpoint.list_resume_states(resume_root(cfg2))[-1], tmp_path)
        assert_states_close(s1, s2, rel=1e-4, what=f"resume state {name}")

    # a state saved by 2 ranks resumes on 1 rank (DCP reshards) and ends where 1 rank ends
    b, a = PARITY_CASES["b4_a1"]
    shutil.copytree(tmp_path / "w2_b4_a1", tmp_path / "w2to1")
    cfg_r = micro_cfg(tmp_path / "w2to1", sft__batch_size=b, sft__grad_accum=2 * a, **common)
    shutil.rmtree(os.path.join(resume_root(cfg_r), "step-4"))
    shutil.rmtree(RunLayout.of(cfg_r).sft_adapter)
    assert checkpoint.find_resume_state("auto", resume_root(cfg_r)).endswith("step-2")
    out_r = train_sft(cfg_r).output_dir
    cfg1 = micro_cfg(tmp_path / "w1_b4_a1", sft__batch_size=b, sft__grad_accum=2 * a, **common)
    assert_metrics_close(metrics(cfg1), metrics(cfg_r), rel=1e-5)
    assert_tensors_close(adapter_tensors(RunLayout.of(cfg1).sft_adapter), adapter_tensors(out_r), 1e-5, "2->1 resume")


# --------------------------------------------------------------------------- resume after a kill

# A training run that stalls at its ``stall_call``-th training micro-step (mid-step: after
# the last resume state and metrics line before it were written), touches ``marker`` so
# the parent knows, and waits there to be SIGKILLed.
@pytest.mark.slow
def test_killed_run_resumes_to_the_same_adapter_and_optimizer_state(micro_overrides, micro_cfg, tmp_path):
    # 88 rows / (4 x 2) = 11 steps per epoch, so the resumed run also crosses an epoch;
    # LoRA dropout makes the result depend on the restored RNG state.
    settings = dict(
        sft__max_steps=14, sft__grad_accum=2, sft__save_every=4, sft__eval_every=5, sft__lr=5e-3,
        sft__warmup_steps=2, lora__dropout=0.1,
    )
    killed_dir, full_dir = tmp_path / "killed", tmp_path / "full"
    cfg_k = micro_cfg(killed_dir, **settings)
    stall_step = 10
    overrides = micro_overrides(killed_dir, **settings)
    proc = kill_training_run(tmp_path, "looper.loops.sft", "scored_token_logps", "train_sft", overrides,
                             stall_call=(stall_step - 1) * 2 + 1)
    assert proc.returncode == -signal.SIGKILL

    root = resume_root(cfg_k)
    assert [Path(p).name for p in checkpoint.list_resume_states(root)] == ["step-4", "step-8"]
    assert [r["step"] for r in metrics(cfg_k)] == list(range(1, stall_step))  # step 9 logged
    assert not os.path.exists(RunLayout.of(cfg_k).sft_adapter + "/adapter_model.safetensors")

    out_k = train_sft(cfg_k).output_dir  # resume=auto picks up step-8
    cfg_f = micro_cfg(full_dir, **settings)
    out_f = train_sft(cfg_f).output_dir

    worst = assert_tensors_close(adapter_tensors(out_k), adapter_tensors(out_f), rel=1e-6, what="adapter")
    assert_metrics_close(metrics(cfg_k), metrics(cfg_f), rel=1e-6)
    assert [r["step"] for r in metrics(cfg_k)] == list(range(1, 15))
    states_k, states_f = checkpoint.list_resume_states(root), checkpoint.list_resume_states(resume_root(cfg_f))
    assert [Path(p).name for p in states_k] == [Path(p).name for p in states_f] == ["step-12", "step-14"]
    for sk, sf in zip(states_k, states_f):
        assert_states_close(load_resume_dict(sk, tmp_path), load_resume_dict(sf, tmp_path), 1e-6, Path(sk).name)
        tk, tf = (json.loads(Path(p, "trainer_state.json").read_text()) for p in (sk, sf))
        assert tk == tf
    print(f"worst relative adapter difference after resume: {worst:.3g}")


# --------------------------------------------------------------------------- atomic saves


class _Crash(RuntimeError):
    pass


def test_crash_mid_save_keeps_the_previous_resume_state(micro_cfg, tmp_path, monkeypatch):
    import torch.distributed.checkpoint as dcp

    cfg = micro_cfg(tmp_path / "run", sft__max_steps=6, sft__save_every=2)
    real_save = dcp.save
    calls = [0]

    def crashing_save(state_dict, *args, **kwargs):
        calls[0] += 1
        result = real_save(state_dict, *args, **kwargs)  # the shards are on disk ...
        if calls[0] == 2:
            raise _Crash("killed mid-save")  # ... but trainer_state.json and the rename are not
        return result

    monkeypatch.setattr(dcp, "save", crashing_save)
    with pytest.raises(_Crash):
        train_sft(cfg)
    monkeypatch.setattr(dcp, "save", real_save)

    root = resume_root(cfg)
    stray = glob.glob(os.path.join(root, ".tmp-step-4-*"))
    assert len(stray) == 1 and os.listdir(os.path.join(stray[0], "model_optim")), "no half-written save to test"
    assert [Path(p).name for p in checkpoint.list_resume_states(root)] == ["step-2"]
    assert checkpoint.find_resume_state("auto", root).endswith("step-2")
    state = load_resume_dict(os.path.join(root, "step-2"), tmp_path)
    assert any("exp_avg" in k for k, _ in flat_items(state))

    out = train_sft(cfg).output_dir  # resumes from step-2; the next save cleans the stray folder
    assert not glob.glob(os.path.join(root, ".tmp-*"))
    assert [r["step"] for r in metrics(cfg)] == list(range(1, 7))
    cfg_ref = micro_cfg(tmp_path / "ref", sft__max_steps=6, sft__save_every=2)
    assert_tensors_close(adapter_tensors(out), adapter_tensors(train_sft(cfg_ref).output_dir), 1e-6, "adapter")


def test_crash_mid_adapter_save_keeps_the_old_adapter(micro_cfg, tmp_path, monkeypatch):
    from peft import PeftModel

    from looper.models import load_base_model

    cfg = micro_cfg(tmp_path / "run", sft__max_steps=2, sft__lr=1e-2)
    out = train_sft(cfg).output_dir
    before = {p.name: p.read_bytes() for p in Path(out).iterdir()}

    real_replace = checkpoint.replace_dir

    def crash(src, dst):
        if os.path.basename(dst) == "sft_lora":
            raise _Crash("killed before the rename")
        return real_replace(src, dst)

    # a second save of the same folder (more steps from the resume state) dies before its rename
    cfg2 = micro_cfg(tmp_path / "run", sft__max_steps=4, sft__lr=1e-2, sft__resume="none")
    monkeypatch.setattr(checkpoint, "replace_dir", crash)
    with pytest.raises(_Crash):
        train_sft(cfg2)
    monkeypatch.undo()
    stray = glob.glob(os.path.join(os.path.dirname(out), ".tmp-sft_lora-*"))
    assert len(stray) == 1 and os.path.isfile(os.path.join(stray[0], "adapter_model.safetensors"))
    unfinished = load_file(os.path.join(stray[0], "adapter_model.safetensors"))
    assert {p.name: p.read_bytes() for p in Path(out).iterdir()} == before
    model = PeftModel.from_pretrained(load_base_model(cfg.model.name_or_path), out)
    assert sum("lora_B" in n for n, _ in model.named_parameters()) > 0

    train_sft(cfg2)  # the next save of that folder succeeds and removes the stray one
    assert not glob.glob(os.path.join(os.path.dirname(out), ".tmp-*"))
    assert_tensors_close(adapter_tensors(out), unfinished, 1e-6, "adapter")  # the 4-step one, now in place


# --------------------------------------------------------------------------- loss normalization


def test_four_microbatches_of_one_equal_one_batch_of_four(micro_cfg, tmp_path, monkeypatch):
    """The loss is normalized by the step's completion-token count, not per micro-batch."""
    import looper.loops.sft as sft
    from looper.data.tokenize import MicroBatches, collate
    from looper.losses.sft import masked_cross_entropy
    from looper.models import load_base_model, load_tokenizer

    class FixedSchedule(MicroBatches):
        """Step s uses rows 4s..4s+3 however they are split into micro-batches."""

        def step(self, step):
            rows = list(range(4 * step, 4 * step + 4))
            return [rows[i : i + self.batch_size] for i in range(0, 4, self.batch_size)]

    import looper.loops.common as common

    monkeypatch.setattr(common, "MicroBatches", FixedSchedule)
    runs = {}
    for b, a in [(4, 1), (1, 4), (2, 2)]:
        cfg = micro_cfg(tmp_path / f"b{b}a{a}", sft__batch_size=b, sft__grad_accum=a, sft__max_steps=4, sft__lr=5e-3)
        runs[(b, a)] = (cfg, train_sft(cfg).output_dir)
    cfg4, out4 = runs[(4, 1)]
    m4 = metrics(cfg4)
    for key in [(1, 4), (2, 2)]:
        cfg, out = runs[key]
        assert_metrics_close(m4, metrics(cfg), rel=1e-5)
        assert_tensors_close(adapter_tensors(out4), adapter_tensors(out), 1e-5, f"adapter {key}")

    # step 1 (LoRA B = 0, so the base model): sum of token losses / number of completion tokens
    tok = load_tokenizer(cfg4.model.name_or_path)
    train, _, _ = sft.load_sft_examples(cfg4, tok)
    rows = train[0:4]
    assert len({sum(l != -100 for l in e.labels) for e in rows}) > 1, "rows should differ in length"
    model = load_base_model(cfg4.model.name_or_path)
    with torch.no_grad():
        batch = collate(rows, tok.pad_token_id)
        s, n = masked_cross_entropy(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"])
    assert m4[0]["completion_tokens"] == int(n)
    assert m4[0]["loss"] == pytest.approx((s / n).item(), rel=1e-5)


# --------------------------------------------------------------------------- it learns


def test_training_lowers_the_eval_loss(micro_cfg, tmp_path):
    # The tiny random base bounds what LoRA can do (the LM head is frozen and its logits are
    # ~0.1 wide): uniform is log(300) = 5.70 and 40 steps reach about 5.52.
    cfg = micro_cfg(tmp_path, sft__max_steps=40, sft__eval_every=4, sft__lr=1e-2, lora__r=8, lora__alpha=32)
    train_sft(cfg)
    m = metrics(cfg)
    evals = [r["eval_loss"] for r in m if "eval_loss" in r]
    assert len(evals) == 10
    assert evals[-1] < evals[0] - 0.05, evals
    assert evals[-1] < min(evals[:-1]) + 1e-3, evals  # no late blow-up
    losses = [r["loss"] for r in m]
    assert sum(losses[-8:]) / 8 < sum(losses[:8]) / 8 - 0.05, losses


# --------------------------------------------------------------------------- output loads elsewhere


@pytest.mark.slow
def test_saved_adapter_loads_with_peft_in_a_fresh_process(micro_cfg, tmp_path):
    from looper.models import load_base_model, merged_model

    cfg = micro_cfg(tmp_path / "run", sft__max_steps=4, sft__lr=1e-2)
    out = train_sft(cfg).output_dir
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json"):
        assert os.path.isfile(os.path.join(out, name)), name
    ids = torch.randint(4, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.save(ids, tmp_path / "ids.pt")
    run_python(
        f"""
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        base = AutoModelForCausalLM.from_pretrained({str(cfg.model.name_or_path)!r}, dtype=torch.float32)
        model = PeftModel.from_pretrained(base, {out!r}).eval()
        with torch.no_grad():
            logits = model(input_ids=torch.load({str(tmp_path / 'ids.pt')!r})).logits
        torch.save(logits, {str(tmp_path / 'peft_logits.pt')!r})
        """,
        workdir=tmp_path,
    )
    peft_logits = torch.load(tmp_path / "peft_logits.pt", weights_only=True)
    with torch.no_grad():
        merged = merged_model(load_base_model(cfg.model.name_or_path), out).eval()
        ours = merged(input_ids=ids).logits
        base = load_base_model(cfg.model.name_or_path).eval()(input_ids=ids).logits
    assert (ours - base).abs().max() > 1e-3, "the adapter changes nothing: the test would be vacuous"
    torch.testing.assert_close(peft_logits, ours, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- full fine-tuning


def test_full_finetuning_saves_a_loadable_hf_model(micro_cfg, tmp_path):
    from transformers import AutoModelForCausalLM

    from looper.models import load_base_model

    cfg = micro_cfg(tmp_path, lora=None, sft__max_steps=3, sft__lr=1e-3, sft__output_name="sft_full")
    assert cfg.lora is None
    out = train_sft(cfg).output_dir
    assert os.path.isfile(os.path.join(out, "config.json")) and os.path.isfile(os.path.join(out, "tokenizer.json"))
    assert not os.path.exists(os.path.join(out, "adapter_config.json"))
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    base = load_base_model(cfg.model.name_or_path)
    sd_l, sd_b = loaded.state_dict(), base.state_dict()
    assert sorted(sd_l) == sorted(sd_b)
    changed = [k for k in sd_b if not torch.equal(sd_l[k], sd_b[k])]
    assert len(changed) > len(sd_b) // 2, f"only {changed} changed"
    m = metrics(cfg)
    assert len(m) == 3 and all(r["grad_norm"] > 0 for r in m)
    assert checkpoint.list_resume_states(resume_root(cfg))[-1].endswith("step-3")
    ids = torch.randint(4, 200, (1, 16))
    with torch.no_grad():
        assert torch.isfinite(loaded(input_ids=ids).logits).all()


# --------------------------------------------------------------------------- bad input


def test_empty_dataset_is_a_clear_error(micro_overrides, tmp_path, capsys):
    from looper.cli import main

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code = main(["sft", *micro_overrides(tmp_path / "run", data__train=str(empty))])
    err = capsys.readouterr().err
    assert code == 2
    assert str(empty) in err and re.search(r"empty|no (rows|records)", err), err
    assert not os.path.exists(tmp_path / "run" / "checkpoints" / "sft_lora")


def test_too_long_rows_error_or_truncate(micro_cfg, micro_overrides, tmp_path, capsys):
    from looper.cli import main
    from looper.io import DataError

    # every synthetic row is > 100 tokens and many prompts alone are > 64
    with pytest.raises(DataError, match=r"data\.max_length=64"):
        train_sft(micro_cfg(tmp_path / "err", data__max_length=64, data__truncation="error"))
    assert main(["sft", *micro_overrides(tmp_path / "err2", data__max_length=64, data__truncation="error")]) == 2
    assert "data.max_length=64" in capsys.readouterr().err

    cfg = micro_cfg(tmp_path / "cut", data__max_length=64, data__truncation="truncate", sft__max_steps=2)
    train_sft(cfg)
    out = capsys.readouterr().out
    assert "(96 truncated)" in out, out  # 88 train + 8 val rows, all cut
    m = metrics(cfg)
    assert all(r["tokens"] - p <= 4 * 64 for r, p in zip(m, [0] + [r["tokens"] for r in m[:-1]]))
    assert all(r["completion_tokens"] > 0 for r in m)  # truncation keeps some completion


@pytest.mark.parametrize(
    "override, key",
    [("sft.batch_size=0", "sft.batch_size"), ("sft.lr=abc", "sft.lr"), ("sft.bogus=1", "sft.bogus"),
     ("data.truncation=maybe", "data.truncation")],
)
def test_bad_config_value_exits_2_naming_the_key(override, key, tmp_path, capsys):
    from looper.cli import main

    code = main(["sft", f"run.output_dir={tmp_path}", override])
    err = capsys.readouterr().err
    assert code == 2 and key in err, err
    assert not os.listdir(tmp_path)


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(micro_cfg, tmp_path, monkeypatch):
    import looper.loops.sft as sft

    cfg = micro_cfg(tmp_path, sft__max_steps=6, sft__save_every=2)
    real = sft.scored_token_logps
    calls = [0]

    def nan_from_step_3(model, batch):
        calls[0] += 1  # one call per step (grad_accum=1, no eval before the end)
        token_logps, rows = real(model, batch)
        return (token_logps * float("nan") if calls[0] >= 3 else token_logps), rows

    monkeypatch.setattr(sft, "scored_token_logps", nan_from_step_3)
    root = resume_root(cfg)
    with pytest.raises(FloatingPointError, match=r"step 3\b") as info:
        train_sft(cfg)
    assert os.path.join(root, "step-2") in str(info.value)
    assert [Path(p).name for p in checkpoint.list_resume_states(root)] == ["step-2"]
    assert [r["step"] for r in metrics(cfg)] == [1, 2]
    assert not os.path.exists(RunLayout.of(cfg).sft_adapter + "/adapter_model.safetensors")
    monkeypatch.undo()
    train_sft(cfg)  # the kept checkpoint resumes cleanly
    assert [r["step"] for r in metrics(cfg)] == list(range(1, 7))


def test_a_step_that_evaluated_is_logged_off_the_log_interval(micro_cfg, tmp_path):
    """SFT and DPO share the rule (TrainLoop.finish_step): a step that evaluated is logged."""
    cfg = micro_cfg(tmp_path / "run", sft__max_steps=4, sft__log_every=4, sft__eval_every=2)
    train_sft(cfg)
    assert [(r["step"], "eval_loss" in r) for r in metrics(cfg)] == [(2, True), (4, True)]


# --------------------------------------------------------------------------- the run folder contract

# A finished 4-step run with resume states after steps 2 and 4 (keep_last=2), shared by the
# tests below; each test works on its own copy.
CONTRACT = dict(sft__max_steps=4, sft__save_every=2, sft__keep_last=2, sft__lr=5e-3)


def snapshot(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def finished_sft(tiny_model_dir, tmp_path_factory) -> Path:
    from conftest import build_overrides
    from looper.config import load_config

    out = tmp_path_factory.mktemp("sft_contract") / "run"
    cfg = load_config(None, build_overrides(out, tiny_model_dir, **CONTRACT))
    train_sft(cfg)
    assert [Path(p).name for p in checkpoint.list_resume_states(resume_root(cfg))] == ["step-2", "step-4"]
    return out


def contract_copy(finished_sft: Path, dest: Path) -> Path:
    shutil.copytree(finished_sft, dest)
    return dest


@pytest.mark.slow
def test_a_killed_run_refuses_a_changed_lr_and_touches_nothing(micro_overrides, micro_cfg, tmp_path):
    from looper.config import ConfigError

    settings = dict(sft__max_steps=6, sft__save_every=2, sft__lr=5e-3)
    out = tmp_path / "run"
    proc = kill_training_run(tmp_path, "looper.loops.sft", "scored_token_logps", "train_sft",
                             micro_overrides(out, **settings), stall_call=5)  # mid step 5
    assert proc.returncode == -signal.SIGKILL
    cfg = micro_cfg(out, **settings)
    assert [Path(p).name for p in checkpoint.list_resume_states(resume_root(cfg))] == ["step-2", "step-4"]
    before = snapshot(out)
    assert "configs/sft.yaml" in before and "metrics/sft.jsonl" in before

    with pytest.raises(ConfigError) as info:
        train_sft(micro_cfg(out, **dict(settings, sft__lr=1e-3)))
    msg = str(info.value)
    assert "sft.lr: 0.005 -> 0.001" in msg and "sft.resume=none" in msg, msg
    assert os.path.join(resume_root(cfg), "step-4") in msg, msg
    assert snapshot(out) == before  # configs/sft.yaml, metrics and resume states byte for byte

    # starting over with the new lr is allowed and runs to the end
    result = train_sft(micro_cfg(out, **dict(settings, sft__lr=1e-3, sft__resume="none")))
    assert result.resumed_from is None and result.steps == 6
    m = metrics(cfg)
    assert [r["step"] for r in m] == list(range(1, 7))
    assert m[0]["lr"] == pytest.approx(1e-3)  # step 1 of the new schedule (no warmup)
    state = checkpoint.read_trainer_state(checkpoint.list_resume_states(resume_root(cfg))[-1])
    assert state["step"] == 6 and state["settings"]["sft.lr"] == 1e-3
    assert "lr: 0.001" in (out / "configs" / "sft.yaml").read_text()


def test_a_finished_run_refuses_result_changing_keys_and_accepts_harmless_ones(finished_sft, micro_cfg, tmp_path):
    from looper.config import ConfigError

    out = contract_copy(finished_sft, tmp_path / "run")
    before = snapshot(out)
    with pytest.raises(ConfigError, match=r"sft\.max_steps: 4 -> 6") as info:
        train_sft(micro_cfg(out, **dict(CONTRACT, sft__max_steps=6)))
    assert "sft.resume=none" in str(info.value)
    # another LoRA shape: named, not a tensor size-mismatch traceback from loading the state
    with pytest.raises(ConfigError, match=r"lora\.r: 4 -> 8"):
        train_sft(micro_cfg(out, **dict(CONTRACT, lora__r=8)))
    assert snapshot(out) == before

    # settings that do not change the result: the finished state is picked up, no step runs
    for extra in (dict(sft__log_every=2), dict(run__progress=True), dict(sft__eval_every=3, sft__keep_last=3)):
        result = train_sft(micro_cfg(out, **dict(CONTRACT, **extra)))
        assert result.resumed_from == os.path.join(resume_root(micro_cfg(out)), "step-4"), extra
        assert result.steps == 4 and result.step_seconds == [], extra
    assert [r["step"] for r in read_jsonl(out / "metrics" / "sft.jsonl")] == [1, 2, 3, 4]
    assert_tensors_close(adapter_tensors(finished_sft / "checkpoints" / "sft_lora"),
                         adapter_tensors(out / "checkpoints" / "sft_lora"), 0.0, "adapter", elem_rel=0.0)


def test_data_changed_mid_run_is_refused_naming_it(finished_sft, micro_cfg, tmp_path):
    from looper.config import ConfigError
    from looper.data.synthetic import generate_problems

    out = contract_copy(finished_sft, tmp_path / "run")
    shutil.rmtree(os.path.join(resume_root(micro_cfg(out)), "step-4"))  # as if killed after step 2
    shutil.rmtree(out / "checkpoints" / "sft_lora")
    before = snapshot(out)
    with pytest.raises(ConfigError) as info:
        train_sft(micro_cfg(out, **dict(CONTRACT, data__synthetic__seed=1)))
    msg = str(info.value)
    assert "data.synthetic.seed: 0 -> 1" in msg and "step-2" in msg, msg
    assert snapshot(out) == before

    # a data file edited in place (same path, same settings): its digest tells
    rows = [{"question": p["question"], "answer": p["answer"]} for p in generate_problems(40, seed=5)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = dict(sft__max_steps=4, sft__save_every=2, sft__val_size=4, data__train=str(data))
    train_sft(micro_cfg(tmp_path / "file_run", **dict(run, sft__max_steps=2)))
    rows[7]["answer"] = rows[7]["answer"].replace("####", "Total:\n####")
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ConfigError, match=r"\bdata: '[0-9a-f]+' -> '[0-9a-f]+'"):
        train_sft(micro_cfg(tmp_path / "file_run", **run))


def test_a_damaged_newest_state_falls_back_to_the_one_before(finished_sft, micro_cfg, tmp_path, capsys):
    out = contract_copy(finished_sft, tmp_path / "run")
    cfg = micro_cfg(out, **CONTRACT)
    step4 = os.path.join(resume_root(cfg), "step-4")
    os.remove(os.path.join(step4, "model_optim", "__0_0.distcp"))
    assert checkpoint.damage(step4) == "model_optim/__0_0.distcp is missing or empty"

    result = train_sft(cfg)
    printed = capsys.readouterr().out
    assert f"[sft] resume state {step4} is damaged (model_optim/__0_0.distcp is missing or empty); " \
           "falling back to the one before it" in printed, printed
    assert "resuming at step 2" in printed, printed
    assert result.resumed_from == os.path.join(resume_root(cfg), "step-2") and len(result.step_seconds) == 2
    # steps 3-4 redone exactly as the uninterrupted run did them
    assert_metrics_close(read_jsonl(finished_sft / "metrics" / "sft.jsonl"), metrics(cfg), rel=1e-6)
    assert_tensors_close(adapter_tensors(finished_sft / "checkpoints" / "sft_lora"),
                         adapter_tensors(result.output_dir), 1e-6, "adapter")
    assert checkpoint.damage(step4) is None  # step-4 written again, whole


def test_an_unwritable_output_folder_fails_before_any_training(micro_cfg, micro_overrides, tmp_path, capsys):
    from looper.cli import main
    from looper.io import DataError

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    out = blocker / "run"
    with pytest.raises(DataError, match=re.escape(str(out))):
        train_sft(micro_cfg(out))
    assert main(["sft", *micro_overrides(out)]) == 2
    assert str(out) in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"] and blocker.read_text() == "not a folder"


# --------------------------------------------------------------------------- bf16 on CPU
# model.dtype=bfloat16 takes the GPU path on any device: FSDP2 gathers parameters in bf16
# and reduces gradients in fp32 (looper.dist.mixed_precision); LoRA keeps fp32 trainable
# masters over a bf16 frozen base, full fine-tuning keeps fp32 masters; losses are fp32.

BF16_TOL = 2e-2  # relative: bf16 keeps 8 mantissa bits (~4e-3 per rounding)


def _linear_weight_dtypes(model) -> tuple[dict, list]:
    """Forward pre-hooks on every nn.Linear that record the dtype its weight has when it
    computes (inside FSDP2's unshard: the gathered, possibly cast, parameter)."""
    seen: dict[str, torch.dtype] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            hooks.append(m.register_forward_pre_hook(lambda mod, args, name=name: seen.__setitem__(name, mod.weight.dtype)))
    return seen, hooks


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p


@pytest.mark.parametrize("dtype,lora", [("bfloat16", True), ("bfloat16", False), ("float32", True)])
def test_mixed_precision_follows_model_dtype_on_cpu(micro_cfg, tmp_path, dtype, lora):
    from looper import dist
    from looper.loops.common import build_policy, shard
    from looper.losses.sft import masked_cross_entropy

    cfg = micro_cfg(tmp_path, f"model.dtype={dtype}", *([] if lora else ["lora=null"]))
    env = dist.init_distributed("cpu")
    compute = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    model, _ = build_policy(cfg, env, str(cfg.model.name_or_path), adapter=None, lora=cfg.lora)
    model = shard(model, env, activation_checkpointing=False, compute_dtype=compute)  # as train_sft does
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    frozen = [(n, p) for n, p in model.named_parameters() if not p.requires_grad]
    assert trainable and (frozen if lora else not frozen)
    # stored (sharded master) dtypes: trainable always fp32; a LoRA base in the compute dtype
    assert all(_local(p).dtype == torch.float32 for _, p in trainable), "trainable masters must be fp32"
    assert all(_local(p).dtype == compute for _, p in frozen), "a frozen LoRA base is stored in model.dtype"
    seen, hooks = _linear_weight_dtypes(model)
    ids = torch.randint(4, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    try:
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    finally:
        for h in hooks:
            h.remove()
    # every Linear (LoRA A/B and base alike) computes in the compute dtype
    assert seen and set(seen.values()) == {compute}, seen
    assert logits.dtype == compute
    s, n = masked_cross_entropy(logits, ids)
    assert s.dtype == torch.float32 and torch.isfinite(s)  # the loss is fp32 whatever the logits
    (s / n).backward()
    for name, p in trainable:
        assert p.grad is not None and _local(p.grad).dtype == torch.float32, name  # fp32 reduce, fp32 grads


def test_losses_are_fp32_for_bf16_logits():
    from looper.losses.dpo import dpo_loss, sequence_logps
    from looper.losses.sft import masked_cross_entropy

    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(3, 20, 300, generator=g)).bfloat16().requires_grad_()
    labels = torch.randint(0, 300, (3, 20), generator=g)
    labels[:, :8] = -100
    s, n = masked_cross_entropy(logits, labels)
    lp = sequence_logps(logits, labels)
    assert s.dtype == lp.dtype == torch.float32
    # the same numbers as fp32 arithmetic on the (exact) upcast bf16 logits
    s32, _ = masked_cross_entropy(logits.detach().float(), labels)
    lp32 = sequence_logps(logits.detach().float(), labels)
    torch.testing.assert_close(s.detach(), s32, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(lp.detach(), lp32, rtol=1e-6, atol=1e-4)
    losses, cr, rr = dpo_loss(lp[:2], lp[1:], lp32[:2].bfloat16(), lp32[1:].bfloat16(), beta=0.1)
    assert losses.dtype == cr.dtype == rr.dtype == torch.float32
    s.backward()
    assert logits.grad.dtype == torch.bfloat16 and torch.isfinite(logits.grad.float()).all()


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
def test_bf16_sft_on_cpu_two_ranks_match_one_rank(micro_overrides, micro_cfg, tmp_path, monkeypatch):
    import math

    from looper.loops import common

    common_kw = dict(sft__max_steps=6, sft__lr=1e-2, sft__warmup_steps=1, sft__batch_size=4)
    two = micro_overrides(tmp_path / "w2", "model.dtype=bfloat16", sft__grad_accum=1, **common_kw)
    run_torchrun(
        _FP32_MASTERS_HOOK + f"""
from looper.config import load_config
from looper.loops.sft import train_sft
train_sft(load_config(None, {two!r}))
""",
        workdir=tmp_path,
    )
    real_step = common.TrainLoop.optimizer_step
    checked = []

    def checked_step(self, *a, **kw):
        for p in self.params:
            assert _local(p).dtype == torch.float32 and _local(p.grad).dtype == torch.float32
        checked.append(1)
        return real_step(self, *a, **kw)

    monkeypatch.setattr(common.TrainLoop, "optimizer_step", checked_step)
    cfg1 = micro_cfg(tmp_path / "w1", "model.dtype=bfloat16", sft__grad_accum=2, **common_kw)
    out1 = train_sft(cfg1).output_dir
    assert len(checked) == 6
    cfg2 = micro_cfg(tmp_path / "w2", "model.dtype=bfloat16", sft__grad_accum=1, **common_kw)
    m1, m2 = metrics(cfg1), metrics(cfg2)
    assert len(m1) == len(m2) == 6
    assert [r["completion_tokens"] for r in m1] == [r["completion_tokens"] for r in m2]
    losses1 = [r["loss"] for r in m1]
    assert all(math.isfinite(v) for v in losses1)
    assert losses1[-1] < losses1[0], losses1
    assert_metrics_close(m1, m2, rel=BF16_TOL, abs_=1e-3)
    a1, a2 = adapter_tensors(out1), adapter_tensors(RunLayout.of(cfg2).sft_adapter)
    assert all(v.dtype == torch.float32 for v in (*a1.values(), *a2.values())), "adapters are saved in fp32"
    assert_tensors_close(a1, a2, rel=5e-2, what="bf16 adapter", elem_rel=0.2)

    # the fp32 adapter loads with peft over an fp32 and a bf16 base, and changes both alike
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.randint(4, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    outs = {}
    for dt in (torch.float32, torch.bfloat16):
        with torch.no_grad():
            base = AutoModelForCausalLM.from_pretrained(str(cfg1.model.name_or_path), dtype=dt).eval()
            plain = base(input_ids=ids).logits.float()
            peft = PeftModel.from_pretrained(base, out1).eval()
            assert all(p.dtype == dt for n, p in peft.named_parameters() if "lora_" not in n)
            outs[dt] = peft(input_ids=ids).logits.float()
        assert torch.isfinite(outs[dt]).all()
        assert (outs[dt] - plain).abs().max() > 1e-2, "the adapter changes nothing"
    torch.testing.assert_close(outs[torch.bfloat16], outs[torch.float32], rtol=0, atol=0.1)
