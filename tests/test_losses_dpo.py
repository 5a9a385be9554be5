from __future__ import annotations

import math

import pytest
import torch

from looper.losses.dpo import (
    chosen_nll,
    dpo_loss,
    dpo_objective,
    dpop_penalty,
    num_completion_tokens,
    preference_metrics,
    sequence_logps,
)
from looper.losses.sft import masked_cross_entropy


def t(*xs, dtype=torch.float32, grad=False):
    return torch.tensor(list(xs), dtype=dtype, requires_grad=grad)


# -log(sigmoid(1)) = log(1 + e^-1)
NLS_1 = math.log1p(math.exp(-1.0))  # 0.31326168751822286
# -log(sigmoid(-1)) = log(1 + e) = 1 + log(1 + e^-1)
NLS_M1 = math.log1p(math.e)  # 1.3132616875182228


# ---------------------------------------------------------------------------
# dpo_loss
# ---------------------------------------------------------------------------


def test_hand_derived_loss_and_rewards():
    # policy chosen -1, rejected -3; reference -2, -2; beta 0.5
    # chosen log-ratio = -1 - (-2) = 1, rejected log-ratio = -3 - (-2) = -1
    # h = 0.5 * (1 - (-1)) = 1.0  ->  loss = -logsigmoid(1) = 0.3132616875...
    # rewards: chosen = 0.5 * 1 = 0.5, rejected = 0.5 * -1 = -0.5
    losses, cr, rr = dpo_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.0), beta=0.5)
    assert NLS_1 == pytest.approx(0.31326168751822286)
    assert losses.item() == pytest.approx(NLS_1, rel=1e-6)
    assert cr.item() == pytest.approx(0.5)
    assert rr.item() == pytest.approx(-0.5)


def test_hand_derived_label_smoothing():
    # Same pair, h = 1, label_smoothing 0.1:
    # loss = 0.9 * -logsigmoid(1) + 0.1 * -logsigmoid(-1)
    #      = 0.9 * 0.3132617 + 0.1 * 1.3132617 = 0.2819355 + 0.1313262 = 0.4132617
    # (equivalently softplus(-h) + ls * h = 0.3132617 + 0.1)
    losses, cr, rr = dpo_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.0), beta=0.5, label_smoothing=0.1)
    assert losses.item() == pytest.approx(0.9 * NLS_1 + 0.1 * NLS_M1, rel=1e-6)
    assert losses.item() == pytest.approx(0.41326168751822286, rel=1e-6)
    # Rewards do not depend on label smoothing.
    assert cr.item() == pytest.approx(0.5) and rr.item() == pytest.approx(-0.5)


def test_beta_scales_the_margin():
    # beta 0.1: h = 0.1 * ((0 - (-1)) - (-4 - (-2))) = 0.1 * (1 + 2) = 0.3
    # loss = log(1 + e^-0.3) = 0.5543552...
    losses, cr, rr = dpo_loss(t(0.0), t(-4.0), t(-1.0), t(-2.0), beta=0.1)
    assert losses.item() == pytest.approx(math.log1p(math.exp(-0.3)), rel=1e-6)
    assert cr.item() == pytest.approx(0.1) and rr.item() == pytest.approx(-0.2)


def test_swapping_chosen_and_rejected():
    torch.manual_seed(0)
    pc, pr, rc, rr = (torch.randn(6) * 3 for _ in range(4))
    beta = 0.3
    h = beta * ((pc - rc) - (pr - rr))
    fwd, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta)
    back, _, _ = dpo_loss(pr, pc, rr, rc, beta=beta)
    torch.testing.assert_close(fwd, -torch.nn.functional.logsigmoid(h))
    torch.testing.assert_close(back, -torch.nn.functional.logsigmoid(-h))
    # The identity softplus(x) - softplus(-x) = x ties the two together.
    torch.testing.assert_close(back - fwd, h)
    # Scalar version of the hand example: swapped gives -logsigmoid(-1).
    swapped, _, _ = dpo_loss(t(-3.0), t(-1.0), t(-2.0), t(-2.0), beta=0.5)
    assert swapped.item() == pytest.approx(NLS_M1, rel=1e-6)


