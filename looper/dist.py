"""Everything about processes and sharding lives here, and only here.

- ``init_distributed``: a process group from torchrun's environment (``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``), or a single process of world size 1. gloo
  on CPU, nccl on GPU. The single process also gets a (size-1) group, so one code path --
  FSDP2 included -- serves a laptop and 8xH100.
- ``destroy``: leave the group at the end of a run (the ``looper`` command does). A process
  that exits without it still leaves the group, at exit (see ``_leave_at_exit``).
- ``shard_model``: FSDP2 ``fully_shard`` on each decoder layer, then on the root, with a
  mixed-precision policy that follows the compute dtype (``model.dtype``), not the device:
  bf16 compute gathers parameters in bf16 and reduces gradients in fp32 on CPU and GPU
  alike; fp32 compute casts nothing.
- ``no_sync``: switch gradient reduction off for all but the last accumulation micro-step.
- ``retain_freed_memory``: on CPU, glibc keeps freed memory for reuse (see there).
- Reductions, a barrier, global-norm clipping, and full state dicts gathered on rank 0.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterable, Optional

import torch
import torch.distributed as dist

from looper.config import ConfigError


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("run.device: cuda was asked for but no GPU is available")
        return torch.device("cuda", local_rank)
    if name != "cpu":
        raise ConfigError(f"run.device: expected auto, cpu or cuda, got {name!r}")
    return torch.device("cpu")


def init_distributed(device: str = "auto", timeout_s: int = 1800) -> DistEnv:
    """Join (or create) the default process group. Safe to call more than once."""

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    else:
        retain_freed_memory()
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        timeout = timedelta(seconds=timeout_s)
        if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
            kw = {"device_id": dev} if dev.type == "cuda" else {}
            dist.init_process_group(backend=backend, timeout=timeout, **kw)
        else:  # plain `python`: a group of one, in memory, so FSDP2 works unchanged
            dist.init_process_group(
                backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
            )
        _register_leave_at_exit()
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, dev)


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters, <malloc.h>


@functools.lru_cache(maxsize=None)
def retain_freed_memory() -> bool:
    """Keep memory the process frees for its own reuse, instead of handing it back to the
    operating system (glibc only; returns whether the setting took).

    A training step on CPU frees and allocates the same large tensors every time
    (activations, logits, gradients). glibc serves blocks above its mmap threshold (at
    most 32 MiB) with ``mmap`` and unmaps them on free, and trims the heap top above its
    trim threshold, so each step touches fresh pages again: about 38,000 minor page faults
    per SFT micro-batch on the benchmark model, a tenth or more of the step. With mmap off
    and the trim threshold at its maximum, freed blocks stay in the heap and the faults
    disappear (864 per micro-batch), for a few percent more peak memory. The process keeps
    its high-water mark until it exits. ``LOOPER_MALLOC=system`` keeps glibc's defaults.
    Called by ``init_distributed`` on CPU; it changes nothing else, and only once.
    """
    if os.environ.get("LOOPER_MALLOC", "").lower() == "system":
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt  # absent outside glibc (musl, macOS)
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def get_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def destroy() -> None:
    """Leave the process group. All ranks meet first, so none tears its connections down
    while another still has work on them (a gloo rank then aborts)."""
    if dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def _leave_at_exit() -> None:
    """Leave the process group when the interpreter exits, if the process has not.

    A gloo rank that exits still in its group can abort while the interpreter is torn down
    (``terminate called without an active exception``, SIGABRT): the group's worker threads
    still hold finished work whose tensors are freed after Python is gone. A run that
    succeeded then fails. This runs in ``atexit``, while the interpreter is whole. It does
    not wait for the other ranks (one that is exiting with an error must not block on peers
    that are not coming), and after an uncaught exception it does nothing: leaving a group
    can wait on work still in flight with a peer, and a failed rank must end promptly.
    """
    if dist.is_initialized() and getattr(sys, "last_value", None) is None:
        dist.destroy_process_group()


@functools.lru_cache(maxsize=None)
def _register_leave_at_exit() -> None:
    import atexit

    atexit.register(_leave_at_exit)


# --------------------------------------------------------------------------- sharding


def mixed_precision(compute_dtype: torch.dtype):
    """FSDP2's policy for a compute dtype: half precision (bf16, fp16) gathers parameters in
    it and reduces gradients in fp32; fp32 (or wider) casts nothing. Same on every device."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if compute_dtype in (torch.bfloat16, torch.float16):
        return MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard_model(
    model: torch.nn.Module, layers: Iterable[torch.nn.Module], device: torch.device,
    compute_dtype: Optional[torch.dtype] = None,
):
    """FSDP2: ``fully_shard`` every decoder layer, then the root module.

    ``compute_dtype`` (``looper.models.resolve_dtype(cfg.model.dtype, device)``) picks the
    policy (``mixed_precision``): bf16 gathers parameters in bf16 for the forward and
    backward and reduces gradients in fp32, on CPU as on GPU; the sharded master copies
    keep their stored dtype (fp32 trainable weights stay fp32 for the optimizer). fp32
    casts nothing. ``None`` keeps the old device default: bf16 on GPU, fp32 on CPU.
    """
    from torch.distributed.fsdp import fully_shard

    if compute_dtype is None:
        compute_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    mp = mixed_precision(compute_dtype)
    for layer in layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    # FSDP2 fixes each group's gradient dtypes (orig/reduce dtype, from the parameters that
    # require grad) at its lazy init, normally the first forward. Do it now, while the
    # trainable set is the training one: DPO's online reference runs the first forward with
    # every parameter frozen, which would leave the dtypes unset, and bf16 gradients would
    # then be reduced in bf16 and refused by the fp32 masters.
    state = model._get_fsdp_state() if hasattr(model, "_get_fsdp_state") else None
    if state is not None and hasattr(state, "_lazy_init"):
        state._lazy_init()
    return model


def set_grad_sync(model: torch.nn.Module, enabled: bool) -> None:
    """Gradient accumulation: reduce-scatter only on the last micro-step."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)


# --------------------------------------------------------------------------- reductions


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (returns a new tensor; the input is untouched)."""
    y = x.detach().clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    return all_reduce_sum(x) / get_world_size()


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip by the global norm over all ranks' shards; returns the pre-clip norm (a local tensor)."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # a DTensor from sharded gradients
        norm = norm.full_tensor()
    return norm


def all_gather_object(obj) -> list:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# --------------------------------------------------------------------------- state dicts


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The unsharded value of a (possibly DTensor) parameter. Collective: call on every rank."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def gather_full_state_dict(model: torch.nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    """Full, unsharded CPU tensors on rank 0 (an empty dict elsewhere). Collective.

    ``trainable_only`` gathers just the parameters that require grad (a LoRA adapter),
    one at a time, so a 7B frozen base is never gathered to save an adapter.
    """
    if not trainable_only:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(model, options=opts)
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        t = full_tensor(p.detach())
        if is_main():
            out[name] = t.to("cpu", copy=True)
    return out


def sharded_train_state(model, optimizer, trainable_only: bool) -> dict:
    """Model and optimizer state as sharded tensors, for torch.distributed.checkpoint."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    opts = StateDictOptions(ignore_frozen_params=trainable_only)
    msd, osd = get_state_dict(model, optimizer, options=opts)
    return {"model": msd, "optim": osd}


def load_sharded_train_state(model, optimizer, state: dict, trainable_only: bool) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    opts = StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only)
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=opts
    )


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the body first (e.g. builds a file), then the others."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()
