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
