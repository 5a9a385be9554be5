"""``looper.metrics``: the JSON-lines metrics log (one line per call, clean values, the cut
back on resume, silence on other ranks), throughput from a stubbed clock, peak memory and
the rank-0 progress bar."""

from __future__ import annotations

import json
import math
import os
import types

import numpy as np
import pytest
import torch

from looper import metrics
from looper.metrics import MetricsLog, Throughput, peak_memory_bytes, progress


def lines(path) -> list[str]:
    with open(path) as f:
        return f.read().splitlines()


def write_steps(path, steps, tail: str = "") -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for s in steps:
            f.write(json.dumps({"step": s, "loss": s / 10}) + "\n")
        f.write(tail)


# --------------------------------------------------------------------------- MetricsLog


def test_one_json_line_per_call_with_clean_values(tmp_path):
    path = tmp_path / "metrics" / "sft.jsonl"  # the folder is created
    log = MetricsLog(str(path))
    log.log({"step": 1, "loss": torch.tensor(2.5), "lr": 1e-3, "name": "sft", "ok": True})
    # written and flushed at once: readable before close
    assert [json.loads(x) for x in lines(path)] == [{"step": 1, "loss": 2.5, "lr": 1e-3, "name": "sft", "ok": True}]
    log.log({"step": 2, "loss": float("nan"), "grad_norm": float("inf"), "m": -math.inf,
             "t": torch.tensor(float("nan")), "np": np.float64(0.25), "n": None})
    log.log({"step": 3, "eval_loss": torch.tensor([1.75], dtype=torch.float64)})
    log.close()
    log.close()  # twice is fine
    log.log({"step": 4})  # after close: ignored
    raw = lines(path)
    assert len(raw) == 3
    recs = [json.loads(x) for x in raw]  # strict JSON: no NaN/Infinity tokens
    assert "NaN" not in raw[1] and "Infinity" not in raw[1]
    assert recs[1] == {"step": 2, "loss": None, "grad_norm": None, "m": None, "t": None, "np": 0.25, "n": None}
    assert recs[2] == {"step": 3, "eval_loss": 1.75}
    assert type(recs[0]["loss"]) is float and type(recs[2]["eval_loss"]) is float


def test_a_fresh_run_overwrites_the_log(tmp_path):
    path = str(tmp_path / "m.jsonl")
    write_steps(path, [1, 2, 3])
    MetricsLog(path).close()  # resume_step 0: start over
    assert lines(path) == []
    MetricsLog(path, resume_step=0).log({"step": 1})
    assert lines(path) == ['{"step": 1}']


def test_resume_cuts_the_log_back_to_the_resumed_step(tmp_path):
    path = str(tmp_path / "m.jsonl")
    write_steps(path, [1, 2, 3, 4, 5])
    log = MetricsLog(path, resume_step=3)
    assert [json.loads(x)["step"] for x in lines(path)] == [1, 2, 3]
    log.log({"step": 4, "loss": 0.9})
    log.close()
    assert [json.loads(x) for x in lines(path)] == [
        {"step": 1, "loss": 0.1}, {"step": 2, "loss": 0.2}, {"step": 3, "loss": 0.3}, {"step": 4, "loss": 0.9}]
    # resuming past the end keeps everything
    MetricsLog(path, resume_step=10).close()
    assert len(lines(path)) == 4
    # resuming with no log yet just starts one
    fresh = str(tmp_path / "none.jsonl")
    MetricsLog(fresh, resume_step=3).close()
    assert lines(fresh) == []


def test_a_torn_last_line_stops_the_cut(tmp_path):
    path = str(tmp_path / "m.jsonl")
    write_steps(path, [1, 2], tail='{"step": 3, "lo')  # killed mid-write
    log = MetricsLog(path, resume_step=3)
    log.log({"step": 3, "loss": 0.3})
    log.close()
    assert [json.loads(x) for x in lines(path)] == [{"step": 1, "loss": 0.1}, {"step": 2, "loss": 0.2}, {"step": 3, "loss": 0.3}]
    # a torn line in the middle: nothing after it is kept, even lines at or before the step
    write_steps(path, [1], tail='{"ste\n' + json.dumps({"step": 2}) + "\n")
    MetricsLog(path, resume_step=5).close()
    assert lines(path) == [json.dumps({"step": 1, "loss": 0.1})]


def test_a_complete_last_line_without_newline_is_kept_whole(tmp_path):
    path = str(tmp_path / "m.jsonl")
    write_steps(path, [1], tail=json.dumps({"step": 2, "loss": 0.2}))  # no trailing newline
    log = MetricsLog(path, resume_step=2)
    log.log({"step": 3})
    log.close()
    assert [json.loads(x) for x in lines(path)] == [{"step": 1, "loss": 0.1}, {"step": 2, "loss": 0.2}, {"step": 3}]


def test_other_ranks_write_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(metrics.dist, "is_main", lambda: False)
    path = str(tmp_path / "m.jsonl")
    write_steps(path, [1, 2, 3])
    before = open(path).read()
    log = MetricsLog(path, resume_step=1)  # no cut either: rank 0 owns the file
    log.log({"step": 2})
    log.close()
    assert open(path).read() == before
    other = tmp_path / "sub" / "x.jsonl"
    MetricsLog(str(other)).log({"step": 1})
    assert not other.parent.exists()
    assert progress(5, "x", enabled=True).disable  # no bar off rank 0


def test_progress_bar_follows_enabled_on_rank_zero(monkeypatch):
    monkeypatch.setattr(metrics.dist, "is_main", lambda: True)
    bar = progress(10, "sft", enabled=False, initial=3)
    assert bar.disable
    bar.close()
    bar = progress(10, "sft", enabled=True, initial=3, unit="q")
    assert not bar.disable and bar.total == 10 and bar.n == 3 and bar.unit == "q"
    bar.close()


# --------------------------------------------------------------------------- Throughput


def test_throughput_is_tokens_over_the_steps_elapsed_time(monkeypatch):
    clock = iter([100.0, 102.0, 102.5, 110.0, 114.0, 114.0])
    monkeypatch.setattr(metrics, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    tp = Throughput()  # t0 = 100
    assert tp.t0 == 100.0
    assert tp.step(500) == 250.0  # 500 tokens in 2 s
    assert tp.step(300) == 600.0  # 300 in 0.5 s (since the last step, not since t0)
    tp.reset()  # 110: evaluation time is not counted
    assert tp.step(1000) == 250.0  # 1000 in 4 s
    assert tp.step(7) == pytest.approx(7e9)  # no time passed: finite, not a ZeroDivisionError
    assert tp.t0 == 100.0


# --------------------------------------------------------------------------- memory


def _proc_status_kb(field: str):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu")])
def test_peak_memory_on_cpu_is_the_peak_rss_in_bytes(device):
    rss_kb = _proc_status_kb("VmRSS")
    peak = peak_memory_bytes(device)
    hwm_kb = _proc_status_kb("VmHWM")
    assert type(peak) is int and peak > 0
    assert peak > 20 * 2**20  # a Python process with torch loaded: tens of MB at least, in bytes
    if rss_kb is not None and hwm_kb is not None:
        # bytes, not kilobytes: about the resident size now, at most the kernel's high-water
        # mark (the kernel's RSS counters are cached per CPU, so allow a few percent)
        assert 0.9 * rss_kb * 1024 <= peak <= 1.1 * hwm_kb * 1024
