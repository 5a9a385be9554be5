"""Helpers shared by test_engine.py and test_generation.py: HF reference decoding and
sample accessors. Their fixtures (``gqa_model_dir``, ``model_tok``, ``items``) live in conftest.py."""

from __future__ import annotations

import torch


def _hf_greedy(model, tok, prompt: str, max_new: int) -> list[int]:
    from looper.data.tokenize import encode_prompt

    ids = torch.tensor([encode_prompt(tok, prompt)])
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new,
        pad_token_id=tok.pad_token_id,
    )
    return out[0, ids.shape[1]:].tolist()


def _with_eos(sample: dict, eos: int) -> list[int]:
    return sample["token_ids"] + ([eos] if sample["finished"] else [])


def _texts(results) -> list[list[str]]:
    return [[s["text"] for s in samples] for _, samples in results]
