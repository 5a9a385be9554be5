"""looper.tracking: metric records sent to TensorBoard and W&B, read back offline.

TensorBoard event files are read with tensorboard's own ``EventAccumulator``; W&B runs in
offline mode, and its run file (``run-<id>.wandb``: a LevelDB-style log of protobuf
records) is read back with W&B's own protobuf messages by the small reader below.
"""

from __future__ import annotations

import glob
import json
import os
import struct
from pathlib import Path

import pytest

from looper import tracking
from looper.config import ConfigError, load_config
from looper.layout import RunLayout

tb_reader = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


# --------------------------------------------------------------------------- readers


def tensorboard_scalars(folder) -> dict[str, dict[int, float]]:
    acc = tb_reader.EventAccumulator(str(folder), size_guidance={tb_reader.SCALARS: 0, tb_reader.TENSORS: 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def tensorboard_text(folder, tag: str) -> str:
    acc = tb_reader.EventAccumulator(str(folder), size_guidance={tb_reader.TENSORS: 0})
    acc.Reload()
    (event,) = [e for e in acc.Tensors(f"{tag}/text_summary")]
    return event.tensor_proto.string_val[0].decode()


def wandb_records(run_file: str) -> list:
    """The protobuf records of a W&B run file: a 7-byte header, then 32 KiB blocks of
    chunks (crc32, little-endian length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(run_file, "rb").read()
    assert data[:4] == b":W&B", "not a W&B run file"
    pos, block, records, parts = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        parts = chunk if kind in (1, 2) else parts + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(parts)
            records.append(rec)
    return records


def wandb_run(folder) -> dict:
    """``{"id", "name", "group", "config", "history": {step: {key: value}}}`` of the one
    offline run under ``folder``."""
    (run_file,) = glob.glob(os.path.join(folder, "wandb", "offline-run-*", "run-*.wandb"))
    out = {"config": {}, "history": {}}
    for rec in wandb_records(run_file):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out.update(id=rec.run.run_id, name=rec.run.display_name, group=rec.run.run_group)
            out["config"].update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
        elif kind == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in rec.config.update})
        elif kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            out["history"][int(items["_step"])] = {k: v for k, v in items.items() if not k.startswith("_")}
    return out


@pytest.fixture
def wandb_offline(monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")


def tracker(tmp_path, report_to, stage="sft") -> tracking.Tracker:
    return tracking.Tracker(
        report_to, tensorboard_dir=str(tmp_path / "tensorboard" / stage), wandb_dir=str(tmp_path / "wandb"),
        stage=stage, run_name="exp", project="looper-tests", config={"sft": {"lr": 0.003}, "seed": 7},
    )


RECORDS = [{"step": s, "loss": 2.0 / s, "lr": 1e-3 * s, "rewards/chosen": -0.5 * s, "note": "text"} for s in (1, 2, 3)]


# --------------------------------------------------------------------------- unit


def test_tensorboard_holds_each_logged_value_and_the_config(tmp_path):
    t = tracker(tmp_path, ["tensorboard"]).open()
    for r in RECORDS:
        t.log(r)
    t.log({"step": 4, "loss": float("nan"), "flag": True})  # not a finite number: left out
    t.close()
    scalars = tensorboard_scalars(tmp_path / "tensorboard" / "sft")
    assert set(scalars) == {"loss", "lr", "rewards/chosen"}
    for r in RECORDS:
        for k in ("loss", "lr", "rewards/chosen"):
            assert scalars[k][r["step"]] == pytest.approx(r[k], rel=1e-6)
    assert 4 not in scalars["loss"]
    assert "lr: 0.003" in tensorboard_text(tmp_path / "tensorboard" / "sft", "config")


def test_a_resumed_stage_hides_the_steps_logged_after_its_resume_state(tmp_path):
    t = tracker(tmp_path, ["tensorboard"]).open()
    for s in (1, 2, 3, 4):
        t.log({"step": s, "loss": float(s)})
    t.close()
    t = tracker(tmp_path, ["tensorboard"]).open(resume_step=2)  # crashed after step 4, resumed at 2
    for s in (3, 4, 5):
        t.log({"step": s, "loss": 10.0 * s})
    t.close()
    assert tensorboard_scalars(tmp_path / "tensorboard" / "sft")["loss"] == {1: 1.0, 2: 2.0, 3: 30.0, 4: 40.0, 5: 50.0}


def test_wandb_offline_run_holds_the_logged_values_name_group_and_config(tmp_path, wandb_offline):
    t = tracker(tmp_path, ["wandb"]).open()
    for r in RECORDS:
        t.log(r)
    t.close()
    run = wandb_run(tmp_path)
    assert run["name"] == "exp/sft" and run["group"] == "exp"
    assert run["id"] == (tmp_path / "wandb" / "sft.id").read_text().strip()
    assert run["config"]["sft"] == {"lr": 0.003} and run["config"]["seed"] == 7
    assert sorted(run["history"]) == [1, 2, 3]
    for r in RECORDS:
        got = run["history"][r["step"]]
        assert set(got) == {"loss", "lr", "rewards/chosen"}
        for k in got:
            assert got[k] == pytest.approx(r[k], rel=1e-12)


def test_wandb_resumes_its_run_only_when_the_stage_resumes(tmp_path, wandb_offline):
    id_file = tmp_path / "wandb" / "sft.id"
    tracker(tmp_path, ["wandb"]).open().close()
    first = id_file.read_text()
    tracker(tmp_path, ["wandb"]).open(resume_step=3).close()
    assert id_file.read_text() == first
    tracker(tmp_path, ["wandb"]).open(resume_step=0).close()  # the stage started over: a new run
    assert id_file.read_text() != first


def test_wandb_without_a_login_is_an_error_with_the_way_out(tmp_path, wandb_offline, monkeypatch):
    import wandb

    def refuse(**kw):
        raise wandb.errors.UsageError("No API key configured. Use `wandb login` to log in.")

    monkeypatch.setattr(wandb, "init", refuse)
    with pytest.raises(ConfigError, match="wandb login.*WANDB_MODE=offline"):
        tracker(tmp_path, ["wandb"]).open()


def test_other_ranks_write_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(tracking.dist, "is_main", lambda: False)
    t = tracker(tmp_path, ["tensorboard", "wandb"] if tracking.importlib.util.find_spec("wandb") else ["tensorboard"])
    t.open()
    t.log(RECORDS[0])
    t.close()
    assert not (tmp_path / "tensorboard").exists() and not (tmp_path / "wandb").exists()


def test_a_missing_package_is_an_error_naming_the_extra(tmp_path, monkeypatch):
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    with pytest.raises(ConfigError, match=r"pip install 'looper\[wandb\]'"):
        tracker(tmp_path, ["tensorboard", "wandb"])
    tracker(tmp_path, ["tensorboard"])  # the other one is fine


def test_report_to_is_checked_when_the_config_loads():
    with pytest.raises(ConfigError, match=r"run.report_to\[1\].*'tensorboard', 'wandb'.*'mlflow'"):
        load_config(None, ["run.report_to=[tensorboard, mlflow]"])
    assert load_config(None, []).run.report_to == []
    assert load_config(None, ["run.report_to=[wandb]"]).run.report_to == ["wandb"]
    assert tracking.for_stage(load_config(None, []), RunLayout.of(load_config(None, [])), "sft") is None


# --------------------------------------------------------------------------- a real stage


def test_an_sft_run_sends_its_jsonl_records_to_both_trackers(micro_cfg, tmp_path, wandb_offline):
    from looper.loops.sft import train_sft

    cfg = micro_cfg(tmp_path / "run", "run.report_to=[tensorboard, wandb]", "run.run_name=micro", sft__log_every=1)
    train_sft(cfg)
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics" / "sft.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    scalars = tensorboard_scalars(tmp_path / "run" / "tensorboard" / "sft")
    run = wandb_run(tmp_path / "run")
    assert run["name"] == "micro/sft" and run["config"]["sft"]["max_steps"] == 4
    for r in lines:
        for k, v in r.items():
            if k == "step" or not isinstance(v, (int, float)):
                continue
            assert scalars[k][r["step"]] == pytest.approx(v, rel=1e-6), k
            assert run["history"][r["step"]][k] == pytest.approx(v, rel=1e-12), k
    assert "eval_loss" in run["history"][4]


def test_a_dpo_run_logs_trl_metric_names(dpo_cfg_factory, tmp_path):
    from looper.loops.dpo import train_dpo

    cfg = dpo_cfg_factory(tmp_path / "run", "run.report_to=[tensorboard]", dpo__log_every=1)
    train_dpo(cfg)
    scalars = tensorboard_scalars(tmp_path / "run" / "tensorboard" / "dpo")
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics" / "dpo.jsonl").read_text().splitlines()]
    for k in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
              "logps/chosen", "logps/rejected"):
        assert {s: pytest.approx(v, rel=1e-6) for s, v in scalars[k].items()} == {r["step"]: r[k] for r in lines}


@pytest.fixture
def dpo_cfg_factory(micro_overrides, tiny_model_dir, tmp_path_factory):
    from test_dpo import DPO_DEFAULTS, make_sft_adapter, pair_records, write_pairs

    root = tmp_path_factory.mktemp("tracking_dpo")
    adapter = make_sft_adapter(Path(tiny_model_dir), root / "sft_lora", seed=1)
    pairs = write_pairs(root / "preferences.jsonl", pair_records())

    def make(output_dir, *overrides, **kw):
        settings = dict(DPO_DEFAULTS, dpo__adapter=str(adapter), dpo__pairs=str(pairs), **kw)
        return load_config(None, micro_overrides(output_dir, *overrides, **settings))

    return make


def test_an_eval_logs_its_accuracy_at_the_round(micro_cfg, tmp_path):
    from looper.loops.evaluate import evaluate

    cfg = micro_cfg(tmp_path / "run", "run.report_to=[tensorboard]", "eval.adapter=none", "eval.n_questions=4",
                    "eval.generation.max_new_tokens=8")
    summary = evaluate(cfg)
    scalars = tensorboard_scalars(tmp_path / "run" / "tensorboard" / "eval_base")
    assert scalars["eval/accuracy"] == {1: pytest.approx(summary["accuracy"])}
    assert scalars["eval/n"] == {1: 4.0}
