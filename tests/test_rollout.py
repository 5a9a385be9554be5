"""Stage 2, Regime W rollouts (``collect_rollouts`` / ``looper rollout``): the records and
their scores, the summary, 1 vs 2 ranks, kill and resume, the hand-off to ``looper prefs``,
and bad input.

Setup (module fixture, a few seconds): the shared tiny model is fully fine-tuned for 60
steps on one-step synthetic problems with numbers up to 6 (as in the pipeline test), so
sampling at temperature 1 gets some answers right and some groups are mixed. The "SFT
policy" is a LoRA adapter on that model with small random non-zero ``lora_B`` weights,
saved where the stage looks for it (``<output_dir>/checkpoints/sft_lora``), so no SFT
run is needed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_ROOT, build_overrides, kill_when, read_jsonl, subprocess_env

from looper.config import ConfigError, default_config_path, load_config
from looper.io import DataError

N_QUESTIONS = 12
K = 6
MAX_NEW = 32

# easy problems (one step, numbers up to 6): the briefly trained tiny model solves some
EASY_DATA = ["data.synthetic.n_train=400", "data.synthetic.max_steps=1", "data.synthetic.max_number=6"]
ROLLOUT = [
    f"rollout.n_questions={N_QUESTIONS}",
    f"rollout.k={K}",
    f"rollout.generation.max_new_tokens={MAX_NEW}",
    "rollout.generation.temperature=1.0",
    "rollout.generation.seed=3",
    # the design's defaults (the embedded tiny config scores per trajectory): these tests
    # derive the question-scope formula by hand
    "regime_w.scope=question",
    "regime_w.free_tokens=512",
    # 2 questions (12 rows) per batch: 6 batches, so 2 ranks share the work and a killed
    # run has finished some batches and not others
    f"rollout.generation.batch_size={2 * K}",
]

# In the killed run, each record takes this long to write, so the kill lands mid-run.
SLOW_RECORD_S = 0.25


@pytest.fixture(scope="module")
def policy(tiny_model_dir, tmp_path_factory) -> dict:
    """``{"base": trained base model dir, "adapter": SFT-like LoRA adapter dir}``."""
    import torch

    from looper.config import LoraConfig
    from looper.loops.sft import train_sft
    from looper.models import attach_lora, load_base_model, load_tokenizer

    root = tmp_path_factory.mktemp("rollout_policy")
    cfg = load_config(None, build_overrides(
        root / "base_run", tiny_model_dir, "lora=null", *EASY_DATA, "sft.max_steps=60", "sft.batch_size=16",
        "sft.lr=1e-2", "sft.warmup_steps=5", "sft.output_name=base",
    ))
    base = train_sft(cfg).output_dir  # full fine-tuning (lora=null) into checkpoints/base

    model = load_base_model(base)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = attach_lora(model, LoraConfig(r=4, alpha=8))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.02)  # non-zero: the adapter changes the policy a little
    adapter = root / "sft_lora"
    model.save_pretrained(str(adapter))
    load_tokenizer(base).save_pretrained(str(adapter))
    return {"base": Path(base), "adapter": adapter}


def overrides(out: Path, policy: dict, *extra: str) -> list[str]:
    """The ``key=value`` list of a rollout run into ``out`` (CLI and in-process alike)."""
    return build_overrides(out, policy["base"], *EASY_DATA, *ROLLOUT, *extra)


def rollout_cfg(out: Path, policy: dict, *extra: str):
    # the same loading as `looper rollout` without -c: the embedded default + overrides
    return load_config(default_config_path(), overrides(out, policy, *extra))


def new_run_dir(path: Path, policy: dict) -> Path:
    """An output folder holding the SFT adapter at checkpoints/sft_lora (rollout.adapter=auto)."""
    shutil.copytree(policy["adapter"], path / "checkpoints" / "sft_lora")
    return path


def all_files(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()) if path.exists() else []


@pytest.fixture(scope="module")
def reference(policy, tmp_path_factory) -> dict:
    """One uninterrupted single-process run: its folder, records and returned summary."""
    from looper.loops.rollout import collect_rollouts

    out = new_run_dir(tmp_path_factory.mktemp("rollout_ref") / "run", policy)
    summary = collect_rollouts(rollout_cfg(out, policy))
    path = out / "data" / "rollouts.jsonl"
    return {"out": out, "path": path, "bytes": path.read_bytes(), "records": read_jsonl(path), "summary": summary}


# --------------------------------------------------------------------------- records


def test_records_have_the_design_fields_and_graded_answers(reference, policy):
    from looper.data.gsm8k import extract_answer, is_correct, load_questions

    cfg = rollout_cfg(reference["out"], policy)
    questions = load_questions(None, "train", cfg.data)[:N_QUESTIONS]
    records = reference["records"]
    assert [r["question_id"] for r in records] == [q["question_id"] for q in questions]  # input order, no gaps
    n_distinct = 0
    for rec, q in zip(records, questions):
        assert {"question_id", "question", "gold", "s_end", "s_path", "s_cf", "s_wm", "trajectories"} <= set(rec)
        assert rec["question"] == q["question"] and rec["gold"] == q["gold"]
        for key in ("s_end", "s_path", "s_cf", "s_wm"):
            assert isinstance(rec[key], float) and 0.0 <= rec[key] <= 1.0, (key, rec[key])
        trajs = rec["trajectories"]
        assert len(trajs) == K
        n_distinct += len({t["full_text"] for t in trajs}) > 1
        for t in trajs:
            assert {"full_text", "answer", "num_tokens", "correct", "cf", "reward"} <= set(t)
            assert isinstance(t["full_text"], str) and isinstance(t["correct"], bool)
            assert isinstance(t["num_tokens"], int) and 0 <= t["num_tokens"] <= MAX_NEW
            assert t["answer"] == extract_answer(t["full_text"])
            assert t["correct"] == is_correct(t["answer"], rec["gold"])
            if t["answer"] is None:
                assert not t["correct"]
            if not t.get("finished", True):  # ran into max_new_tokens
                assert t["num_tokens"] == MAX_NEW
    assert n_distinct == len(records)  # temperature 1: every group holds different samples

    # the run's other artifacts; no partial files left behind
    out = reference["out"]
    meta = json.loads((out / "data" / "rollouts.jsonl.meta.json").read_text())
    assert meta["info"]["adapter"] == str(out / "checkpoints" / "sft_lora")  # rollout.adapter=auto
    assert meta["num_samples"] == K and meta["generation"]["max_new_tokens"] == MAX_NEW
    assert (out / "configs" / "rollout.yaml").is_file()
    assert not list((out / "data").glob("*.partial"))


def test_stored_scores_and_rewards_match_regime_w(reference, policy):
    from looper.regime_w import score_group, trajectory_rewards

    cfg = rollout_cfg(reference["out"], policy)
    for rec in reference["records"]:
        trajs = rec["trajectories"]
        texts = [t["full_text"] for t in trajs]
        answers = [t["answer"] for t in trajs]
        n = np.array([t["num_tokens"] for t in trajs], dtype=np.int64)
        scores = score_group(texts, answers, n, cfg.regime_w)
        for key in ("s_end", "s_path", "s_cf", "s_wm"):
            assert rec[key] == getattr(scores, key), (rec["question_id"], key)
        assert [t["cf"] for t in trajs] == scores.cf.tolist()
        rewards = trajectory_rewards([t["correct"] for t in trajs], n, scores, cfg.regime_w)
        assert [t["reward"] for t in trajs] == rewards.tolist()
        # and the formula itself, from the stored fields (question scope, no length penalty here)
        w = cfg.regime_w
        assert rec["s_wm"] == pytest.approx(w.w_end * rec["s_end"] + w.w_path * rec["s_path"] + w.w_cf * rec["s_cf"])
        full = all(scores.agree)
        for t in trajs:
            expect = w.alpha * t["correct"] + w.beta * rec["s_wm"] + w.bonus * (t["correct"] and full)
            assert t["reward"] == pytest.approx(expect)


def test_summary_agrees_with_the_records(reference, policy):
    from looper.data.gsm8k import is_correct
    from looper.regime_w import score_group

    cfg = rollout_cfg(reference["out"], policy)
    records, summary = reference["records"], reference["summary"]
    corr = [[t["correct"] for t in r["trajectories"]] for r in records]
    flat = [c for cs in corr for c in cs]
    # maj@k: the majority answer as Regime W defines it (most common non-None answer; ties
    # broken by score_group's order-independent rule)
    maj = 0
    for r in records:
        trajs = r["trajectories"]
        g = score_group([t["full_text"] for t in trajs], [t["answer"] for t in trajs],
                        [t["num_tokens"] for t in trajs], cfg.regime_w)
        maj += g.majority is not None and is_correct(g.majority, r["gold"])
    expected = {
        "questions": N_QUESTIONS,
        "k": K,
        "accuracy": sum(flat) / len(flat),
        "maj_at_k": maj / len(records),
        "pass_at_k": sum(any(cs) for cs in corr) / len(records),
        "all_correct": sum(all(cs) for cs in corr),
        "all_wrong": sum(not any(cs) for cs in corr),
        "mixed": sum(any(cs) and not all(cs) for cs in corr),
        "mean_tokens": sum(t["num_tokens"] for r in records for t in r["trajectories"]) / (len(records) * K),
        **{key: sum(r[key] for r in records) / len(records) for key in ("s_end", "s_path", "s_cf", "s_wm")},
    }
    for key, value in expected.items():
        assert summary[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
    assert expected["all_correct"] + expected["all_wrong"] + expected["mixed"] == N_QUESTIONS
    # the setup is meant to give mixed groups (the prefs test needs them)
    assert expected["mixed"] > 0 and 0 < expected["accuracy"] < 1
    # the summary file holds the returned summary
    written = json.loads((reference["out"] / "data" / "rollouts_summary.json").read_text())
    assert written == json.loads(json.dumps(summary))


def test_maj_at_k_does_not_depend_on_trajectory_order():
    """maj@k on hand-built groups whose majority is known, ties included; shuffling the
    trajectories of every group keeps that exact value."""
    import random

    from looper.data.gsm8k import is_correct
    from looper.loops.rollout import majority_answer, rollout_summary

    def rec(gold, answers):
        trajs = [{"answer": a, "correct": is_correct(a, gold), "num_tokens": 3} for a in answers]
        return {"gold": gold, "s_end": 0.5, "s_path": 1.0, "s_cf": 1.0, "s_wm": 0.8, "trajectories": trajs}

    groups = [  # (gold, answers, majority is correct)
        ("4", ["4", "4", "7", "4"], True),  # clear majority, right
        ("4", ["7", "7", "4", None], False),  # clear majority, wrong (though pass@k)
        ("4", ["4", "7", "4", "7"], True),  # 2-2 tie: the smaller value, 4, wins -- right
        ("9", ["9", "3", "3", "9"], False),  # 2-2 tie: the smaller value, 3, wins -- wrong
        ("12", ["12.0", "12", "5", None], True),  # 12.0 and 12 agree by value: 2 votes to 1
        ("4", [None, None, None, None], False),  # no answer at all: no majority
        ("4", [None, "4", None, None], True),  # None never votes: the one answer wins
        ("5", ["abc", "5", "abc", "5"], True),  # number-text tie: numbers sort first
    ]
    records = [rec(g, a) for g, a, _ in groups]
    expected = sum(ok for _, _, ok in groups) / len(groups)
    assert expected == 5 / 8
    base = rollout_summary(records)
    assert base["maj_at_k"] == expected
    assert base["pass_at_k"] == 7 / 8 and base["k"] == 4 and base["questions"] == 8
    # the tie rule, both orders
    assert majority_answer(["4", "7", "4", "7"]) == majority_answer(["7", "4", "7", "4"]) == "4"
    assert majority_answer(["3", "9", "9", "3"]) == majority_answer(["9", "3", "3", "9"]) == "3"
    orders = [lambda t, i: t[::-1]] + [lambda t, i: random.Random(i).sample(t, len(t))] * 24
    for seed, order in enumerate(orders):
        shuffled = [dict(r, trajectories=order(r["trajectories"], seed * 100 + j)) for j, r in enumerate(records)]
        assert rollout_summary(shuffled)["maj_at_k"] == expected, seed


# --------------------------------------------------------------------------- ranks


@pytest.mark.slow
def test_one_and_two_ranks_write_the_same_file(reference, policy, tmp_path, run_torchrun):
    out = new_run_dir(tmp_path / "two_ranks", policy)
    proc = run_torchrun(cli=["rollout", *overrides(out, policy)], nproc=2, timeout=240)
    path = out / "data" / "rollouts.jsonl"
    assert path.read_bytes() == reference["bytes"]
    assert not list((out / "data").glob("*.partial"))
    assert proc.stdout.count("[rollout]") == 1  # the summary is printed by rank 0 only


# --------------------------------------------------------------------------- resume

KILLED_RUN = """
import sys, time
import looper.loops.rollout as rollout
from looper.cli import main

