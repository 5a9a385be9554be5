"""``looper.layout``: the names of every path of a run folder, the adapter settings
(``resolve_adapter``, ``adapter_label``), the base model each stage starts from, what a
forced stage removes, and the sidecar files of resumable outputs.

Everything here is pure path logic (no model is built), so the whole file takes well under
a second.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from looper.config import ConfigError, load_config
from looper.layout import (
    RunLayout,
    adapter_label,
    meta_path,
    partial_path,
    partial_paths,
    resolve_adapter,
    resolve_base_model,
    stage_outputs,
)


def make_cfg(root, *overrides: str):
    return load_config(None, [f"run.output_dir={root}", *overrides])


def fake_adapter(path) -> str:
    """A folder that passes for a PEFT adapter (what resolve_adapter checks)."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA"}, f)
    return str(path)


def is_under(path: str, folder: str) -> bool:
    path, folder = os.path.abspath(path), os.path.abspath(folder)
    return os.path.commonpath([path, folder]) == folder and path != folder


# --------------------------------------------------------------------------- names


def test_round_one_paths_have_the_documented_names(tmp_path):
    root = str(tmp_path / "run")
    lay = RunLayout.of(make_cfg(root))
    j = lambda *p: os.path.join(root, *p)  # noqa: E731
    expected = {
        "tiny_model": (lay.tiny_model, j("base_model")),
        "base_checkpoint": (lay.base_checkpoint, j("checkpoints", "base")),
        "sft_adapter": (lay.sft_adapter, j("checkpoints", "sft_lora")),
        "dpo_adapter": (lay.dpo_adapter(), j("checkpoints", "dpo_lora")),
        "dpo_output_name": (lay.dpo_output_name(), "dpo_lora"),
        "resume": (lay.resume("sft_lora"), j("checkpoints", "sft_lora-resume")),
        "rollouts": (lay.rollouts(), j("data", "rollouts.jsonl")),
        "rollouts_summary": (lay.rollouts_summary(), j("data", "rollouts_summary.json")),
        "preferences": (lay.preferences(), j("data", "preferences.jsonl")),
        "preferences_summary": (lay.preferences_summary(), j("data", "preferences_summary.json")),
        "preferences_variant": (lay.preferences_variant("abl"), j("data", "preferences_abl.jsonl")),
        "reference_cache": (lay.reference_cache("k123"), j("cache", "ref_logps-k123.safetensors")),
        "outputs": (lay.outputs, j("outputs")),
        "eval_records": (lay.eval_records("sft"), j("outputs", "sft_eval.jsonl")),
        "eval_summary": (lay.eval_summary("sft"), j("outputs", "sft_eval.json")),
        "compare_markdown": (lay.compare_markdown, j("outputs", "compare.md")),
        "compare_variant": (lay.compare_variant("abl"), j("outputs", "compare_abl.md")),
        "metrics": (lay.metrics("dpo"), j("metrics", "dpo.jsonl")),
        "config": (lay.config("sft"), j("configs", "sft.yaml")),
        "pipeline_state": (lay.pipeline_state, j("pipeline_state.json")),
        "report": (lay.report, j("report.md")),
        "plot": (lay.plot("sft_loss.png"), j("sft_loss.png")),
    }
    for what, (got, want) in expected.items():
        assert got == want, what
        if what != "dpo_output_name":
            assert is_under(got, root), what
    # round 1 is spelled out the same as the default
    assert lay.rollouts(1) == lay.rollouts() and lay.dpo_adapter(1) == lay.dpo_adapter()


def test_round_two_gets_an_r2_suffix(tmp_path):
    root = str(tmp_path / "run")
    lay = RunLayout.of(make_cfg(root))
    assert lay.round_suffix(1) == "" and lay.round_suffix(2) == "_r2" and lay.round_suffix(3) == "_r3"
    assert lay.rollouts(2) == os.path.join(root, "data", "rollouts_r2.jsonl")
    assert lay.rollouts_summary(2) == os.path.join(root, "data", "rollouts_r2_summary.json")
    assert lay.preferences(2) == os.path.join(root, "data", "preferences_r2.jsonl")
    assert lay.preferences_summary(2) == os.path.join(root, "data", "preferences_r2_summary.json")
    assert lay.dpo_output_name(2) == "dpo_r2_lora"
    assert lay.dpo_adapter(2) == os.path.join(root, "checkpoints", "dpo_r2_lora")
    # every round has its own files: none of round 2's names is round 1's
    for name in ("rollouts", "rollouts_summary", "preferences", "preferences_summary", "dpo_adapter"):
        assert getattr(lay, name)(2) != getattr(lay, name)(1), name
        assert getattr(lay, name)(2) != getattr(lay, name)(3), name


