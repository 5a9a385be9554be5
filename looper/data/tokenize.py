"""Prompt/completion tokenization, loss masks, length-grouped batching and collation.

Prompt and completion are tokenized separately and then joined, so the boundary between
them never shifts with the tokenizer's merges. The completion ends with EOS. Labels are
-100 on the prompt and on padding, so the loss covers the completion only.

That is the ``template`` prompt format. The encoders take an optional ``fmt`` (a format of
``looper.data.formats``, which holds every formatting rule); with the ``chat`` format the
prompt is the rendered chat template, the completion ends with the template's end-of-turn
text instead of EOS, and every example's boundary is checked against the whole rendered
conversation (``DataError`` naming the example on a mismatch). ``fmt=None`` is the
template format, exactly as before.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Sequence

import torch

from looper.io import DataError

IGNORE_INDEX = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    prompt_len: int
    truncated: bool


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids
    return ids


def encode_completion(tokenizer, completion: str) -> list[int]:
    return tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def join_truncate(
    prompt_ids: list[int], completion_ids: list[int], max_length: int, mode: str, where: str = ""
) -> tuple[list[int], list[int], bool]:
    """Join prompt and completion within ``max_length``.

    Truncation keeps the end of the prompt (its first token, BOS, is kept too) and the start
    of the completion; the prompt keeps at least half the budget when it needs it. With
    ``mode="error"`` an over-long row raises instead.
    """
    total = len(prompt_ids) + len(completion_ids)
    if total <= max_length:
        return prompt_ids, completion_ids, False
    if mode == "error":
        raise DataError(
            f"{where}prompt + completion is {total} tokens, more than data.max_length={max_length} "
            "(set data.truncation=truncate to cut it instead)"
        )
    keep_c = min(len(completion_ids), max_length - min(len(prompt_ids), max_length // 2))
    keep_p = max_length - keep_c
    p = prompt_ids[-keep_p:]
    if keep_p > 1 and p[0] != prompt_ids[0]:
        p = [prompt_ids[0]] + prompt_ids[-(keep_p - 1):]  # keep BOS
    return p, completion_ids[:keep_c], True


def _encode_pieces(tokenizer, prompt: str, completion: str, where: str, fmt=None, messages=None):
    if fmt is None:
        return encode_prompt(tokenizer, prompt), encode_completion(tokenizer, completion)
    return fmt.encode(prompt, completion, where, messages)


def encode_example(
    tokenizer, prompt: str, completion: str, max_length: int, mode: str, where: str = "",
    fmt=None, messages=None,
) -> Encoded:
    """One training example. ``fmt``: a ``looper.data.formats`` format (None: template);
    ``messages``: the chat conversation before the answer, checked against ``prompt``."""
    p, c = _encode_pieces(tokenizer, prompt, completion, where, fmt, messages)
    p, c, truncated = join_truncate(p, c, max_length, mode, where)
    return Encoded(p + c, [IGNORE_INDEX] * len(p) + c, len(p), truncated)


def _row_format(tokenizer, row: dict, cache: dict):
    """The format of an SFT row: chat when it carries its ``messages`` (``load_sft_rows``
    writes them in the chat format), else template (None)."""
    messages = row.get("messages")
    if messages is None:
        return None
    from looper.data.formats import ChatFormat

    system = messages[0]["content"] if messages and messages[0].get("role") == "system" else None
    kwargs = row.get("chat_template_kwargs") or {}
    key = (system, json.dumps(kwargs, sort_keys=True, default=str))
    if key not in cache:
        cache[key] = ChatFormat(tokenizer, system, kwargs)
    return cache[key]


def encode_sft_rows(tokenizer, rows: Sequence[dict], max_length: int, mode: str, fmt=None) -> tuple[list[Encoded], int]:
    """Encode rows with ``prompt`` and ``completion`` text; returns examples and the truncated count.

    A row that carries ``messages`` (the chat conversation before the answer) is encoded in
    the chat format and checked against the template's rendering of the whole conversation;
    ``fmt`` (a ``looper.data.formats`` format) applies to the rows without them.
    """
    out, chats = [], {}
    for i, row in enumerate(rows):
        where = f"row {row.get('question_id', i)}: "
        if not row["completion"]:
            raise DataError(f"{where}empty completion")
        row_fmt = _row_format(tokenizer, row, chats) or fmt
        out.append(encode_example(tokenizer, row["prompt"], row["completion"], max_length, mode, where,
                                  row_fmt, row.get("messages")))
    return out, sum(e.truncated for e in out)


def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Shuffle, sort by length inside windows of 64 batches, cut into batches, shuffle batches.

    Deterministic for (seed, epoch): every rank computes the same list and takes its share.
    """
    rng = random.Random(f"{seed}-{epoch}")
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    window = batch_size * 64
    batches = []
    for s in range(0, len(idx), window):
        chunk = sorted(idx[s : s + window], key=lambda i: (lengths[i], i))
        batches += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(examples: Sequence[Encoded], pad_id: int, pad_to_multiple: int = 1) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row. Padding has label -100 and attention 0."""
    width = max(len(e.input_ids) for e in examples)
    width = -(-width // pad_to_multiple) * pad_to_multiple
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for r, e in enumerate(examples):
        n = len(e.input_ids)
        ids[r, :n] = torch.tensor(e.input_ids)
        labels[r, :n] = torch.tensor(e.labels)
        mask[r, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def largest_first(batches: list[list[int]], lengths: Sequence[int], k: int) -> list[list[int]]:
    """``batches`` with its ``k`` largest (rows x longest row) moved to the front, largest
    first; the others keep their order."""
    size = [len(b) * max(lengths[i] for i in b) for b in batches]
    top = sorted(range(len(batches)), key=lambda j: (-size[j], j))[:k]
    chosen = set(top)
    return [batches[j] for j in top] + [b for j, b in enumerate(batches) if j not in chosen]


class MicroBatches:
    """The micro-batch schedule of a training run, identical on every rank.

    Optimizer step ``s`` uses global micro-batches ``s*A*W .. s*A*W + A*W - 1`` (A = grad
    accumulation, W = world size); rank ``r`` takes those with index ``= r (mod W)``. So a
    run with W ranks and A steps of accumulation sees the same examples per optimizer step
    as one rank with A*W steps. Each epoch reshuffles; the batches that cannot fill a whole
    optimizer step at the end of an epoch's order are dropped. A length window whose size
    is not a multiple of ``batch_size`` yields one shorter micro-batch, which may land
    anywhere in the epoch; the loss is normalized by the global token (or pair) count, so
    it weighs every example the same either way.

    The first optimizer step of the run holds the first epoch's ``per_step`` largest
    micro-batches (rows x longest row), largest first, so every rank's first micro-batch is
    its largest: a run that does not fit in memory fails at step 1, and the peak is
    allocated once and then reused. In growing order, each new peak asks for fresh memory
    that the smaller freed blocks cannot serve (``largest_first``). Later epochs keep their
    shuffled order.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, per_step: int, seed: int):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.per_step = per_step
        self.seed = seed
        n = len(self.lengths) // batch_size if len(self.lengths) >= batch_size else 0
        self.steps_per_epoch = n // per_step
        if self.steps_per_epoch == 0:
            raise DataError(
                f"{len(self.lengths)} training examples cannot fill one optimizer step of "
                f"{per_step} micro-batches x {batch_size} rows; lower batch_size or grad_accum, "
                "or add data"
            )
        self._cache: dict[int, list[list[int]]] = {}

    def step(self, step: int) -> list[list[int]]:
        """All A*W micro-batches (lists of example indices) of optimizer step ``step``."""
        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch not in self._cache:
            batches = length_grouped_batches(self.lengths, self.batch_size, self.seed, epoch)
            if epoch == 0:
                used = self.steps_per_epoch * self.per_step  # the tail that cannot fill a step stays out
                batches = largest_first(batches[:used], self.lengths, self.per_step) + batches[used:]
            self._cache = {epoch: batches}
        return self._cache[epoch][k * self.per_step : (k + 1) * self.per_step]

    def for_rank(self, step: int, rank: int, world: int) -> list[list[int]]:
        return self.step(step)[rank::world]


