"""Experiment tracking: the metric records of ``metrics/<stage>.jsonl``, also sent to
TensorBoard and/or Weights & Biases (``run.report_to``).

JSONL is always written; a tracker receives the same records under the same names (TRL's
names for DPO: ``rewards/chosen``, ``logps/rejected``, ...), from rank 0 only, with the
resolved config attached (TensorBoard: a ``config`` text; W&B: the run's config).

Both are optional extras (``pip install 'looper[tensorboard]'``, ``'looper[wandb]'``);
a missing package is a ``ConfigError`` when the tracker is built, before any model loads.

Where things go:
- TensorBoard: event files under ``<run>/tensorboard/<stage>/``. A resumed stage opens its
  writer with ``purge_step`` at the resumed step, so steps logged after the last resume
  state and before a crash are hidden, as the JSONL cuts them.
- W&B: one W&B run per stage, named ``<run name>/<stage>``, grouped by the run name, with
  files under ``<run>/wandb/``. Its id is kept in ``<run>/wandb/<stage>.id``: a resumed
  stage continues the same W&B run, a stage that starts over gets a new one.
  ``WANDB_MODE=offline`` and the other W&B environment variables apply as usual.
"""

from __future__ import annotations

import importlib.util
import math
import os
import secrets
from typing import Optional

from looper import dist
from looper.config import ConfigError

EXTRAS = {"tensorboard": ("tensorboard", "looper[tensorboard]"), "wandb": ("wandb", "looper[wandb]")}


def _require(name: str) -> None:
    module, extra = EXTRAS[name]
    if importlib.util.find_spec(module) is None:
        raise ConfigError(
            f"run.report_to includes {name!r} but the {module!r} package is not installed: "
            f"pip install '{extra}' (or remove {name!r} from run.report_to)"
        )


def _numbers(record: dict) -> dict[str, float]:
    """The finite numeric values of a record, ``step`` left out (it is the x axis)."""
    out = {}
    for k, v in record.items():
        if k == "step" or isinstance(v, bool):
            continue
        if hasattr(v, "item"):
            v = v.item()
        if isinstance(v, (int, float)) and math.isfinite(v):
            out[k] = float(v)
    return out


class Tracker:
    """Rank-0 forwarding of metric records to the trackers of ``report_to``.

    Built before any work (it checks the packages are installed); ``open(resume_step)``
    starts the writers, ``log(record)`` sends one record at ``record["step"]``,
    ``close()`` flushes and ends them. On other ranks every call does nothing.
    """

    def __init__(self, report_to: list[str], *, tensorboard_dir: str, wandb_dir: str, stage: str, run_name: str,
                 project: str, config: dict):
        for name in report_to:
            if name not in EXTRAS:
                raise ConfigError(f"run.report_to: unknown tracker {name!r} (choose from {sorted(EXTRAS)})")
            _require(name)
        self.report_to = list(dict.fromkeys(report_to))
        self.tensorboard_dir, self.wandb_dir = tensorboard_dir, wandb_dir
        self.stage, self.run_name, self.project, self.config = stage, run_name, project, config
        self._tb = self._wandb = None

    def open(self, resume_step: int = 0) -> "Tracker":
        if not dist.is_main():
            return self
        if "tensorboard" in self.report_to:
            import yaml
            from torch.utils.tensorboard import SummaryWriter

            os.makedirs(self.tensorboard_dir, exist_ok=True)
            self._tb = SummaryWriter(self.tensorboard_dir, purge_step=resume_step + 1 if resume_step else None)
            self._tb.add_text("config", "```\n" + yaml.safe_dump(self.config, sort_keys=False) + "```", resume_step)
        if "wandb" in self.report_to:
            import wandb

            from looper.io import write_text_atomic

            os.makedirs(self.wandb_dir, exist_ok=True)
            id_file = os.path.join(self.wandb_dir, f"{self.stage}.id")
            run_id = None
            if resume_step and os.path.exists(id_file):
                with open(id_file) as f:
                    run_id = f.read().strip() or None
            if run_id is None:
                run_id = secrets.token_hex(8)
                write_text_atomic(id_file, run_id + "\n")
            try:
                self._wandb = wandb.init(
                    project=self.project, name=f"{self.run_name}/{self.stage}", group=self.run_name,
                    job_type=self.stage, config=self.config, id=run_id, resume="allow",
                    dir=os.path.dirname(self.wandb_dir),  # W&B writes under <dir>/wandb/
                )
            except wandb.errors.UsageError as e:  # no API key, most often
                raise ConfigError(
                    f"run.report_to includes 'wandb' but W&B refused to start: {e} "
                    "(run `wandb login`, or set WANDB_MODE=offline and `wandb sync` later)"
                ) from None
        return self

    def log(self, record: dict) -> None:
        if self._tb is None and self._wandb is None:
            return
        step = int(record["step"])
        values = _numbers(record)
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(values, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def for_stage(cfg, layout, stage: str) -> Optional[Tracker]:
    """The tracker of ``stage`` (a stage name as in ``metrics/<stage>.jsonl``), or None when
    ``run.report_to`` is empty."""
    if not cfg.run.report_to:
        return None
    from looper.config import to_dict

    name = cfg.run.run_name or os.path.basename(os.path.abspath(layout.root))
    return Tracker(cfg.run.report_to, tensorboard_dir=layout.tensorboard(stage), wandb_dir=layout.wandb,
                   stage=stage, run_name=name, project=cfg.run.wandb_project, config=to_dict(cfg))
