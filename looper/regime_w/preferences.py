"""Preference pairs from scored rollouts (docs/design.md, "Regime W").

For each question the trajectories are split into C (correct) and W (incorrect, including
those without an answer).

- **Correctness pairs** (chosen from C, rejected from W): C sorted by reward, highest
  first, W by reward, lowest first (ties keep the input order), then paired round-robin:
  pair ``j`` of block ``b`` is ``(C[j mod |C|], W[(j + b) mod |W|])`` for
  ``j < lcm(|C|, |W|)`` and ``b < gcd(|C|, |W|)``, which walks every one of the |C|·|W|
  combinations once, best-against-worst first, while spreading each trajectory evenly.
  At most ``max_correctness_pairs`` per question.
- **Coherence pairs** (both from C): the ordered pairs with
  ``reward(chosen) - reward(rejected) >= threshold``, largest margin first (ties by rank
  in the sorted C), at most ``max_coherence_pairs`` per question.
- A pair whose chosen and rejected texts are identical is skipped, and so is an exact
  duplicate (same prompt, chosen and rejected) of an earlier pair, and a pair with an empty
  (or whitespace-only) side, which DPO cannot train on; skipped pairs do not count against
  the caps.

``margin = chosen_reward - rejected_reward`` rounded to 12 decimals (so float noise never
decides the threshold). The output depends only on the input records: no randomness.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from looper.config import ABEL_PROMPT, ConfigError, PrefsConfig
from looper.io import DataError

__all__ = [
    "TRAJECTORY_FIELDS",
    "build_preferences",
    "check_rollout_record",
    "format_summary",
    "record_prompt",
    "summarize",
]

# Fields every trajectory must carry for pair building.
TRAJECTORY_FIELDS = ("full_text", "correct", "reward")
_MARGIN_DECIMALS = 12


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_rollout_record(rec: Any, where: str) -> None:
    """Raise ``DataError`` (prefixed by ``where``, e.g. ``"file.jsonl:3"``) unless ``rec`` is
    a usable rollout record: ``question_id``, ``prompt`` or ``question``, and a non-empty
    list ``trajectories`` whose items carry ``full_text`` (str), ``correct`` (bool) and
    ``reward`` (finite number)."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a rollout record (JSON object), got {type(rec).__name__}")
    missing = [k for k in ("question_id", "trajectories") if k not in rec]
    if "prompt" not in rec and "question" not in rec:
        missing.append("question (or prompt)")
    if missing:
        raise DataError(
            f"{where}: missing field(s) {missing}; a rollout record needs question_id, question "
            f"(or prompt) and trajectories"
        )
    qid = rec["question_id"]
    if isinstance(qid, bool) or not isinstance(qid, (str, int)) or qid == "":
        raise DataError(f"{where}: 'question_id' must be a non-empty string or an integer, got {qid!r}")
    key = "prompt" if "prompt" in rec else "question"
    if not isinstance(rec[key], str):
        raise DataError(f"{where}: '{key}' must be a string, got {type(rec[key]).__name__}")
    trajs = rec["trajectories"]
    if not isinstance(trajs, list) or not trajs:
        raise DataError(f"{where}: 'trajectories' must be a non-empty list, got {trajs!r:.80}")
    for i, t in enumerate(trajs):
        at = f"{where}: trajectories[{i}]"
        if not isinstance(t, dict):
            raise DataError(f"{at}: expected an object, got {type(t).__name__}")
        missing = [k for k in TRAJECTORY_FIELDS if k not in t]
        if missing:
            raise DataError(f"{at}: missing field(s) {missing}; each trajectory needs {list(TRAJECTORY_FIELDS)}")
        if not isinstance(t["full_text"], str):
            raise DataError(f"{at}: 'full_text' must be a string, got {type(t['full_text']).__name__}")
        if not isinstance(t["correct"], bool) and t["correct"] not in (0, 1):
            raise DataError(f"{at}: 'correct' must be true or false, got {t['correct']!r}")
        if not _is_number(t["reward"]):
            raise DataError(f"{at}: 'reward' must be a finite number, got {t['reward']!r}")