@pytest.mark.parametrize("ls", [0.0, 0.25])
def test_policy_equal_to_reference(ls):
    pc, pr = t(-5.0, -1.5, -20.0), t(-2.0, -7.0, -20.0)
    losses, cr, rr = dpo_loss(pc, pr, pc.clone(), pr.clone(), beta=0.7, label_smoothing=ls)
    # h = 0 -> -logsigmoid(0) = log 2 for either label
    torch.testing.assert_close(losses, torch.full((3,), math.log(2.0)))
    assert torch.count_nonzero(cr) == 0 and torch.count_nonzero(rr) == 0


def naive_dpo(pc, pr, rc, rr, beta, ls):
    h = beta * (pc - pr) - beta * (rc - rr)
    sig = 1.0 / (1.0 + torch.exp(-h))
    return -(1 - ls) * torch.log(sig) - ls * torch.log(1 - sig)


@pytest.mark.parametrize("ls", [0.0, 0.2])
def test_gradients_match_naive_reference(ls):
    torch.manual_seed(1)
    vals = [torch.randn(5, dtype=torch.float64) * 2 for _ in range(4)]
    beta = 0.4
    a = [v.clone().requires_grad_(True) for v in vals]
    b = [v.clone().requires_grad_(True) for v in vals]
    losses, _, _ = dpo_loss(*a, beta=beta, label_smoothing=ls)
    ref = naive_dpo(*b, beta=beta, ls=ls)
    torch.testing.assert_close(losses, ref)
    weights = torch.rand(5, dtype=torch.float64)
    (losses * weights).sum().backward()
    (ref * weights).sum().backward()
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad)
    # Closed form: d loss / d pc = -beta * ((1 - ls) * sigmoid(-h) - ls * sigmoid(h))
    h = beta * ((vals[0] - vals[2]) - (vals[1] - vals[3]))
    expected = -beta * ((1 - ls) * torch.sigmoid(-h) - ls * torch.sigmoid(h)) * weights
    torch.testing.assert_close(a[0].grad, expected)
    torch.testing.assert_close(a[1].grad, -expected)


def test_rewards_are_detached():
    pc, pr = t(-1.0, -2.0, grad=True), t(-3.0, -1.0, grad=True)
    losses, cr, rr = dpo_loss(pc, pr, t(-2.0, -2.0), t(-2.0, -2.0), beta=0.5)
    assert losses.requires_grad
    assert not cr.requires_grad and not rr.requires_grad
    assert cr.grad_fn is None and rr.grad_fn is None


def test_extreme_margins_are_finite():
    losses, _, _ = dpo_loss(t(0.0, -5000.0), t(-5000.0, 0.0), t(0.0, 0.0), t(0.0, 0.0), beta=1.0, label_smoothing=0.1)
    assert torch.isfinite(losses).all()
    # h = +5000: (1 - ls) * ~0 + ls * 5000; h = -5000: 0.9 * 5000 + 0.1 * ~0
    assert losses[0].item() == pytest.approx(500.0, rel=1e-5)
    assert losses[1].item() == pytest.approx(4500.0, rel=1e-5)


def test_half_precision_inputs_are_upcast():
    losses, cr, _ = dpo_loss(
        t(-1.0, dtype=torch.bfloat16), t(-3.0, dtype=torch.bfloat16), t(-2.0), t(-2.0), beta=0.5
    )
    assert losses.dtype == torch.float32 and cr.dtype == torch.float32
    assert losses.item() == pytest.approx(NLS_1, rel=1e-6)


