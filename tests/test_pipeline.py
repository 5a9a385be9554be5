"""The whole pipeline on a micro config: artifacts, hand-offs between stages, resume,
--stages/--force, the example configs and the research example."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT, kill_when, subprocess_env

from looper.config import ConfigError, default_config_path, load_config
from looper.io import read_jsonl
from looper.layout import RunLayout
from looper.loops.pipeline import STAGES, run_pipeline

# A tiny model trained for seconds on one-step problems with small numbers: sampling at
# temperature 1 then gets a few answers right, so groups are mixed and pairs exist.
MICRO_PIPELINE = [
    "run.progress=false",
    "run.device=cpu",
    "model.tiny.hidden_size=32",
    "model.tiny.num_layers=2",
    "model.tiny.num_heads=2",
    "model.tiny.num_kv_heads=2",
    "model.tiny.intermediate_size=64",
    "model.tiny.vocab_size=300",
    "model.tiny.corpus_size=300",
    "data.synthetic.n_train=400",
    "data.synthetic.n_test=16",
    "data.synthetic.max_steps=1",
    "data.synthetic.max_number=6",
    "sft.val_size=8",
    "base_train={max_steps: 60, batch_size: 16, lr: 1.0e-2, warmup_steps: 5, val_size: 8}",
    "sft.max_steps=4",
    "sft.batch_size=8",
    "rollout.n_questions=16",
    "rollout.k=8",
    "rollout.generation.max_new_tokens=40",
    "dpo.max_steps=3",
    "dpo.val_size=0",
    "eval.generation.max_new_tokens=40",
]


def micro(out: Path, *extra: str):
    return load_config(default_config_path(), [f"run.output_dir={out}", *MICRO_PIPELINE, *extra])


def mtime(path: Path) -> float:
    return os.stat(path).st_mtime_ns


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pipeline") / "run"
    run_pipeline(micro(out))
    return out


def test_every_artifact_exists_and_each_stage_consumed_the_previous_output(finished_run: Path):
    out = finished_run
    state = json.loads((out / "pipeline_state.json").read_text())
    assert list(state["completed"]) == list(STAGES)

    # base -> sft: the adapter was trained on the base-trained model
    assert (out / "checkpoints/base/model.safetensors").exists()
    sft = out / "checkpoints/sft_lora"
    for f in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json"):
        assert (sft / f).exists(), f
    assert json.loads((sft / "looper_info.json").read_text())["base_model"] == str(out / "checkpoints/base")
    assert json.loads((sft / "adapter_config.json").read_text())["base_model_name_or_path"] == str(out / "checkpoints/base")

    # sft -> rollout: sampled from the SFT adapter, records complete
    meta = json.loads((out / "data/rollouts.jsonl.meta.json").read_text())
    assert meta["info"]["adapter"] == str(sft)
    rollouts = read_jsonl(str(out / "data/rollouts.jsonl"))
    assert len(rollouts) == 16
    for rec in rollouts:
        assert {"question_id", "question", "gold", "s_end", "s_path", "s_cf", "s_wm", "trajectories"} <= set(rec)
        assert len(rec["trajectories"]) == 8
        for t in rec["trajectories"]:
            assert {"full_text", "answer", "num_tokens", "correct", "cf", "reward"} <= set(t)

    # rollout -> prefs: every pair's texts are trajectories of its own question
    pairs = read_jsonl(str(out / "data/preferences.jsonl"))
    assert pairs
    texts = {r["question_id"]: {t["full_text"] for t in r["trajectories"]} for r in rollouts}
    for p in pairs:
        assert {"pair_id", "question_id", "kind", "prompt", "chosen", "rejected", "margin"} <= set(p)
        assert p["chosen"] in texts[p["question_id"]] and p["rejected"] in texts[p["question_id"]]
        assert p["chosen"] != p["rejected"]

    # prefs + sft -> dpo
    dpo = out / "checkpoints/dpo_lora"
    info = json.loads((dpo / "looper_info.json").read_text())
    assert info["start_adapter"] == info["reference_adapter"] == str(sft) and info["steps"] == 3
    dpo_metrics = [json.loads(line) for line in (out / "metrics/dpo.jsonl").read_text().splitlines()]
    assert [m["step"] for m in dpo_metrics] == [1, 2, 3]
    assert abs(dpo_metrics[0]["loss"] - 0.6931471805599453) < 1e-4  # policy == reference at step 1

    # -> eval: three evaluations of the same questions, and the comparison
    ids = None
    for name, adapter in (("base", None), ("sft", sft), ("dpo", dpo)):
        summary = json.loads((out / f"outputs/{name}_eval.json").read_text())
        records = read_jsonl(str(out / f"outputs/{name}_eval.jsonl"))
        assert summary["n"] == len(records) == 16
        assert summary["correct"] == sum(r["correct"] for r in records)
        assert ids is None or ids == [r["question_id"] for r in records]
        ids = [r["question_id"] for r in records]
    report = (out / "report.md").read_text()
    assert "| sft |" in report and "| base |" in report and "| dpo |" in report
    assert "## Rollouts" in report and "## Preference pairs" in report and "## Final dpo metrics" in report
    assert ("## Plots" in report) or ("Plots skipped" in report)


def test_a_rerun_skips_complete_stages(finished_run: Path, capsys):
    watched = [finished_run / "checkpoints/sft_lora/adapter_model.safetensors", finished_run / "data/rollouts.jsonl",
               finished_run / "checkpoints/dpo_lora/adapter_model.safetensors"]
    before = [mtime(p) for p in watched]
    run_pipeline(micro(finished_run))
    assert [mtime(p) for p in watched] == before
    assert capsys.readouterr().out.count("complete, skipped") == len(STAGES)


def test_force_redoes_a_stage_and_everything_after_it(finished_run: Path, tmp_path: Path):
    out = tmp_path / "copy"
    shutil.copytree(finished_run, out)
    sft_before = mtime(out / "checkpoints/sft_lora/adapter_model.safetensors")
    run_pipeline(micro(out), stages=["prefs"], force=["prefs"])
    state = json.loads((out / "pipeline_state.json").read_text())
    assert list(state["completed"]) == ["base", "sft", "rollout", "prefs"]
    assert not (out / "checkpoints/dpo_lora").exists() and not (out / "outputs").exists()
    assert (out / "data/preferences.jsonl").exists()
    assert mtime(out / "checkpoints/sft_lora/adapter_model.safetensors") == sft_before
    with pytest.raises(ConfigError, match="unknown pipeline stage 'sfft'"):
        run_pipeline(micro(out), stages=["sfft"])


def test_killed_mid_dpo_resumes_without_redoing_sft_or_rollouts(finished_run: Path, tmp_path: Path, capsys):
    extra = ["dpo.max_steps=40", "dpo.save_every=2"]
    ref_dir = tmp_path / "uninterrupted"
    shutil.copytree(finished_run, ref_dir)
    run_pipeline(micro(ref_dir, *extra), stages=["dpo"], force=["dpo"])
    reference = [json.loads(l) for l in (ref_dir / "metrics/dpo.jsonl").read_text().splitlines()]

    out = tmp_path / "resume"
    shutil.copytree(finished_run, out)
    run_pipeline(micro(out), stages=["base"], force=["dpo"])  # as if the first run had stopped before DPO
    watched = [out / "checkpoints/sft_lora/adapter_model.safetensors", out / "data/rollouts.jsonl"]
    before = [mtime(p) for p in watched]
    cmd = [sys.executable, "-m", "looper", "pipeline", f"run.output_dir={out}", *MICRO_PIPELINE, *extra]
    proc = subprocess.Popen(cmd, cwd=str(REPO_ROOT), env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    marker = Path(RunLayout.of(micro(out)).resume("dpo_lora")) / "step-4" / "trainer_state.json"
    kill_when(proc, marker.exists, what="a DPO resume state")
    assert not (out / "checkpoints/dpo_lora").exists()

    run_pipeline(micro(out, *extra))
    assert "resuming at step" in capsys.readouterr().out
    assert [mtime(p) for p in watched] == before  # SFT and rollouts were not redone
    resumed = [json.loads(l) for l in (out / "metrics/dpo.jsonl").read_text().splitlines()]
    assert [m["step"] for m in resumed] == list(range(1, 41))
    for a, b in zip(resumed, reference):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)
    assert (out / "checkpoints/dpo_lora/adapter_model.safetensors").exists()


def test_example_configs_load_and_validate():
    configs = sorted((REPO_ROOT / "examples/configs").glob("*.yaml"))
    assert {c.name for c in configs} >= {"tiny_cpu.yaml", "abel7b_8xh100.yaml"}
    for path in configs:
        load_config(str(path))
    assert os.path.samefile(REPO_ROOT / "examples/configs/tiny_cpu.yaml", default_config_path())
    abel = load_config(str(REPO_ROOT / "examples/configs/abel7b_8xh100.yaml"))
    assert abel.model.name_or_path == "GAIR/Abel-7B-002" and abel.model.dtype == "bfloat16"
    assert abel.base_train is None and abel.lora is not None
    assert abel.dpo.batch_size * abel.dpo.grad_accum * 8 == 32 and abel.dpo.lr == 5e-6
    assert abel.rollout.k == 8 and abel.rollout.n_questions == 500 and abel.eval.dataset == "platinum"
    tiny = load_config(default_config_path())
    assert tiny.model.name_or_path == "tiny" and tiny.base_train is not None and tiny.data.train is None


def test_research_example_runs_on_the_micro_run(finished_run: Path, tmp_path: Path):
    out = tmp_path / "research"
    shutil.copytree(finished_run, out)
    sys.path.insert(0, str(REPO_ROOT / "examples"))
    try:
        import research_api
    finally:
        sys.path.pop(0)
    summary = research_api.main(["-c", default_config_path(), f"run.output_dir={out}", *MICRO_PIPELINE])
    assert (out / "checkpoints/dpo_cf_lora/adapter_model.safetensors").exists()
    assert (out / "outputs/dpo_cf_eval.json").exists()
    assert (out / "outputs/compare_dpo_cf.md").exists()
    pairs = read_jsonl(str(out / "data/preferences_dpo_cf.jsonl"))
    assert pairs and summary
