"""Atomic saves: PEFT adapters, full models, and resume states.

Every save goes to a temporary folder beside its target, which rank 0 renames into place
once every rank has finished writing. A run killed mid-save leaves only a ``.tmp-*``
folder, which is ignored and cleaned on the next save; the previous checkpoint is intact.

Resume state, under ``checkpoints/<stage>/resume/step-<N>/``:
- ``model_optim/``: sharded model (trainable part) and optimizer state, via
  ``torch.distributed.checkpoint`` (one file per rank, reshardable);
- ``trainer_state.json``: step, scheduler state, data position, counters;
- ``rng_rank<r>.pt``: each rank's RNG states (loaded with ``weights_only=True``).
"""

from __future__ import annotations

import glob
import json
import os
import random
import re
import shutil
import time
from typing import Optional

import numpy as np
import torch

from looper import dist
from looper.io import replace_dir

_STEP_RE = re.compile(r"^step-(\d+)$")


def _tmp_dir(target: str) -> str:
    """A temporary folder beside ``target``, with the same name on every rank."""
    parent = os.path.dirname(os.path.abspath(target))
    name = dist.broadcast_object(f".tmp-{os.path.basename(target)}-{time.time_ns()}")
    path = os.path.join(parent, name)
    if dist.is_main():
        os.makedirs(path, exist_ok=True)
    dist.barrier()
    return path


def _finish(tmp: str, target: str) -> None:
    dist.barrier()  # every rank has written its part
    if dist.is_main():
        replace_dir(tmp, target)
        # leftovers of earlier saves of this target that were killed before their rename
        parent, name = os.path.split(os.path.abspath(target))
        for stale in glob.glob(os.path.join(parent, glob.escape(f".tmp-{name}-") + "*")):
            shutil.rmtree(stale, ignore_errors=True)
    dist.barrier()


def save_adapter(
    model, tokenizer, out_dir: str, extra: Optional[dict] = None, adapter_name: str = "default"
) -> None:
    """Save a PEFT adapter (every rank's shard, gathered on rank 0) plus the tokenizer.

    The result is a plain PEFT folder that ``PeftModel.from_pretrained`` loads.
    """
    full = dist.gather_full_state_dict(model, trainable_only=True)
    tmp = _tmp_dir(out_dir)
    if dist.is_main():
        model.save_pretrained(tmp, state_dict=full, safe_serialization=True, selected_adapters=[adapter_name])
        tokenizer.save_pretrained(tmp)
        if extra:
            with open(os.path.join(tmp, "looper_info.json"), "w") as f:
                json.dump(extra, f, indent=2)
    _finish(tmp, out_dir)


def save_full_model(model, tokenizer, out_dir: str) -> None:
    """Save a fully fine-tuned model in Hugging Face format (safetensors)."""
    full = dist.gather_full_state_dict(model, trainable_only=False)
    tmp = _tmp_dir(out_dir)
    if dist.is_main():
        model.save_pretrained(tmp, state_dict=full, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    _finish(tmp, out_dir)


# --------------------------------------------------------------------------- resume


def rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": int(np.random.get_state()[2]),
        "python": json.dumps(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), int(state["numpy_pos"])))
    py = json.loads(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_resume_state(
    resume_root: str, step: int, model, optimizer, trainer_state: dict, trainable_only: bool, keep_last: int
) -> str:
    """Write ``resume_root/step-<step>`` atomically and prune to the newest ``keep_last``."""
    import torch.distributed.checkpoint as dcp

    target = os.path.join(resume_root, f"step-{step}")
    os.makedirs(resume_root, exist_ok=True)
    tmp = _tmp_dir(target)
    dcp.save(dist.sharded_train_state(model, optimizer, trainable_only), checkpoint_id=os.path.join(tmp, "model_optim"))
    torch.save(rng_state(), os.path.join(tmp, f"rng_rank{dist.get_rank()}.pt"))
    if dist.is_main():
        state = dict(trainer_state, step=step, world_size=dist.get_world_size())
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump(state, f, indent=2)
    _finish(tmp, target)
    if dist.is_main():
        _prune(resume_root, keep_last)
    dist.barrier()
    return target


def _prune(resume_root: str, keep_last: int) -> None:
    for stale in glob.glob(os.path.join(resume_root, ".tmp-*")):
        shutil.rmtree(stale, ignore_errors=True)
    steps = list_resume_states(resume_root)
    for path in steps[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


def list_resume_states(resume_root: str) -> list[str]:
    """Complete resume states, oldest first (temporary folders are never listed)."""
    if not os.path.isdir(resume_root):
        return []
    found = []
    for name in os.listdir(resume_root):
        m = _STEP_RE.match(name)
        if m and os.path.isfile(os.path.join(resume_root, name, "trainer_state.json")):
            found.append((int(m.group(1)), os.path.join(resume_root, name)))
    return [p for _, p in sorted(found)]


def find_resume_state(resume: str, resume_root: str) -> Optional[str]:
    """``auto``: the newest state under ``resume_root`` (or None); ``none``; or an explicit path."""
    if resume == "none":
        return None
    if resume == "auto":
        states = list_resume_states(resume_root)
        return states[-1] if states else None
    if not os.path.isfile(os.path.join(resume, "trainer_state.json")):
        from looper.config import ConfigError

        raise ConfigError(f"resume: {resume} is not a resume state (no trainer_state.json)")
    return resume


def damage(path: str) -> Optional[str]:
    """What is missing from resume state ``path`` (None if it looks intact): its trainer
    state, the checkpoint metadata, or one rank's shard file."""
    try:
        state = read_trainer_state(path)
    except (OSError, ValueError) as e:
        return f"unreadable trainer_state.json: {e}"
    shards = os.path.join(path, "model_optim")
    if not os.path.isfile(os.path.join(shards, ".metadata")):
        return "model_optim/.metadata is missing"
    for rank in range(int(state.get("world_size", 1))):
        shard = os.path.join(shards, f"__{rank}_0.distcp")
        if not os.path.isfile(shard) or os.path.getsize(shard) == 0:
            return f"model_optim/__{rank}_0.distcp is missing or empty"
    return None


def read_trainer_state(path: str) -> dict:
    """The ``trainer_state.json`` of resume state ``path``."""
    with open(os.path.join(path, "trainer_state.json")) as f:
        return json.load(f)


def load_resume_state(path: str, model, optimizer, trainable_only: bool) -> dict:
    """Restore model, optimizer and this rank's RNG; return the trainer state dict."""
    import torch.distributed.checkpoint as dcp

    state = dist.sharded_train_state(model, optimizer, trainable_only)
    dcp.load(state, checkpoint_id=os.path.join(path, "model_optim"))
    dist.load_sharded_train_state(model, optimizer, state, trainable_only)
    trainer_state = read_trainer_state(path)
    rng_file = os.path.join(path, f"rng_rank{dist.get_rank()}.pt")
    if trainer_state.get("world_size") == dist.get_world_size() and os.path.exists(rng_file):
        set_rng_state(torch.load(rng_file, weights_only=True))
    return trainer_state
