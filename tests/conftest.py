"""Shared fixtures and helpers for the looper test suite.

Fixtures
- ``tiny_model_dir`` (session): a very small offline Llama + BPE tokenizer, built once.
- ``micro_cfg(tmp_path, *overrides, **kw)``: a ``looper.config.Config`` for a run that
  takes seconds on a CPU (small synthetic data set, the tiny model, LoRA r=4).
- ``micro_overrides(tmp_path, *overrides, **kw)``: the same settings as a list of
  ``key=value`` strings, for the CLI (``python -m looper sft ...``) or ``load_config``.
- ``run_torchrun`` / ``run_python``: the helpers below, as fixtures.

Overrides are dotted strings (``"sft.lr=1e-3"``) or keyword arguments with ``__`` for the
dots (``sft__lr=1e-3``, ``lora=None``); Python values are written as YAML scalars.

Plain helpers (importable with ``from conftest import ...``): ``free_port``,
``run_torchrun``, ``run_python``, ``kill_when``, ``kill_training_run``, ``shared_gsm8k_dir``, ``subprocess_env``, ``REPO_ROOT``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Optional, Sequence

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# One intra-op thread unless the caller says otherwise (set before torch is imported).
# The test models are tiny, so threads buy nothing, and on a shared 2-core machine an
# oversubscribed OpenMP pool makes a 1-second run take 20. Also makes subprocess and
# in-process results bit-for-bit comparable.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# The shape of the shared tiny model: about 40k parameters, builds in about a second.
TINY_SHAPE = dict(
    hidden_size=32,
    num_layers=2,
    num_heads=2,
    num_kv_heads=2,
    intermediate_size=64,
    vocab_size=300,
    corpus_size=300,
)

# Settings of a "micro" run. With the tiny tokenizer, synthetic rows are 100-290 tokens,
# so max_length=320 truncates nothing.
MICRO_DEFAULTS = {
    "run.progress": False,
    "run.device": "cpu",
    "data.synthetic.n_train": 96,
    "data.synthetic.n_test": 16,
    "sft.val_size": 8,
    "data.max_length": 320,
    "lora.r": 4,
    "lora.alpha": 8,
    "sft.batch_size": 4,
    "sft.max_steps": 4,
}


# --------------------------------------------------------------------------- helpers


def shared_gsm8k_dir() -> Optional[Path]:
    """``<repo>/../shared/data/gsm8k`` (train.jsonl, test.jsonl), or None when absent."""
    path = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"
    return path if path.is_dir() else None


def free_port() -> int:
    """A TCP port that is free right now (for ``--master_port``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(extra: Optional[dict] = None) -> dict:
    """The environment for a child process: the repo importable, one OpenMP thread per
    process (two ranks share the two cores), no progress bars or hub access."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO_ROOT), env.get("PYTHONPATH", "")] if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("TQDM_DISABLE", "1")
    for k in list(env):  # never inherit a torchrun environment from an outer launcher
        if k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
            del env[k]
    if extra:
        env.update({k: str(v) for k, v in extra.items()})
    return env


def _run(cmd: list[str], timeout: float, env: Optional[dict], cwd: Optional[str]) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group (so a timeout also ends torchrun's workers)."""
    proc = subprocess.Popen(
        cmd,
        cwd=cwd or str(REPO_ROOT),
        env=subprocess_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError(
            f"command timed out after {timeout}s: {' '.join(cmd)}\n"
            f"----- stdout -----\n{stdout[-6000:]}\n----- stderr -----\n{stderr[-6000:]}"
        ) from None
    if proc.returncode != 0:
        raise AssertionError(
            f"command failed with exit code {proc.returncode}: {' '.join(cmd)}\n"
            f"----- stdout -----\n{stdout[-6000:]}\n----- stderr -----\n{stderr[-6000:]}"
        )
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


class _Script:
    """A snippet written to a file for the length of one run (removed afterwards)."""

    def __init__(self, code: str, workdir: Optional[os.PathLike]):
        import tempfile

        fd, self.path = tempfile.mkstemp(prefix="snippet-", suffix=".py", dir=str(workdir) if workdir else None)
        with os.fdopen(fd, "w") as f:
            f.write(textwrap.dedent(code))

    def __enter__(self) -> str:
        return self.path

    def __exit__(self, *exc) -> None:
        try:
            os.remove(self.path)
        except OSError:
            pass


def run_python(
    code: str,
    *,
    timeout: float = 300,
    env: Optional[dict] = None,
    cwd: Optional[str] = None,
    workdir: Optional[os.PathLike] = None,
) -> subprocess.CompletedProcess:
    """Run a Python snippet in a fresh interpreter; raise with its output if it fails."""
    with _Script(code, workdir) as path:
        return _run([sys.executable, path], timeout, env, cwd)


def run_torchrun(
    code: Optional[str] = None,
    *,
    cli: Optional[Sequence[str]] = None,
    nproc: int = 2,
    timeout: float = 300,
    env: Optional[dict] = None,
    cwd: Optional[str] = None,
    workdir: Optional[os.PathLike] = None,
) -> subprocess.CompletedProcess:
    """Run a Python snippet (``code``) or the looper CLI (``cli=["sft", "k=v", ...]``) on
    ``nproc`` gloo ranks under ``torch.distributed.run``; raise with its output on failure."""
    if (code is None) == (cli is None):
        raise ValueError("give exactly one of code= or cli=")
    launcher = [
        sys.executable, "-m", "torch.distributed.run",
        f"--nproc_per_node={nproc}", "--nnodes=1", f"--master_port={free_port()}",
    ]
    if cli is not None:
        return _run(launcher + ["-m", "looper", *cli], timeout, env, cwd)
    with _Script(code, workdir) as path:
        return _run(launcher + [path], timeout, env, cwd)


def kill_when(proc: subprocess.Popen, ready, *, timeout: float = 240, what: str = "the kill point", log=None) -> None:
    """Poll until ``ready()`` holds, then SIGKILL ``proc`` (its whole process group when it
    leads one) and reap it. Fails the test if the process ends first or ``timeout`` passes;
    ``log()`` supplies its output for the message."""
    import time

    output = log or (lambda: "")
    deadline = time.time() + timeout
    try:
        while not ready():
            if proc.poll() is not None:
                pytest.fail(f"the run ended before {what}:\n{output()[-4000:]}")
            if time.time() > deadline:
                pytest.fail(f"the run never reached {what} within {timeout}s:\n{output()[-4000:]}")
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            if os.getpgid(proc.pid) == proc.pid:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.kill()
        proc.wait(timeout=30)


_STALLING = """
import importlib, json, sys, time
import torch
from looper.config import load_config

module, loss_name, entry = sys.argv[1], sys.argv[2], sys.argv[3]
overrides, marker, stall_call = json.loads(sys.argv[4]), sys.argv[5], int(sys.argv[6])
mod = importlib.import_module(module)
real = getattr(mod, loss_name)
calls = [0]

def stalling(*args, **kwargs):
    calls[0] += torch.is_grad_enabled()  # training micro-steps only, not no-grad passes
    if torch.is_grad_enabled() and calls[0] == stall_call:
        open(marker, "w").close()
        time.sleep(600)
    return real(*args, **kwargs)

setattr(mod, loss_name, stalling)
getattr(mod, entry)(load_config(None, overrides))
raise SystemExit("the run was not killed")
"""


def kill_training_run(workdir: Path, module: str, loss_name: str, entry: str, overrides: list[str], stall_call: int):
    """Run ``module.entry(cfg)`` in a subprocess, stall it inside its ``stall_call``-th
    training call of ``module.loss_name`` (a kill mid-step, after the resume states written
    so far), SIGKILL it there, and return the finished ``Popen``. Same thread count as this
    process, so the killed and the reference runs compute bit for bit alike."""
    import torch

    script, marker, log_path = workdir / "stalling.py", workdir / "stalled", workdir / "killed.log"
    script.write_text(_STALLING)
    cmd = [sys.executable, str(script), module, loss_name, entry, json.dumps(overrides), str(marker), str(stall_call)]
    env = subprocess_env({"OMP_NUM_THREADS": torch.get_num_threads()})
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=str(REPO_ROOT), env=env, stdout=log, stderr=subprocess.STDOUT)
        kill_when(proc, marker.exists, log=log_path.read_text)
    return proc


def assert_metrics_close(a: list[dict], b: list[dict], rel: float, abs_: float = 1e-9,
                         volatile: Sequence[str] = ("tokens_per_s",)) -> None:
    """Two ``metrics/<stage>.jsonl`` logs agree step by step: same steps, same fields, floats
    within ``rel``/``abs_``, everything else equal. Timing fields (``volatile``) are skipped."""
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        assert set(ra) == set(rb), f"step {ra['step']}: different fields {set(ra) ^ set(rb)}"
        for k in ra:
            if k in volatile:
                continue
            if isinstance(ra[k], float):
                assert ra[k] == pytest.approx(rb[k], rel=rel, abs=abs_), f"step {ra['step']}: {k}"
            else:
                assert ra[k] == rb[k], f"step {ra['step']}: {k}"


def to_override(key: str, value: Any) -> str:
    """``key=value`` with ``value`` written as a YAML scalar (None -> null, True -> true)."""
    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (list, dict)):
        text = json.dumps(value)
    else:
        text = str(value)
    return f"{key}={text}"


