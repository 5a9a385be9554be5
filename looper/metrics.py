"""Rank-0 progress bars and ``metrics/<stage>.jsonl`` (one JSON line per optimizer step)."""

from __future__ import annotations

import json
import math
import os
import time
from typing import Optional

from looper import dist


class MetricsLog:
    """Append metrics as JSON lines on rank 0; other ranks do nothing.

    On resume the file is cut back to the lines at or before the resumed step, so the
    log of a resumed run matches the log of an uninterrupted one. A ``tracker``
    (``looper.tracking.Tracker``) receives every record too.
    """

    def __init__(self, path: str, resume_step: int = 0, tracker=None):
        self.path = path
        self._f = None
        self.tracker = tracker
        if not dist.is_main():
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        kept = []
        if resume_step > 0 and os.path.exists(path):
            with open(path) as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        break
                    if rec.get("step", 0) <= resume_step:
                        kept.append(line if line.endswith("\n") else line + "\n")
        with open(path, "w") as f:
            f.writelines(kept)
        self._f = open(path, "a")
        if tracker is not None:
            tracker.open(resume_step)

    def log(self, record: dict) -> None:
        if self._f is None:
            return
        clean = {k: (float(v) if hasattr(v, "item") else v) for k, v in record.items()}
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in clean.items()}
        self._f.write(json.dumps(clean) + "\n")
        self._f.flush()
        if self.tracker is not None:
            self.tracker.log(record)

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()
        if self._f is not None:
            self._f.close()
            self._f = None


def progress(total: int, desc: str, enabled: bool = True, initial: int = 0, unit: str = "step"):
    """A tqdm bar on rank 0 (a silent stand-in elsewhere)."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=initial, desc=desc, unit=unit, disable=not (enabled and dist.is_main()),
        dynamic_ncols=True,
    )


class Throughput:
    """Tokens per second over a step, and in total."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.last = self.t0

    def step(self, tokens: int) -> float:
        now = time.perf_counter()
        rate = tokens / max(now - self.last, 1e-9)
        self.last = now
        return rate

    def reset(self) -> None:
        self.last = time.perf_counter()


def peak_memory_bytes(device) -> Optional[int]:
    """Peak accelerator memory, or this process's peak RSS on CPU."""
    import torch

    if getattr(device, "type", device) == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
