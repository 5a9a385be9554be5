from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from looper.losses import sft as sft_mod
from looper.losses.sft import masked_cross_entropy, row_token_logps, shifted_token_logps


def naive_loss_sum(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100):
    """One token at a time, straight from the definition (fp64)."""
    total = logits.new_zeros((), dtype=torch.float64)
    count = 0
    B, T, _ = logits.shape
    for b in range(B):
        for t in range(T - 1):
            y = int(labels[b, t + 1])
            if y == ignore_index:
                continue
            total = total - torch.log_softmax(logits[b, t].double(), dim=-1)[y]
            count += 1
    return total, count


def test_uniform_logits_give_log_vocab_per_token():
    V, T = 7, 5
    logits = torch.zeros(2, T, V)
    labels = torch.randint(0, V, (2, T))
    loss_sum, n = masked_cross_entropy(logits, labels)
    # labels[:, 0] is never a target: 2 rows x (T - 1) targets, each costing log V.
    assert n.dtype == torch.int64 and int(n) == 2 * (T - 1)
    assert loss_sum.dtype == torch.float32 and loss_sum.dim() == 0
    assert loss_sum.item() == pytest.approx(2 * (T - 1) * math.log(V), rel=1e-6)


def test_hand_worked_two_token_example():
    # V = 3, T = 3, labels = [-100, 1, 2].
    # position 0 logits [0, ln 2, 0] -> probs [1/4, 1/2, 1/4]; target 1 -> -log(1/2) = ln 2
    # position 1 logits [ln 3, 0, 0] -> probs [3/5, 1/5, 1/5]; target 2 -> -log(1/5) = ln 5
    # position 2 has no next label, so its logits (random) are irrelevant.
    # loss_sum = ln 2 + ln 5 = ln 10, num_tokens = 2.
    logits = torch.tensor(
        [[[0.0, math.log(2.0), 0.0], [math.log(3.0), 0.0, 0.0], [5.0, -3.0, 11.0]]]
    )
    labels = torch.tensor([[-100, 1, 2]])
    loss_sum, n = masked_cross_entropy(logits, labels)
    assert int(n) == 2
    assert loss_sum.item() == pytest.approx(math.log(10.0), rel=1e-6)


def test_first_label_is_never_a_target():
    logits = torch.randn(1, 4, 6)
    a = torch.tensor([[-100, 2, 3, 4]])
    b = torch.tensor([[5, 2, 3, 4]])
    la, na = masked_cross_entropy(logits, a)
    lb, nb = masked_cross_entropy(logits, b)
    assert int(na) == int(nb) == 3
    assert la.item() == lb.item()


@pytest.mark.parametrize("ignore_index", [-100, -1, 0])
def test_ignore_index_respected(ignore_index):
    torch.manual_seed(0)
    B, T, V = 3, 9, 11
    logits = torch.randn(B, T, V)
    labels = torch.randint(1, V, (B, T))
    mask = torch.rand(B, T) < 0.4
    labels[mask] = ignore_index
    loss_sum, n = masked_cross_entropy(logits, labels, ignore_index=ignore_index)
    ref, count = naive_loss_sum(logits, labels, ignore_index)
    assert int(n) == count == int((labels[:, 1:] != ignore_index).sum())
    assert loss_sum.item() == pytest.approx(ref.item(), rel=1e-5)
    # Changing the logits at positions whose next label is ignored changes nothing.
    poked = logits.clone()
    poked[:, :-1][labels[:, 1:] == ignore_index] += 100.0 * torch.randn(V)
    assert masked_cross_entropy(poked, labels, ignore_index)[0].item() == pytest.approx(loss_sum.item(), rel=1e-6)
    # And it matches torch's own cross-entropy with the same ignore_index.
    ce = F.cross_entropy(
        logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=ignore_index, reduction="sum"
    )
    assert loss_sum.item() == pytest.approx(ce.item(), rel=1e-5)