def test_validation_errors():
    x = t(-1.0, -2.0)
    with pytest.raises(ValueError, match="same shape"):
        dpo_loss(x, x, x, t(-1.0))
    with pytest.raises(ValueError, match=r"\[B\]"):
        dpo_loss(*(torch.zeros(2, 2) for _ in range(4)))
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(x, x, x, x, beta=0.0)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(x, x, x, x, beta=-0.1)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(x, x, x, x, beta=float("nan"))
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(x, x, x, x, label_smoothing=0.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(x, x, x, x, label_smoothing=-0.01)
    with pytest.raises(ValueError, match="floating"):
        dpo_loss(torch.tensor([1, 2]), x, x, x)


# ---------------------------------------------------------------------------
# DPO-Positive (Pal et al. 2024) and the combined objective (RPO's NLL term)
# ---------------------------------------------------------------------------


def test_dpop_hand_derived_value():
    # chosen log-ratio -2, rejected -3: h = beta * (1 - lambda * max(0, rc - pc)) = 1 * (1 - 2 * 2) = -3
    pc, pr, rc, rr = t(-3.0, grad=True), t(-5.0), t(-1.0), t(-2.0)
    losses, cr, rr_ = dpo_loss(pc, pr, rc, rr, beta=1.0, dpop_lambda=2.0)
    assert losses.item() == pytest.approx(math.log1p(math.exp(3.0)), abs=1e-6)  # -log sigmoid(-3)
    # the rewards stay the plain beta * log-ratios: the penalty is part of the loss only
    assert cr.item() == pytest.approx(-2.0) and rr_.item() == pytest.approx(-3.0)
    # d/dpc of -log sigmoid(h), h = (pc - rc) - (pr - rr) - 2 * (rc - pc): dh/dpc = 3
    losses.backward()
    assert pc.grad.item() == pytest.approx(-(1 - 1 / (1 + math.exp(3.0))) * 3.0, abs=1e-6)


def test_dpop_penalty_is_zero_when_the_policy_keeps_the_chosen_likelihood():
    pc, pr, rc, rr = t(-1.0, -2.0), t(-4.0, -3.0), t(-2.0, -2.0), t(-3.0, -3.0)  # pc >= rc in both rows
    torch.testing.assert_close(dpop_penalty(pc, rc), t(0.0, 0.0))
    plain, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.3)
    positive, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.3, dpop_lambda=50.0)
    assert torch.equal(plain, positive)
    torch.testing.assert_close(dpop_penalty(t(-5.0), t(-2.0)), t(3.0))


@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_dpop_gradients_match_a_naive_formula(ls):
    g = torch.Generator().manual_seed(3)
    pc, pr, rc, rr = (torch.randn(16, generator=g, dtype=torch.float64) * 3 for _ in range(4))
    pc.requires_grad_(), pr.requires_grad_()
    beta, lam = 0.2, 5.0
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=ls, dpop_lambda=lam)
    pc2, pr2 = pc.detach().clone().requires_grad_(), pr.detach().clone().requires_grad_()
    h = beta * ((pc2 - rc) - (pr2 - rr) - lam * torch.relu(rc - pc2))
    naive = -(1 - ls) * torch.log(torch.sigmoid(h)) - ls * torch.log(torch.sigmoid(-h))
    torch.testing.assert_close(losses, naive)
    losses.sum().backward()
    naive.sum().backward()
    torch.testing.assert_close(pc.grad, pc2.grad)
    torch.testing.assert_close(pr.grad, pr2.grad)
    assert (rc > pc).any() and (rc < pc).any()  # both sides of the hinge were exercised


def test_objective_adds_the_length_normalized_nll_and_nll_weight_zero_is_the_plain_loss():
    pc, pr, rc, rr = t(-6.0, -2.0), t(-7.0, -1.0), t(-5.0, -2.5), t(-6.0, -1.5)
    n = torch.tensor([3, 4])
    plain, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1)
    out0 = dpo_objective(pc, pr, rc, rr, n, beta=0.1)
    assert torch.equal(out0["total"], plain) and torch.equal(out0["dpo"], plain)
    out = dpo_objective(pc, pr, rc, rr, n, beta=0.1, nll_weight=0.5)
    torch.testing.assert_close(out["nll"], t(2.0, 0.5))  # 6/3, 2/4
    torch.testing.assert_close(out["total"], plain + 0.5 * t(2.0, 0.5))
    with pytest.raises(ValueError, match="nll_weight"):
        dpo_objective(pc, pr, rc, rr, n, nll_weight=-1.0)
    with pytest.raises(ValueError, match="dpop_lambda"):
        dpo_loss(pc, pr, rc, rr, dpop_lambda=-1.0)


# ---------------------------------------------------------------------------
# chosen_nll and preference_metrics
# ---------------------------------------------------------------------------


