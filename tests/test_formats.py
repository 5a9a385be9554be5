"""Prompt formats (``looper.data.formats``): the chat format on three template styles written
into the offline tiny tokenizer (ChatML as Qwen has it, Llama 3 headers, Mistral ``[INST]``),
the prompt/completion boundary against the whole rendered conversation, the end-of-turn
token that ends completions and stops generation, the errors, and the template format
staying exactly as it was."""

from __future__ import annotations

import shutil

import pytest

from looper.config import ConfigError, DataConfig, load_config
from looper.data import formats
from looper.data.formats import ChatFormat, TemplateFormat
from looper.data.gsm8k import format_completion, format_prompt
from looper.data.synthetic import generate_problems
from looper.data.tokenize import IGNORE_INDEX, encode_example, encode_pair, encode_sft_rows
from looper.io import DataError
from looper.models import load_tokenizer

BIG = 10_000

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported') }}{% endif %}{% endfor %}"
)
# name: (template, special tokens to add, end-of-turn suffix, end-of-turn token, renders BOS)
STYLES = {
    "chatml": (CHATML, ["<|im_start|>", "<|im_end|>"], "<|im_end|>\n", "<|im_end|>", False),
    "llama3": (LLAMA3, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "<|eot_id|>", "<|eot_id|>", True),
    "mistral": (MISTRAL, ["[INST]", "[/INST]"], "</s>", "</s>", True),
}


def chat_tokenizer(model_dir, style: str, template: str = None):
    tok = load_tokenizer(str(model_dir))
    chat, specials = STYLES[style][:2]
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.chat_template = template or chat
    return tok


@pytest.fixture(scope="module")
def problems() -> list[dict]:
    return generate_problems(12, seed=11)