def record_prompt(rec: dict, prompt_template: str = ABEL_PROMPT, prompt_format: str = "template") -> str:
    """The prompt of a rollout record: ``rec["prompt"]`` if present, else the template.

    The stored prompt is the one the rollout sent, in either prompt format. Without one the
    template is filled like ``looper.data.gsm8k.format_prompt``: ``{question}`` is replaced
    by the stripped question (other braces are left alone). A chat prompt is rendered by the
    tokenizer's chat template, which this torch-free module has not got: with
    ``prompt_format="chat"`` a record without its prompt is a ``DataError``.
    """
    if isinstance(rec.get("prompt"), str):
        return rec["prompt"]
    if prompt_format == "chat":
        raise DataError(
            f"rollout record {rec.get('question_id')!r} has no stored 'prompt'; with data.prompt_format: chat "
            "the prompt is rendered by the tokenizer at rollout time and must be in the record (rerun the rollout)"
        )
    if "{question}" not in prompt_template:
        raise ConfigError("data.prompt_template must contain the placeholder '{question}'")
    return prompt_template.replace("{question}", rec["question"].strip())


def _round_robin(n_c: int, n_w: int) -> Iterator[tuple[int, int]]:
    """Every ``(c, w)`` index pair once: block ``b`` pairs ``c = j % n_c`` with ``(j + b) % n_w``."""
    if n_c == 0 or n_w == 0:
        return
    g = math.gcd(n_c, n_w)
    lcm = n_c * n_w // g
    for block in range(g):
        for j in range(lcm):
            yield j % n_c, (j + block) % n_w


def _margin(chosen: float, rejected: float) -> float:
    return round(chosen - rejected, _MARGIN_DECIMALS)


def build_preferences(
    records: Sequence[dict],
    cfg: Optional[PrefsConfig] = None,
    prompt_template: str = ABEL_PROMPT,
) -> list[dict]:
    """Preference records ``{pair_id, question_id, kind, prompt, chosen, rejected,
    chosen_reward, rejected_reward, margin}`` for rollout records, in input order:
    per question, its correctness pairs, then its coherence pairs.

    ``pair_id`` is ``f"{question_id}-corr-{j}"`` / ``f"{question_id}-cohe-{j}"``, with ``j``
    counting the kept pairs of that kind for that question. Raises ``DataError`` for a
    malformed record or a repeated ``question_id``.
    """
    cfg = cfg or PrefsConfig()
    pairs: list[dict] = []
    seen: set[tuple[str, str, str]] = set()
    seen_ids: dict[str, int] = {}
    for r_idx, rec in enumerate(records):
        check_rollout_record(rec, f"rollout record {r_idx}")
        qid = str(rec["question_id"])
        if qid in seen_ids:
            raise DataError(
                f"rollout record {r_idx}: duplicate question_id {qid!r} (also record {seen_ids[qid]})"
            )
        seen_ids[qid] = r_idx
        prompt = record_prompt(rec, prompt_template)
        trajs = rec["trajectories"]
        texts = [t["full_text"] for t in trajs]
        rewards = [float(t["reward"]) for t in trajs]
        correct = [i for i, t in enumerate(trajs) if bool(t["correct"])]
        wrong = [i for i, t in enumerate(trajs) if not bool(t["correct"])]
        c_sorted = sorted(correct, key=lambda i: (-rewards[i], i))
        w_sorted = sorted(wrong, key=lambda i: (rewards[i], i))

        def add(kind: str, j: int, ci: int, ri: int) -> bool:
            chosen, rejected = texts[ci], texts[ri]
            key = (prompt, chosen, rejected)
            if chosen == rejected or key in seen or not chosen.strip() or not rejected.strip():
                return False
            seen.add(key)
            pairs.append(
                {
                    "pair_id": f"{qid}-{kind[:4]}-{j}",
                    "question_id": rec["question_id"],
                    "kind": kind,
                    "prompt": prompt,
                    "chosen": chosen,
                    "rejected": rejected,
                    "chosen_reward": rewards[ci],
                    "rejected_reward": rewards[ri],
                    "margin": _margin(rewards[ci], rewards[ri]),
                }
            )
            return True

        n_kept = 0
        cap = min(cfg.max_correctness_pairs, len(c_sorted) * len(w_sorted))
        for a, b in _round_robin(len(c_sorted), len(w_sorted)):
            if n_kept >= cap:
                break
            n_kept += add("correctness", n_kept, c_sorted[a], w_sorted[b])

        if not cfg.coherence or cfg.max_coherence_pairs == 0:
            continue
        candidates = [
            (-_margin(rewards[ci], rewards[ri]), a, b)
            for a, ci in enumerate(c_sorted)
            for b, ri in enumerate(c_sorted)
            if a != b and _margin(rewards[ci], rewards[ri]) >= cfg.threshold
        ]
        candidates.sort()
        n_kept = 0
        for _, a, b in candidates:
            if n_kept >= cfg.max_coherence_pairs:
                break
            n_kept += add("coherence", n_kept, c_sorted[a], c_sorted[b])
    return pairs