def test_all_masked_gives_zero_and_finite_gradient():
    logits = torch.randn(2, 5, 8, requires_grad=True)
    labels = torch.full((2, 5), -100)
    labels[:, 0] = 3  # position 0 is never a target, so this is still "all masked"
    loss_sum, n = masked_cross_entropy(logits, labels)
    assert int(n) == 0
    assert loss_sum.item() == 0.0
    assert loss_sum.requires_grad
    loss_sum.backward()
    assert logits.grad is not None
    assert torch.isfinite(logits.grad).all()
    assert torch.count_nonzero(logits.grad) == 0


def test_single_position_sequence():
    logits = torch.randn(2, 1, 4, requires_grad=True)
    loss_sum, n = masked_cross_entropy(logits, torch.tensor([[1], [2]]))
    assert int(n) == 0 and loss_sum.item() == 0.0


def test_parity_with_transformers_llama_loss():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    model = LlamaForCausalLM(cfg).eval()
    input_ids = torch.randint(0, 64, (3, 12))
    with torch.no_grad():
        # Nothing masked: labels == input_ids.
        out = model(input_ids, labels=input_ids)
        loss_sum, n = masked_cross_entropy(out.logits, input_ids)
        assert int(n) == 3 * 11
        assert (loss_sum / n).item() == pytest.approx(out.loss.item(), rel=1e-5)

        # Prompt positions masked: HF's mean over non-ignored tokens still matches.
        labels = input_ids.clone()
        labels[0, :5] = -100
        labels[2, :8] = -100
        out = model(input_ids, labels=labels)
        loss_sum, n = masked_cross_entropy(out.logits, labels)
        assert int(n) == 3 * 11 - 4 - 7
        assert (loss_sum / n).item() == pytest.approx(out.loss.item(), rel=1e-5)


def test_bf16_logits_computed_in_fp32():
    torch.manual_seed(1)
    B, T, V = 2, 16, 50
    logits32 = (torch.randn(B, T, V) * 4).bfloat16().float()  # values representable in bf16
    labels = torch.randint(0, V, (B, T))
    labels[0, :6] = -100
    ref_sum, ref_n = masked_cross_entropy(logits32, labels)

    logits16 = logits32.bfloat16().requires_grad_(True)
    loss_sum, n = masked_cross_entropy(logits16, labels)
    assert loss_sum.dtype == torch.float32
    assert int(n) == int(ref_n)
    # Same inputs, fp32 arithmetic: agreement to fp32 precision, not bf16's ~1e-2.
    assert loss_sum.item() == pytest.approx(ref_sum.item(), rel=1e-6)
    loss_sum.backward()
    assert logits16.grad.dtype == torch.bfloat16

    # A bf16-arithmetic computation would be visibly worse: sanity check that the
    # tolerance above actually discriminates.
    bf16_naive = F.cross_entropy(
        logits16.detach()[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), reduction="sum"
    )
    assert bf16_naive.dtype == torch.bfloat16
    assert abs(bf16_naive.float().item() - ref_sum.item()) > 1e-6 * abs(ref_sum.item())


def test_gradient_matches_naive_per_token_loop():
    torch.manual_seed(2)
    B, T, V = 3, 7, 13
    base = torch.randn(B, T, V)
    labels = torch.randint(0, V, (B, T))
    labels[0, :3] = -100
    labels[1, -2:] = -100
    labels[2, 4] = -100

    x = base.clone().requires_grad_(True)
    loss_sum, _ = masked_cross_entropy(x, labels)
    loss_sum.backward()

    y = base.clone().double().requires_grad_(True)
    ref, _ = naive_loss_sum(y, labels)
    ref.backward()

    assert loss_sum.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(x.grad.double(), y.grad, rtol=1e-5, atol=1e-6)


