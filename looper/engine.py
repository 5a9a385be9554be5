"""The batched sampling engine: KV cache, decode attention, sampling and decoding.

:func:`generate` samples completions for an in-memory list of items and returns
``[(item, samples), ...]`` in input order. It knows nothing of stages, files or ranks:
``looper.generation.run_generation`` shards items across ranks and makes the runs
resumable, and ``looper.models.load_for_generation`` loads a model for it.

Each item is a dict with a ``question_id`` and either ``prompt`` (text, tokenized with
:func:`looper.data.tokenize.encode_prompt`, exactly as SFT/DPO tokenize prompts) or
``prompt_ids`` (a list of token ids). Each sample is a dict::

    {"text": str, "token_ids": list[int], "num_tokens": int, "finished": bool}

``num_tokens`` counts the generated tokens *excluding* the EOS token (it equals
``len(token_ids)``); ``finished`` is True when the model emitted EOS and False when it ran
into ``max_new_tokens``. ``text`` is the decoded ``token_ids`` (special tokens skipped).

How it is fast (see ``benchmarks/generation_throughput.py``): decoding a small model on
a CPU, or any model at large batch, is bound by reading the KV cache, so the engine reads
as little of it as it can.

- The prompts are prefilled once; the prompt part of the KV cache is kept once per
  question, not copied to each of its ``num_samples`` rows. A decode step attends to it
  with one batched product per question (all its samples' queries together), and to
  each row's own generated part separately; the two softmax parts are merged exactly
  (``_prefix_attention``, switched in only while the engine runs).
- The generated part is preallocated (``[rows, kv_heads, max_new_tokens, head_dim]``) and
  written in place: no per-step concatenation of a dynamic cache.
- Prompts are sorted by length into batches bounded by ``batch_size`` rows and
  ``max_batch_tokens`` (rows x (longest prompt + max_new_tokens)); left padding with
  per-row position ids.
- Finished rows leave the batch once a quarter of it is done (and questions with no row
  left leave the prompt part); the generated part is compacted in place. Greedy decoding
  runs one row per prompt and copies it to every sample.

What it serves: any model whose attention goes through transformers' attention interface
as plain softmax attention over the context. ``check_supported(model, total_len)`` runs
before any batch (in the planning step of ``generate`` and ``run_generation``) and raises
``UnsupportedModelError`` for what it cannot give exactly: attention sinks, attention-logit
softcapping, chunked or linear-attention layers, a sliding window shorter than the longest
prompt + ``max_new_tokens``.

How it is reproducible:

- sampling noise comes from one ``torch.Generator`` per (question, sample), seeded by a
  SHA-256 of ``gen_cfg.seed``, the question id and the sample index, so a sample never
  depends on which other questions share its batch;
- batches are planned from the whole item list, before sharding: rank ``r`` runs batches
  ``r, r + W, ...`` of those not yet done, so every question is computed in the same batch (same shapes, same
  arithmetic) whatever the number of ranks, and a resumed run recomputes a half-written
  batch whole. The output file is byte-identical for 1 or N ranks and for killed-and-
  resumed runs, given the same device type and thread count. (A CUDA OOM shrinks batches
  and is logged: results stay valid, bit-identity with an unsplit run is not promised.)
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from looper.config import ConfigError, GenerationConfig
from looper.io import DataError

log = logging.getLogger(__name__)

Sample = dict  # {"text", "token_ids", "num_tokens", "finished"}


class UnsupportedModelError(ConfigError, NotImplementedError):
    """The engine cannot serve this model (or this run length): raised before any decoding.

    A ``ConfigError`` (the CLI prints it as a clean error) and a ``NotImplementedError``."""


__all__ = ["generate", "check_supported", "UnsupportedModelError", "plan_batches", "sample_seed", "pick_tokens",
           "PrefixCache", "Sample"]


# --------------------------------------------------------------------------- seeds


def sample_seed(base_seed: int, question_id: str, sample_index: int) -> int:
    """A stable 63-bit seed for one sample of one question (SHA-256, never ``hash``)."""
    key = f"{base_seed}\x1f{question_id}\x1f{sample_index}".encode("utf-8")
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & ((1 << 63) - 1)


def _uniforms(seeds: Sequence[int], steps: int) -> torch.Tensor:
    """One uniform number per (row, step), from a CPU generator per row: ``[rows, steps]``."""
    out = torch.empty(len(seeds), steps, dtype=torch.float32)
    gen = torch.Generator()
    for r, s in enumerate(seeds):
        gen.manual_seed(s)
        out[r] = torch.rand(steps, generator=gen)
    return out


# --------------------------------------------------------------------------- KV cache


_COMPACT_ROWS = 16  # rows moved per copy when finished rows leave the cache


class _PrefixLayer(CacheLayerMixin):
    """One layer's KV cache: the prompt part per question, the generated part per row.

    The prefill stores the prompts' values once, ``[questions, heads, prompt, dim]``, and
    their keys once, transposed (``prompt_kt``, ``[questions, heads, dim, prompt]``: the
    decode scores are then a product of two row-major matrices, about 2% faster on CPU),
    however many samples share them. Generated tokens go to a buffer allocated once,
    ``[rows, heads, max_new, dim]``, written in place; row ``q * samples + s`` is sample
    ``s`` of question ``q`` until rows are dropped (see ``_DecodeState``).
    """

    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(self, rows: int, max_new: int):
        super().__init__()
        self.rows, self.max_new = rows, max_new
        self.prompt_kt: Optional[torch.Tensor] = None  # [questions, heads, dim, prompt]
        self.prompt_v: Optional[torch.Tensor] = None
        self.length = 0  # generated tokens written

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        _, heads, _, k_dim = key_states.shape
        kw = dict(dtype=key_states.dtype, device=key_states.device)
        self.device = key_states.device
        self.keys = torch.empty(self.rows, heads, self.max_new, k_dim, **kw)
        self.values = torch.empty(self.rows, heads, self.max_new, value_states.shape[-1], **kw)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.prompt_kt is None:  # prefill: the prompt part, one copy per question
            # contiguous, so each decode step reads them without a copy
            self.prompt_kt = key_states.transpose(-1, -2).contiguous()
            self.prompt_v = value_states.contiguous()
            self.lazy_initialization(key_states, value_states)
            return key_states, value_states
        end = self.length + key_states.shape[-2]
        if end > self.max_new:
            raise RuntimeError(f"KV cache overflow: {end} generated tokens > {self.max_new}")
        self.keys[:, :, self.length : end] = key_states
        self.values[:, :, self.length : end] = value_states
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def select(self, rows: torch.Tensor, questions: Optional[torch.Tensor]) -> None:
        """Keep generated rows ``rows`` (strictly ascending) and, if given, prompt questions ``questions``.

        The generated part is compacted in place, ``_COMPACT_ROWS`` rows per copy: row
        ``rows[i]`` moves to row ``i``. As ``rows`` ascends, no source is overwritten before
        it is read, and no second buffer is needed (at 128 rows x 512 new tokens, a 7B model's
        generated part is 32 GB in bf16: copying the kept rows into new buffers would need up
        to 24 GB more at the first drop).
        """
        n = len(rows)
        if n > 1 and bool((rows[1:] <= rows[:-1]).any()):
            raise ValueError("PrefixCache: the rows to keep must be strictly ascending")
        moved = (rows != torch.arange(n, device=rows.device)).nonzero()
        start = int(moved[0, 0]) if len(moved) else n  # rows before it stay where they are
        for name in ("keys", "values"):
            buf = getattr(self, name)
            for i in range(start, n, _COMPACT_ROWS):
                part = rows[i : i + _COMPACT_ROWS]
                buf[i : i + len(part), :, : self.length] = buf[part, :, : self.length]
            setattr(self, name, buf[:n])
        self.rows = n
        if questions is not None:
            self.prompt_kt = self.prompt_kt[questions]
            self.prompt_v = self.prompt_v[questions]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        prompt = 0 if self.prompt_kt is None else self.prompt_kt.shape[-1]
        return prompt + self.length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.prompt_kt = self.prompt_v = None
        self.length = 0


class PrefixCache(Cache):
    """KV cache for batched sampling: shared prompt part, preallocated generated part."""

    def __init__(self, num_layers: int, rows: int, max_new: int):
        super().__init__(layers=[_PrefixLayer(rows, max_new) for _ in range(num_layers)])


@dataclass
class _DecodeState:
    """What the decode attention needs beyond the current keys and values.

    ``slot[r]`` is ``question * samples + sample`` of batch row ``r``; ``prompt_bias`` is
    0 on a question's prompt tokens and -inf on its left padding, ``[questions, 1, 1, prompt]``.
    """

    cache: PrefixCache
    samples: int
    slot: torch.Tensor
    prompt_bias: torch.Tensor

    full: bool = True  # every slot still has its row, in order (slot == arange)

    @property
    def questions(self) -> int:
        return self.prompt_bias.shape[0]

    def drop_rows(self, keep: torch.Tensor) -> None:
        """Keep batch rows ``keep``; questions left with no row leave the prompt part."""
        slot = self.slot[keep]
        q = torch.div(slot, self.samples, rounding_mode="floor")
        live = torch.unique(q)
        questions = None
        if len(live) < self.questions:
            remap = torch.full((self.questions,), -1, dtype=torch.long, device=slot.device)
            remap[live] = torch.arange(len(live), device=slot.device)
            slot = remap[q] * self.samples + slot % self.samples
            self.prompt_bias = self.prompt_bias[live]
            questions = live
        self.slot = slot
        self.full = False
        for layer in self.cache.layers:
            layer.select(keep, questions)


_ATTN_NAME = "looper_prefix"
DROP_FINISHED_AT = 0.25  # drop finished rows once they are this fraction of the batch (> 1: never)


def _prefix_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention for one decode step over [shared prompt part | per-row generated part].

    Each part gets its own softmax statistics (max, sum), merged exactly, so the result is
    ordinary softmax attention over the concatenated keys. The prompt part is one batched
    product per question (all its samples' queries at once): its keys are read once, not
    once per sample. Without a ``looper_state`` (the prefill), this is plain SDPA.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    state: Optional[_DecodeState] = kwargs.pop("looper_state", None)
    if state is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    for unsupported in ("softcap", "s_aux", "sinks"):
        if kwargs.get(unsupported) is not None:
            raise UnsupportedModelError(f"looper generation: attention with {unsupported!r} is not supported")
    layer = state.cache.layers[module.layer_idx]
    rows, n_heads, _, dim = query.shape
    kv_heads = key.shape[1]
    group = n_heads // kv_heads  # query head h reads kv head h // group
    scale = scaling if scaling is not None else dim**-0.5
    q = (query * scale).reshape(rows, kv_heads, group, dim)
    n_q, s = state.questions, state.samples

    # prompt part: queries placed in [question, sample] slots, one product per question
    if state.full:
        qs = q
    else:
        qs = q.new_zeros(n_q * s, kv_heads, group, dim)
        qs[state.slot] = q
    qs = qs.view(n_q, s, kv_heads, group, dim).transpose(1, 2).reshape(n_q, kv_heads, s * group, dim)
    sp = torch.matmul(qs, layer.prompt_kt).float().add_(state.prompt_bias)
    mp = sp.amax(dim=-1, keepdim=True)
    ep = sp.sub_(mp).exp_()
    lp = ep.sum(dim=-1, keepdim=True)
    op = torch.matmul(ep.to(value.dtype), layer.prompt_v).float()

    def to_rows(x: torch.Tensor) -> torch.Tensor:
        x = x.view(n_q, kv_heads, s, group, x.shape[-1]).transpose(1, 2)
        x = x.reshape(n_q * s, kv_heads, group, x.shape[-1])
        return x if state.full else x[state.slot]

    mp, lp, op = to_rows(mp), to_rows(lp), to_rows(op)
    # generated part: per row; then both parts rescaled to the common max
    # keys times queries, not queries times keys: each row's product is then a matrix-vector
    # product over its contiguous keys (1.3 against 1.8 ms for 256 rows x 4 heads x 128 keys on CPU)
    sg = torch.matmul(key, q.transpose(-1, -2)).transpose(-1, -2).float()
    m = torch.maximum(mp, sg.amax(dim=-1, keepdim=True))
    eg = sg.sub_(m).exp_()
    wp = (mp - m).exp_()
    num = torch.matmul(eg.to(value.dtype), value).float().addcmul_(op, wp)
    den = eg.sum(dim=-1, keepdim=True).addcmul_(lp, wp)
    out = num.div_(den).to(query.dtype)
    return out.reshape(rows, 1, n_heads, dim), None


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(_ATTN_NAME, _prefix_attention)


class _use_prefix_attention:
    """Switch a model to the decode attention for the duration of a ``with`` block."""

    def __init__(self, model):
        self.config = model.config

    def __enter__(self):
        _register_attention()
        self.old = self.config._attn_implementation
        self.config._attn_implementation = _ATTN_NAME
        return self

    def __exit__(self, *exc):
        self.config._attn_implementation = self.old


# --------------------------------------------------------------------------- sampling


_CDF_BLOCK = 64  # tokens per block of the two-level inverse CDF


def _below(target: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """``target``, kept strictly below ``last`` (the last value of a prefix sum searched for it)."""
    return torch.minimum(target, torch.nextafter(last, torch.zeros_like(last)))


def _inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Per row, the first token whose cumulative probability exceeds ``uniforms[row] * total``.

    Two levels, so that no vocabulary-wide prefix sum is needed (a ``cumsum`` over
    [rows, vocab] runs at a fraction of a plain sum's speed on CPU): sums of blocks of
    ``_CDF_BLOCK`` tokens and their prefix sum find the block, then a prefix sum over that
    block's tokens alone finds the token. Every search target stays below its prefix sum's
    last value, so a token with zero probability is never picked, even where rounding makes
    a block's sum exceed the running sum of its tokens.
    """
    rows, vocab = probs.shape
    if vocab % _CDF_BLOCK:  # zero-probability padding to whole blocks
        probs = torch.nn.functional.pad(probs, (0, -vocab % _CDF_BLOCK))
    block_cdf = probs.reshape(rows, -1, _CDF_BLOCK).sum(-1).cumsum(dim=-1)
    total = block_cdf[:, -1:]
    target = _below(uniforms[:, None] * total, total)
    block = torch.searchsorted(block_cdf, target, right=True)
    before = block_cdf.gather(-1, (block - 1).clamp(min=0)).masked_fill_(block == 0, 0.0)
    index = block * _CDF_BLOCK + torch.arange(_CDF_BLOCK, device=probs.device)
    cdf = probs.gather(-1, index).cumsum(dim=-1)
    within = _below(target - before, cdf[:, -1:])
    return index.gather(-1, torch.searchsorted(cdf, within, right=True))[:, 0]


