"""scripts/gpu_check.py on a CPU-only machine: --help works, a plain run exits 2 saying a
CUDA device is needed, and --dry-run-cpu runs the whole flow with a tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "gpu_check.py")


def _run(*args, timeout=60):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=timeout)


def test_help():
    proc = _run("--help")
    assert proc.returncode == 0
    assert "--dry-run-cpu" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_without_cuda_exits_2_with_a_message():
    proc = _run()
    assert proc.returncode == 2
    assert "CUDA device is needed" in proc.stderr
    assert proc.stdout == ""


def test_dry_run_cpu_runs_every_part():
    proc = _run("--dry-run-cpu", "--threads", "2", timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["ok"] and out["failed"] == []
    assert out["engine_matches_hf_generate"] is True
    for part in ("sft", "dpo"):
        assert out[part]["tokens_per_s"] > 0 and out[part]["mfu"] > 0
    assert set(out["benchmarks"]) == {"sft_throughput", "dpo_throughput", "dpo_throughput_packed",
                                      "generation_throughput", "rollout_throughput"}
    assert out["benchmarks"]["dpo_throughput_packed"]["result"]["packed"] == {"setting": "true", "used": True}
    assert out["benchmarks"]["dpo_throughput"]["result"]["packed"]["used"] is False
    assert all(b["ok"] and "result" in b for b in out["benchmarks"].values())
