"""Config loading: YAML files, dotted overrides, strict errors that name the key and the
valid keys, cross-field validation, the CLI's exit code on a bad value, and a lossless
save/load round trip."""

from __future__ import annotations

import dataclasses
import os
import re

import pytest
import yaml

from looper.config import (
    Config,
    ConfigError,
    DPOConfig,
    GenerationConfig,
    LoraConfig,
    SFTConfig,
    TrainConfig,
    default_config_path,
    load_config,
    save_config,
)


def field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def write_yaml(path, text: str) -> str:
    path.write_text(text)
    return str(path)


# --------------------------------------------------------------------------- loading


def test_defaults_load_and_equal_the_dataclass_defaults():
    cfg = load_config()
    assert cfg == Config()
    assert isinstance(cfg.sft, SFTConfig) and isinstance(cfg.dpo, DPOConfig)
    assert cfg.lora == LoraConfig() and cfg.lora.target_modules == "all-linear"
    assert cfg.base_train is None
    # the DPO section keeps its own defaults over the shared TrainConfig ones
    assert cfg.dpo.lr == 5e-6 and cfg.sft.lr == TrainConfig().lr == 2e-4
    # rollouts sample, eval decodes greedily
    assert cfg.rollout.generation.temperature == 1.0 and cfg.eval.generation.temperature == 0.0


def test_load_yaml_file_and_overrides(tmp_path):
    path = write_yaml(
        tmp_path / "c.yaml",
        "run:\n  output_dir: runs/x\n  seed: 3\n"
        "sft:\n  lr: 1e-4\n  batch_size: 8\n  schedule: linear\n"
        "lora:\n  r: 8\n  target_modules: [q_proj, v_proj]\n"
        "rollout:\n  generation:\n    max_new_tokens: 17\n",
    )
    cfg = load_config(path)
    # YAML 1.1 reads "1e-4" (no dot) as a string; the float field still gets a float
    assert yaml.safe_load("lr: 1e-4")["lr"] == "1e-4"
    assert isinstance(cfg.sft.lr, float) and cfg.sft.lr == 1e-4
    assert cfg.run.output_dir == "runs/x" and cfg.run.seed == 3
    assert cfg.sft.batch_size == 8 and cfg.sft.schedule == "linear"
    assert cfg.lora.r == 8 and cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.rollout.generation.max_new_tokens == 17
    # untouched keys of a section keep their defaults
    assert cfg.rollout.generation.temperature == 1.0 and cfg.sft.grad_accum == 1
    assert cfg.lora.alpha == LoraConfig().alpha

    # overrides are applied on top of the file
    cfg = load_config(path, ["sft.lr=3e-5", "lora.r=32", "rollout.generation.temperature=0.7"])
    assert cfg.sft.lr == 3e-5 and isinstance(cfg.sft.lr, float)
    assert cfg.lora.r == 32 and cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.rollout.generation.temperature == 0.7
    assert cfg.rollout.generation.max_new_tokens == 17  # sibling from the file survives
    assert cfg.sft.batch_size == 8


def test_dotted_overrides_of_every_kind():
    cfg = load_config(None, ["sft.lr=1e-4", "lora.r=32"])
    assert cfg.sft.lr == 1e-4 and isinstance(cfg.sft.lr, float)
    assert cfg.lora.r == 32 and isinstance(cfg.lora.r, int)

    # lora=null switches to full fine-tuning
    assert load_config(None, ["lora=null"]).lora is None

    # a nested section three levels down
    cfg = load_config(None, ["rollout.generation.temperature=0.7"])
    assert cfg.rollout.generation.temperature == 0.7
    assert cfg.eval.generation.temperature == 0.0  # the other generation section is separate

    # a mapping override fills an optional section, the rest from the section's defaults
    cfg = load_config(None, ["base_train={max_steps: 5, lr: 1e-3}"])
    assert type(cfg.base_train) is TrainConfig
    assert cfg.base_train.max_steps == 5 and cfg.base_train.lr == 1e-3
    assert cfg.base_train.batch_size == TrainConfig().batch_size
    # and so does a dotted key into a section that is null by default
    assert load_config(None, ["base_train.max_steps=7"]).base_train.max_steps == 7

    # a list
    cfg = load_config(None, ["sft.betas=[0.9,0.95]"])
    assert cfg.sft.betas == [0.9, 0.95] and all(isinstance(b, float) for b in cfg.sft.betas)
    # an int given for a float field is stored as a float; a whole float for an int as an int
    cfg = load_config(None, ["sft.lr=1", "sft.batch_size=8.0"])
    assert cfg.sft.lr == 1.0 and isinstance(cfg.sft.lr, float)
    assert cfg.sft.batch_size == 8 and isinstance(cfg.sft.batch_size, int)
    # a string option that looks like a value keeps its text
    assert load_config(None, ["run.device=cpu", "sft.resume=none"]).sft.resume == "none"


