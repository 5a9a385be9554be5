"""Whole jobs against TRL on the same work: `looper dpo` vs TRL's DPOTrainer and
`looper sft` vs TRL's SFTTrainer, each job a separate process, timed from launch to exit.

What a user feels is the whole process: imports, model load, tokenization, the reference
pass, the steps and the save. Each tool runs as its own process on the same inputs, built
once here:

- the tiny benchmark model (``common.ensure_model``) and a LoRA adapter (r=16, every linear
  projection, small random B, dropout 0): the DPO starting point of both tools, whose
  frozen copy is the reference;
- ``--pairs`` GSM8K-train pairs (chosen = the question's own solution, rejected = the next
  question's), the same file for both tools;
- ``--rows`` GSM8K-train rows for SFT: looper reads the question/answer file, TRL gets the
  prompt and completion texts looper builds from it (``load_sft_rows``), so both train on
  the same text.

DPO: batch 8, ``--steps`` steps, lr 5e-6, beta 0.1, max_length 512, fp32, reference log-probs
precomputed (looper's default; TRL's ``precompute_ref_log_probs``). SFT: batch 16, LoRA r=16
(alpha 32, dropout 0), completion-only loss, lr 1e-4. The processes alternate (A B A B ...,
``--repeats`` each) so that drifting machine load hits both alike; the ratio is of medians.

Checks that the work is the same: both ran the same number of optimizer steps on the same
number of sequences, and the first DPO step's loss is log 2 for both (the policy starts as
its reference). A profiled run of each tool (in-process timers, not part of the timing)
gives where the whole job's time goes.

TRL is a benchmark-only dependency (``pip install trl``); looper never imports it.

    python benchmarks/versus_trl.py                        # both jobs, 2 repeats each
    python benchmarks/versus_trl.py --jobs dpo --repeats 3 --threads 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

T_START = time.perf_counter()  # the profiled children count their imports from here
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

DPO = dict(batch=8, lr=5e-6, beta=0.1, max_length=512)
SFT = dict(batch=16, lr=1e-4, r=16, max_length=512)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", default="dpo,sft", help="comma-separated: dpo, sft")
    p.add_argument("--pairs", type=int, default=128)
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2, help="timed processes per tool and job")
    p.add_argument("--threads", type=int, default=2, help="OMP/torch threads of every child process")
    p.add_argument("--no-profile", action="store_true", help="skip the profiled runs (the time breakdown)")
    p.add_argument("--work-dir", default=None, help="inputs and runs (default: a temporary folder, removed)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # trl-dpo | trl-sft | looper-dpo | looper-sft
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# --------------------------------------------------------------------------- inputs (parent)


def build_inputs(work: str, args) -> dict:
    sys.path[:0] = [HERE, REPO]
    from common import data_source, ensure_model, make_adapter
    from dpo_throughput import write_pairs

    from looper.data.gsm8k import load_questions

    source, note = data_source("train")
    model = ensure_model(None, source)
    rows = load_questions(source, "train")
    adapter = os.path.join(work, "adapter")
    if not os.path.isdir(adapter):
        make_adapter(model, adapter, 16)
    pairs = os.path.join(work, "pairs.jsonl")
    write_pairs(pairs, rows[: args.pairs])
    sft_file = os.path.join(work, "sft_rows.jsonl")
    with open(sft_file, "w") as f:
        for r in rows[: args.rows]:
            f.write(json.dumps({"question_id": r["question_id"], "question": r["question"], "answer": r["answer"]}) + "\n")
    spec = {"model": model, "adapter": adapter, "pairs": pairs, "sft_file": sft_file, "steps": args.steps,
            "threads": args.threads, "data": note}
    spec["looper_dpo"] = [
        f"model.name_or_path={model}", "model.dtype=float32", "run.device=cpu", "run.progress=false",
        f"dpo.adapter={adapter}", f"dpo.pairs={pairs}", f"dpo.batch_size={DPO['batch']}", "dpo.grad_accum=1",
        f"dpo.max_steps={args.steps}", f"dpo.lr={DPO['lr']}", f"dpo.beta={DPO['beta']}", "dpo.warmup_steps=0",
        "dpo.val_size=0", "dpo.log_every=1", "dpo.eval_every=0", "dpo.reference=precomputed",
        f"data.max_length={DPO['max_length']}",
    ]
    spec["looper_sft"] = [
        f"model.name_or_path={model}", "model.dtype=float32", "run.device=cpu", "run.progress=false",
        f"data.train={sft_file}", f"data.max_length={SFT['max_length']}", f"lora.r={SFT['r']}",
        f"lora.alpha={2 * SFT['r']}", "lora.dropout=0.0", f"sft.batch_size={SFT['batch']}", "sft.grad_accum=1",
        f"sft.max_steps={args.steps}", f"sft.lr={SFT['lr']}", "sft.warmup_steps=0", "sft.val_size=0",
        "sft.log_every=1", "sft.eval_every=0",
    ]
    # TRL's SFT rows: the exact prompt and completion texts looper trains on
    from looper.loops.sft import load_sft_rows

    cfg = looper_config("sft", spec, f"{work}/unused")
    trl_rows = os.path.join(work, "trl_sft_rows.jsonl")
    with open(trl_rows, "w") as f:
        for r in load_sft_rows(cfg):
            f.write(json.dumps({"prompt": r["prompt"], "completion": r["completion"]}) + "\n")
    spec["trl_sft_rows"] = trl_rows
    path = os.path.join(work, "spec.json")
    with open(path, "w") as f:
        json.dump(spec, f, indent=1)
    return {**spec, "path": path}


def child_env(threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_DISABLED="true", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def command(tool: str, job: str, spec: dict, out: str, profile: bool = False) -> list[str]:
    if tool == "looper" and not profile:
        return [sys.executable, "-m", "looper", job, *spec[f"looper_{job}"], f"run.output_dir={out}"]
    return [sys.executable, os.path.abspath(__file__), "--child", f"{tool}-{job}", "--spec", f"{spec['path']}#{out}"]


def run_child(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:])
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed with exit code {proc.returncode}")
    return seconds


def looper_work(job: str, out: str) -> dict:
    lines = [json.loads(l) for l in open(os.path.join(out, "metrics", f"{job}.jsonl"))]
    return {"steps": lines[-1]["step"], "first_loss": lines[0]["loss"], "logged_steps": len(lines)}


# --------------------------------------------------------------------------- children


def looper_config(job: str, spec: dict, out: str):
    """The config ``looper <job> <overrides>`` runs: the embedded default under the overrides."""
    from looper.config import default_config_path, load_config

    return load_config(default_config_path(), spec[f"looper_{job}"] + [f"run.output_dir={out}"])


def _load_spec(arg: str) -> tuple[dict, str]:
    path, out = arg.split("#", 1)
    with open(path) as f:
        return json.load(f), out


def child_looper(job: str, spec: dict, out: str) -> dict:
    """``looper <job>`` in process, with timers: imports, then the loop's own phases. The
    config and the garbage collector are set as the CLI sets them (``child_main`` freezes
    the collector before exit)."""
    from looper.cli import collect_for_a_command

    collect_for_a_command()
    t_imports = time.perf_counter()
    from looper.loops.dpo import train_dpo
    from looper.loops.sft import train_sft

    imports = time.perf_counter() - t_imports
    cfg = looper_config(job, spec, out)
    result = (train_dpo if job == "dpo" else train_sft)(cfg)
    return {"imports": imports, **result.phases}


# the TrainingArguments both TRL jobs share: no saving, logging or workers beyond the job's own
TRL_COMMON = dict(gradient_accumulation_steps=1, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
                  bf16=False, fp16=False, disable_tqdm=True, dataloader_num_workers=0, warmup_steps=0, seed=0)


def child_trl(job: str, spec: dict, out: str) -> dict:
    """TRL's trainer for ``job`` in this process, timed phase by phase."""
    phases, t = {}, time.perf_counter()
    import torch
    from datasets import load_dataset
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    torch.set_num_threads(spec["threads"])
    phases["imports"] = time.perf_counter() - t
    t = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(spec["model"])
    tok.pad_token = tok.pad_token or tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    if job == "dpo":  # the adapter is the starting policy; TRL keeps a frozen copy as the reference
        model = PeftModel.from_pretrained(model, spec["adapter"], is_trainable=True)
        data = load_dataset("json", data_files=spec["pairs"], split="train").select_columns(["prompt", "chosen", "rejected"])
    else:
        data = load_dataset("json", data_files=spec["trl_sft_rows"], split="train")
    phases["model_and_data_load"] = time.perf_counter() - t
    t = time.perf_counter()
    if job == "dpo":
        args = DPOConfig(output_dir=out, per_device_train_batch_size=DPO["batch"], max_steps=spec["steps"],
                         learning_rate=DPO["lr"], beta=DPO["beta"], max_length=DPO["max_length"],
                         precompute_ref_log_probs=True, **TRL_COMMON)
        trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
    else:
        args = SFTConfig(output_dir=out, per_device_train_batch_size=SFT["batch"], max_steps=spec["steps"],
                         learning_rate=SFT["lr"], max_length=SFT["max_length"], completion_only_loss=True, **TRL_COMMON)
        lora = LoraConfig(r=SFT["r"], lora_alpha=2 * SFT["r"], lora_dropout=0.0, target_modules="all-linear",
                          task_type="CAUSAL_LM")
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok, peft_config=lora)
    phases["trainer_init_and_tokenization"] = time.perf_counter() - t
    t = time.perf_counter()
    trainer.train()
    phases["train_incl_reference_pass" if job == "dpo" else "train"] = time.perf_counter() - t
    t = time.perf_counter()
    trainer.save_model(os.path.join(out, "adapter"))
    phases["save"] = time.perf_counter() - t
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    batch = DPO["batch"] if job == "dpo" else SFT["batch"]
    return {"phases": phases, "steps": trainer.state.global_step, "first_loss": losses[0] if losses else None,
            "sequences": trainer.state.global_step * batch, "train_rows": len(trainer.train_dataset)}


