"""How cost grows with the work: each stage benchmark at three sizes, throughput side by side.

Runs the stage benchmarks as separate processes, one after another, at ``--factors`` times
a base size (the size flag each benchmark has):

- SFT: measured optimizer steps (``sft_throughput.py --steps``; 16 rows each), so 1x, 4x,
  16x the rows, over the first 128 GSM8K-train rows (``--rows 128``: 8 steps an epoch)
  after one epoch of warm-up. Each size measures whole epochs of the same rows, so every
  size computes the same tokens per step on average: only the amount of work differs. (Over
  the whole file, a short run's few steps have their own mix of row lengths, and longer
  rows cost more per token: attention grows with the length.)
- DPO: pairs (``dpo_throughput.py --pairs``; one epoch of 8-pair steps);
- generation: questions (``generation_throughput.py --questions``; 8 samples, 256 tokens);
- rollouts: questions (``rollout_throughput.py --questions``; K=8, 256 tokens, 1 thread),
  and at the largest size also on 2 ranks of 1 thread each (``torchrun --nproc_per_node 2``),
  against the same work on 1 rank.

For each it prints the throughput (tokens/s; trajectories/s for rollouts) and MFU where the
benchmark measures it, and ``throughput_ratio_largest_to_smallest``; a stage whose
throughput falls by more than ``--tolerance`` as the work grows is flagged in ``notes``.

    python benchmarks/scaling.py                          # every stage, factors 1,4,16
    python benchmarks/scaling.py --stages dpo,generation --factors 1,2,4
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))

# stage: (script, size flag, base size, extra args, throughput key, MFU key)
STAGES = {
    "sft": ("sft_throughput.py", "--steps", 8, ["--rows", "128", "--warmup", "8"], "tokens_per_s", "mfu"),
    "dpo": ("dpo_throughput.py", "--pairs", 32, [], "tokens_per_s", "mfu"),
    "generation": ("generation_throughput.py", "--questions", 8, ["--skip-baseline", "--rounds", "1"],
                   "engine.tokens_per_s", "decode_efficiency.decode_fraction_of_peak"),
    "rollouts": ("rollout_throughput.py", "--questions", 8, [], "trajectories_per_s", None),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--factors", default="1,4,16")
    p.add_argument("--threads", type=int, default=2, help="threads of the SFT, DPO and generation runs (rollouts: 1)")
    p.add_argument("--tolerance", type=float, default=0.10, help="allowed fall of throughput, as a fraction")
    p.add_argument("--no-ranks", action="store_true", help="skip the rollouts on 1 and 2 ranks")
    return p.parse_args(argv)


def _get(result: dict, dotted: str):
    for part in dotted.split("."):
        result = result[part]
    return result


def run(script: str, args: list[str], ranks: int = 1) -> dict:
    cmd = [sys.executable, os.path.join(HERE, script), *args]
    env = dict(os.environ)
    if ranks > 1:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", f"--master_port={port}",
               *cmd[1:]]
        env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    if proc.returncode not in (0, 1):  # rollout_throughput exits 1 when scoring is too slow: still a result
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit(f"{script} {' '.join(args)} failed with exit code {proc.returncode}")
    return json.loads(proc.stdout[proc.stdout.index("{"):])


def main(argv=None) -> dict:
    args = parse_args(argv)
    factors = [int(f) for f in args.factors.split(",")]
    out = {"factors": factors, "threads": args.threads, "stages": {}, "notes": []}
    for stage in [s.strip() for s in args.stages.split(",") if s.strip()]:
        script, flag, base, extra, key, mfu_key = STAGES[stage]
        threads = 1 if stage == "rollouts" else args.threads
        rows = []
        for f in factors:
            res = run(script, [flag, str(base * f), "--threads", str(threads), *extra])
            rows.append({"size": base * f, "throughput": round(float(_get(res, key)), 2),
                         "mfu": round(float(_get(res, mfu_key)), 4) if mfu_key else None})
        ratio = rows[-1]["throughput"] / rows[0]["throughput"]
        out["stages"][stage] = {"size_flag": flag, "other_args": extra, "throughput_key": key, "threads": threads,
                                "runs": rows, "throughput_ratio_largest_to_smallest": round(ratio, 3)}
        if ratio < 1 - args.tolerance:
            out["notes"].append(f"{stage}: throughput fell to {ratio:.2f}x from {rows[0]['size']} to {rows[-1]['size']}")
        if stage == "rollouts" and not args.no_ranks:
            size = base * factors[-1]
            by_ranks = {}
            with tempfile.TemporaryDirectory(prefix="looper-scaling-") as work:
                for ranks in (1, 2):
                    res = run(script, [flag, str(size), "--threads", "1", "--work-dir", work, *extra], ranks=ranks)
                    by_ranks[ranks] = res[key]
            out["stages"][stage]["ranks"] = {
                "size": size, "threads_per_rank": 1, "trajectories_per_s": by_ranks,
                "two_over_one": round(by_ranks[2] / by_ranks[1], 3),
            }
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