def test_partial_section_keeps_the_fields_own_defaults(tmp_path):
    """rollout.generation samples (temperature 1) although GenerationConfig is greedy: setting
    one key of it, by override or in a file, must not reset the rest to the class defaults
    (that would make all K rollouts of a question identical greedy decodes)."""
    assert GenerationConfig().temperature == 0.0
    for cfg in (
        load_config(None, ["rollout.generation.max_new_tokens=17"]),
        load_config(None, ["rollout={generation: {max_new_tokens: 17}}"]),
        load_config(write_yaml(tmp_path / "c.yaml", "rollout:\n  generation:\n    max_new_tokens: 17\n")),
    ):
        assert cfg.rollout.generation.max_new_tokens == 17
        assert cfg.rollout.generation.temperature == 1.0
    cfg = load_config(None, ["rollout.k=4", "eval.generation.max_new_tokens=9"])
    assert cfg.rollout.generation == Config().rollout.generation
    assert cfg.eval.generation.temperature == 0.0 and cfg.eval.generation.max_new_tokens == 9


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(None, ["sft.lr"])
    with pytest.raises(ConfigError, match="empty key"):
        load_config(None, ["=3"])
    # a dotted key below a plain value
    with pytest.raises(ConfigError, match="run.seed"):
        load_config(None, ["run.seed.x=1"])


