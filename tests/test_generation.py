"""looper.generation: sharded, resumable generation runs (resume after a crash, corruption,
changed settings, bad items, 1 rank vs 2 ranks, merged adapters)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from looper.config import GenerationConfig
from looper.generation import run_generation
from looper.io import DataError
from generation_helpers import _hf_greedy, _texts, _with_eos
from looper.engine import generate

# --------------------------------------------------------------------------- files


def _record(item, samples):
    return {"question_id": item["question_id"], "texts": [s["text"] for s in samples],
            "num_tokens": [s["num_tokens"] for s in samples]}


SAMPLING = GenerationConfig(max_new_tokens=16, temperature=1.0, top_p=0.95, batch_size=4, seed=7)



def test_run_generation_resume_after_crash(model_tok, items, tmp_path):
    model, tok = model_tok
    full = tmp_path / "full.jsonl"
    ref = run_generation(model, tok, items, SAMPLING, 2, str(full), _record, progress=False)
    assert [r["question_id"] for r in ref] == [it["question_id"] for it in items]
    assert not list(tmp_path.glob("full.jsonl.rank*"))

    # a run that dies after 5 records, leaving a torn line behind
    out = tmp_path / "resumed.jsonl"
    calls = {"n": 0}

    def crashing(item, samples):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt("killed")
        return _record(item, samples)

    with pytest.raises(KeyboardInterrupt):
        run_generation(model, tok, items, SAMPLING, 2, str(out), crashing, progress=False)
    partial = tmp_path / "resumed.jsonl.rank0.partial"
    assert len(partial.read_text().splitlines()) == 5
    with open(partial, "a") as f:
        f.write('{"question_id": "torn')
    seen = []

    def recording(item, samples):
        seen.append(item["question_id"])
        return _record(item, samples)

    run_generation(model, tok, items, SAMPLING, 2, str(out), recording, progress=False)
    assert len(seen) == len(items) - 5  # only the missing questions were written
    assert out.read_bytes() == full.read_bytes()
    assert not partial.exists()
    # a rerun of a finished file changes nothing
    run_generation(model, tok, items, SAMPLING, 2, str(out), recording, progress=False)
    assert len(seen) == len(items) - 5 and out.read_bytes() == full.read_bytes()


def test_corrupted_partial_is_an_error_and_nothing_is_overwritten(model_tok, items, tmp_path):
    model, tok = model_tok
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"question_id": items[0]["question_id"], "texts": ["x"]}) + "\n")
    partial = tmp_path / "out.jsonl.rank0.partial"
    partial.write_text('{"question_id": "a"}\nnot json\n{"question_id": "b"}\n')
    before = (out.read_bytes(), partial.read_bytes())
    with pytest.raises(DataError, match=r"rank0\.partial:2"):
        run_generation(model, tok, items, SAMPLING, 2, str(out), _record, progress=False)
    assert (out.read_bytes(), partial.read_bytes()) == before


def test_changed_settings_refuse_to_resume(model_tok, items, tmp_path):
    from looper.config import ConfigError
    from looper.generation import generation_meta

    model, tok = model_tok
    out = tmp_path / "out.jsonl"
    run_generation(model, tok, items[:3], SAMPLING, 1, str(out), _record, progress=False,
                   meta=generation_meta(SAMPLING, 1))
    before = out.read_bytes()
    other = GenerationConfig(max_new_tokens=16, temperature=0.5, batch_size=4, seed=7)
    with pytest.raises(ConfigError, match="generation"):
        run_generation(model, tok, items, other, 1, str(out), _record, progress=False,
                       meta=generation_meta(other, 1))
    assert out.read_bytes() == before


def test_bad_items(model_tok, tmp_path):
    model, tok = model_tok
    with pytest.raises(DataError, match="duplicate question_id"):
        generate(model, tok, [{"question_id": "a", "prompt": "x"}, {"question_id": "a", "prompt": "y"}], SAMPLING)
    with pytest.raises(DataError, match="neither 'prompt'"):
        generate(model, tok, [{"question_id": "a"}], SAMPLING)


# --------------------------------------------------------------------------- ranks


RANK_SCRIPT = """
import sys
import torch
from looper import dist
from looper.config import GenerationConfig
from looper.data.gsm8k import format_prompt, load_questions
from looper.generation import run_generation
from looper.models import load_base_model, load_tokenizer