# --------------------------------------------------------------------------- summary


def _histogram(values: Sequence[float], bins: int) -> dict:
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return {"counts": [], "edges": []}
    counts, edges = np.histogram(arr, bins=bins)
    return {"counts": [int(c) for c in counts], "edges": [float(e) for e in edges]}


def summarize(records: Sequence[dict], pairs: Sequence[dict], bins: int = 10) -> dict:
    """Counts and histograms for a set of (valid) rollout records and their pairs.

    Keys: ``n_questions``, ``n_trajectories``, ``accuracy`` (fraction of correct
    trajectories), ``n_all_correct``, ``n_all_wrong``, ``n_mixed`` (groups), ``n_pairs``,
    ``n_correctness``, ``n_coherence``, ``n_questions_with_pairs``,
    ``max_correct_reward_gap`` (largest reward spread among the correct trajectories of one
    question; what coherence pairs need to reach the threshold), ``mean_reward_correct``,
    ``mean_reward_wrong``, and ``margin_hist`` / ``reward_hist`` (``numpy.histogram``
    counts and edges; empty when there is nothing to count).
    """
    n_all_correct = n_all_wrong = n_mixed = 0
    rewards_c: list[float] = []
    rewards_w: list[float] = []
    max_gap = 0.0
    for rec in records:
        trajs = rec["trajectories"]
        flags = [bool(t["correct"]) for t in trajs]
        rc = [float(t["reward"]) for t, f in zip(trajs, flags) if f]
        rewards_c += rc
        rewards_w += [float(t["reward"]) for t, f in zip(trajs, flags) if not f]
        if all(flags):
            n_all_correct += 1
        elif not any(flags):
            n_all_wrong += 1
        else:
            n_mixed += 1
        if len(rc) >= 2:
            max_gap = max(max_gap, _margin(max(rc), min(rc)))
    n_traj = len(rewards_c) + len(rewards_w)
    kinds = [p["kind"] for p in pairs]
    return {
        "n_questions": len(records),
        "n_trajectories": n_traj,
        "accuracy": len(rewards_c) / n_traj if n_traj else 0.0,
        "n_all_correct": n_all_correct,
        "n_all_wrong": n_all_wrong,
        "n_mixed": n_mixed,
        "n_pairs": len(pairs),
        "n_correctness": kinds.count("correctness"),
        "n_coherence": kinds.count("coherence"),
        "n_questions_with_pairs": len({str(p["question_id"]) for p in pairs}),
        "max_correct_reward_gap": max_gap,
        "mean_reward_correct": float(np.mean(rewards_c)) if rewards_c else None,
        "mean_reward_wrong": float(np.mean(rewards_w)) if rewards_w else None,
        "margin_hist": _histogram([p["margin"] for p in pairs], bins),
        "reward_hist": _histogram(rewards_c + rewards_w, bins),
    }


def _format_hist(title: str, hist: dict, width: int = 40) -> list[str]:
    lines = [title]
    counts, edges = hist["counts"], hist["edges"]
    if not counts:
        return lines + ["  (none)"]
    top = max(counts) or 1
    for i, c in enumerate(counts):
        bar = "#" * (round(width * c / top) if c else 0)
        lines.append(f"  [{edges[i]:+9.4f}, {edges[i + 1]:+9.4f}{']' if i == len(counts) - 1 else ')'} {c:6d} {bar}")
    return lines


def format_summary(summary: dict) -> str:
    """A human-readable, multi-line rendering of :func:`summarize`'s dict."""
    s = summary

    def mean(x: Optional[float]) -> str:
        return "-" if x is None else f"{x:.4f}"

    lines = [
        f"questions: {s['n_questions']}  trajectories: {s['n_trajectories']}  "
        f"accuracy: {s['accuracy']:.3f}",
        f"groups: {s['n_all_correct']} all-correct, {s['n_all_wrong']} all-wrong, {s['n_mixed']} mixed",
        f"pairs: {s['n_pairs']} ({s['n_correctness']} correctness, {s['n_coherence']} coherence) "
        f"from {s['n_questions_with_pairs']} questions",
        f"mean reward: correct {mean(s['mean_reward_correct'])}, wrong {mean(s['mean_reward_wrong'])}; "
        f"largest reward gap among correct: {s['max_correct_reward_gap']:.4f}",
    ]
    lines += _format_hist("pair margins:", s["margin_hist"])
    lines += _format_hist("trajectory rewards:", s["reward_hist"])
    return "\n".join(lines)