# --------------------------------------------------------------------------- preference pairs


@dataclass
class PairEncoded:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    truncated: bool

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


def encode_pair(
    tokenizer, prompt: str, chosen: str, rejected: str, max_length: int, mode: str, where: str = "", fmt=None
) -> PairEncoded:
    """Tokenize the prompt once and each completion separately, as SFT does: each ends with
    EOS (template format, ``fmt=None``) or with the end-of-turn text (``fmt`` chat, where
    both boundaries are checked against the whole conversation).

    Truncation treats the longer completion as the one to fit, so chosen and rejected keep
    exactly the same prompt tokens.
    """
    if fmt is None:
        p = encode_prompt(tokenizer, prompt)
        c = encode_completion(tokenizer, chosen)
        r = encode_completion(tokenizer, rejected)
    else:
        p, c = fmt.encode(prompt, chosen, where)
        _, r = fmt.encode(prompt, rejected, where)
    longer = c if len(c) >= len(r) else r
    p2, kept, truncated = join_truncate(p, longer, max_length, mode, where)
    room = max_length - len(p2)
    return PairEncoded(p2, c[:room], r[:room], truncated)


def collate_packed_pairs(pairs: Sequence[PairEncoded], pad_id: int) -> dict[str, torch.Tensor]:
    """One row per pair, ``prompt | chosen | rejected``: the prompt is computed once.

    - ``position_ids`` restart at the end of the prompt for the rejected segment, so it
      sits at the positions it has after the prompt alone;
    - ``attention_mask`` is a 4-D boolean ``[B, 1, T, T]`` (True: may attend): causal,
      except that rejected tokens never see chosen ones; padding positions see only
      themselves (no empty softmax row);
    - the scored tokens are listed explicitly (``packed_sequence_logps``): ``source`` is
      the flat position ``b * T + t`` of the logits that predict ``target``, ``segment`` is
      ``b`` for chosen and ``B + b`` for rejected tokens. The first rejected token is
      predicted from the last prompt position, as in a ``prompt | rejected`` row.

    Also ``chosen_tokens`` ``[B]`` (the NLL term's lengths) and ``real_tokens`` (the
    positions that are not padding). Every pair needs a non-empty prompt.
    """
    rows = [p.prompt_ids + p.chosen_ids + p.rejected_ids for p in pairs]
    b_n, width = len(pairs), max(map(len, rows))
    ids = torch.full((b_n, width), pad_id, dtype=torch.long)
    pos = torch.zeros((b_n, width), dtype=torch.long)
    mask = torch.zeros((b_n, 1, width, width), dtype=torch.bool)
    source, target, segment = [], [], []
    causal = torch.ones(width, width, dtype=torch.bool).tril_()
    diag = torch.arange(width)
    for b, (p, row) in enumerate(zip(pairs, rows)):
        n_p, n_c, n_r = len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)
        if n_p == 0:
            raise ValueError("a packed pair needs a non-empty prompt (its last position predicts both completions)")
        n = len(row)
        ids[b, :n] = torch.tensor(row)
        pos[b, : n_p + n_c] = torch.arange(n_p + n_c)
        pos[b, n_p + n_c : n] = torch.arange(n_p, n_p + n_r)
        mask[b, 0, :n, :n] = causal[:n, :n]
        mask[b, 0, n_p + n_c : n, n_p : n_p + n_c] = False  # rejected never sees chosen
        mask[b, 0, diag[n:], diag[n:]] = True  # padding: itself only
        base = b * width
        source += [base + n_p - 1 + j for j in range(n_c)]
        source += [base + (n_p - 1 if k == 0 else n_p + n_c + k - 1) for k in range(n_r)]
        target += p.chosen_ids + p.rejected_ids
        segment += [b] * n_c + [b_n + b] * n_r
    return {
        "input_ids": ids, "attention_mask": mask, "position_ids": pos,
        "source": torch.tensor(source, dtype=torch.long), "target": torch.tensor(target, dtype=torch.long),
        "segment": torch.tensor(segment, dtype=torch.long),
        "chosen_tokens": torch.tensor([len(p.chosen_ids) for p in pairs], dtype=torch.long),
        "real_tokens": torch.tensor(sum(map(len, rows))),
    }


def collate_pairs(pairs: Sequence[PairEncoded], pad_id: int) -> dict[str, torch.Tensor]:
    """One concatenated batch: rows ``0..B-1`` are chosen, ``B..2B-1`` rejected."""
    rows = [Encoded(p.prompt_ids + p.chosen_ids, [IGNORE_INDEX] * len(p.prompt_ids) + p.chosen_ids, len(p.prompt_ids), p.truncated) for p in pairs]
    rows += [Encoded(p.prompt_ids + p.rejected_ids, [IGNORE_INDEX] * len(p.prompt_ids) + p.rejected_ids, len(p.prompt_ids), p.truncated) for p in pairs]
    return collate(rows, pad_id)
