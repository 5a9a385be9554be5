"""Every stage on tiny random models of the transformers families people post-train, built
offline from their configs (hidden 32, 2 layers, 4 query heads over 2 kv heads, the tiny
BPE tokenizer of ``tiny_model_dir``):

- Llama with grouped-query attention;
- Qwen2 (q/k/v projections with a bias), and Qwen2 with ``tie_word_embeddings=True``;
- Qwen3 (RMSNorm on q and k, ``head_dim`` apart from hidden/heads);
- Mistral (its default 4096-token sliding window, far beyond these runs);
- Phi-3 (fused ``qkv_proj`` and ``gate_up_proj``).

Per family: ``decoder_layers`` finds the blocks (bare, PEFT-wrapped, FSDP-sharded, and by
the ``nn.ModuleList`` fallback); ``all-linear`` LoRA wraps exactly the decoder projections
(never the LM head, tied or not); the engine's greedy decode of a merged adapter equals
PEFT + ``model.generate`` token for token; a few SFT steps, then a few DPO steps from that
SFT adapter, lower their losses. And the models the engine cannot serve (a sliding window
shorter than the run, attention sinks, softcapping) are refused before any decoding.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import build_overrides, read_jsonl

SHAPE = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=512,
)

# family -> (config class, extra config, LoRA all-linear targets inside each decoder layer)
ATTN = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"}
MLP = {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
FAMILIES = {
    "llama_gqa": ("LlamaConfig", {}, ATTN | MLP),
    "qwen2": ("Qwen2Config", {}, ATTN | MLP),
    "qwen3": ("Qwen3Config", {"head_dim": 16}, ATTN | MLP),
    "mistral": ("MistralConfig", {"sliding_window": 4096}, ATTN | MLP),
    "phi3": ("Phi3Config", {}, {"self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"}),
    "qwen2_tied": ("Qwen2Config", {"tie_word_embeddings": True}, ATTN | MLP),
}
PROMPT = "Question:\n{q}\nAnswer:\nLet's think step by step.\n"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def build_family(name: str, out_dir: Path, tokenizer, seed: int = 0, **extra) -> Path:
    """A random tiny model of ``name``'s family, saved with ``save_pretrained`` and the tokenizer."""
    import transformers

    from looper.models import quiet_transformers

    quiet_transformers()
    cls, family_extra, _ = FAMILIES[name]
    config = getattr(transformers, cls)(
        **SHAPE, **{**family_extra, **extra}, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


def random_adapter(model_dir: Path, out_dir: Path, seed: int) -> Path:
    """An all-linear r=4 LoRA adapter with non-zero B, so the adapter changes the outputs."""
    from looper.config import LoraConfig
    from looper.models import attach_lora, load_base_model

    torch.manual_seed(seed)
    model = attach_lora(load_base_model(str(model_dir)), LoraConfig(r=4, alpha=8))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.2)
    model.save_pretrained(str(out_dir))
    return out_dir


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from looper.models import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tokenizer, tmp_path_factory):
    name = request.param
    root = tmp_path_factory.mktemp(name)
    seed = list(FAMILIES).index(name)
    return SimpleNamespace(name=name, dir=build_family(name, root / "model", tokenizer, seed=seed), root=root,
                           targets=FAMILIES[name][2])


@pytest.fixture(scope="module")
def prompts():
    from looper.data.synthetic import generate_problems

    probs = generate_problems(4, seed=11)
    # different lengths, so left padding and the length-sorted batches matter
    return [{"question_id": f"q{i}", "prompt": PROMPT.format(q=p["question"][: 30 + 25 * i])}
            for i, p in enumerate(probs)]


def run_cfg(model_dir: Path, out: Path, **kw):
    from looper.config import load_config

    return load_config(None, build_overrides(out, model_dir, **kw))


# --------------------------------------------------------------------------- decoder layers


