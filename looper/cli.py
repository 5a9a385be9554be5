"""Command line: ``looper <stage> -c config.yaml key=value ...`` (also ``python -m looper``)."""

from __future__ import annotations

import argparse
import gc
import sys
from typing import Optional

STAGES = {
    # stage name: (module, function)
    "sft": ("looper.loops.sft", "train_sft"),
    "rollout": ("looper.loops.rollout", "collect_rollouts"),
    "prefs": ("looper.loops.prefs", "build_preference_file"),
    "dpo": ("looper.loops.dpo", "train_dpo"),
    "eval": ("looper.loops.evaluate", "evaluate"),
}


def _stage_parser(name: str, help: str, sub) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help)
    p.add_argument("-c", "--config", default=None, help="YAML config (default: the embedded tiny CPU config, looper/configs/tiny_cpu.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. sft.lr=1e-4 lora.r=32")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="looper", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _stage_parser("sft", "supervised fine-tuning (LoRA or full)", sub)
    _stage_parser("rollout", "sample K trajectories per question and score them (Regime W)", sub)
    _stage_parser("prefs", "build preference pairs from data/rollouts.jsonl", sub)
    _stage_parser("dpo", "DPO against a frozen reference adapter", sub)
    _stage_parser("eval", "evaluate base or base+adapter on GSM8K / Platinum / JSONL", sub)
    p = _stage_parser("pipeline", "all five stages in order", sub)
    p.add_argument("--stages", default=None, help="comma-separated subset, e.g. sft,rollout")
    p.add_argument("--force", action="append", default=[], help="redo STAGE even if complete")
    c = sub.add_parser("compare", help="compare eval files: accuracy, fixes/breaks, McNemar")
    c.add_argument("files", nargs="+", help="outputs/<name>_eval.jsonl files; the first is the baseline")
    c.add_argument("--markdown", default=None, help="where to write the Markdown table")
    b = sub.add_parser("build-tiny", help="build the offline tiny model and tokenizer")
    b.add_argument("-c", "--config", default=None)
    b.add_argument("overrides", nargs="*")
    b.add_argument("--out", required=True)
    return parser


def _load(args):
    from looper.config import default_config_path, load_config

    # no -c: the embedded default, the tiny CPU config shipped inside the package
    return load_config(args.config or default_config_path(), args.overrides)


def collect_for_a_command() -> None:
    """Garbage-collector settings for a process that the CLI owns.

    Importing torch and transformers leaves about 400,000 long-lived objects, and Python's
    default thresholds run six full collections over them during start-up: 0.4 s of an
    SFT job of 12 s on 2 cores. A full collection after 100 middle-generation ones (not
    10) keeps the collector on for cyclic garbage, and a 16-step job then runs none. A
    library user's process is left as it is: ``entry`` (the command) calls this, and
    ``main`` does not.
    """
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, 100)


def entry() -> None:
    """The ``looper`` command and ``python -m looper``: ``main`` in a process of its own."""
    collect_for_a_command()
    try:
        code = main()
        if code == 0 and "looper.dist" in sys.modules:  # the command joined a process group
            from looper import dist

            dist.destroy()  # all ranks meet, then leave: none exits with work in flight
    finally:
        # what is still alive lives until exit: the interpreter's last collections skip it
        # (0.3 s on the same job)
        gc.freeze()
    raise SystemExit(code)


def main(argv: Optional[list[str]] = None) -> int:
    import importlib

    from looper.config import ConfigError
    from looper.io import DataError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may also come after options: `looper pipeline --force dpo dpo.lr=1e-4`
    bad = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    try:
        if args.command == "compare":
            from looper.loops.evaluate import compare

            compare(args.files, markdown_path=args.markdown)
            return 0
        cfg = _load(args)
        if args.command == "build-tiny":
            from looper.models import build_tiny_model

            build_tiny_model(args.out, cfg.model.tiny)
            print(f"tiny model written to {args.out}")
            return 0
        if args.command == "pipeline":
            from looper.loops.pipeline import run_pipeline

            stages = args.stages.split(",") if args.stages else None
            run_pipeline(cfg, stages=stages, force=args.force)
            return 0
        module, fn = STAGES[args.command]
        getattr(importlib.import_module(module), fn)(cfg)
        return 0
    except (ConfigError, DataError) as e:
        print(f"looper {args.command}: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # a NaN/inf loss: the message names the step and checkpoint
        print(f"looper {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    entry()