def pieces(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


# --------------------------------------------------------------------------- chat format


@pytest.mark.parametrize("style", sorted(STYLES))
def test_chat_boundary_equals_the_whole_conversation(tiny_model_dir, problems, style):
    tok = chat_tokenizer(tiny_model_dir, style)
    _, _, suffix, eot, renders_bos = STYLES[style]
    fmt = formats.resolve(tok, DataConfig(prompt_format="chat"))
    assert isinstance(fmt, ChatFormat) and fmt.end_of_turn == suffix
    assert fmt.end_of_turn_id == tok.convert_tokens_to_ids(eot)
    for p in problems:
        prompt = fmt.prompt(p["question"])
        assert prompt == tok.apply_chat_template(
            [{"role": "user", "content": p["question"].strip()}], tokenize=False, add_generation_prompt=True)
        completion = format_completion(p["answer"])
        messages = fmt.messages(p["question"])
        conversation = tok.apply_chat_template(
            messages + [{"role": "assistant", "content": completion}], tokenize=False)
        e = encode_example(tok, prompt, completion, BIG, "truncate", f"{p['question_id']}: ", fmt, messages)
        # prompt + completion tokens are the whole conversation's tokens, split at the prompt
        assert e.input_ids == pieces(tok, conversation), p["question_id"]
        assert e.input_ids[: e.prompt_len] == pieces(tok, prompt)
        assert e.labels == [IGNORE_INDEX] * e.prompt_len + e.input_ids[e.prompt_len:]
        # BOS exactly once when the template renders it, never added (this tokenizer adds none itself)
        assert e.input_ids.count(tok.bos_token_id) == (1 if renders_bos else 0)
        assert (e.input_ids[0] == tok.bos_token_id) == renders_bos


@pytest.mark.parametrize("style", sorted(STYLES))
def test_chat_completion_ends_with_the_end_of_turn_token(tiny_model_dir, problems, style):
    tok = chat_tokenizer(tiny_model_dir, style)
    _, _, suffix, eot, _ = STYLES[style]
    fmt = formats.resolve(tok, DataConfig(prompt_format="chat"))
    eot_id = tok.convert_tokens_to_ids(eot)
    for p in problems[:4]:
        text = format_completion(p["answer"])
        c = formats.completion_ids(tok, text, DataConfig(prompt_format="chat"))
        assert c == fmt.completion_ids(text) == pieces(tok, text + suffix)
        body = pieces(tok, text)
        assert c[: len(body)] == body and c[len(body)] == eot_id  # the turn ends right after the text
        assert c.count(tok.eos_token_id) == (1 if eot == "</s>" else 0)  # no EOS appended after the turn
        prompt = fmt.prompt(p["question"])
        pair = encode_pair(tok, prompt, text, "No idea.", BIG, "truncate", fmt=fmt)
        assert pair.chosen_ids == c and pair.rejected_ids == fmt.completion_ids("No idea.")  # DPO encodes as SFT
        assert pair.prompt_ids == fmt.prompt_ids(prompt)


def test_system_prompt_goes_first_and_a_template_that_refuses_it_is_named(tiny_model_dir, problems):
    tok = chat_tokenizer(tiny_model_dir, "chatml")
    fmt = formats.resolve(tok, DataConfig(prompt_format="chat", system_prompt="Be brief."))
    q = problems[0]["question"]
    assert fmt.prompt(q).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert fmt.messages(q)[0] == {"role": "system", "content": "Be brief."}
    completion = format_completion(problems[0]["answer"])
    p, c = fmt.encode(fmt.prompt(q), completion, "q0: ", fmt.messages(q))
    assert p + c == pieces(tok, tok.apply_chat_template(fmt.messages(q) + [{"role": "assistant", "content": completion}],
                                                        tokenize=False))
    with pytest.raises(ConfigError, match="data.system_prompt"):
        formats.resolve(chat_tokenizer(tiny_model_dir, "mistral"), DataConfig(prompt_format="chat", system_prompt="Hi."))


def test_a_shifted_boundary_is_an_error_naming_the_example(tiny_model_dir, problems):
    # the generation prompt ends inside a word: "...assistant\nA" + "nswer ..." tokenizes as "An" "s" ...
    merging = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + ('A' if m['role'] == 'assistant' else '') "
        "+ m['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\nA' }}{% endif %}"
    )
    tok = chat_tokenizer(tiny_model_dir, "chatml", template=merging)
    fmt = formats.resolve(tok, DataConfig(prompt_format="chat"))
    p = problems[0]
    with pytest.raises(DataError, match=f"row {p['question_id']}: .*boundary shifts"):
        encode_sft_rows(tok, [{"question_id": p["question_id"], "prompt": fmt.prompt(p["question"]),
                               "completion": "nswer: " + format_completion(p["answer"]),
                               "messages": fmt.messages(p["question"])}], BIG, "truncate")
    with pytest.raises(DataError, match="pairs.jsonl:3: .*boundary shifts"):
        encode_pair(tok, fmt.prompt(p["question"]), "n 4", "n 5", BIG, "truncate", "pairs.jsonl:3: ", fmt=fmt)


def test_a_template_that_changes_the_completion_is_an_error(tiny_model_dir, problems):
    tok = chat_tokenizer(tiny_model_dir, "llama3")  # trims the content
    fmt = formats.resolve(tok, DataConfig(prompt_format="chat"))
    p = problems[0]
    with pytest.raises(DataError, match=f"{p['question_id']}: the chat template renders this conversation differently"):
        fmt.encode(fmt.prompt(p["question"]), "The answer is 4.\n", f"{p['question_id']}: ", fmt.messages(p["question"]))


