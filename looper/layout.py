"""Every path of a run, in one object built from the config.

``RunLayout(cfg)`` names where each stage reads and writes under ``run.output_dir``;
nothing else in looper joins run paths. Beside it, ``resolve_adapter`` turns the
``*.adapter`` settings (``auto``, ``sft``, ``dpo``, ``none``, a path) into a folder.

::

    <output_dir>/
      base_model/                        the offline tiny model, when model.name_or_path: tiny
      checkpoints/base/                  the tiny model after its base stage (a full HF model)
      checkpoints/<sft.output_name>/     PEFT adapter + tokenizer (default sft_lora)
      checkpoints/<dpo.output_name>/     PEFT adapter + tokenizer (default dpo_lora)
      checkpoints/<name>-resume/step-N/  resume states of the output <name>
      data/rollouts.jsonl, data/rollouts_summary.json
      data/preferences.jsonl, data/preferences_summary.json
      cache/ref_logps-<key>.safetensors  reference log-probs of a pair file
      outputs/<name>_eval.jsonl, outputs/<name>_eval.json, outputs/compare.md
      metrics/<stage>.jsonl              one line per optimizer step
      configs/<stage>.yaml               the resolved config each stage ran with
      tensorboard/<stage>/, wandb/       trackers' files, when run.report_to asks for them
      pipeline_state.json, report.md, *.png

Iterative rounds (``round > 1``) get their own rollouts, pairs, adapter, metrics and eval
names with an ``_r<round>`` suffix; round 1 keeps the names above.

The resume folder of an output is never inside it: the final save replaces the output
folder as a whole (an atomic rename), which would delete the resume states with it.

Standard library only.
"""

from __future__ import annotations

import functools
import glob
import os
from dataclasses import dataclass
from typing import Optional

from looper.io import run_lock

TINY = "tiny"  # model.name_or_path that builds the offline tiny model
ROUND_STAGES = ("rollout", "prefs", "dpo")  # the stages each round of iterative DPO repeats