def test_output_names_follow_the_config(tmp_path):
    root = str(tmp_path / "run")
    lay = RunLayout.of(make_cfg(root, "sft.output_name=my_sft", "dpo.output_name=pref_lora"))
    assert lay.sft_adapter == os.path.join(root, "checkpoints", "my_sft")
    assert lay.dpo_adapter() == os.path.join(root, "checkpoints", "pref_lora")
    assert lay.dpo_output_name(2) == "pref_r2_lora"  # the _lora ending stays last
    plain = RunLayout.of(make_cfg(root, "dpo.output_name=mydpo"))
    assert plain.dpo_output_name(1) == "mydpo"
    assert plain.dpo_output_name(2) == "mydpo_r2_lora"


def test_resume_folder_is_never_inside_its_output(tmp_path):
    root = str(tmp_path / "run")
    lay = RunLayout.of(make_cfg(root, "sft.output_name=x_lora"))
    names = ["base", lay.sft_name, lay.dpo_output_name(1), lay.dpo_output_name(2), "a", "a-resume"]
    for name in names:
        out, res = lay.checkpoint(name), lay.resume(name)
        assert is_under(res, root)
        assert not is_under(res, out) and res != out, name
        # the final save replaces checkpoints/<name> with a rename: the resume folder is a sibling
        assert os.path.dirname(res) == os.path.dirname(out) == os.path.join(root, "checkpoints")
    # and no output's resume folder is another output's folder
    resumes = {lay.resume(n) for n in names}
    assert len(resumes) == len(names)


# --------------------------------------------------------------------------- the base model


@pytest.mark.parametrize(
    "model, base_train, expect",
    [
        ("tiny", True, "checkpoint"),
        ("tiny", False, "tiny"),
        ("some/hub-model", True, "source"),
        ("some/hub-model", False, "source"),
    ],
)
def test_base_model_is_the_base_checkpoint_exactly_with_tiny_and_base_train(tmp_path, model, base_train, expect):
    root = str(tmp_path / "run")
    overrides = [f"model.name_or_path={model}"] + (["base_train.max_steps=3"] if base_train else [])
    cfg = make_cfg(root, *overrides)
    assert (cfg.base_train is not None) == base_train
    lay = RunLayout.of(cfg)
    assert lay.has_base_stage == (expect == "checkpoint")
    want = {
        "checkpoint": os.path.join(root, "checkpoints", "base"),
        "tiny": os.path.join(root, "base_model"),
        "source": model,
    }[expect]
    assert lay.base_model == want
    assert lay.pretrained == (os.path.join(root, "base_model") if model == "tiny" else model)


def test_resolve_base_model_follows_what_is_on_disk(tmp_path, capsys):
    root = tmp_path / "run"
    lay = RunLayout.of(make_cfg(root, "base_train.max_steps=3"))
    # the base stage has not run: the untrained tiny model, with a note only when asked
    assert resolve_base_model(lay) == lay.tiny_model
    assert capsys.readouterr().out == ""
    assert resolve_base_model(lay, announce=True) == lay.tiny_model
    assert "base stage has not run" in capsys.readouterr().out
    # a folder without config.json is not a finished base stage
    os.makedirs(lay.base_checkpoint)
    assert resolve_base_model(lay) == lay.tiny_model
    (Path(lay.base_checkpoint) / "config.json").write_text("{}")
    assert resolve_base_model(lay, announce=True) == lay.base_checkpoint
    assert capsys.readouterr().out == ""
    # without a base stage the checkpoint is ignored even when it exists
    lay_no_base = RunLayout.of(make_cfg(root))
    assert resolve_base_model(lay_no_base, announce=True) == lay_no_base.tiny_model
    assert capsys.readouterr().out == ""
    hub = RunLayout.of(make_cfg(root, "model.name_or_path=org/model", "base_train.max_steps=3"))
    assert resolve_base_model(hub) == "org/model"