def test_chosen_nll_is_length_normalized():
    logps = t(-6.0, -1.0, 0.0, grad=True)
    n = torch.tensor([3, 4, 0])
    nll = chosen_nll(logps, n)
    # 6/3 = 2, 1/4 = 0.25, and an empty completion gives 0 (not NaN)
    torch.testing.assert_close(nll, t(2.0, 0.25, 0.0))
    nll.sum().backward()
    torch.testing.assert_close(logps.grad, t(-1 / 3, -0.25, -1.0))
    with pytest.raises(ValueError):
        chosen_nll(logps, torch.tensor([1, 2]))


def test_preference_metrics():
    losses, cr, rr = dpo_loss(t(-1.0, -4.0, -2.0), t(-3.0, -1.0, -2.0), t(-2.0, -2.0, -2.0), t(-2.0, -2.0, -2.0), beta=0.5)
    pc = t(-1.0, -4.0, -2.0, grad=True)
    m = preference_metrics(cr, rr, pc, t(-3.0, -1.0, -2.0))
    assert set(m) == {
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
    }
    torch.testing.assert_close(m["rewards/chosen"], t(0.5, -1.0, 0.0))
    torch.testing.assert_close(m["rewards/rejected"], t(-0.5, 0.5, 0.0))
    # A tie is not counted as correct.
    torch.testing.assert_close(m["rewards/accuracies"], t(1.0, 0.0, 0.0))
    torch.testing.assert_close(m["rewards/margins"], t(1.0, -1.5, 0.0))
    torch.testing.assert_close(m["logps/chosen"], t(-1.0, -4.0, -2.0))
    assert all(v.shape == (3,) and not v.requires_grad for v in m.values())


# ---------------------------------------------------------------------------
# sequence_logps
# ---------------------------------------------------------------------------


def naive_sequence_logps(logits, labels, ignore_index=-100):
    out = []
    for b in range(logits.shape[0]):
        s = torch.zeros((), dtype=torch.float64)
        for tt in range(logits.shape[1] - 1):
            y = int(labels[b, tt + 1])
            if y != ignore_index:
                s = s + torch.log_softmax(logits[b, tt].double(), dim=-1)[y]
        out.append(s)
    return torch.stack(out)


def padded_batch(seed=0, V=19):
    """Rows with left padding, right padding, both, none, and one row with nothing scored."""
    g = torch.Generator().manual_seed(seed)
    T = 12
    logits = torch.randn(5, T, V, generator=g) * 3
    labels = torch.randint(0, V, (5, T), generator=g)
    labels[0, :4] = -100  # left padding + prompt
    labels[1, 3:] = -100
    labels[1, :1] = -100  # right padding
    labels[2, :2] = -100
    labels[2, -3:] = -100  # both sides
    labels[4, :] = -100  # nothing scored
    labels[:, 0] = -100  # the first token is always prompt (and never a target anyway)
    return logits, labels


def test_sequence_logps_matches_naive_loop():
    logits, labels = padded_batch()
    got = sequence_logps(logits, labels)
    ref = naive_sequence_logps(logits, labels)
    assert got.shape == (5,) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    assert got[4].item() == 0.0
    torch.testing.assert_close(num_completion_tokens(labels), torch.tensor([8, 2, 7, 11, 0]))


def test_sequence_logps_hand_example():
    # Uniform logits over V = 4: every scored token costs log(1/4).
    # row 0 scores 3 tokens -> -3 log 4; row 1 scores 1 token -> -log 4.
    logits = torch.zeros(2, 4, 4)
    labels = torch.tensor([[-100, 0, 1, 2], [-100, -100, 3, -100]])
    torch.testing.assert_close(sequence_logps(logits, labels), t(-3 * math.log(4), -math.log(4)))


def test_sequence_logps_padding_invariance():
    logits, labels = padded_batch(seed=1)
    base = sequence_logps(logits, labels)
    g = torch.Generator().manual_seed(7)
    B, T, V = logits.shape
    # Append 5 right-padded positions with random logits and random-looking ignored labels.
    right_logits = torch.cat([logits, torch.randn(B, 5, V, generator=g) * 10], dim=1)
    right_labels = torch.cat([labels, torch.full((B, 5), -100)], dim=1)
    torch.testing.assert_close(sequence_logps(right_logits, right_labels), base)
    # Prepend 3 left-padded positions, likewise.
    left_logits = torch.cat([torch.randn(B, 3, V, generator=g) * 10, logits], dim=1)
    left_labels = torch.cat([torch.full((B, 3), -100), labels], dim=1)
    torch.testing.assert_close(sequence_logps(left_logits, left_labels), base)
    # Random logits at the positions whose next label is ignored do not matter either.
    poked = logits.clone()
    poked[:, :-1][labels[:, 1:] == -100] = torch.randn(V, generator=g) * 50
    torch.testing.assert_close(sequence_logps(poked, labels), base)