def test_gradcheck_float64():
    torch.manual_seed(3)
    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 6, (2, 5))
    labels[1, :2] = -100
    assert masked_cross_entropy(x, labels)[0].dtype == torch.float64  # fp64 is never downcast
    assert torch.autograd.gradcheck(lambda t: masked_cross_entropy(t, labels)[0], (x,))


def test_chunked_path_matches_unchunked(monkeypatch):
    torch.manual_seed(4)
    B, T, V = 3, 10, 17
    logits = torch.randn(B, T, V)
    labels = torch.randint(0, V, (B, T))
    labels[:, :3] = -100
    x1 = logits.clone().requires_grad_(True)
    l1, _ = masked_cross_entropy(x1, labels)
    l1.backward()
    # Force chunks of 2 rows (34 elements / 17 columns), including a ragged last chunk.
    monkeypatch.setattr(sft_mod, "_CHUNK_ELEMENTS", 2 * V)
    x2 = logits.clone().requires_grad_(True)
    l2, _ = masked_cross_entropy(x2, labels)
    l2.backward()
    assert l2.item() == pytest.approx(l1.item(), rel=1e-6)
    torch.testing.assert_close(x2.grad, x1.grad)


def test_shifted_token_logps_order_and_rows():
    logits = torch.zeros(2, 4, 5)
    labels = torch.tensor([[-100, 1, -100, 2], [-100, -100, 3, 4]])
    token_logps, rows = shifted_token_logps(logits, labels)
    assert rows.tolist() == [0, 0, 1, 1]
    torch.testing.assert_close(token_logps, torch.full((4,), -math.log(5.0)))


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match=r"\[B, T, V\]"):
        masked_cross_entropy(torch.randn(4, 5), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="disagree"):
        masked_cross_entropy(torch.randn(2, 5, 3), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        masked_cross_entropy(torch.randn(2, 5, 3), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        masked_cross_entropy(torch.randn(1, 3, 4), torch.tensor([[0, 4, 1]]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        masked_cross_entropy(torch.randn(1, 3, 4), torch.tensor([[0, -1, 1]]))


@pytest.mark.parametrize("limit", [None, "_CHUNK_ELEMENTS", "_CPU_CHUNK_ELEMENTS"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_token_logps_with_shared_rows_matches_log_softmax(monkeypatch, limit, dtype):
    """Rows that predict several tokens (a packed prompt's last position) are normalized
    once; values and gradients equal a naive log_softmax over gathered rows, chunked or not
    (by the chunk limit of every device, or by the CPU's own), and a row no token uses gets
    a zero gradient."""
    from looper.losses import sft as sft_mod

    V = 11
    if limit:
        monkeypatch.setattr(sft_mod, limit, 2 * V)  # chunks of 2 rows: a ragged last chunk of 5 rows
        assert sft_mod._chunk_rows(V, torch.device("cpu")) == 2
    g = torch.Generator().manual_seed(3)
    rows = (torch.randn(5, V, generator=g) * 3).to(dtype)
    index = torch.tensor([0, 1, 1, 3, 4, 4, 4])  # row 2 predicts nothing
    targets = torch.tensor([2, 5, 7, 0, 10, 1, 10])
    weights = torch.randn(7, generator=g)

    x = rows.clone().requires_grad_(True)
    out = row_token_logps(x, targets, index)
    assert out.dtype == torch.float32
    (out * weights).sum().backward()

    ref_x = rows.clone().requires_grad_(True)
    ref = torch.log_softmax(ref_x.float()[index], dim=-1).gather(-1, targets[:, None]).squeeze(-1)
    (ref * weights).sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(x.grad, ref_x.grad, **tol)
    assert x.grad.dtype == dtype and torch.count_nonzero(x.grad[2]) == 0


def test_row_token_logps_checks_shapes():
    with pytest.raises(ValueError, match="one target per row"):
        row_token_logps(torch.randn(3, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="same shape"):
        row_token_logps(torch.randn(3, 4), torch.tensor([0, 1]), torch.tensor([0]))