# --------------------------------------------------------------------------- stage outputs


def test_stage_outputs_name_each_stages_files(tmp_path):
    root = str(tmp_path / "run[1]")  # glob metacharacters in the folder name
    lay = RunLayout.of(make_cfg(root, "sft.output_name=x_lora"))
    ck = lambda n: os.path.join(root, "checkpoints", n)  # noqa: E731
    assert stage_outputs(lay, "base") == [ck("base"), ck("base-resume")]
    assert stage_outputs(lay, "sft") == [ck("x_lora"), ck("x_lora-resume")]
    assert stage_outputs(lay, "dpo") == [ck("dpo_lora"), ck("dpo_lora-resume")]
    assert stage_outputs(lay, "dpo", round=2) == [ck("dpo_r2_lora"), ck("dpo_r2_lora-resume")]
    roll = os.path.join(root, "data", "rollouts.jsonl")
    assert stage_outputs(lay, "rollout") == [roll, roll + ".meta.json", os.path.join(root, "data", "rollouts_summary.json")]
    assert stage_outputs(lay, "prefs") == [lay.preferences(), lay.preferences_summary()]
    assert stage_outputs(lay, "prefs", round=2) == [
        os.path.join(root, "data", "preferences_r2.jsonl"), os.path.join(root, "data", "preferences_r2_summary.json")]
    assert stage_outputs(lay, "eval") == [os.path.join(root, "outputs")]
    # partial files that exist are removed with the rollout stage (and only this round's)
    os.makedirs(os.path.join(root, "data"))
    parts = [partial_path(roll, 1), partial_path(roll, 0)]
    for p in parts + [partial_path(lay.rollouts(2), 0)]:
        Path(p).write_text("")
    assert stage_outputs(lay, "rollout") == [roll, meta_path(roll), *sorted(parts), lay.rollouts_summary()]
    r2 = stage_outputs(lay, "rollout", round=2)
    assert r2 == [lay.rollouts(2), meta_path(lay.rollouts(2)), partial_path(lay.rollouts(2), 0), lay.rollouts_summary(2)]
    for stage in ("base", "sft", "rollout", "prefs", "dpo", "eval"):
        for p in stage_outputs(lay, stage):
            assert is_under(p, root), (stage, p)
    with pytest.raises(ValueError, match="unknown stage"):
        stage_outputs(lay, "report")


def test_sidecar_paths(tmp_path):
    out = str(tmp_path / "d[x]" / "rollouts.jsonl")
    assert meta_path(out) == out + ".meta.json"
    assert partial_path(out, 3) == out + ".rank3.partial"
    assert partial_paths(out) == []
    os.makedirs(os.path.dirname(out))
    for r in (10, 2, 0):
        Path(partial_path(out, r)).write_text("")
    Path(out).write_text("")
    Path(meta_path(out)).write_text("{}")
    Path(out + ".rank1.partial.tmp").write_text("")  # not a partial file
    Path(str(tmp_path / "d[x]" / "other.jsonl.rank0.partial")).write_text("")  # another output's
    assert partial_paths(out) == sorted([partial_path(out, r) for r in (0, 2, 10)])


# --------------------------------------------------------------------------- adapters


@pytest.mark.parametrize("spec", [None, "", "  ", "none", "None", "null", "NULL", "base", " Base "])
def test_no_adapter_spellings(tmp_path, spec):
    lay = RunLayout.of(make_cfg(tmp_path / "run"))
    # no folder needs to exist, and auto is not consulted
    assert resolve_adapter(lay, spec, "eval.adapter", auto=str(tmp_path / "missing")) is None