# adapter settings that mean "no adapter: the base model"
_NO_ADAPTER = ("", "none", "null", "base")


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run folder. Build it with ``RunLayout.of(cfg)``."""

    root: str
    model_source: str  # model.name_or_path: a hub id, a local folder, or "tiny"
    has_base_stage: bool  # the tiny model is given a base ability first (base_train)
    sft_name: str
    dpo_name: str
    round: int = 1  # the round that rollout, prefs and dpo read and write by default

    @classmethod
    def of(cls, cfg) -> "RunLayout":
        return cls(
            root=cfg.run.output_dir,
            model_source=cfg.model.name_or_path,
            has_base_stage=cfg.model.name_or_path == TINY and cfg.base_train is not None,
            sft_name=cfg.sft.output_name,
            dpo_name=cfg.dpo.output_name,
            round=cfg.pipeline.round,
        )

    def _r(self, round: Optional[int]) -> int:
        return self.round if round is None else round

    def _p(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    # ---- models
    @property
    def tiny_model(self) -> str:
        """Where the offline tiny model is built (``model.name_or_path: tiny``)."""
        return self._p("base_model")

    @property
    def pretrained(self) -> str:
        """The model as configured: the tiny model's folder, a local folder or a hub id."""
        return self.tiny_model if self.model_source == TINY else self.model_source

    @property
    def base_checkpoint(self) -> str:
        """The output of the tiny model's base stage (full fine-tuning)."""
        return self.checkpoint("base")

    @property
    def base_model(self) -> str:
        """The model every stage after ``base`` starts from."""
        return self.base_checkpoint if self.has_base_stage else self.pretrained

    # ---- trained outputs
    def checkpoint(self, name: str) -> str:
        return self._p("checkpoints", name)

    def resume(self, name: str) -> str:
        """Resume states of the output ``name`` (never inside it)."""
        return self._p("checkpoints", f"{name}-resume")

    @property
    def sft_adapter(self) -> str:
        return self.checkpoint(self.sft_name)

    def dpo_output_name(self, round: Optional[int] = None) -> str:
        r = self._r(round)
        if r == 1:
            return self.dpo_name
        stem = self.dpo_name[: -len("_lora")] if self.dpo_name.endswith("_lora") else self.dpo_name
        return f"{stem}_r{r}_lora"

    def dpo_adapter(self, round: Optional[int] = None) -> str:
        return self.checkpoint(self.dpo_output_name(round))

    def policy(self, round: Optional[int] = None) -> str:
        """The adapter round ``round`` samples from and starts DPO from (and whose frozen copy
        is its reference): the SFT adapter for round 1, round r-1's DPO adapter after."""
        r = self._r(round)
        return self.sft_adapter if r == 1 else self.dpo_adapter(r - 1)

    # ---- data
    @staticmethod
    def round_suffix(round: int = 1) -> str:
        return "" if round == 1 else f"_r{round}"

    def _named(self, stem: str, round: Optional[int]) -> str:
        return f"{stem}{self.round_suffix(self._r(round))}"

    def rollouts(self, round: Optional[int] = None) -> str:
        return self._p("data", f"{self._named('rollouts', round)}.jsonl")

    def rollouts_summary(self, round: Optional[int] = None) -> str:
        return self._p("data", f"{self._named('rollouts', round)}_summary.json")

    def preferences(self, round: Optional[int] = None) -> str:
        return self._p("data", f"{self._named('preferences', round)}.jsonl")

    def preferences_summary(self, round: Optional[int] = None) -> str:
        return self._p("data", f"{self._named('preferences', round)}_summary.json")

    def preferences_variant(self, tag: str) -> str:
        """A research variant's own pair file, beside the run's (``preferences_<tag>.jsonl``)."""
        return self._p("data", f"preferences_{tag}.jsonl")

    @property
    def cache(self) -> str:
        return self._p("cache")

    def reference_cache(self, key: str) -> str:
        return os.path.join(self.cache, f"ref_logps-{key}.safetensors")

    # ---- outputs, metrics, configs, state
    @property
    def outputs(self) -> str:
        return self._p("outputs")

    def eval_records(self, name: str) -> str:
        return self._p("outputs", f"{name}_eval.jsonl")

    def eval_summary(self, name: str) -> str:
        return self._p("outputs", f"{name}_eval.json")

    @property
    def compare_markdown(self) -> str:
        return self._p("outputs", "compare.md")

    def compare_variant(self, tag: str) -> str:
        return self._p("outputs", f"compare_{tag}.md")

    def stage_name(self, stage: str, round: Optional[int] = None) -> str:
        """``dpo`` -> ``dpo_r2`` in round 2: the name of a per-round stage's metrics and config."""
        return self._named(stage, round) if stage in ROUND_STAGES else stage

    def metrics(self, stage: str, round: Optional[int] = None) -> str:
        return self._p("metrics", f"{self.stage_name(stage, round)}.jsonl")

    def tensorboard(self, stage_name: str) -> str:
        """TensorBoard event files of one stage (``stage_name`` as ``stage_name()`` gives it)."""
        return self._p("tensorboard", stage_name)

    @property
    def wandb(self) -> str:
        """W&B's files, and ``<stage name>.id``: the W&B run a resumed stage continues."""
        return self._p("wandb")

    def config(self, stage: str, round: Optional[int] = None) -> str:
        return self._p("configs", f"{self.stage_name(stage, round)}.yaml")

    @property
    def pipeline_state(self) -> str:
        return self._p("pipeline_state.json")

    @property
    def report(self) -> str:
        return self._p("report.md")

    def plot(self, name: str) -> str:
        return self._p(name)



# --------------------------------------------------------------------------- sidecar files


def meta_path(out_path: str) -> str:
    """The settings a resumable output file was made with."""
    return f"{out_path}.meta.json"


def partial_path(out_path: str, rank: int) -> str:
    """Rank ``rank``'s part of an output file while it is being generated."""
    return f"{out_path}.rank{rank}.partial"


def partial_paths(out_path: str) -> list[str]:
    """Every rank's partial file of ``out_path`` that exists, sorted."""
    return sorted(glob.glob(glob.escape(out_path) + ".rank*.partial"))