def test_missing_and_malformed_files(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=re.escape(str(missing))):
        load_config(str(missing))
    bad = write_yaml(tmp_path / "bad.yaml", "sft: [unclosed\n")
    with pytest.raises(ConfigError, match=re.escape(bad) + ".*invalid YAML"):
        load_config(bad)
    scalar = write_yaml(tmp_path / "scalar.yaml", "just a string\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(scalar)
    # an empty file is the defaults
    assert load_config(write_yaml(tmp_path / "empty.yaml", "")) == Config()


# --------------------------------------------------------------------------- strict errors


def assert_lists_keys(message: str, cls) -> None:
    for name in field_names(cls):
        assert re.search(rf"\b{name}\b", message), f"valid key {name!r} missing from: {message}"


@pytest.mark.parametrize(
    "override, full_key, section",
    [
        ("bogus=1", "bogus", Config),
        ("sft.lrr=1e-4", "sft.lrr", SFTConfig),
        ("rollout.generation.temperatur=0.5", "rollout.generation.temperatur", GenerationConfig),
        # optional sections: the error is the section's own, not a vague "expected X | null"
        ("lora.rank=8", "lora.rank", LoraConfig),
        ("base_train.max_step=5", "base_train.max_step", TrainConfig),
    ],
)
def test_unknown_key_names_full_key_and_valid_keys(override, full_key, section):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    msg = str(e.value)
    assert f"'{full_key}'" in msg
    assert_lists_keys(msg, section)


def test_unknown_key_in_a_yaml_file_names_the_file(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", "dpo:\n  betaa: 0.2\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert path in msg and "'dpo.betaa'" in msg
    assert_lists_keys(msg, DPOConfig)


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("sft.lr=abc", r"sft\.lr: expected a number, got 'abc'"),
        ("sft.batch_size=2.5", r"sft\.batch_size: expected an integer, got 2\.5"),
        ("run.progress=maybe", r"run\.progress: expected true/false, got 'maybe'"),
        ("sft.schedule=cosinee", r"sft\.schedule: expected one of \['cosine', 'linear', 'constant'\], got 'cosinee'"),
        ("dpo.reference=offline", r"dpo\.reference: expected one of \['precomputed', 'online'\]"),
        ("sft.betas=0.9", r"sft\.betas: expected list\[float\]"),
        ("sft.betas=[0.9,x]", r"sft\.betas\[1\]: expected a number"),
        ("lora.r=abc", r"lora\.r: expected an integer"),
        ("run=3", r"run: expected a mapping"),
        ("run.output_dir=null", r"run\.output_dir: expected a string, got None"),
        ("lora=[1]", r"lora: expected a mapping for section LoraConfig"),
        ("sft.batch_size=true", r"sft\.batch_size: expected an integer, got True"),
    ],
)
def test_wrong_type_names_key_and_expectation(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, [override])


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        (["sft.batch_size=0"], r"sft\.batch_size must be >= 1, got 0"),
        (["dpo.grad_accum=0"], r"dpo\.grad_accum must be >= 1"),
        (["base_train={batch_size: 0}"], r"base_train\.batch_size must be >= 1"),
        (["rollout.k=0"], r"rollout\.k must be >= 1, got 0"),
        (["dpo.label_smoothing=0.6"], r"dpo\.label_smoothing must be in \[0, 0\.5\), got 0\.6"),
        (["regime_w.w_end=0.6"], r"regime_w.*sum to 1"),
        (["regime_w.w_end=0.4", "regime_w.w_path=0.1"], r"regime_w.*sum to 1"),
        (["rollout.n_questions=0"], r"rollout\.n_questions must be -1 \(all\) or >= 1, got 0"),
        (["eval.n_questions=-2"], r"eval\.n_questions"),
        (["sft.lr=0"], r"sft\.lr must be > 0"),
        # regression: log_every=0 was accepted and crashed on `step % 0` after a training step
        (["sft.log_every=0"], r"sft\.log_every must be >= 1, got 0"),
        (["dpo.log_every=0"], r"dpo\.log_every must be >= 1, got 0"),
        (["dpo.beta=0"], r"dpo\.beta must be > 0"),
        (["lora.alpha=0"], r"lora\.alpha must be > 0"),
        (["lora.dropout=1.5"], r"lora\.dropout must be in \[0, 1\)"),
        (["sft.betas=[2,3]"], r"sft\.betas must be two values in \[0, 1\)"),
        (["sft.weight_decay=-1"], r"sft\.weight_decay must be >= 0"),
        (["sft.eval_every=-1"], r"sft\.eval_every must be >= 0"),
        (["dpo.save_every=-1"], r"dpo\.save_every must be >= 0"),
        (["sft.epochs=-1"], r"sft\.epochs must be > 0"),
        (["sft.warmup_steps=-5"], r"sft\.warmup_steps must be >= 0"),
        (["dpo.val_size=-1"], r"dpo\.val_size must be >= 0"),
        (["sft.min_lr_ratio=5"], r"sft\.min_lr_ratio must be in \[0, 1\]"),
        (["sft.output_name=a/b"], r"sft\.output_name must be a plain folder or file name"),
        (["model.tiny.num_heads=3"], r"model\.tiny: num_heads \(3\) must divide hidden_size"),
        (["sft.max_steps=0"], r"sft\.max_steps"),
        (["sft.betas=[0.9]"], r"sft\.betas must be two values in \[0, 1\)"),
        (["lora.r=0"], r"lora\.r must be >= 1"),
        (["data.max_length=4"], r"data\.max_length must be >= 8"),
        (["rollout.generation.top_p=0"], r"rollout\.generation"),
        (["eval.generation.temperature=-1"], r"eval\.generation"),
    ],
)
def test_cross_field_validation(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, overrides)


def test_valid_edges_pass_validation():
    # the boundaries just inside the checks load
    cfg = load_config(
        None,
        ["sft.batch_size=1", "rollout.k=1", "dpo.label_smoothing=0.49", "rollout.n_questions=1",
         "regime_w.w_end=0.2", "regime_w.w_path=0.2", "regime_w.w_cf=0.6", "eval.n_questions=-1"],
    )
    assert cfg.rollout.k == 1 and cfg.dpo.label_smoothing == 0.49
    assert (cfg.regime_w.w_end, cfg.regime_w.w_path, cfg.regime_w.w_cf) == (0.2, 0.2, 0.6)


# --------------------------------------------------------------------------- CLI