def test_auto_is_the_callers_default(tmp_path):
    lay = RunLayout.of(make_cfg(tmp_path / "run"))
    other = fake_adapter(tmp_path / "elsewhere")
    assert resolve_adapter(lay, "auto", "rollout.adapter", auto=other) == other
    assert resolve_adapter(lay, "AUTO", "rollout.adapter", auto=other) == other
    with pytest.raises(ConfigError, match="eval.adapter.*auto"):
        resolve_adapter(lay, "auto", "eval.adapter")
    with pytest.raises(ConfigError, match="rollout.adapter"):  # auto pointing at nothing
        resolve_adapter(lay, "auto", "rollout.adapter", auto=str(tmp_path / "nothing"))


def test_sft_and_dpo_are_this_runs_outputs_with_their_names(tmp_path):
    root = tmp_path / "run"
    lay = RunLayout.of(make_cfg(root, "sft.output_name=x_lora", "dpo.output_name=y_lora"))
    with pytest.raises(ConfigError, match="eval.adapter"):
        resolve_adapter(lay, "sft", "eval.adapter")
    # decoys at the default names must not be picked
    fake_adapter(root / "checkpoints" / "sft_lora")
    fake_adapter(root / "checkpoints" / "dpo_lora")
    with pytest.raises(ConfigError, match="eval.adapter"):
        resolve_adapter(lay, "dpo", "eval.adapter")
    sft = fake_adapter(root / "checkpoints" / "x_lora")
    dpo = fake_adapter(root / "checkpoints" / "y_lora")
    assert resolve_adapter(lay, "sft", "eval.adapter") == sft
    assert resolve_adapter(lay, " SFT ", "eval.adapter") == sft
    assert resolve_adapter(lay, "dpo", "eval.adapter") == dpo
    # "sft"/"dpo" win over the caller's auto
    assert resolve_adapter(lay, "dpo", "rollout.adapter", auto=sft) == dpo
    assert adapter_label(lay, sft) == "sft"
    assert adapter_label(lay, dpo) == "dpo"
    assert adapter_label(lay, sft + os.sep) == "sft"
    assert adapter_label(lay, None) == "base"
    assert adapter_label(lay, str(root / "checkpoints" / "sft_lora")) == "sft_lora"  # not this run's sft


def test_a_path_is_expanded_and_checked(tmp_path, monkeypatch):
    lay = RunLayout.of(make_cfg(tmp_path / "run"))
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    ad = fake_adapter(home / "adapters" / "mine")
    assert resolve_adapter(lay, "~/adapters/mine", "dpo.adapter") == ad
    assert resolve_adapter(lay, ad, "dpo.adapter") == ad
    # a folder without adapter_config.json, and a missing one: ConfigError naming the key
    empty = home / "adapters" / "empty"
    empty.mkdir()
    (empty / "adapter_model.safetensors").write_bytes(b"")
    for spec in ("~/adapters/empty", str(empty), str(home / "nope")):
        with pytest.raises(ConfigError) as info:
            resolve_adapter(lay, spec, "sft.init_adapter")
        assert "sft.init_adapter" in str(info.value) and "adapter_config.json" in str(info.value)
    assert adapter_label(lay, ad) == "mine"


# --------------------------------------------------------------------------- regression: sft.output_name


def test_rollout_and_dpo_find_a_renamed_sft_adapter(tmp_path):
    # REGRESSION: the old code looked for checkpoints/sft_lora whatever sft.output_name said
    from looper.loops.dpo import resolve_inputs
    from looper.loops.rollout import resolve_policy_adapter

    root = tmp_path / "run"
    cfg = make_cfg(root, "sft.output_name=x_lora")
    with pytest.raises(ConfigError, match="rollout.adapter"):
        resolve_policy_adapter(cfg)
    adapter = fake_adapter(root / "checkpoints" / "x_lora")
    assert resolve_policy_adapter(cfg) == adapter
    pairs = root / "data" / "preferences.jsonl"
    pairs.parent.mkdir(parents=True)
    pairs.write_text(json.dumps({"pair_id": "p0", "prompt": "Q", "chosen": "a", "rejected": "b"}) + "\n")
    assert resolve_inputs(cfg) == (adapter, str(pairs))
    # dpo.adapter=none has nothing to start from
    with pytest.raises(ConfigError, match="dpo.adapter"):
        resolve_inputs(make_cfg(root, "sft.output_name=x_lora", "dpo.adapter=none"))