def test_decoder_layers_are_found_structurally(family):
    from torch.distributed.fsdp import FSDPModule

    from looper import dist
    from looper.config import LoraConfig
    from looper.models import attach_lora, decoder_layers, load_base_model

    model = load_base_model(str(family.dir))
    blocks = list(model.model.layers)
    assert [type(b).__name__ for b in blocks] == [f"{type(model).__name__[: -len('ForCausalLM')]}DecoderLayer"] * 2
    assert decoder_layers(model) == blocks
    peft = attach_lora(model, LoraConfig(r=4, alpha=8))
    assert decoder_layers(peft) == blocks  # through PeftModel -> LoraModel
    assert decoder_layers(peft.base_model) == blocks

    # the fallback, for a model that names no blocks: the ModuleList of num_hidden_layers blocks
    inner = peft.get_base_model()
    inner._no_split_modules = set()
    assert decoder_layers(peft) == blocks
    inner._no_split_modules = {"NoSuchLayer"}
    assert decoder_layers(peft) == blocks
    del inner._no_split_modules  # the class attribute again

    # FSDP2 per-layer wrapping goes through it, and it still finds the (renamed) sharded blocks
    env = dist.init_distributed("cpu")
    sharded = dist.shard_model(peft, decoder_layers(peft), env.device)
    layers = decoder_layers(sharded)
    assert layers == blocks and all(isinstance(b, FSDPModule) for b in layers)
    assert type(layers[0]).__name__.startswith("FSDP")


# --------------------------------------------------------------------------- LoRA targets