make = rollout.make_rollout_record

def slow(*args):
    time.sleep({delay})
    return make(*args)

rollout.make_rollout_record = slow
sys.exit(main(["rollout", *{overrides!r}]))
"""


@pytest.mark.slow
def test_killed_and_resumed_gives_the_uninterrupted_file(reference, policy, tmp_path, monkeypatch):
    import looper.loops.rollout as rollout

    out = new_run_dir(tmp_path / "killed", policy)
    partial = out / "data" / "rollouts.jsonl.rank0.partial"
    script = tmp_path / "killed_run.py"
    script.write_text(KILLED_RUN.format(delay=SLOW_RECORD_S, overrides=overrides(out, policy)))
    proc = subprocess.Popen([sys.executable, str(script)], cwd=str(REPO_ROOT), env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        kill_when(proc, lambda: partial.exists() and partial.read_bytes().count(b"\n") >= 1,
                  timeout=120, what="a record in the partial file", log=lambda: proc.stdout.read().decode())
    finally:
        proc.stdout.close()

    final = out / "data" / "rollouts.jsonl"
    assert not final.exists()
    with open(partial, "ab") as f:  # as if the kill had landed in the middle of a write
        f.write(b'{"question_id": "torn')
    done = [r["question_id"] for r in read_jsonl_complete(partial)]
    assert 1 <= len(done) < N_QUESTIONS and len(set(done)) == len(done)

    # resume in this process: only the missing questions are generated and recorded
    recorded = []
    make = rollout.make_rollout_record

    def counting(question, samples, cfg):
        recorded.append(question["question_id"])
        return make(question, samples, cfg)

    monkeypatch.setattr(rollout, "make_rollout_record", counting)
    summary = rollout.collect_rollouts(rollout_cfg(out, policy))
    assert not set(recorded) & set(done) and len(recorded) == N_QUESTIONS - len(done)
    assert final.read_bytes() == reference["bytes"]
    ids = [r["question_id"] for r in read_jsonl(final)]
    assert len(ids) == len(set(ids)) == N_QUESTIONS
    assert not list((out / "data").glob("*.partial"))
    assert {k: v for k, v in summary.items() if k != "seconds"} == {
        k: v for k, v in reference["summary"].items() if k != "seconds"
    }

    # a rerun of a finished stage generates nothing and leaves the file alone
    recorded.clear()
    rollout.collect_rollouts(rollout_cfg(out, policy))
    assert recorded == [] and final.read_bytes() == reference["bytes"]


def read_jsonl_complete(path: Path) -> list[dict]:
    """The complete lines of a file being appended to (a torn last line is skipped)."""
    lines = path.read_bytes().split(b"\n")[:-1]
    return [json.loads(line) for line in lines if line.strip()]


# --------------------------------------------------------------------------- prefs


def test_prefs_consumes_the_rollouts(reference, policy, tmp_path, capsys):
    from looper.cli import main

    out = tmp_path / "prefs"
    shutil.copytree(reference["out"], out)
    assert main(["prefs", *overrides(out, policy)]) == 0
    assert "pairs" in capsys.readouterr().out
    pairs = read_jsonl(out / "data" / "preferences.jsonl")
    assert pairs

    by_q = {r["question_id"]: r for r in reference["records"]}
    mixed = {q for q, r in by_q.items() if len({t["correct"] for t in r["trajectories"]}) == 2}
    corr_pairs = [p for p in pairs if p["kind"] == "correctness"]
    assert {p["question_id"] for p in corr_pairs} == mixed  # every mixed group gives pairs
    for p in pairs:
        assert {"pair_id", "question_id", "kind", "prompt", "chosen", "rejected",
                "chosen_reward", "rejected_reward", "margin"} <= set(p)
        rec = by_q[p["question_id"]]
        traj = {t["full_text"]: t for t in rec["trajectories"]}
        chosen, rejected = traj[p["chosen"]], traj[p["rejected"]]
        assert p["chosen"] != p["rejected"]
        assert p["prompt"] == rec["prompt"]  # the exact prompt the policy was sampled with
        assert p["chosen_reward"] == chosen["reward"] and p["rejected_reward"] == rejected["reward"]
        if p["kind"] == "correctness":
            assert chosen["correct"] and not rejected["correct"]
        else:
            assert chosen["correct"] and rejected["correct"]
    per_q = Counter(p["question_id"] for p in corr_pairs)
    for q, n in per_q.items():
        c = sum(t["correct"] for t in by_q[q]["trajectories"])
        assert n <= min(8, c * (K - c))


# --------------------------------------------------------------------------- bad input


def test_k_below_one_is_a_config_error_and_writes_nothing(policy, tmp_path, capsys):
    from looper.cli import main

    out = new_run_dir(tmp_path / "k0", policy)
    before = all_files(out)
    assert main(["rollout", *overrides(out, policy, "rollout.k=0")]) == 2
    err = capsys.readouterr().err
    assert "rollout.k" in err and ">= 1" in err
    assert all_files(out) == before


def test_missing_sft_adapter_is_a_config_error_and_writes_nothing(policy, tmp_path):
    from looper.loops.rollout import collect_rollouts

    out = tmp_path / "no_adapter"
    with pytest.raises(ConfigError, match=r"sft_lora"):
        collect_rollouts(rollout_cfg(out, policy))
    assert all_files(out) == []
    with pytest.raises(ConfigError, match=r"adapter_config\.json"):
        collect_rollouts(rollout_cfg(out, policy, f"rollout.adapter={tmp_path / 'nowhere'}"))
    assert all_files(out) == []


def test_empty_dataset_is_a_data_error_and_writes_nothing(policy, tmp_path):
    from looper.loops.rollout import collect_rollouts

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = new_run_dir(tmp_path / "empty", policy)
    before = all_files(out)
    with pytest.raises(DataError, match=r"empty\.jsonl"):
        collect_rollouts(rollout_cfg(out, policy, f"rollout.dataset={empty}"))
    assert all_files(out) == before


# --------------------------------------------------------------------------- the run folder contract

NEW_WEIGHTS = ["regime_w.w_end=0.6", "regime_w.w_path=0.2", "regime_w.w_cf=0.2"]


def snapshot(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def test_new_regime_w_weights_rescore_every_record_old_and_new(reference, policy, tmp_path, capsys):
    from looper.loops.rollout import collect_rollouts
    from looper.regime_w.rescore import score_record

    out = tmp_path / "run"
    shutil.copytree(reference["out"], out)
    cfg = rollout_cfg(out, policy, *NEW_WEIGHTS, f"rollout.n_questions={N_QUESTIONS + 2}")
    summary = collect_rollouts(cfg)
    records = read_jsonl(out / "data" / "rollouts.jsonl")
    assert len(records) == N_QUESTIONS + 2
    # the samples of the first questions are the old ones (resumed, not sampled again) ...
    old = reference["records"]
    assert [[t["full_text"] for t in r["trajectories"]] for r in records[:N_QUESTIONS]] == \
        [[t["full_text"] for t in r["trajectories"]] for r in old]
    # ... and every record, old and new, is scored under today's weights: none left mixed
    for rec in records:
        assert rec == score_record(rec, cfg.regime_w), rec["question_id"]
    assert any(a["s_wm"] != b["s_wm"] for a, b in zip(records, old)), "the new weights changed no score"
    assert "rescored" in capsys.readouterr().out
    assert summary["questions"] == summary["records_in_file"] == N_QUESTIONS + 2
    assert summary["s_wm"] == pytest.approx(sum(r["s_wm"] for r in records) / len(records), rel=1e-12)
    # the meta records what the file is now scored with (prefs reads it)
    meta = json.loads((out / "data" / "rollouts.jsonl.meta.json").read_text())
    assert (meta["info"]["regime_w"]["w_end"], meta["info"]["regime_w"]["w_path"]) == (0.6, 0.2)


def test_a_smaller_n_questions_keeps_the_earlier_records(reference, policy, tmp_path, capsys):
    from looper.loops.rollout import collect_rollouts

    out = tmp_path / "run"
    shutil.copytree(reference["out"], out)
    summary = collect_rollouts(rollout_cfg(out, policy, "rollout.n_questions=5"))
    path = out / "data" / "rollouts.jsonl"
    records = read_jsonl(path)
    assert len(records) == N_QUESTIONS
    assert [[t["full_text"] for t in r["trajectories"]] for r in records] == \
        [[t["full_text"] for t in r["trajectories"]] for r in reference["records"]]
    assert path.read_bytes() == reference["bytes"]
    assert summary["questions"] == 5 and summary["records_in_file"] == N_QUESTIONS
    first5 = reference["records"][:5]
    assert summary["s_wm"] == pytest.approx(sum(r["s_wm"] for r in first5) / 5, rel=1e-12)
    assert f"used 5 of the {N_QUESTIONS} records" in capsys.readouterr().out
    written = json.loads((out / "data" / "rollouts_summary.json").read_text())
    assert (written["questions"], written["records_in_file"]) == (5, N_QUESTIONS)


def test_a_changed_generation_setting_is_refused_before_a_model_loads(reference, policy, tmp_path, monkeypatch):
    import looper.loops.rollout as rollout

    out = tmp_path / "run"
    shutil.copytree(reference["out"], out)
    before = snapshot(out)

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the settings were checked")

    monkeypatch.setattr(rollout, "load_for_generation", no_model)
    with pytest.raises(ConfigError) as info:
        rollout.collect_rollouts(rollout_cfg(out, policy, "rollout.generation.temperature=0.7"))
    msg = str(info.value)
    assert "rollout.generation.temperature: 1.0 -> 0.7" in msg, msg
    assert str(out / "data" / "rollouts.jsonl") in msg and "--force" in msg, msg  # where, and how to redo it
    assert snapshot(out) == before
    monkeypatch.undo()

    # how many sequences share a forward changes no sample: accepted, nothing generated again
    recorded = []
    make = rollout.make_rollout_record
    monkeypatch.setattr(rollout, "make_rollout_record", lambda q, s, c: recorded.append(q) or make(q, s, c))
    summary = rollout.collect_rollouts(rollout_cfg(out, policy, "rollout.generation.batch_size=4"))
    assert recorded == [] and summary["questions"] == N_QUESTIONS
    assert (out / "data" / "rollouts.jsonl").read_bytes() == reference["bytes"]


def test_prefs_honours_trajectory_scope_on_rollouts_from_the_stage(reference, policy, tmp_path, capsys):
    from looper.loops.prefs import build_preference_file
    from looper.regime_w.preferences import build_preferences
    from looper.regime_w.rescore import rescore

    out = tmp_path / "run"
    shutil.copytree(reference["out"], out)
    build_preference_file(rollout_cfg(out, policy))
    assert "rescored" not in capsys.readouterr().out  # scored with these very settings
    question = read_jsonl(out / "data" / "preferences.jsonl")

    cfg = rollout_cfg(out, policy, "regime_w.scope=trajectory")
    build_preference_file(cfg)
    printed = capsys.readouterr().out
    assert f"[prefs] rescored {N_QUESTIONS} of {N_QUESTIONS} groups with the current regime_w settings" in printed, printed
    traj = read_jsonl(out / "data" / "preferences.jsonl")
    assert traj != question
    assert [(p["chosen_reward"], p["rejected_reward"]) for p in traj] != \
        [(p["chosen_reward"], p["rejected_reward"]) for p in question]
    expected = build_preferences(rescore(reference["records"], cfg.regime_w)[0], cfg.prefs,
                                 prompt_template=cfg.data.prompt_template)
    assert traj == json.loads(json.dumps(expected))
    # the rollouts file itself is left as the rollout stage wrote it
    assert (out / "data" / "rollouts.jsonl").read_bytes() == reference["bytes"]