def test_a_tokenizer_without_a_chat_template_is_a_config_error(tiny_model_dir, tmp_path, monkeypatch):
    tok = load_tokenizer(str(tiny_model_dir))
    assert not tok.chat_template
    with pytest.raises(ConfigError, match="data.prompt_format"):
        formats.resolve(tok, DataConfig(prompt_format="chat"))
    cfg = load_config(None, [f"run.output_dir={tmp_path / 'run'}", f"model.name_or_path={tiny_model_dir}",
                             "data.prompt_format=chat", "run.device=cpu"])

    import looper.models as models
    from looper.loops.sft import load_sft_rows

    def no_weights(*args, **kwargs):
        raise AssertionError("model weights loaded before the prompt format was checked")

    monkeypatch.setattr(models, "load_base_model", no_weights)
    with pytest.raises(ConfigError, match="data.prompt_format.*no chat template"):
        models.load_for_generation(cfg, None, "cpu")
    with pytest.raises(ConfigError, match="data.prompt_format.*no chat template"):
        load_sft_rows(cfg)


def test_config_keys_are_checked(tmp_path):
    base = [f"run.output_dir={tmp_path}"]
    assert load_config(None, base).data.prompt_format == "template"
    assert load_config(None, base + ["data.prompt_format=chat", "data.system_prompt=Be brief."]).data.system_prompt == "Be brief."
    with pytest.raises(ConfigError, match="prompt_format"):
        load_config(None, base + ["data.prompt_format=chatml"])
    with pytest.raises(ConfigError, match="system_prompt is set but prompt_format is 'template'"):
        load_config(None, base + ["data.system_prompt=Be brief."])
    with pytest.raises(ConfigError, match="data.system_prompt must be null or a non-empty string"):
        load_config(None, base + ["data.prompt_format=chat", "data.system_prompt=' '"])


def test_stage_settings_compare_the_prompt_format(tmp_path):
    from looper.fingerprint import changes, stage_settings

    a = load_config(None, [f"run.output_dir={tmp_path}"])
    b = load_config(None, [f"run.output_dir={tmp_path}", "data.prompt_format=chat", "data.system_prompt=Hi."])
    for stage in ("sft", "base", "rollout", "eval"):
        keys = {k for k, _, _ in changes(stage_settings(a, stage), stage_settings(b, stage))}
        assert keys == {"data.prompt_format", "data.system_prompt"}, stage


# --------------------------------------------------------------------------- generation


