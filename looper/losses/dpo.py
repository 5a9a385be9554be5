"""Direct Preference Optimization losses and metrics.

Pure tensor functions: no model, no config and no ``torch.distributed``.

The loss is the sigmoid loss of Rafailov et al. (2023), "Direct Preference
Optimization: Your Language Model is Secretly a Reward Model", eq. 7:

    L_DPO = -E[ log sigma( beta * log(pi(y_w|x) / pi_ref(y_w|x))
                         - beta * log(pi(y_l|x) / pi_ref(y_l|x)) ) ]

With ``label_smoothing = eps > 0`` the preference label is treated as flipped
with probability ``eps`` (the conservative "cDPO" form):

    L = -(1 - eps) * log sigma(h) - eps * log sigma(-h)

where ``h`` is the argument of the sigmoid above.

Two optional terms, each zero by default:

- DPO-Positive (Pal et al. 2024, "Smaug: Fixing Failure Modes of Preference
  Optimisation with DPO-Positive", arXiv 2402.13228, eq. 3): a penalty inside the
  sigmoid whenever the policy's chosen log-prob falls below the reference's,
  ``h -> h - beta * lambda * max(0, log pi_ref(y_w) - log pi(y_w))``; when chosen
  and rejected differ in a few tokens, plain DPO can lower both.
- The NLL term of Iterative Reasoning Preference Optimization (Pang et al. 2024,
  arXiv 2404.19733, eq. 1): ``alpha * (-log pi(y_w)) / |y_w|``, added per pair.

``dpo_objective`` combines them from plain numbers (``beta``, ``label_smoothing``,
``dpop_lambda``, ``nll_weight``), so a training loop selects a loss by settings, not
by branching on names.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from looper.losses.sft import row_token_logps, shifted_token_logps

__all__ = [
    "sequence_logps",
    "packed_sequence_logps",
    "num_completion_tokens",
    "dpo_loss",
    "dpop_penalty",
    "chosen_nll",
    "dpo_objective",
    "preference_metrics",
]


def sequence_logps(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Sum of the completion-token log-probabilities of each row.

    ``logits[:, t]`` is scored against ``labels[:, t + 1]`` (``labels`` aligned
    with ``input_ids``, as in Hugging Face). Positions labelled
    ``ignore_index`` (prompt, padding on either side) add nothing, so padding
    never changes the result. The arithmetic runs in fp32 (fp64 input stays
    fp64) over the scored positions only, in chunks, so no ``[B, T, V]`` fp32
    copy of the logits is built.

    Args:
        logits: ``[B, T, V]`` model outputs, any floating dtype.
        labels: ``[B, T]`` integer labels.
        ignore_index: label value to skip.

    Returns:
        ``[B]`` tensor of summed log-probs (0 for a row with no scored token),
        differentiable with respect to ``logits``.
    """
    token_logps, rows = shifted_token_logps(logits, labels, ignore_index)
    out = torch.zeros(labels.shape[0], dtype=token_logps.dtype, device=token_logps.device)
    return out.index_add(0, rows, token_logps)


def packed_sequence_logps(logits: Tensor, source: Tensor, targets: Tensor, segments: Tensor, n: int) -> Tensor:
    """Summed log-probs of ``n`` segments scored inside packed rows.

    For rows that hold several completions after one prompt (``prompt | chosen |
    rejected``), the position that predicts a token is not always the one before it: the
    first rejected token is predicted from the last prompt position. So the scored
    positions are given explicitly: token ``i`` is ``targets[i]``, predicted by the logits
    at flat position ``source[i]`` of ``logits.reshape(-1, V)``, and counted in segment
    ``segments[i]``. ``logits`` may be ``[B, T, V]`` (only the rows that ``source`` names
    are normalized, each once) or ``[M, V]``, rows already chosen as ``scored_logits``
    returns them (``source`` indexes those rows, every row is normalized). Arithmetic in
    fp32 (fp64 stays fp64), as in :func:`sequence_logps`.

    Returns ``[n]``: 0 for a segment with no token; differentiable in ``logits``.
    """
    flat, index = logits.reshape(-1, logits.shape[-1]), source
    if logits.dim() == 3:  # full logits: rows no token needs are never normalized
        used, index = torch.unique(source, return_inverse=True)
        flat = flat.index_select(0, used)
    token_logps = row_token_logps(flat, targets, index)
    out = torch.zeros(n, dtype=token_logps.dtype, device=token_logps.device)
    return out.index_add(0, segments, token_logps)