def stage_outputs(layout: RunLayout, stage: str, round: Optional[int] = None) -> list[str]:
    """What a pipeline stage writes (outputs and resume states); removed when it is forced."""
    def trained(name: str) -> list[str]:
        return [layout.checkpoint(name), layout.resume(name)]

    def generated(path: str) -> list[str]:
        return [path, meta_path(path), *partial_paths(path)]

    if stage == "base":
        return trained("base")
    if stage == "sft":
        return trained(layout.sft_name)
    if stage == "rollout":
        return generated(layout.rollouts(round)) + [layout.rollouts_summary(round)]
    if stage == "prefs":
        return [layout.preferences(round), layout.preferences_summary(round)]
    if stage == "dpo":
        return trained(layout.dpo_output_name(round))
    if stage == "eval":
        return [layout.outputs]
    raise ValueError(f"unknown stage {stage!r}")


# --------------------------------------------------------------------------- adapters


def adapter_missing(path: str) -> bool:
    return not os.path.isfile(os.path.join(path, "adapter_config.json"))


def resolve_adapter(layout: RunLayout, spec: Optional[str], key: str, auto: Optional[str] = None) -> Optional[str]:
    """The adapter folder that setting ``key`` (e.g. ``rollout.adapter``) names, or None.

    One spelling everywhere:
    - ``none`` / ``null`` / ``base`` / empty: no adapter (the base model);
    - ``auto``: ``auto`` as given by the caller (the stage's natural input, the SFT adapter);
    - ``sft`` / ``dpo``: this run's SFT or DPO output (``checkpoints/<output_name>``);
    - anything else: a path to a PEFT adapter folder (``~`` expanded).
    A folder without ``adapter_config.json`` is a ``ConfigError`` naming the key.
    """
    from looper.config import ConfigError

    raw = "" if spec is None else str(spec).strip()
    if raw.lower() in _NO_ADAPTER:
        return None
    if raw.lower() == "auto":
        if auto is None:
            raise ConfigError(f"{key}: 'auto' has no meaning here; give sft, dpo, none or a path")
        path = auto
    elif raw.lower() == "sft":
        path = layout.sft_adapter
    elif raw.lower() == "dpo":
        path = layout.dpo_adapter()  # this round's
    else:
        path = os.path.expanduser(raw)
    if adapter_missing(path):
        raise ConfigError(
            f"{key}={spec!r}: no PEFT adapter at {path} (no adapter_config.json); expected a folder "
            f"such as {layout.sft_adapter}, or one of sft, dpo, none"
        )
    return path


def adapter_label(layout: RunLayout, path: Optional[str]) -> str:
    """A short name for an adapter: ``base``, ``sft``, ``dpo`` or the folder's name."""
    if path is None:
        return "base"
    norm = os.path.normpath(path)
    if norm == os.path.normpath(layout.sft_adapter):
        return "sft"
    if norm == os.path.normpath(layout.dpo_adapter()):
        return "dpo"
    return os.path.basename(norm) or "adapter"


def resolve_base_model(layout: RunLayout, announce: bool = False) -> str:
    """The model a stage after ``base`` starts from, as it is on disk now.

    With a base stage that has not run in this folder yet, stages start from the untrained
    tiny model (and, with ``announce``, say so).
    """
    if not layout.has_base_stage:
        return layout.pretrained
    if os.path.isfile(os.path.join(layout.base_checkpoint, "config.json")):
        return layout.base_checkpoint
    if announce:
        print(
            "[looper] note: the tiny model's base stage has not run in this output folder, so this "
            "stage uses the untrained tiny model; `looper pipeline --stages base` runs it"
        )
    return layout.pretrained


def holds_run_lock(stage_fn):
    """Run a stage function ``fn(cfg, ...)`` holding its run folder's lock (``io.run_lock``).

    Under torchrun only the global rank 0 takes it: the ranks of one job share the folder.
    """
    @functools.wraps(stage_fn)
    def wrapper(cfg, *args, **kwargs):
        if int(os.environ.get("RANK", "0")) != 0:
            return stage_fn(cfg, *args, **kwargs)
        with run_lock(cfg.run.output_dir):
            return stage_fn(cfg, *args, **kwargs)

    return wrapper
