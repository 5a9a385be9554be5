"""Tokenization for training: the prompt/completion boundary, loss masks, padding,
truncation (kept ends, counted, or rejected), preference pairs sharing one prompt, and the
length-grouped micro-batch schedule that every rank computes identically."""

from __future__ import annotations

import random

import pytest
import torch

from looper.data.gsm8k import format_completion, format_prompt
from looper.data.synthetic import generate_problems
from looper.data.tokenize import (
    IGNORE_INDEX,
    MicroBatches,
    collate,
    collate_pairs,
    encode_example,
    encode_pair,
    encode_sft_rows,
    length_grouped_batches,
)
from looper.io import DataError
from looper.models import load_tokenizer

BIG = 10_000  # a max_length that truncates nothing


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return [
        {"question_id": p["question_id"], "prompt": format_prompt(p["question"]),
         "completion": format_completion(p["answer"])}
        for p in generate_problems(50, seed=7)
    ]


def pieces(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


# --------------------------------------------------------------------------- one example


def test_encode_example_boundary_and_mask(tok, rows):
    bos, eos = tok.bos_token_id, tok.eos_token_id
    assert None not in (bos, eos) and bos != eos
    for row in rows:
        p, c = pieces(tok, row["prompt"]), pieces(tok, row["completion"])
        assert p and c
        e = encode_example(tok, row["prompt"], row["completion"], BIG, "truncate")
        assert e.input_ids == [bos] + p + c + [eos], row["question_id"]
        assert e.prompt_len == 1 + len(p) and not e.truncated
        assert len(e.labels) == len(e.input_ids)
        assert e.labels[: e.prompt_len] == [IGNORE_INDEX] * e.prompt_len
        assert e.labels[e.prompt_len :] == e.input_ids[e.prompt_len :]  # EOS included
        assert e.labels[-1] == eos
        target = [t for t in e.labels if t != IGNORE_INDEX]
        assert tok.decode(target, skip_special_tokens=True) == row["completion"]
        assert tok.decode(target[:-1]) == row["completion"]
        assert tok.decode(e.input_ids[1 : e.prompt_len]) == row["prompt"]


def test_boundary_does_not_follow_joint_tokenization(tok):
    # a seam inside a word: tokenizing the joined text merges across it ("Tom h" + "as"
    # gives " has"); looper tokenizes each side on its own, so the boundary stays put
    prompt, completion = "Question:\nTom h", "as 12 apples.\n#### 12"
    joint = pieces(tok, prompt + completion)
    assert joint != pieces(tok, prompt) + pieces(tok, completion)  # the seam does merge
    e = encode_example(tok, prompt, completion, BIG, "error")
    assert e.input_ids[e.prompt_len :] == pieces(tok, completion) + [tok.eos_token_id]
    assert e.input_ids[1 : e.prompt_len] == pieces(tok, prompt)


def test_empty_completion_is_an_error(tok):
    with pytest.raises(DataError, match="row q7: empty completion"):
        encode_sft_rows(tok, [{"question_id": "q7", "prompt": "Question: x", "completion": ""}], BIG, "truncate")


# --------------------------------------------------------------------------- collate


def test_collate_right_pads(tok, rows):
    examples, n_trunc = encode_sft_rows(tok, rows[:6], BIG, "truncate")
    assert n_trunc == 0
    lengths = [len(e.input_ids) for e in examples]
    assert len(set(lengths)) > 1  # the rows differ in length, so padding happens
    pad = tok.pad_token_id
    batch = collate(examples, pad)
    width = max(lengths)
    for key in ("input_ids", "attention_mask", "labels"):
        assert batch[key].shape == (6, width) and batch[key].dtype == torch.long
    for r, e in enumerate(examples):
        n = len(e.input_ids)
        assert batch["input_ids"][r, :n].tolist() == e.input_ids
        assert batch["labels"][r, :n].tolist() == e.labels
        assert batch["attention_mask"][r, :n].tolist() == [1] * n
        assert batch["input_ids"][r, n:].tolist() == [pad] * (width - n)
        assert batch["labels"][r, n:].tolist() == [IGNORE_INDEX] * (width - n)
        assert batch["attention_mask"][r, n:].tolist() == [0] * (width - n)
    # the longest row is unchanged and unpadded
    longest = lengths.index(width)
    assert batch["attention_mask"][longest].all()

    padded = collate(examples, pad, pad_to_multiple=64)
    assert padded["input_ids"].shape[1] % 64 == 0 and padded["input_ids"].shape[1] >= width
    assert torch.equal(padded["input_ids"][:, :width], batch["input_ids"])
    assert (padded["labels"][:, width:] == IGNORE_INDEX).all() and (padded["attention_mask"][:, width:] == 0).all()


# --------------------------------------------------------------------------- truncation


def test_truncate_keeps_bos_prompt_end_and_completion_start(tok, rows):
    bos, eos = tok.bos_token_id, tok.eos_token_id
    row = max(rows, key=lambda r: len(pieces(tok, r["prompt"])) + len(pieces(tok, r["completion"])))
    P = [bos] + pieces(tok, row["prompt"])
    C = pieces(tok, row["completion"]) + [eos]
    assert len(P) > 40 and len(C) > 20
    for max_length in (16, 33, 64, len(P) + len(C) - 1):
        e = encode_example(tok, row["prompt"], row["completion"], max_length, "truncate")
        assert e.truncated
        assert len(e.input_ids) == len(e.labels) == max_length
        k = e.prompt_len
        kept_c = max_length - k
        assert 2 <= k <= len(P) and 1 <= kept_c <= len(C)
        assert e.input_ids[0] == bos
        assert e.input_ids[1:k] == P[len(P) - (k - 1) :]  # the end of the prompt, after BOS
        assert e.input_ids[k:] == C[:kept_c]  # the start of the completion
        assert e.labels[:k] == [IGNORE_INDEX] * k and e.labels[k:] == C[:kept_c]
        assert k >= min(len(P), max_length // 2)  # the prompt keeps half the budget it needs

    # a long prompt with a short completion: the whole completion (with EOS) survives
    short = "#### 5"
    e = encode_example(tok, row["prompt"], short, 32, "truncate")
    assert e.truncated and len(e.input_ids) == 32
    assert e.input_ids[e.prompt_len :] == pieces(tok, short) + [eos]
    assert e.input_ids[0] == bos and e.input_ids[1 : e.prompt_len] == P[-(e.prompt_len - 1) :]
    # exactly at the limit: nothing is cut
    exact = encode_example(tok, row["prompt"], row["completion"], len(P) + len(C), "error")
    assert not exact.truncated and exact.input_ids == P + C


def test_truncation_is_counted(tok, rows):
    full = [len(e.input_ids) for e in encode_sft_rows(tok, rows, BIG, "truncate")[0]]
    max_length = sorted(full)[len(full) // 2]
    expected = sum(n > max_length for n in full)
    assert 0 < expected < len(rows)
    examples, n_trunc = encode_sft_rows(tok, rows, max_length, "truncate")
    assert n_trunc == expected == sum(e.truncated for e in examples)
    assert all(len(e.input_ids) <= max_length for e in examples)
    assert [len(e.input_ids) for e in examples] == [min(n, max_length) for n in full]


def test_truncation_error_mode(tok, rows):
    full = [len(e.input_ids) for e in encode_sft_rows(tok, rows, BIG, "error")[0]]
    with pytest.raises(DataError, match=r"data\.max_length=40") as e:
        encode_sft_rows(tok, rows, 40, "error")
    assert rows[0]["question_id"] in str(e.value) and "data.truncation=truncate" in str(e.value)
    assert f"{full[0]} tokens" in str(e.value)
    with pytest.raises(DataError, match=r"data\.max_length"):
        encode_pair(tok, rows[0]["prompt"], rows[0]["completion"], "x", 40, "error")


# --------------------------------------------------------------------------- pairs


def test_encode_pair_shares_the_prompt(tok, rows):
    bos, eos = tok.bos_token_id, tok.eos_token_id
    row = rows[0]
    chosen, rejected = row["completion"], row["completion"] + "\nWait, let me check that again. " * 6
    P = [bos] + pieces(tok, row["prompt"])
    Cc, Cr = pieces(tok, chosen) + [eos], pieces(tok, rejected) + [eos]

    # no truncation: each completion whole, after the same prompt
    pe = encode_pair(tok, row["prompt"], chosen, rejected, BIG, "truncate")
    assert (pe.prompt_ids, pe.chosen_ids, pe.rejected_ids, pe.truncated) == (P, Cc, Cr, False)
    assert pe.length == len(P) + len(Cr)

    # truncation fits the longer completion; both keep exactly the same prompt tokens, the
    # same as a single example of the longer completion would keep
    for max_length in (48, len(P) + len(Cc) + 5):
        pe = encode_pair(tok, row["prompt"], chosen, rejected, max_length, "truncate")
        single = encode_example(tok, row["prompt"], rejected, max_length, "truncate")
        assert pe.truncated
        assert pe.prompt_ids == single.input_ids[: single.prompt_len]
        assert pe.rejected_ids == single.input_ids[single.prompt_len :]
        assert pe.chosen_ids == Cc[: max_length - len(pe.prompt_ids)]
        assert len(pe.prompt_ids) + len(pe.rejected_ids) == max_length
        assert len(pe.prompt_ids) + len(pe.chosen_ids) <= max_length
        assert pe.prompt_ids[0] == bos and pe.prompt_ids[1:] == P[len(P) - len(pe.prompt_ids) + 1 :]
        # the same result with the roles swapped: the longer one decides, not the order
        swapped = encode_pair(tok, row["prompt"], rejected, chosen, max_length, "truncate")
        assert swapped.prompt_ids == pe.prompt_ids and swapped.chosen_ids == pe.rejected_ids


def test_collate_pairs_chosen_first(tok, rows):
    pairs = [
        encode_pair(tok, r["prompt"], r["completion"], f"Nope.\n#### {i}", BIG, "truncate")
        for i, r in enumerate(rows[:3])
    ]
    batch = collate_pairs(pairs, tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 6
    for i, pe in enumerate(pairs):
        for row, completion in ((i, pe.chosen_ids), (i + 3, pe.rejected_ids)):
            seq = pe.prompt_ids + completion
            n = len(seq)
            assert batch["input_ids"][row, :n].tolist() == seq
            assert batch["labels"][row, :n].tolist() == [IGNORE_INDEX] * len(pe.prompt_ids) + completion
            assert batch["attention_mask"][row].sum().item() == n
            assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
    # chosen and rejected rows of one pair share the prompt tokens
    k = len(pairs[0].prompt_ids)
    assert torch.equal(batch["input_ids"][0, :k], batch["input_ids"][3, :k])
    assert not torch.equal(batch["input_ids"][0], batch["input_ids"][3])


# --------------------------------------------------------------------------- batching


def padding_of(batches: list[list[int]], lengths: list[int]) -> int:
    return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)


def test_length_grouped_batches():
    rng = random.Random(0)
    lengths = [rng.randint(20, 600) for _ in range(1500)]
    bs = 8
    b0 = length_grouped_batches(lengths, bs, seed=1, epoch=0)
    assert b0 == length_grouped_batches(lengths, bs, seed=1, epoch=0)  # deterministic
    flat = [i for b in b0 for i in b]
    assert sorted(flat) == list(range(len(lengths)))  # every index exactly once
    assert sum(len(b) != bs for b in b0) <= 1  # only one tail batch (1500 = 187*8 + 4)
    b1 = length_grouped_batches(lengths, bs, seed=1, epoch=1)
    assert b1 != b0 and sorted(i for b in b1 for i in b) == list(range(len(lengths)))
    assert length_grouped_batches(lengths, bs, seed=2, epoch=0) != b0

    # fewer pad tokens than random batches of the same size
    idx = list(range(len(lengths)))
    random.Random(3).shuffle(idx)
    random_batches = [idx[s : s + bs] for s in range(0, len(idx), bs)]
    grouped, plain = padding_of(b0, lengths), padding_of(random_batches, lengths)
    assert grouped < 0.2 * plain, (grouped, plain)
    # and the batch order is shuffled, not sorted by length
    maxima = [max(lengths[i] for i in b) for b in b0]
    assert maxima != sorted(maxima) and maxima != sorted(maxima, reverse=True)


@pytest.mark.parametrize("accum", [1, 3])
def test_micro_batches_same_examples_per_step_for_any_world_size(accum):
    rng = random.Random(1)
    lengths = [rng.randint(5, 300) for _ in range(203)]
    bs, world = 4, 2
    two = MicroBatches(lengths, bs, accum * world, seed=5)  # 2 ranks x accum A
    one = MicroBatches(lengths, bs, 2 * accum * 1, seed=5)  # 1 rank x accum 2A
    fewer = MicroBatches(lengths, bs, accum, seed=5)  # 1 rank x accum A: a different step
    assert two.steps_per_epoch == one.steps_per_epoch == len(lengths) // bs // (2 * accum)
    seen_epoch0: list[int] = []
    for step in range(two.steps_per_epoch + 2):  # into the second epoch
        per_rank = [two.for_rank(step, r, world) for r in range(world)]
        assert all(len(mbs) == accum and all(1 <= len(mb) <= bs for mb in mbs) for mbs in per_rank)
        ranks = [{i for mb in mbs for i in mb} for mbs in per_rank]
        assert not ranks[0] & ranks[1]  # a partition: no example on both ranks
        single = [i for mb in one.for_rank(step, 0, 1) for i in mb]
        # 203 rows = 50 full micro-batches + one of 3 rows, which may land in any step
        assert 2 * accum * bs - (bs - 1) <= len(single) <= 2 * accum * bs
        assert ranks[0] | ranks[1] == set(single)
        assert set(single) != {i for mb in fewer.for_rank(step, 0, 1) for i in mb}
        if step < two.steps_per_epoch:
            seen_epoch0 += single
    # within an epoch no example repeats, and only the tail that cannot fill a step is left out
    assert len(seen_epoch0) == len(set(seen_epoch0))
    assert len(lengths) - len(seen_epoch0) < 2 * accum * bs + bs
    # the next epoch reshuffles
    assert one.step(two.steps_per_epoch) != one.step(0)


@pytest.mark.parametrize("world,accum", [(1, 1), (2, 3)])
def test_micro_batches_start_the_run_with_the_largest(world, accum):
    rng = random.Random(4)
    lengths = [rng.randint(5, 400) for _ in range(301)]
    bs, per_step = 4, world * accum
    sched = MicroBatches(lengths, bs, per_step, seed=2)
    size = lambda mb: len(mb) * max(lengths[i] for i in mb)  # noqa: E731
    n = sched.steps_per_epoch
    steps = [sched.step(k) for k in range(n)]
    flat = [mb for step in steps for mb in step]
    # the same micro-batches as the plain length-grouped order, only reordered
    plain = length_grouped_batches(lengths, bs, 2, 0)[: len(flat)]
    assert sorted(map(sorted, flat)) == sorted(map(sorted, plain)) and flat != plain
    # step 1 holds the epoch's per_step largest, largest first
    sizes = [size(mb) for mb in flat]
    assert [size(mb) for mb in steps[0]] == sorted(sizes, reverse=True)[:per_step]
    # so each rank's first micro-batch is the largest it sees in the epoch
    for r in range(world):
        mine = [size(mb) for k in range(n) for mb in sched.for_rank(k, r, world)]
        assert mine[0] == max(mine)
    # the rest keep the shuffled order (not sorted by size), and later epochs are left as they are
    rest = sizes[per_step:]
    assert rest != sorted(rest) and rest != sorted(rest, reverse=True)
    later = [mb for k in range(n) for mb in sched.step(n + k)]
    assert later == length_grouped_batches(lengths, bs, 2, 1)[: len(later)]


def test_micro_batches_too_small_dataset():
    with pytest.raises(DataError, match="cannot fill one optimizer step"):
        MicroBatches([10] * 7, batch_size=4, per_step=2, seed=0)
    with pytest.raises(DataError, match="cannot fill one optimizer step"):
        MicroBatches([10] * 3, batch_size=4, per_step=1, seed=0)
    assert MicroBatches([10] * 8, batch_size=4, per_step=2, seed=0).steps_per_epoch == 1


def test_packed_pairs_layout_by_hand():
    from looper.data.tokenize import PairEncoded, collate_packed_pairs

    # prompt [1, 2], chosen [3, 4, 5], rejected [6]; and prompt [7], chosen [8], rejected [9, 10]
    b = collate_packed_pairs([PairEncoded([1, 2], [3, 4, 5], [6], False), PairEncoded([7], [8], [9, 10], False)], 0)
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 0, 0]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 2], [0, 1, 1, 2, 0, 0]]  # rejected restarts after the prompt
    m = b["attention_mask"][:, 0].int().tolist()
    assert m[0] == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0],
                    [1, 1, 0, 0, 0, 1]]  # the rejected token sees the prompt and itself, not the chosen tokens
    assert m[1] == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 0, 1, 0, 0, 0], [1, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 0],
                    [0, 0, 0, 0, 0, 1]]  # padding sees only itself
    # chosen tokens are predicted from the position before them; the first rejected token
    # from the last prompt position (row 0: position 1; row 1: position 6 + 0)
    assert b["source"].tolist() == [1, 2, 3, 1, 6, 6, 8]
    assert b["target"].tolist() == [3, 4, 5, 6, 8, 9, 10]
    assert b["segment"].tolist() == [0, 0, 0, 2, 1, 3, 3]
    assert b["chosen_tokens"].tolist() == [3, 1] and int(b["real_tokens"]) == 10
    with pytest.raises(ValueError, match="non-empty prompt"):
        collate_packed_pairs([PairEncoded([], [1], [2], False)], 0)