def num_completion_tokens(labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Number of scored tokens per row (``[B]`` int64), matching :func:`sequence_logps`."""
    if labels.dim() != 2:
        raise ValueError(f"labels must have shape [B, T], got {tuple(labels.shape)}")
    return (labels[:, 1:] != ignore_index).sum(dim=-1)


def _as_float(name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    # Half-precision inputs are upcast; fp32 and fp64 are kept as they are.
    return t.to(torch.promote_types(t.dtype, torch.float32))


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    dpop_lambda: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair sigmoid DPO loss (Rafailov et al. 2023, eq. 7), optionally conservative,
    optionally DPO-Positive.

    With ``h = beta * ((pc - rc) - (pr - rr) - dpop_lambda * max(0, rc - pc))``
    (policy/reference log-prob of the chosen and rejected completions), the loss of
    each pair is

        losses = -(1 - label_smoothing) * logsigmoid(h) - label_smoothing * logsigmoid(-h)

    ``label_smoothing = 0`` is plain DPO; ``0 < label_smoothing < 0.5`` is cDPO,
    which assumes each preference label is wrong with that probability.
    ``dpop_lambda > 0`` is DPO-Positive (arXiv 2402.13228): the penalty is zero while
    the policy keeps the chosen completion at least as likely as the reference does.

    Args:
        policy_chosen_logps, policy_rejected_logps: ``[B]`` summed log-probs
            under the trained policy (these carry the gradient).
        reference_chosen_logps, reference_rejected_logps: ``[B]`` summed
            log-probs under the frozen reference.
        beta: inverse temperature of the implicit reward, ``> 0``.
        label_smoothing: ``0 <= label_smoothing < 0.5``.
        dpop_lambda: weight of the DPO-Positive penalty, ``>= 0``.

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each ``[B]`` and fp32
        (or fp64 for fp64 input). ``losses`` is per pair (the caller reduces);
        the rewards are ``beta * (policy - reference)`` and are detached.

    Raises:
        ValueError: on shape mismatch, ``beta <= 0`` or ``label_smoothing``
            outside ``[0, 0.5)``.
    """
    pc = _as_float("policy_chosen_logps", policy_chosen_logps)
    pr = _as_float("policy_rejected_logps", policy_rejected_logps)
    rc = _as_float("reference_chosen_logps", reference_chosen_logps)
    rr = _as_float("reference_rejected_logps", reference_rejected_logps)
    shapes = {
        "policy_chosen_logps": tuple(pc.shape),
        "policy_rejected_logps": tuple(pr.shape),
        "reference_chosen_logps": tuple(rc.shape),
        "reference_rejected_logps": tuple(rr.shape),
    }
    if len(set(shapes.values())) != 1:
        raise ValueError(f"dpo_loss needs four log-prob tensors of the same shape, got {shapes}")
    if pc.dim() != 1:
        raise ValueError(f"dpo_loss expects [B] log-prob tensors (one per pair), got shape {tuple(pc.shape)}")
    beta = float(beta)
    if not math.isfinite(beta) or beta <= 0.0:
        raise ValueError(f"beta must be a finite number > 0, got {beta}")
    label_smoothing = float(label_smoothing)
    if not (0.0 <= label_smoothing < 0.5):
        raise ValueError(f"label_smoothing must satisfy 0 <= label_smoothing < 0.5, got {label_smoothing}")
    dpop_lambda = float(dpop_lambda)
    if not math.isfinite(dpop_lambda) or dpop_lambda < 0.0:
        raise ValueError(f"dpop_lambda must be a finite number >= 0, got {dpop_lambda}")

    chosen_logratios = pc - rc
    rejected_logratios = pr - rr
    h = beta * (chosen_logratios - rejected_logratios)
    if dpop_lambda > 0.0:
        h = h - beta * dpop_lambda * dpop_penalty(pc, rc)
    losses = -F.logsigmoid(h) * (1.0 - label_smoothing)
    if label_smoothing > 0.0:
        losses = losses - F.logsigmoid(-h) * label_smoothing
    chosen_rewards = (beta * chosen_logratios).detach()
    rejected_rewards = (beta * rejected_logratios).detach()
    return losses, chosen_rewards, rejected_rewards


def dpop_penalty(policy_chosen_logps: Tensor, reference_chosen_logps: Tensor) -> Tensor:
    """``max(0, log pi_ref(y_w) - log pi(y_w))`` per pair (Pal et al. 2024, arXiv 2402.13228,
    eq. 3): how far the policy has pushed the chosen completion below the reference."""
    return (reference_chosen_logps - policy_chosen_logps).clamp(min=0.0)


def chosen_nll(chosen_logps: Tensor, chosen_num_tokens: Tensor) -> Tensor:
    """Length-normalized negative log-likelihood of the chosen completions.

    ``-chosen_logps / chosen_num_tokens`` per row (``[B]``); a row with no
    tokens gives 0. The loop adds ``nll_weight * chosen_nll(...)`` to the DPO
    loss to keep the likelihood of the preferred answers from drifting down.
    """
    if chosen_logps.shape != chosen_num_tokens.shape:
        raise ValueError(
            f"chosen_logps {tuple(chosen_logps.shape)} and chosen_num_tokens "
            f"{tuple(chosen_num_tokens.shape)} must have the same shape"
        )
    denom = chosen_num_tokens.to(chosen_logps.dtype).clamp(min=1.0)
    return -chosen_logps / denom


def dpo_objective(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    chosen_num_tokens: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    dpop_lambda: float = 0.0,
    nll_weight: float = 0.0,
) -> dict[str, Tensor]:
    """The per-pair training objective: ``dpo_loss`` (sigmoid / cDPO / DPO-Positive) plus
    ``nll_weight * chosen_nll`` (RPO).

    Returns ``[B]`` tensors: ``total`` (differentiable; the loop averages it), ``dpo`` and
    ``nll`` (the two parts), ``chosen_rewards`` and ``rejected_rewards`` (detached). With
    ``dpop_lambda = nll_weight = 0`` the total is exactly ``dpo_loss``.
    """
    if nll_weight < 0:
        raise ValueError(f"nll_weight must be >= 0, got {nll_weight}")
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
        beta=beta, label_smoothing=label_smoothing, dpop_lambda=dpop_lambda,
    )
    nll = chosen_nll(policy_chosen_logps, chosen_num_tokens)
    total = losses + nll_weight * nll if nll_weight else losses
    return {"total": total, "dpo": losses, "nll": nll, "chosen_rewards": chosen_rewards, "rejected_rewards": rejected_rewards}


def preference_metrics(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
) -> dict[str, Tensor]:
    """Per-pair DPO metrics under their usual names (detached ``[B]`` tensors; the loop reduces them).

    ``rewards/accuracies`` is 1.0 where the chosen reward is strictly larger
    than the rejected one, and ``rewards/margins`` is chosen minus rejected.
    """
    cr = chosen_rewards.detach().float()
    rr = rejected_rewards.detach().float()
    return {
        "rewards/chosen": cr,
        "rewards/rejected": rr,
        "rewards/accuracies": (cr > rr).float(),
        "rewards/margins": cr - rr,
        "logps/chosen": policy_chosen_logps.detach().float(),
        "logps/rejected": policy_rejected_logps.detach().float(),
    }