def build_overrides(output_dir: os.PathLike, model_dir: os.PathLike, *overrides: str, **kw: Any) -> list[str]:
    settings = dict(MICRO_DEFAULTS)
    settings["run.output_dir"] = str(output_dir)
    settings["model.name_or_path"] = str(model_dir)
    out = [to_override(k, v) for k, v in settings.items()]
    out += [to_override(k.replace("__", "."), v) for k, v in kw.items()]
    out += list(overrides)
    if any(o.split("=", 1)[0] == "lora" and o.endswith("=null") for o in out):
        out = [o for o in out if not o.startswith("lora.")]  # full fine-tuning: no LoRA keys
    return out


def read_jsonl(path: os.PathLike) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny Llama (hidden 32, 2 layers, vocab 300) with its tokenizer, built once."""
    from looper.config import TinyModelConfig
    from looper.models import build_tiny_model

    out = tmp_path_factory.mktemp("tiny_base") / "model"
    build_tiny_model(str(out), TinyModelConfig(**TINY_SHAPE))
    return out


@pytest.fixture
def micro_overrides(tiny_model_dir):
    """``micro_overrides(output_dir, *overrides, **kw) -> list[str]`` of ``key=value``."""

    def make(output_dir: os.PathLike, *overrides: str, **kw: Any) -> list[str]:
        return build_overrides(output_dir, tiny_model_dir, *overrides, **kw)

    return make


@pytest.fixture
def micro_cfg(tiny_model_dir):
    """``micro_cfg(output_dir, *overrides, **kw) -> Config`` for a run of a few seconds."""
    from looper.config import load_config

    def make(output_dir: os.PathLike, *overrides: str, **kw: Any):
        return load_config(None, build_overrides(output_dir, tiny_model_dir, *overrides, **kw))

    return make


@pytest.fixture(name="run_torchrun")
def _run_torchrun_fixture():
    return run_torchrun


@pytest.fixture(name="run_python")
def _run_python_fixture():
    return run_python


# --------------------------------------------------------------------------- generation fixtures
# (test_engine.py, test_generation.py)

GQA_SHAPE = dict(  # 4 query heads sharing 2 kv heads: exercises the grouped attention path
    hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64, vocab_size=300, corpus_size=300
)


@pytest.fixture(scope="module")
def gqa_model_dir(tmp_path_factory) -> Path:
    from looper.config import TinyModelConfig
    from looper.models import build_tiny_model

    out = tmp_path_factory.mktemp("gqa") / "model"
    build_tiny_model(str(out), TinyModelConfig(**GQA_SHAPE))
    return out


@pytest.fixture(scope="module")
def model_tok(gqa_model_dir):
    from looper.models import load_base_model, load_tokenizer

    return load_base_model(str(gqa_model_dir)).eval(), load_tokenizer(str(gqa_model_dir))


@pytest.fixture(scope="module")
def items():
    from looper.data.gsm8k import format_prompt, load_questions

    qs = load_questions(None, "test")[:12]
    # prompts of different lengths, so left padding and length sorting matter
    return [
        {"question_id": q["question_id"], "prompt": format_prompt(q["question"][: 30 + 25 * (i % 4)])}
        for i, q in enumerate(qs)
    ]