def test_sequence_logps_bf16_computed_in_fp32():
    logits, labels = padded_batch(seed=2)
    logits16 = logits.bfloat16()
    ref = naive_sequence_logps(logits16.float(), labels)  # fp64 on the same bf16 values
    got = sequence_logps(logits16, labels)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-5)
    # bf16 arithmetic would be off by far more than that, so the tolerance discriminates.
    tgt = labels[:, 1:].clamp(min=0)
    bf16_tok = torch.log_softmax(logits16[:, :-1], dim=-1).gather(-1, tgt[..., None]).squeeze(-1)
    bf16_seq = (bf16_tok * (labels[:, 1:] != -100)).sum(-1)
    assert bf16_seq.dtype == torch.bfloat16
    assert (bf16_seq.double() - ref).abs().max() > 1e-3


def test_sequence_logps_gradients():
    logits, labels = padded_batch(seed=3, V=7)
    x = logits.double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: sequence_logps(z, labels), (x,))
    # And against autograd through the naive loop, with per-row upstream weights.
    a = logits.clone().requires_grad_(True)
    b = logits.clone().double().requires_grad_(True)
    w = torch.randn(5)
    (sequence_logps(a, labels) * w).sum().backward()
    (naive_sequence_logps(b, labels) * w.double()).sum().backward()
    torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-5, atol=1e-6)


def test_sequence_logps_agrees_with_sft_loss():
    logits, labels = padded_batch(seed=4)
    loss_sum, n = masked_cross_entropy(logits, labels)
    assert sequence_logps(logits, labels).sum().item() == pytest.approx(-loss_sum.item(), rel=1e-6)
    assert int(n) == int(num_completion_tokens(labels).sum())


def test_end_to_end_dpo_step_through_tiny_model():
    """Concatenated chosen/rejected forward -> sequence_logps -> dpo_loss -> gradients flow."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=4)
    )
    ids = torch.randint(0, 64, (4, 10))
    labels = ids.clone()
    labels[:, :4] = -100  # shared prompt
    labels[1, 8:] = -100  # right padding
    out = model(ids).logits
    logps = sequence_logps(out, labels)
    with torch.no_grad():
        ref = logps.detach()
    losses, cr, rr = dpo_loss(logps[:2], logps[2:], ref[:2], ref[2:], beta=0.1)
    torch.testing.assert_close(losses, torch.full((2,), math.log(2.0)))
    total = losses.mean() + 0.5 * chosen_nll(logps[:2], num_completion_tokens(labels[:2])).mean()
    total.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_packed_sequence_logps_match_a_naive_sum():
    from looper.losses.dpo import packed_sequence_logps

    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    source = torch.tensor([0, 1, 0, 6, 9])
    target = torch.tensor([3, 1, 6, 0, 2])
    segment = torch.tensor([0, 0, 2, 1, 1])
    got = packed_sequence_logps(logits, source, target, segment, 4)
    flat = logits.reshape(-1, 7)
    want = torch.zeros(4, dtype=torch.float64)
    for s, t, g in zip(source.tolist(), target.tolist(), segment.tolist()):
        want[g] += flat[s, t] - torch.logsumexp(flat[s], dim=0)
    torch.testing.assert_close(got, want)
    assert got[3] == 0  # a segment with no token
    got.sum().backward()
    assert logits.grad[0, 2].abs().sum() == 0 and logits.grad[0, 0].abs().sum() > 0  # only the scored positions
    # rows already chosen ([M, V], as the loop's scored_logits gives them): the same values
    used = torch.tensor([0, 1, 6, 9])
    rows = logits.detach().reshape(-1, 7)[used]
    torch.testing.assert_close(packed_sequence_logps(rows, torch.tensor([0, 1, 0, 2, 3]), target, segment, 4), want)