def test_all_linear_lora_targets_the_decoder_projections(family):
    from peft.tuners.lora import LoraLayer

    from looper.config import LoraConfig
    from looper.models import attach_lora, decoder_layers, load_base_model

    base = load_base_model(str(family.dir))
    tied = base.config.tie_word_embeddings
    assert (base.lm_head.weight is base.model.embed_tokens.weight) == tied == (family.name == "qwen2_tied")
    model = attach_lora(base, LoraConfig(r=4, alpha=8))  # the default target: all-linear
    wrapped = {n for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    per_layer = []
    for layer in decoder_layers(model):
        per_layer.append({n for n, m in layer.named_modules() if isinstance(m, LoraLayer)})
    assert per_layer == [family.targets] * 2, f"{family.name}: LoRA on {per_layer}"
    assert len(wrapped) == 2 * len(family.targets)  # nothing outside the decoder layers
    inner = model.get_base_model()
    assert type(inner.lm_head) is torch.nn.Linear and type(inner.model.embed_tokens) is torch.nn.Embedding
    assert not any("lm_head" in n or "embed" in n for n, p in model.named_parameters() if p.requires_grad)
    if tied:  # LoRA leaves the tie alone, also once merged
        assert inner.lm_head.weight is inner.model.embed_tokens.weight
        merged = model.merge_and_unload()
        assert merged.lm_head.weight is merged.model.embed_tokens.weight


# --------------------------------------------------------------------------- generation


def test_engine_greedy_matches_peft_generate(family, prompts, tmp_path):
    from peft import PeftModel

    from generation_helpers import _hf_greedy, _with_eos
    from looper.config import GenerationConfig
    from looper.engine import generate
    from looper.models import load_base_model, load_for_generation

    adapter = random_adapter(family.dir, tmp_path / "lora", seed=7)
    cfg = run_cfg(family.dir, tmp_path / "run")
    model, tok = load_for_generation(cfg, str(adapter), "cpu")  # base + adapter merged, as the stages serve it
    gen = GenerationConfig(max_new_tokens=24, temperature=0.0, batch_size=8)
    results = generate(model, tok, prompts, gen)
    reference = PeftModel.from_pretrained(load_base_model(str(family.dir)), str(adapter)).eval()
    base = load_base_model(str(family.dir)).eval()
    adapter_mattered = False
    for item, samples in results:
        ours = _with_eos(samples[0], tok.eos_token_id)
        assert ours == _hf_greedy(reference, tok, item["prompt"], 24), f"{family.name} {item['question_id']}"
        adapter_mattered |= ours != _hf_greedy(base, tok, item["prompt"], 24)
    assert adapter_mattered, "the adapter changed no output: the comparison proves nothing"
    assert len({tuple(s[0]["token_ids"]) for _, s in results}) > 1


def _tiny_unsupported(name: str):
    """Random tiny models of families the engine refuses, built from their configs."""
    import transformers

    common = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=256)
    if name == "gemma2_softcap":
        config = transformers.Gemma2Config(**common, attn_logit_softcapping=50.0, sliding_window=128)
    elif name == "gpt_oss_sinks":
        config = transformers.GptOssConfig(**common, num_local_experts=2, num_experts_per_tok=1, sliding_window=128)
    else:
        raise KeyError(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return transformers.AutoModelForCausalLM.from_config(config).eval()


def _no_decoding(monkeypatch):
    import looper.engine as engine

    def refuse(*a, **k):
        raise AssertionError("decoding started before the model was checked")

    monkeypatch.setattr(engine, "_decode", refuse)


def test_engine_refuses_a_sliding_window_shorter_than_the_run(tokenizer, prompts, tmp_path, monkeypatch):
    from generation_helpers import _hf_greedy, _with_eos
    from looper.config import ConfigError, GenerationConfig
    from looper.data.tokenize import encode_prompt
    from looper.engine import UnsupportedModelError, check_supported, generate
    from looper.generation import run_generation
    from looper.models import load_base_model

    longest = max(len(encode_prompt(tokenizer, p["prompt"])) for p in prompts)
    window = longest + 8
    mistral = load_base_model(str(build_family("mistral", tmp_path / "mistral", tokenizer, sliding_window=window)))
    fits = GenerationConfig(max_new_tokens=8, temperature=0.0)  # prompt + new tokens = the window: served
    for item, samples in generate(mistral, tokenizer, prompts, fits):  # and HF's windowed mask agrees
        assert _with_eos(samples[0], tokenizer.eos_token_id) == _hf_greedy(mistral, tokenizer, item["prompt"], 8)

    _no_decoding(monkeypatch)
    too_long = GenerationConfig(max_new_tokens=9, temperature=0.0)
    msg = rf"MistralForCausalLM.*prompt \+ max_new_tokens = {window + 1} tokens exceeds its sliding_window={window}"
    with pytest.raises(UnsupportedModelError, match=msg) as err:
        generate(mistral, tokenizer, prompts, too_long)
    assert isinstance(err.value, ConfigError)  # the CLI prints it as a clean error
    out = tmp_path / "rollouts.jsonl"
    with pytest.raises(NotImplementedError, match=msg):  # run_generation: before any file is touched
        run_generation(mistral, tokenizer, prompts, too_long, 1, str(out), lambda it, s: {"question_id": it["question_id"]},
                       progress=False)
    assert list(tmp_path.glob("rollouts.jsonl*")) == []  # nothing written

    # Qwen2's window applies only to the layers from max_window_layers on (its layer_types)
    import transformers

    def qwen2(max_window_layers):
        cfg = transformers.Qwen2Config(**SHAPE, vocab_size=64, use_sliding_window=True, sliding_window=16,
                                       max_window_layers=max_window_layers)
        return transformers.AutoModelForCausalLM.from_config(cfg)

    check_supported(qwen2(2), total_len=100)  # no layer slides
    with pytest.raises(UnsupportedModelError, match="sliding_window=16"):
        check_supported(qwen2(1), total_len=100)
    check_supported(qwen2(1), total_len=16)


@pytest.mark.parametrize("name, reason", [
    ("gemma2_softcap", r"softcapping \(attn_logit_softcapping=50.0\)"),
    ("gpt_oss_sinks", r"attention sinks"),
])
def test_engine_refuses_sinks_and_softcapping(name, reason, monkeypatch):
    from looper.config import GenerationConfig
    from looper.engine import UnsupportedModelError, check_supported, generate

    model = _tiny_unsupported(name)
    with pytest.raises(UnsupportedModelError, match=reason):
        check_supported(model)  # whatever the length
    _no_decoding(monkeypatch)
    tok = SimpleNamespace(eos_token_id=1, pad_token_id=0)
    items = [{"question_id": "q0", "prompt_ids": [2, 3, 4]}]
    with pytest.raises(UnsupportedModelError, match=reason):
        generate(model, tok, items, GenerationConfig(max_new_tokens=4, temperature=0.0), device="cpu")


# --------------------------------------------------------------------------- SFT and DPO


@pytest.fixture(scope="module")
def sft_run(family):
    """A few SFT steps (LoRA r=4) through ``train_sft`` on four synthetic rows, every step the same
    rows, so the losses compare; activation checkpointing on, as on a large model."""
    from looper.layout import RunLayout
    from looper.loops.sft import train_sft

    cfg = run_cfg(
        family.dir, family.root / "run", data__synthetic__n_train=4, sft__val_size=0, sft__batch_size=4,
        sft__max_steps=4, sft__lr=1e-2, sft__schedule="constant", sft__activation_checkpointing=True,
    )
    result = train_sft(cfg)
    return SimpleNamespace(cfg=cfg, result=result, metrics=read_jsonl(RunLayout.of(cfg).metrics("sft")))


def test_sft_steps_lower_the_loss(family, sft_run):
    losses = [r["loss"] for r in sft_run.metrics]
    assert sft_run.result.steps == 4 and len(losses) == 4
    # on these four rows: about 5.7 (log 300) down by 0.07-0.11 in three updates
    assert all(l < losses[0] for l in losses[1:]) and losses[-1] < losses[0] - 0.03, f"{family.name}: SFT {losses}"
    saved = json.loads((Path(sft_run.result.output_dir) / "adapter_config.json").read_text())
    short = {t.rsplit(".", 1)[-1] for t in family.targets}
    assert {t.rsplit(".", 1)[-1] for t in saved["target_modules"]} == short  # the same projections, saved


def write_pairs(path: Path) -> Path:
    """Four pairs by hand: chosen is the worked answer, rejected a wrong one."""
    rows = [
        ("Tom has 3 apples and buys 4 more. How many apples does he have?",
         "Tom has 3 + 4 = <<3+4=7>>7 apples.\n#### 7", "Tom has 3 - 4 = 1 apples.\n#### 1"),
        ("A box holds 5 pens. How many pens are in 2 boxes?",
         "2 boxes hold 2 * 5 = <<2*5=10>>10 pens.\n#### 10", "2 boxes hold 5 pens.\n#### 5"),
        ("Sara had 9 stickers and gave away 6. How many are left?",
         "She has 9 - 6 = <<9-6=3>>3 stickers left.\n#### 3", "She has 9 + 6 = 15 stickers.\n#### 15"),
        ("Each of 4 kids has 2 balls. How many balls in all?",
         "There are 4 * 2 = <<4*2=8>>8 balls.\n#### 8", "There are 4 + 2 = 6 balls.\n#### 6"),
    ]
    path.write_text("".join(
        json.dumps({"pair_id": f"p{i}", "prompt": PROMPT.format(q=q), "chosen": c, "rejected": r}) + "\n"
        for i, (q, c, r) in enumerate(rows)
    ))
    return path


def test_dpo_steps_from_the_sft_adapter_lower_the_loss(family, sft_run):
    import math

    from looper.layout import RunLayout
    from looper.loops.dpo import train_dpo

    pairs = write_pairs(family.root / "pairs.jsonl")
    cfg = run_cfg(
        family.dir, family.root / "run", dpo__adapter=sft_run.result.output_dir, dpo__pairs=str(pairs),
        dpo__batch_size=4, dpo__grad_accum=1, dpo__max_steps=4, dpo__lr=1e-2, dpo__schedule="constant",
        dpo__val_size=0,
    )
    result = train_dpo(cfg)
    losses = [r["loss"] for r in read_jsonl(RunLayout.of(cfg).metrics("dpo"))]
    assert result.steps == 4 and len(losses) == 4 and result.reference == "computed"
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4)  # the policy starts as its reference
    # log 2 down by 0.06-0.12 in three updates
    assert all(l < losses[0] for l in losses[1:]) and losses[-1] < losses[0] - 0.02, f"{family.name}: DPO {losses}"


