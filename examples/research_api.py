"""A research variant through looper's Python API, without the CLI.

Re-score existing rollouts with a different Regime W weighting (more weight on internal
consistency, per-trajectory scope), build preference pairs from the new rewards, run DPO
on them from the same SFT adapter, evaluate, and compare with SFT and standard DPO.

It needs the rollouts and the SFT adapter of an earlier run, e.g.:

    looper pipeline                                   # the tiny CPU run, into runs/tiny
    python examples/research_api.py                   # then this variant, beside it

or ``python examples/research_api.py -c my.yaml key=value ...`` for another run.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

from looper import build_preferences, compare, evaluate, load_config, train_dpo
from looper.config import default_config_path
from looper.io import read_jsonl, write_jsonl_atomic
from looper.layout import RunLayout
from looper.regime_w.rescore import rescore


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", default=default_config_path())
    p.add_argument("overrides", nargs="*")
    p.add_argument("--name", default="dpo_cf", help="name of the variant's adapter and eval files")
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
    files = [layout.eval_records(n) for n in ("sft", "dpo", args.name)]
    return compare([f for f in files if os.path.exists(f)], markdown_path=layout.compare_variant(args.name))


if __name__ == "__main__":
    main()
