"""looper.cli: the stage commands, overrides after options, and exit codes."""

from __future__ import annotations

import json

import pytest

from looper.cli import build_parser, main


def test_every_stage_has_a_command_with_config_and_overrides():
    parser = build_parser()
    for stage in ("sft", "rollout", "prefs", "dpo", "eval", "pipeline"):
        args = parser.parse_args([stage, "-c", "x.yaml", "sft.lr=1e-4"])
        assert args.command == stage and args.config == "x.yaml" and args.overrides == ["sft.lr=1e-4"]


def test_unknown_options_are_refused(capsys):
    with pytest.raises(SystemExit) as e:
        main(["sft", "--bogus"])
    assert e.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_a_bad_value_exits_2_naming_the_key_and_a_good_compare_exits_0(tmp_path, capsys):
    assert main(["prefs", f"run.output_dir={tmp_path}", "sft.log_every=0"]) == 2
    assert "sft.log_every must be >= 1, got 0" in capsys.readouterr().err
    a, b = tmp_path / "a_eval.jsonl", tmp_path / "b_eval.jsonl"
    a.write_text("".join(json.dumps({"question_id": str(i), "correct": i < 2}) + "\n" for i in range(4)))
    b.write_text("".join(json.dumps({"question_id": str(i), "correct": i < 3}) + "\n" for i in range(4)))
    assert main(["compare", str(a), str(b), "--markdown", str(tmp_path / "cmp.md")]) == 0
    out = capsys.readouterr().out
    assert "| a | 0.5000 |" in out and "| b | 0.7500 |" in out
    assert (tmp_path / "cmp.md").read_text() == out


def test_overrides_may_follow_options(tmp_path, capsys):
    # `looper pipeline --force dpo dpo.lr=...`: the override after the option is kept (and here refused)
    assert main(["pipeline", "--stages", "prefs", f"run.output_dir={tmp_path}", "dpo.beta=0"]) == 2
    assert "dpo.beta must be > 0" in capsys.readouterr().err


def test_the_command_sets_the_collector_for_its_own_process_and_main_does_not(tmp_path, monkeypatch, capsys):
    import gc

    import torch

    from looper import dist
    from looper.cli import entry

    threshold = gc.get_threshold()
    a = tmp_path / "a_eval.jsonl"
    a.write_text(json.dumps({"question_id": "0", "correct": True}) + "\n")
    try:
        assert main(["compare", str(a)]) == 0  # in a library user's process: left as it is
        assert gc.get_threshold() == threshold and gc.get_freeze_count() == 0
        monkeypatch.setattr("sys.argv", ["looper", "compare", str(a)])
        dist.init_distributed("cpu")
        with pytest.raises(SystemExit) as e:
            entry()
        assert e.value.code == 0 and "| a | 1.0000 |" in capsys.readouterr().out
        assert not torch.distributed.is_initialized()  # a command that succeeds leaves its group
        # full collections 10x rarer; what lives at exit is frozen (the last collections skip it)
        assert gc.get_threshold() == (threshold[0], threshold[1], 100) and gc.get_freeze_count() > 0
        monkeypatch.setattr("sys.argv", ["looper", "prefs", f"run.output_dir={tmp_path}", "sft.log_every=0"])
        with pytest.raises(SystemExit) as e:
            entry()
        assert e.value.code == 2  # the exit code of main
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