# --------------------------------------------------------------------------- packed DPO rows


def test_packed_pairs_give_the_concatenated_log_probs(family, tokenizer):
    """``prompt | chosen | rejected`` in one row (``dpo.packed``) scores each completion as
    its own ``prompt | completion`` row does, with chosen and rejected of very different
    lengths, with and without LoRA (dropout off: eval mode)."""
    from peft import PeftModel

    from looper.data.tokenize import PairEncoded
    from looper.loops.dpo import pair_batch, pair_logps
    from looper.models import load_base_model

    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    long = ids("She has 9 - 6 = <<9-6=3>>3 stickers left, and then she buys 12 more, so 3 + 12 = 15.\n#### 15")
    pairs = [
        PairEncoded([tokenizer.bos_token_id] + ids(PROMPT.format(q="Tom has 3 apples.")), ids("#### 7"), long, False),
        PairEncoded([tokenizer.bos_token_id] + ids(PROMPT.format(q="A box holds 5 pens. How many in 2 boxes?")),
                    long, ids("5"), False),
        PairEncoded(ids("Q: 2 + 2?"), ids("4"), ids("5"), False),  # no BOS, one-token completions
    ]
    adapter = random_adapter(family.dir, family.root / "packed_adapter", seed=5)
    base = load_base_model(str(family.dir)).eval()
    for model in (base, PeftModel.from_pretrained(load_base_model(str(family.dir)), str(adapter)).eval()):
        with torch.no_grad():
            plain = pair_logps(model, pair_batch(pairs, tokenizer.pad_token_id, False, "cpu"), len(pairs))
            packed = pair_logps(model, pair_batch(pairs, tokenizer.pad_token_id, True, "cpu"), len(pairs))
        for a, b in zip(plain, packed):
            # 1e-5, plus 1e-6 relative for the long sums: fp32's step at 400 nats is 3e-5
            assert torch.allclose(a, b, rtol=1e-6, atol=1e-5), f"{family.name}: {a.tolist()} vs {b.tolist()}"
        assert plain[0].abs().min() > 1  # real log-probs, not zeros
