"""A research variant through looper's Python API, without the CLI.

Re-score existing rollouts with a different Regime W weighting (more weight on internal
consistency, per-trajectory scope), build preference pairs from the new rewards, run DPO
on them from the same SFT adapter, evaluate, and compare with SFT and standard DPO.

With ``--next-round``, it also drives one more round of iterative DPO by hand, the way the
pipeline's ``pipeline.rounds`` does: sample from the variant's adapter, score, build
pairs, and train from that adapter with it frozen as the reference (an adapter in, an
adapter out), then evaluate.

It needs the rollouts and the SFT adapter of an earlier run, e.g.:

    looper pipeline                                   # the tiny CPU run, into runs/tiny
    python examples/research_api.py                   # then this variant, beside it
    python examples/research_api.py --next-round      # ... and one more round from it

or ``python examples/research_api.py -c my.yaml key=value ...`` for another run.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

from looper import build_preference_file, build_preferences, collect_rollouts, compare, evaluate, load_config, train_dpo
from looper.config import default_config_path
from looper.io import read_jsonl, write_jsonl_atomic
from looper.layout import RunLayout
from looper.regime_w.rescore import rescore


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", default=default_config_path())
    p.add_argument("overrides", nargs="*")
    p.add_argument("--name", default="dpo_cf", help="name of the variant's adapter and eval files")
    p.add_argument("--next-round", action="store_true", help="then run one more round of iterative DPO from it")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    layout = RunLayout.of(cfg)  # where the run's files are; the stages below ask it too

    # 1. a different Regime W: consistency-heavy weights, per-trajectory coherence
    rw = dataclasses.replace(cfg.regime_w, w_end=0.2, w_path=0.2, w_cf=0.6, scope="trajectory")
    records, _ = rescore(read_jsonl(layout.rollouts()), rw)  # same texts and grades, new scores

    # 2. pairs from the new rewards, in a file of their own beside the run's
    pairs = build_preferences(records, cfg.prefs, prompt_template=cfg.data.prompt_template)
    pairs_path = layout.preferences_variant(args.name)
    write_jsonl_atomic(pairs_path, pairs)
    kinds = {k: sum(p["kind"] == k for p in pairs) for k in ("correctness", "coherence")}
    print(f"[research] {len(pairs)} pairs {kinds} -> {pairs_path}")

    # 3. DPO on them, from the same SFT adapter, into its own folder
    dpo = dataclasses.replace(cfg.dpo, pairs=pairs_path, output_name=f"{args.name}_lora")
    adapter = train_dpo(dataclasses.replace(cfg, dpo=dpo)).output_dir

    # 4. evaluate and compare with SFT (and standard DPO when it exists)
    evaluate(dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, adapter=adapter, name=args.name)))
    names = ["sft", "dpo", args.name]

    # 5. (optional) one more round by hand: an adapter in, an adapter out
    if args.next_round:
        names.append(next_round(cfg, adapter, args.name))
    files = [layout.eval_records(n) for n in names]
    return compare([f for f in files if os.path.exists(f)], markdown_path=layout.compare_variant(args.name))


def next_round(cfg, policy: str, name: str) -> str:
    """Round 2 of iterative DPO from adapter ``policy``; returns the new run's eval name.

    ``pipeline.round`` names the files (data/rollouts_r2.jsonl, data/preferences_r2.jsonl,
    checkpoints/<name>_r2_lora); the adapters are given explicitly, so any adapter can
    start a round.
    """
    r = dataclasses.replace(cfg.pipeline, round=2)
    rcfg = dataclasses.replace(
        cfg, pipeline=r, rollout=dataclasses.replace(cfg.rollout, adapter=policy),
        dpo=dataclasses.replace(cfg.dpo, adapter=policy, pairs=None, output_name=f"{name}_lora"),
    )
    name = f"{name}_r2"
    collect_rollouts(rcfg)        # K samples per question from `policy`, scored with Regime W
    build_preference_file(rcfg)   # correctness pairs first, then coherence pairs
    adapter = train_dpo(rcfg).output_dir  # policy and frozen reference both start from `policy`
    evaluate(dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, adapter=adapter, name=name)))
    return name


if __name__ == "__main__":
    main()