def test_cli_bad_value_exits_2_and_writes_nothing(tmp_path, capsys):
    from looper.cli import main

    out = tmp_path / "run"
    rc = main(["sft", f"run.output_dir={out}", "run.device=cpu", "sft.lr=abc"])
    assert rc == 2
    captured = capsys.readouterr()
    assert "sft.lr" in captured.err and "expected a number" in captured.err and "'abc'" in captured.err
    assert captured.err.startswith("looper sft: error:")
    assert "sft.lr" not in captured.out
    assert not out.exists()
    assert os.listdir(tmp_path) == []

    rc = main(["sft", f"run.output_dir={out}", "sft.lrr=1e-4"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "'sft.lrr'" in err and "grad_accum" in err
    assert not out.exists()


def test_cli_bad_value_in_config_file_names_the_file(tmp_path, capsys):
    from looper.cli import main

    path = write_yaml(tmp_path / "c.yaml", f"run:\n  output_dir: {tmp_path / 'run'}\nsft:\n  schedule: cosinee\n")
    assert main(["sft", "-c", path]) == 2
    err = capsys.readouterr().err
    assert path in err and "sft.schedule" in err and "cosinee" in err
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- save / load


def test_keys_that_moved_or_were_removed_say_where_they_went():
    with pytest.raises(ConfigError, match=r"data\.val_size' was moved to sft\.val_size"):
        load_config(None, ["data.val_size=8"])
    with pytest.raises(ConfigError, match=r"prefs\.seed' was removed"):
        load_config(None, ["prefs.seed=1"])
    # base_train is a plain training section: an output name there would be silently ignored
    with pytest.raises(ConfigError, match=r"unknown config key 'base_train\.output_name'"):
        load_config(None, ["base_train={output_name: x}"])


def test_a_config_path_that_is_not_a_yaml_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not a file"):
        load_config(str(tmp_path))
    binary = tmp_path / "model.bin"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    with pytest.raises(ConfigError, match="not a UTF-8 text file"):
        load_config(str(binary))
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(str(listing))


def test_sections_built_by_hand_check_their_bounds():
    from looper.config import PrefsConfig, RegimeWConfig

    with pytest.raises(ConfigError, match=r"regime_w\.lam must be >= 0"):
        RegimeWConfig(lam=-1)
    with pytest.raises(ConfigError, match=r"prefs\.threshold must be > 0"):
        PrefsConfig(threshold=0)


def test_save_config_round_trip(tmp_path):
    cfg = load_config(
        None,
        ["lora=null", "base_train={max_steps: 5, lr: 3e-3}", "sft.lr=1e-4", "sft.betas=[0.9,0.95]",
         "rollout.generation.temperature=0.7", "regime_w.answer_markers=['####']", "dpo.beta=0.25",
         "data.train=/some/path.jsonl", "run.output_dir=runs/rt", "regime_w.lam=1e-6"],
    )
    path = tmp_path / "sub" / "resolved.yaml"
    save_config(cfg, str(path))
    assert path.is_file()
    assert [p.name for p in path.parent.iterdir()] == ["resolved.yaml"]  # no temp file left
    back = load_config(str(path))
    assert back == cfg
    assert back.lora is None and back.base_train.max_steps == 5 and back.regime_w.lam == 1e-6

    # a LoRA config with a list of target modules round-trips too, and so do the defaults
    cfg2 = load_config(None, ["lora.target_modules=[q_proj, v_proj]", "lora.r=8"])
    save_config(cfg2, str(path))
    assert load_config(str(path)) == cfg2
    save_config(Config(), str(path))
    assert load_config(str(path)) == Config()
    # the file is plain YAML that names every section
    assert set(yaml.safe_load(path.read_text())) == set(field_names(Config))


def test_embedded_default_config_loads():
    path = default_config_path()
    assert os.path.isfile(path)
    cfg = load_config(path)
    assert cfg.model.name_or_path == "tiny"
    assert type(cfg.base_train) is TrainConfig  # the tiny pipeline's base stage
    assert cfg.lora is not None and cfg.sft.lr == 3e-3
    assert cfg != Config()
    # and overrides apply on top of it, as the CLI does
    assert load_config(path, ["sft.lr=1e-4"]).sft.lr == 1e-4