@pytest.fixture(scope="module")
def chat_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with a ChatML tokenizer and its embeddings grown for the new tokens."""
    from looper.models import load_base_model

    out = tmp_path_factory.mktemp("chat_model") / "model"
    shutil.copytree(tiny_model_dir, out)
    tok = chat_tokenizer(tiny_model_dir, "chatml")
    tok.save_pretrained(str(out))
    model = load_base_model(str(tiny_model_dir))
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(str(out), safe_serialization=True)
    return out


def always_emit(model, token_id: int) -> None:
    """Make the LM head put (almost) all mass on ``token_id``, in memory."""
    def hook(module, args, output):
        output = output.clone()
        output[..., token_id] += 1e4
        return output

    model.get_output_embeddings().register_forward_hook(hook)


def test_generation_stops_on_the_end_of_turn_token(chat_model_dir, problems, tmp_path):
    from looper.config import GenerationConfig
    from looper.engine import _eos_ids, generate
    from looper.models import load_for_generation

    def loaded(fmt_key: str):
        cfg = load_config(None, [f"run.output_dir={tmp_path / 'run'}", f"model.name_or_path={chat_model_dir}",
                                 f"data.prompt_format={fmt_key}", "run.device=cpu"])
        return cfg, *load_for_generation(cfg, None, "cpu")

    cfg, model, tok = loaded("chat")
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    always_emit(model, eot)
    assert eot in _eos_ids(model, tok) and tok.eos_token_id in _eos_ids(model, tok)
    fmt = formats.resolve(tok, cfg.data)
    items = [{"question_id": p["question_id"], "prompt_ids": fmt.prompt_ids(fmt.prompt(p["question"]))}
             for p in problems[:3]]
    gen = GenerationConfig(max_new_tokens=6, temperature=0.0)
    for _, samples in generate(model, tok, items, gen):
        assert samples[0]["finished"] and samples[0]["num_tokens"] == 0 and samples[0]["text"] == ""

    _, model, tok = loaded("template")  # the template format does not stop on it
    assert eot not in _eos_ids(model, tok)
    always_emit(model, eot)
    for _, samples in generate(model, tok, items, gen):
        assert not samples[0]["finished"] and samples[0]["num_tokens"] == 6


def test_rollout_and_eval_records_store_the_chat_prompt_as_sent(chat_model_dir, tmp_path):
    from conftest import read_jsonl
    from looper.loops.evaluate import evaluate
    from looper.loops.rollout import collect_rollouts

    cfg = load_config(None, [
        f"run.output_dir={tmp_path / 'run'}", f"model.name_or_path={chat_model_dir}", "run.device=cpu",
        "run.progress=false", "data.prompt_format=chat", "data.system_prompt=Be brief.",
        "data.synthetic.n_test=3", "eval.generation.max_new_tokens=4",
        "rollout.adapter=none", "rollout.n_questions=2", "rollout.k=2", "rollout.generation.max_new_tokens=4",
    ])
    evaluate(cfg)
    collect_rollouts(cfg)
    fmt = formats.resolve(load_tokenizer(str(chat_model_dir)), cfg.data)
    evals = read_jsonl(tmp_path / "run" / "outputs" / "base_eval.jsonl")
    rollouts = read_jsonl(tmp_path / "run" / "data" / "rollouts.jsonl")
    assert len(evals) == 3 and len(rollouts) == 2
    for r in evals + rollouts:
        assert r["prompt"] == fmt.prompt(r["question"])
        assert r["prompt"].startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")


def test_sft_rows_in_the_chat_format(chat_model_dir, tmp_path):
    from looper.loops.sft import load_sft_examples, load_sft_rows

    cfg = load_config(None, [f"run.output_dir={tmp_path / 'run'}", f"model.name_or_path={chat_model_dir}",
                             "data.prompt_format=chat", "data.synthetic.n_train=10", "sft.val_size=2"])
    rows = load_sft_rows(cfg)
    tok = load_tokenizer(str(chat_model_dir))
    fmt = formats.resolve(tok, cfg.data)
    assert all(r["prompt"] == fmt.prompt(r["messages"][-1]["content"]) for r in rows)
    train, val, _ = load_sft_examples(cfg, tok, rows=rows)
    assert len(train) == 8 and len(val) == 2
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    for e in train + val:
        completion = e.input_ids[e.prompt_len:]
        assert completion[-2:] == [eot] + pieces(tok, "\n")  # "<|im_end|>\n"
        assert tok.eos_token_id not in e.input_ids and tok.bos_token_id not in e.input_ids


# --------------------------------------------------------------------------- template format


def test_template_format_is_unchanged(tiny_model_dir, problems, tmp_path):
    tok = load_tokenizer(str(tiny_model_dir))
    tok.chat_template = CHATML  # a chat template present does not matter to the template format
    fmt = formats.resolve(tok, DataConfig())
    assert isinstance(fmt, TemplateFormat) and fmt.stop_ids == () and fmt.messages("q") is None
    custom = formats.resolve(None, DataConfig(prompt_template="Q: {question}\nA:"))
    for p in problems:
        q, a = p["question"], format_completion(p["answer"])
        assert fmt.prompt(q) == format_prompt(q) == f"Question:\n{q.strip()}\nAnswer:\nLet's think step by step.\n"
        assert formats.format_prompt(q, None, DataConfig()) == format_prompt(q)
        assert custom.prompt(q) == format_prompt(q, "Q: {question}\nA:")
        ids = [tok.bos_token_id] + pieces(tok, fmt.prompt(q))
        assert fmt.prompt_ids(fmt.prompt(q)) == ids == formats.prompt_ids(tok, fmt.prompt(q))
        assert fmt.completion_ids(a) == pieces(tok, a) + [tok.eos_token_id]
        plain = encode_example(tok, fmt.prompt(q), a, BIG, "truncate")
        assert encode_example(tok, fmt.prompt(q), a, BIG, "truncate", fmt=fmt) == plain
        assert plain.input_ids == ids + pieces(tok, a) + [tok.eos_token_id]
        assert encode_pair(tok, fmt.prompt(q), a, "x", 64, "truncate", fmt=fmt) == \
            encode_pair(tok, fmt.prompt(q), a, "x", 64, "truncate")

    from looper.loops.sft import load_sft_rows

    cfg = load_config(None, [f"run.output_dir={tmp_path}", "data.synthetic.n_train=20"])
    from looper.data.gsm8k import load_questions

    old = [{"question_id": r["question_id"], "prompt": format_prompt(r["question"], cfg.data.prompt_template),
            "completion": format_completion(r["answer"], cfg.data.strip_calculator)}
           for r in load_questions(None, "train", cfg.data)]
    assert load_sft_rows(cfg) == old  # same rows, same keys: the SFT data digest is unchanged


# --------------------------------------------------------------------------- template variables

DATED_LLAMA3 = (  # Llama 3.x's templates write a date into the system header, today's by default
    "{{ bos_token }}{% if date_string is not defined %}{% set date_string = strftime_now('%d %b %Y') %}{% endif %}"
    "{{ '<|start_header_id|>system<|end_header_id|>\n\nToday Date: ' + date_string + '<|eot_id|>' }}"
    "{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def test_chat_template_kwargs_reach_every_rendering(tiny_model_dir, problems, tmp_path, monkeypatch):
    import datetime

    from looper.loops.sft import load_sft_examples, load_sft_rows

    tok = chat_tokenizer(tiny_model_dir, "llama3", DATED_LLAMA3)
    today = datetime.datetime.now().strftime("%d %b %Y")
    assert f"Today Date: {today}" in ChatFormat(tok).prompt("q")  # without it: the day it runs
    fixed = ChatFormat(tok, template_kwargs={"date_string": "26 Jul 2024"})
    assert "Today Date: 26 Jul 2024" in fixed.prompt("q") and today not in fixed.prompt("q")
    assert fixed.end_of_turn == "<|eot_id|>"
    # SFT rows: the prompt and the boundary check both render with the variables
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    tok.save_pretrained(str(model_dir))
    cfg = load_config(None, [f"run.output_dir={tmp_path / 'run'}", f"model.name_or_path={model_dir}",
                             "data.prompt_format=chat", "data.chat_template_kwargs={date_string: 26 Jul 2024}",
                             "data.synthetic.n_train=6", "sft.val_size=2"])
    rows = load_sft_rows(cfg)
    assert all("Today Date: 26 Jul 2024" in r["prompt"] for r in rows)
    saved = load_tokenizer(str(model_dir))
    train, val, _ = load_sft_examples(cfg, saved, rows=rows)  # each row checked against the whole conversation
    assert len(train) + len(val) == 6
    assert all("Today Date: 26 Jul 2024" in saved.decode(e.input_ids[:e.prompt_len]) for e in train + val)


def test_chat_template_kwargs_are_checked_and_compared(tmp_path):
    from looper.fingerprint import changes, stage_settings

    base = [f"run.output_dir={tmp_path}", "data.prompt_format=chat"]
    with pytest.raises(ConfigError, match="chat_template_kwargs is set but prompt_format is 'template'"):
        load_config(None, [f"run.output_dir={tmp_path}", "data.chat_template_kwargs={date_string: x}"])
    with pytest.raises(ConfigError, match="data.chat_template_kwargs: expected a mapping"):
        load_config(None, base + ["data.chat_template_kwargs=[1, 2]"])
    a = load_config(None, base)
    b = load_config(None, base + ["data.chat_template_kwargs={date_string: 26 Jul 2024}"])
    for stage in ("sft", "rollout", "dpo", "eval"):
        keys = {k for k, _, _ in changes(stage_settings(a, stage), stage_settings(b, stage))}
        assert keys and all(k.startswith("data.chat_template_kwargs") for k in keys), (stage, keys)