def child_main(args) -> None:
    spec, out = _load_spec(args.spec)
    os.makedirs(out, exist_ok=True)
    tool, job = args.child.split("-")
    if tool == "trl":
        result = child_trl(job, spec, out)
    else:
        result = {"phases": child_looper(job, spec, out)}
    result["process_seconds_to_here"] = time.perf_counter() - T_START
    with open(os.path.join(out, "child.json"), "w") as f:
        json.dump(result, f)
    if tool == "looper":
        import gc

        gc.freeze()  # as looper.cli.entry does before the interpreter exits


# --------------------------------------------------------------------------- parent


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.child:
        child_main(args)
        return {}
    work = args.work_dir or tempfile.mkdtemp(prefix="looper-vs-trl-")
    os.makedirs(work, exist_ok=True)
    spec = build_inputs(work, args)
    env = child_env(args.threads)
    jobs = [j.strip() for j in args.jobs.split(",") if j.strip()]
    result = {"threads": args.threads, "data": spec["data"], "steps": args.steps, "pairs": args.pairs,
              "rows": args.rows, "repeats": args.repeats, "jobs": {}}
    for job in jobs:
        times = {"looper": [], "trl": []}
        work_seen = {}
        for i in range(args.repeats):
            for tool in ("looper", "trl") if i % 2 == 0 else ("trl", "looper"):
                out = os.path.join(work, f"{tool}-{job}-{i}")
                shutil.rmtree(out, ignore_errors=True)
                times[tool].append(run_child(command(tool, job, spec, out), env))
                if tool == "looper":
                    work_seen["looper"] = looper_work(job, out)
                else:
                    work_seen["trl"] = json.load(open(os.path.join(out, "child.json")))
        med = {k: statistics.median(v) for k, v in times.items()}
        steps = {"looper": work_seen["looper"]["steps"], "trl": work_seen["trl"]["steps"]}
        batch = DPO["batch"] if job == "dpo" else SFT["batch"]
        checks = {
            "same_optimizer_steps": steps["looper"] == steps["trl"] == args.steps,
            "same_sequences": steps["looper"] * batch == work_seen["trl"]["sequences"],
        }
        entry = {
            "process_seconds": {k: [round(x, 2) for x in v] for k, v in times.items()},
            "median_seconds": {k: round(v, 2) for k, v in med.items()},
            "trl_over_looper": round(med["trl"] / med["looper"], 2),
            "optimizer_steps": steps,
            "sequences": {"looper": steps["looper"] * batch, "trl": work_seen["trl"]["sequences"]},
        }
        if job == "dpo":
            first = {"looper": work_seen["looper"]["first_loss"], "trl": work_seen["trl"]["first_loss"]}
            entry["first_step_loss"] = first
            checks["first_loss_is_log2"] = all(v is not None and abs(v - math.log(2)) < 1e-3 for v in first.values())
        entry["checks"] = checks
        if not args.no_profile:
            breakdown = {}
            for tool in ("looper", "trl"):
                out = os.path.join(work, f"profile-{tool}-{job}")
                shutil.rmtree(out, ignore_errors=True)
                wall = run_child(command(tool, job, spec, out, profile=True), env)
                child = json.load(open(os.path.join(out, "child.json")))
                phases = {k: round(v, 2) for k, v in child["phases"].items() if v is not None}
                inside = child["process_seconds_to_here"]
                phases["interpreter_start_and_exit"] = round(wall - inside, 2)
                breakdown[tool] = {"process_seconds": round(wall, 2), "phases": phases}
            entry["breakdown"] = breakdown
        result["jobs"][job] = entry
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
