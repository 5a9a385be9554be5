"""The benchmark scripts still import and parse their arguments (a renamed looper name breaks
them without any other test noticing); running them is for a quiet machine, not the suite."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO_ROOT, subprocess_env

SCRIPTS = sorted(p.name for p in (REPO_ROOT / "benchmarks").glob("*_throughput.py"))


def test_every_stage_has_a_benchmark():
    assert SCRIPTS == ["dpo_throughput.py", "generation_throughput.py", "rollout_throughput.py", "sft_throughput.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_imports_and_shows_its_help(script):
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / script), "--help"], cwd=str(REPO_ROOT),
                          env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--threads" in proc.stdout


@pytest.mark.parametrize("script", ["versus_trl.py", "scaling.py"])
def test_whole_job_and_scaling_scripts_show_their_help(script):
    # versus_trl imports TRL only in its child processes, so its help needs no TRL
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / script), "--help"], cwd=str(REPO_ROOT),
                          env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--threads" in proc.stdout


def _bench_module(name):
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    try:
        return __import__(name)
    finally:
        sys.path.pop(0)


def test_generation_flops_by_hand():
    generation_flops = _bench_module("generation_throughput").generation_flops
    n = {"layers": 2, "hidden": 8, "decoder_linear": 100, "lm_head": 20}  # N = 120
    # one prompt of 3 tokens, 2 samples, 2 new tokens:
    # prefill 2*120*3 + 2*2*8*3*4 = 720 + 384; decode per sample: tokens at context 4 and 5,
    # 2*(2*120) + 4*2*8*(4+5) = 480 + 576 = 1056, times 2 samples
    assert generation_flops([3], 2, 2, n) == {"prefill": 1104, "decode": 2112}


def test_sft_first_rows_keeps_the_first_lines_and_refuses_a_short_file(tmp_path):
    first_rows = _bench_module("sft_throughput").first_rows
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(f'{{"i": {i}}}\n' for i in range(5)))
    out = first_rows(str(src), 3, str(tmp_path / "work"))
    assert open(out).read() == '{"i": 0}\n{"i": 1}\n{"i": 2}\n'
    assert first_rows(None, 3, str(tmp_path / "work")) is None  # synthetic data: n_train limits it
    with pytest.raises(SystemExit, match="only 5 rows"):
        first_rows(str(src), 6, str(tmp_path / "work"))


def test_sft_scaling_sizes_are_whole_epochs_of_the_same_rows():
    # each size must measure whole epochs after a whole epoch of warm-up, or the sizes
    # measure different mixes of row lengths (the fall the scaling table once showed)
    script, flag, base, extra, _, _ = _bench_module("scaling").STAGES["sft"]
    assert (script, flag) == ("sft_throughput.py", "--steps")
    args = _bench_module("sft_throughput").parse_args([*extra, flag, str(base)])
    steps_per_epoch = args.rows // (args.batch_size * args.grad_accum)
    assert args.rows % (args.batch_size * args.grad_accum) == 0
    assert args.warmup % steps_per_epoch == 0 and base % steps_per_epoch == 0
