"""How cost grows with the work: each stage benchmark at three sizes, throughput side by side.

Runs the stage benchmarks as separate processes, one after another, at ``--factors`` times
a base size (the size flag each benchmark has):

- SFT: measured optimizer steps (``sft_throughput.py --steps``; 16 rows each), so 1x, 4x,
  16x the rows;
- DPO: pairs (``dpo_throughput.py --pairs``; one epoch of 8-pair steps);
- generation: questions (``generation_throughput.py --questions``; 8 samples, 256 tokens);
- rollouts: questions (``rollout_throughput.py --questions``; K=8, 256 tokens, 1 thread).

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
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

# stage: (script, size flag, base size, extra args, throughput key, MFU key)
STAGES = {
    "sft": ("sft_throughput.py", "--steps", 4, ["--warmup", "1"], "tokens_per_s", "mfu"),
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
    return p.parse_args(argv)


def _get(result: dict, dotted: str):
    for part in dotted.split("."):
        result = result[part]
    return result


def run(script: str, args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, os.path.join(HERE, script), *args], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
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
        out["stages"][stage] = {"size_flag": flag, "throughput_key": key, "threads": threads, "runs": rows,
                                "throughput_ratio_largest_to_smallest": round(ratio, 3)}
        if ratio < 1 - args.tolerance:
            out["notes"].append(f"{stage}: throughput fell to {ratio:.2f}x from {rows[0]['size']} to {rows[-1]['size']}")
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