torch.set_num_threads(1)
model_dir, out = sys.argv[1], sys.argv[2]
dist.init_distributed("cpu")
model, tok = load_base_model(model_dir).eval(), load_tokenizer(model_dir)
qs = load_questions(None, "test")[:10]
items = [{"question_id": q["question_id"], "prompt": format_prompt(q["question"][: 30 + 20 * (i % 3)])}
         for i, q in enumerate(qs)]
cfg = GenerationConfig(max_new_tokens=12, temperature=1.0, top_p=0.9, batch_size=4, seed=1)
rec = lambda it, s: {"question_id": it["question_id"], "texts": [x["text"] for x in s]}
records = run_generation(model, tok, items, cfg, 2, out, rec, progress=False)
assert [r["question_id"] for r in records] == [it["question_id"] for it in items]
dist.destroy()
"""


@pytest.mark.slow
def test_one_rank_and_two_ranks_write_the_same_file(gqa_model_dir, model_tok, tmp_path):
    from conftest import run_torchrun

    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    run_torchrun(RANK_SCRIPT.replace("sys.argv[1], sys.argv[2]", f"{str(gqa_model_dir)!r}, {str(two)!r}"),
                 nproc=2, workdir=tmp_path)
    # the single process runs in this interpreter (one thread, like each rank)
    model, tok = model_tok
    from looper.data.gsm8k import format_prompt, load_questions

    qs = load_questions(None, "test")[:10]
    items = [{"question_id": q["question_id"], "prompt": format_prompt(q["question"][: 30 + 20 * (i % 3)])}
             for i, q in enumerate(qs)]
    cfg = GenerationConfig(max_new_tokens=12, temperature=1.0, top_p=0.9, batch_size=4, seed=1)
    rec = lambda it, s: {"question_id": it["question_id"], "texts": [x["text"] for x in s]}  # noqa: E731
    run_generation(model, tok, items, cfg, 2, str(one), rec, progress=False)
    assert one.read_bytes() == two.read_bytes()
    assert not list(tmp_path.glob("two.jsonl.rank*"))


# --------------------------------------------------------------------------- adapters


def test_merged_adapter_matches_unmerged_peft(gqa_model_dir, items, tmp_path):
    from peft import LoraConfig, get_peft_model

    from looper.config import Config
    from looper.models import load_for_generation
    from looper.models import load_base_model, load_tokenizer

    torch.manual_seed(0)
    peft_model = get_peft_model(
        load_base_model(str(gqa_model_dir)),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # non-zero B: the adapter changes the outputs
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(str(adapter))
    snapshot = {p.name: p.read_bytes() for p in adapter.iterdir()}
    peft_model.eval()

    cfg = Config()
    cfg.model.name_or_path = str(gqa_model_dir)
    cfg.run.output_dir = str(tmp_path / "run")
    merged, tok = load_for_generation(cfg, str(adapter), "cpu")
    gen = GenerationConfig(max_new_tokens=16, temperature=0.0, batch_size=8)
    res = generate(merged, tok, items[:4], gen)
    base_res = generate(load_base_model(str(gqa_model_dir)).eval(), load_tokenizer(str(gqa_model_dir)), items[:4], gen)
    assert _texts(res) != _texts(base_res)  # the adapter matters
    for item, samples in res:
        assert _with_eos(samples[0], tok.eos_token_id) == _hf_greedy(peft_model, tok, item["prompt"], 16)
    assert {p.name: p.read_bytes() for p in adapter.iterdir()} == snapshot  # adapter untouched
    assert os.path.isdir(adapter)