def pick_tokens(
    logits: torch.Tensor, temperature: float, top_p: float, uniforms: Optional[torch.Tensor]
) -> torch.Tensor:
    """Next token per row: argmax when ``temperature == 0``, else temperature + top-p sampling.

    Sampling inverts the CDF of the (top-p filtered) distribution at ``uniforms[row]``
    (``_inverse_cdf``), so each row's choice depends only on its own logits and its own
    uniform number. Top-p keeps the smallest set of most likely tokens whose mass reaches ``top_p``.
    """
    if temperature <= 0:
        return logits.argmax(dim=-1)
    scaled = logits.float() if temperature == 1.0 else logits.float() / temperature
    order = None
    if top_p < 1.0:
        scaled, order = scaled.sort(dim=-1, descending=True)
    probs = torch.softmax(scaled, dim=-1)
    if order is not None:
        mass_before = probs.cumsum(dim=-1) - probs
        probs = probs.masked_fill(mass_before >= top_p, 0.0)
    idx = _inverse_cdf(probs, uniforms.to(probs.device))
    if order is not None:
        idx = order.gather(-1, idx[:, None])[:, 0]
    return idx


# --------------------------------------------------------------------------- planning


def plan_batches(prompt_lens: Sequence[int], rows_per_prompt: int, gen_cfg: GenerationConfig) -> list[list[int]]:
    """Group prompt indices into batches: longest first, ties by index.

    A batch holds at most ``gen_cfg.batch_size`` rows and ``gen_cfg.max_batch_tokens`` of
    rows x (longest prompt + max_new_tokens), but always at least one prompt. The plan
    depends only on the lengths and the config, never on ranks or on what is already done.
    """
    order = sorted(range(len(prompt_lens)), key=lambda i: (-prompt_lens[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    width = 0
    for i in order:
        new_width = max(width, prompt_lens[i] + gen_cfg.max_new_tokens)
        rows = (len(current) + 1) * rows_per_prompt
        if current and (rows > gen_cfg.batch_size or rows * new_width > gen_cfg.max_batch_tokens):
            batches.append(current)
            current, new_width = [], prompt_lens[i] + gen_cfg.max_new_tokens
        current.append(i)
        width = new_width
    if current:
        batches.append(current)
    return batches


# --------------------------------------------------------------------------- decoding


@dataclass
class _Job:
    """What one batch needs: prompt ids and one seed per generated row."""

    prompts: list[list[int]]
    seeds: list[list[int]]  # [prompt][sample]


def _eos_ids(model, tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif isinstance(gen_eos, (list, tuple)):
        ids.update(gen_eos)
    return sorted(i for i in ids if i is not None)


def _prefill_inputs(prompts: list[list[int]], pad_id: int):
    """Left-padded ids, key mask, position ids and the 4-D prefill mask."""
    n, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros(n, width, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = True
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    # padding queries attend to themselves only, so no row of the mask is empty (no NaN)
    mask4 = (causal[None] & mask[:, None, :]) | torch.eye(width, dtype=torch.bool)[None]
    return ids, mask, positions, mask4[:, None]


_ATTENTION_LAYER_TYPES = {"full_attention", "sliding_attention"}


def check_supported(model, total_len: Optional[int] = None) -> None:
    """Raise ``UnsupportedModelError`` when the engine cannot give this model's own outputs.

    The decode attention (``_prefix_attention``) is plain softmax attention over the whole
    context through transformers' attention interface, so it refuses, naming each reason:

    - a model that does not route attention through that interface
      (``_supports_attention_backend`` false, e.g. some ``trust_remote_code`` models);
    - attention-logit softcapping (``attn_logit_softcapping``, Gemma 2);
    - attention sinks (a ``sinks`` parameter on the attention modules, gpt-oss);
    - layer types other than full and sliding-window attention (chunked, linear, recurrent);
    - a sliding window shorter than ``total_len`` (longest prompt + ``max_new_tokens``) on
      any layer that uses it: inside the window, sliding attention is full attention.

    ``total_len=None`` checks only what does not depend on the run's length.
    """
    from looper.models import unwrap_model

    hf = unwrap_model(model)  # the engine gets a merged model; a PeftModel is looked into
    config = hf.config
    text = config.get_text_config()
    what = f"{type(hf).__name__} (model_type {getattr(text, 'model_type', None) or config.model_type!r})"
    problems = []
    if not getattr(hf, "_supports_attention_backend", False):
        problems.append("it does not route attention through transformers' attention interface "
                        "(_supports_attention_backend is not set), so the decode attention cannot be switched in")
    softcap = getattr(text, "attn_logit_softcapping", None)
    if softcap is not None:
        problems.append(f"attention-logit softcapping (attn_logit_softcapping={softcap})")
    if any(name.rsplit(".", 1)[-1] == "sinks" for name, _ in hf.named_parameters()):
        problems.append("attention sinks (a 'sinks' parameter in its attention layers)")
    layer_types = getattr(text, "layer_types", None)
    other = sorted(set(layer_types or ()) - _ATTENTION_LAYER_TYPES)
    if other:
        problems.append(f"layer types {other} (only full_attention and sliding_attention are supported)")
    if getattr(text, "attention_chunk_size", None) is not None and not layer_types:
        problems.append(f"chunked attention (attention_chunk_size={text.attention_chunk_size})")
    window = getattr(text, "sliding_window", None)
    windowed = window is not None and (layer_types is None or "sliding_attention" in layer_types)
    if windowed and total_len is not None and total_len > window:
        problems.append(
            f"prompt + max_new_tokens = {total_len} tokens exceeds its sliding_window={window} "
            "(the engine attends to the full context; lower generation.max_new_tokens or the prompt length)"
        )
    if problems:
        raise UnsupportedModelError(
            f"looper generation cannot serve {what}: " + "; ".join(problems)
        )


@torch.inference_mode()
def _decode(
    model, job: _Job, gen_cfg: GenerationConfig, eos_ids: list[int], pad_id: int, device: torch.device,
    ignore_eos: bool = False,
) -> tuple[list[list[list[int]]], list[list[bool]]]:
    """Generate for one batch; returns token ids (EOS excluded) and finished flags per prompt/sample."""
    greedy = gen_cfg.temperature <= 0
    n_prompts, n_samples = len(job.prompts), len(job.seeds[0])
    expand = 1 if greedy else n_samples  # greedy: one row per prompt, copied afterwards
    rows, max_new = n_prompts * expand, gen_cfg.max_new_tokens
    ids, key_mask, positions, mask4 = _prefill_inputs(job.prompts, pad_id)
    n_layers = model.config.get_text_config().num_hidden_layers
    cache = PrefixCache(n_layers, rows, max_new)
    with _use_prefix_attention(model):
        out = model(
            input_ids=ids.to(device), attention_mask=mask4.to(device), position_ids=positions.to(device),
            cache=cache, use_cache=True, logits_to_keep=1,
        )
        bias = torch.zeros(key_mask.shape, dtype=torch.float32).masked_fill_(~key_mask, float("-inf"))
        state = _DecodeState(cache, expand, torch.arange(rows, device=device), bias[:, None, None].to(device))
        tokens, lengths = _decode_loop(model, state, out.logits[:, -1], positions[:, -1] + 1, job, gen_cfg,
                                       eos_ids, pad_id, device, ignore_eos)
    ids_out: list[list[list[int]]] = []
    finished: list[list[bool]] = []
    for p in range(n_prompts):
        rows_p = [p * expand + (0 if greedy else s) for s in range(n_samples)]
        ids_out.append([tokens[r, : lengths[r]].tolist() for r in rows_p])
        finished.append([lengths[r] < max_new for r in rows_p])
    return ids_out, finished


def _decode_loop(model, state: _DecodeState, logits, next_pos, job, gen_cfg, eos_ids, pad_id, device, ignore_eos):
    """The token loop: pick, record, drop finished rows now and then, feed the next tokens."""
    greedy = gen_cfg.temperature <= 0
    expand, max_new = state.samples, gen_cfg.max_new_tokens
    rows = len(state.slot)
    logits = logits.repeat_interleave(expand, dim=0)
    next_pos = next_pos.to(device).repeat_interleave(expand)
    uniforms = None if greedy else _uniforms([s for seeds in job.seeds for s in seeds], max_new).to(device)
    alive = torch.arange(rows, device=device)  # original row of each batch row
    tokens = torch.full((rows, max_new), pad_id, dtype=torch.long, device=device)
    lengths = torch.full((rows,), max_new, dtype=torch.long, device=device)
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
    done = torch.zeros(rows, dtype=torch.bool, device=device)  # per batch row

    for step in range(max_new):
        tok = pick_tokens(logits, gen_cfg.temperature, gen_cfg.top_p, None if greedy else uniforms[alive, step])
        tokens[alive, step] = tok
        if not ignore_eos:
            hit = torch.isin(tok, eos) & ~done
            lengths[alive[hit]] = step
            done |= hit
        if step == max_new - 1:
            break
        if not ignore_eos:
            n_done = int(done.sum())
            if n_done == len(alive):
                break
            if n_done >= DROP_FINISHED_AT * len(alive):  # drop finished rows from the batch
                keep = (~done).nonzero()[:, 0]
                state.drop_rows(keep)
                alive, tok, next_pos, done = alive[keep], tok[keep], next_pos[keep], done[keep]
        out = model(
            input_ids=tok[:, None], position_ids=next_pos[:, None], cache=state.cache, use_cache=True,
            looper_state=state,
        )
        logits = out.logits[:, -1]
        next_pos = next_pos + 1
    return tokens.cpu(), lengths.tolist()


def _is_oom(err: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    return oom is not None and isinstance(err, oom)


# --------------------------------------------------------------------------- engine


class _Engine:
    """Runs planned batches; halves the batch after a CUDA out-of-memory error."""

    def __init__(self, model, tokenizer, gen_cfg: GenerationConfig, num_samples: int, device: torch.device,
                 ignore_eos: bool = False):
        self.model, self.tokenizer, self.gen_cfg = model, tokenizer, gen_cfg
        self.num_samples, self.device, self.ignore_eos = num_samples, device, ignore_eos
        self.max_prompts: Optional[int] = None  # lowered after an OOM
        self.eos_ids = _eos_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]

    def prompt_ids(self, item: dict, where: str) -> list[int]:
        from looper.data.tokenize import encode_prompt

        if "question_id" not in item:
            raise DataError(f"{where}: item has no 'question_id'")
        if "prompt_ids" in item:
            ids = list(item["prompt_ids"])
        elif "prompt" in item:
            ids = encode_prompt(self.tokenizer, item["prompt"])
        else:
            raise DataError(f"{where}: item {item['question_id']!r} has neither 'prompt' nor 'prompt_ids'")
        if not ids:
            raise DataError(f"{where}: item {item['question_id']!r} has an empty prompt")
        return ids

    def run(self, items: list[dict], prompts: list[list[int]]) -> list[list[Sample]]:
        """Samples for a planned batch of items, splitting it on OOM."""
        n = len(items)
        if self.max_prompts is not None and n > self.max_prompts:
            return self._split(items, prompts, self.max_prompts)
        try:
            return self._run_once(items, prompts)
        except Exception as err:  # noqa: BLE001 - only OOM is handled, anything else is re-raised
            if not _is_oom(err) or n == 1:
                raise
        # out of memory: retry outside the except block, so the failed attempt's tensors are freed
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.max_prompts = max(1, n // 2)
        log.warning(
            "generation: CUDA out of memory with %d prompts x %d samples; retrying with batches of %d prompts",
            n, self.num_samples, self.max_prompts,
        )
        return self._split(items, prompts, self.max_prompts)

    def _split(self, items, prompts, size: int) -> list[list[Sample]]:
        out: list[list[Sample]] = []
        for i in range(0, len(items), size):
            out.extend(self.run(items[i : i + size], prompts[i : i + size]))
        return out

    def _run_once(self, items: list[dict], prompts: list[list[int]]) -> list[list[Sample]]:
        seeds = [
            [sample_seed(self.gen_cfg.seed, str(it["question_id"]), s) for s in range(self.num_samples)]
            for it in items
        ]
        ids, finished = _decode(
            self.model, _Job(prompts, seeds), self.gen_cfg, self.eos_ids, self.pad_id, self.device, self.ignore_eos
        )
        out = []
        for toks, fins in zip(ids, finished):
            texts = self.tokenizer.batch_decode(toks, skip_special_tokens=True)
            out.append(
                [
                    {"text": t, "token_ids": k, "num_tokens": len(k), "finished": f}
                    for t, k, f in zip(texts, toks, fins)
                ]
            )
        return out


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _check_items(items: Sequence[dict], where: str) -> None:
    seen: set = set()
    for i, it in enumerate(items):
        if not isinstance(it, dict) or "question_id" not in it:
            raise DataError(f"{where}: item {i} is not a dict with a 'question_id'")
        qid = it["question_id"]
        if qid in seen:
            raise DataError(f"{where}: duplicate question_id {qid!r} (item {i})")
        seen.add(qid)


def _prepare(engine: _Engine, items: Sequence[dict], where: str) -> tuple[list[list[int]], list[list[int]]]:
    _check_items(items, where)
    prompts = [engine.prompt_ids(it, where) for it in items]
    if prompts:  # before any batch runs: the longest prompt bounds every batch's length
        check_supported(engine.model, max(len(p) for p in prompts) + engine.gen_cfg.max_new_tokens)
    rows = 1 if engine.gen_cfg.temperature <= 0 else engine.num_samples
    return prompts, plan_batches([len(p) for p in prompts], rows, engine.gen_cfg)


def _check_args(gen_cfg: GenerationConfig, num_samples: int) -> None:
    if num_samples < 1:
        raise ConfigError(f"num_samples must be >= 1, got {num_samples}")
    if gen_cfg.max_new_tokens < 1 or gen_cfg.batch_size < 1:
        raise ConfigError("generation: max_new_tokens and batch_size must be >= 1")
    if gen_cfg.temperature < 0 or not 0 < gen_cfg.top_p <= 1:
        raise ConfigError("generation: temperature must be >= 0 and top_p in (0, 1]")


def generate(
    model,
    tokenizer,
    items: Sequence[dict],
    gen_cfg: GenerationConfig,
    num_samples: int = 1,
    device: Optional[torch.device | str] = None,
    ignore_eos: bool = False,
) -> list[tuple[dict, list[Sample]]]:
    """Generate ``num_samples`` completions per item, on this process only; input order kept.

    ``ignore_eos`` keeps generating after EOS up to ``max_new_tokens`` (for benchmarks).
    """
    _check_args(gen_cfg, num_samples)
    dev = torch.device(device) if device is not None else _model_device(model)
    engine = _Engine(model, tokenizer, gen_cfg, num_samples, dev, ignore_eos)
    prompts, batches = _prepare(engine, items, "generate")
    results: list[Optional[list[Sample]]] = [None] * len(items)
    for batch in batches:
        samples = engine.run([items[i] for i in batch], [prompts[i] for i in batch])
        for i, s in zip(batch, samples):
            results[i] = s
    return [(it, s) for it, s in zip(items, results)]
