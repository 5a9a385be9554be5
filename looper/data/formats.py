"""Prompt formats: how a question becomes a prompt and a completion becomes tokens.

Every stage formats through this module (SFT rows, rollout and eval prompts, DPO pairs),
so a prompt is written and tokenized the same way wherever it appears.
``resolve(tokenizer, data_cfg)`` gives the format object of ``data.prompt_format``:

- ``template`` (:class:`TemplateFormat`, the default): the prompt is
  ``data.prompt_template`` filled with the question (``looper.data.gsm8k.format_prompt``);
  its tokens are BOS + the text's tokens (``looper.data.tokenize.encode_prompt``) and a
  completion's are its text's tokens + EOS (``encode_completion``), each tokenized on its own.
- ``chat`` (:class:`ChatFormat`): the prompt is the tokenizer's chat template applied to
  ``[{"role": "system", ...} (data.system_prompt, when set), {"role": "user", "content":
  question}]`` with ``add_generation_prompt=True``. A completion is the assistant turn: its
  text followed by the template's end-of-turn text (``<|im_end|>\\n`` for ChatML,
  ``<|eot_id|>`` for Llama 3, ``</s>`` for Mistral), tokenized together; no EOS is added
  after it. Generation stops on the end-of-turn token (``stop_ids``).

The chat end-of-turn text is read off the template itself: the conversation is rendered
with and without an assistant message ``X`` (``add_generation_prompt=False`` for the
former), and what follows ``X`` in the full rendering is the suffix. It must hold a special
token, the first of which is the one generation stops on.

Chat BOS: the prompt's tokens are ``tokenizer(text, add_special_tokens=False)``, plus BOS
in front only when the tokenizer puts one before any text by itself and the template did
not render it (so never twice).

Chat boundary: for every example, prompt tokens + completion tokens must equal the
tokens of the whole rendered conversation (prompt, completion and end-of-turn text in one
string), or ``encode`` raises ``DataError`` naming the example: a tokenizer that merges
across the boundary, or a template that changes the assistant's text (trimming it, say),
is reported and never shifted silently. Rows that carry their ``messages`` are checked
against a fresh rendering of the conversation too.

This module imports no torch; the template format's token functions are imported from
``looper.data.tokenize`` when first used.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

from looper.config import ABEL_PROMPT, ConfigError, DataConfig
from looper.data.gsm8k import format_prompt as fill_template
from looper.io import DataError

__all__ = [
    "TemplateFormat",
    "ChatFormat",
    "PromptFormat",
    "resolve",
    "format_prompt",
    "prompt_ids",
    "completion_ids",
    "add_stop_ids",
]

# the assistant text rendered to find the end-of-turn suffix: no whitespace at its ends,
# so a template that trims the content leaves it whole
SENTINEL = "looper-assistant-sentinel-7f3a"
_PROBE_QUESTION = "What is 1 + 1?"


class TemplateFormat:
    """``data.prompt_format: template``: ``data.prompt_template`` as plain text."""

    kind = "template"
    stop_ids: tuple[int, ...] = ()

    def __init__(self, tokenizer=None, template: str = ABEL_PROMPT):
        self.tokenizer = tokenizer  # needed for the token functions only
        self.template = template

    def messages(self, question: str) -> None:
        return None

    def prompt(self, question: str) -> str:
        return fill_template(question, self.template)

    def prompt_ids(self, prompt: str) -> list[int]:
        from looper.data.tokenize import encode_prompt

        return encode_prompt(self.tokenizer, prompt)

    def completion_ids(self, text: str) -> list[int]:
        from looper.data.tokenize import encode_completion

        return encode_completion(self.tokenizer, text)

    def encode(self, prompt: str, completion: str, where: str = "", messages=None) -> tuple[list[int], list[int]]:
        """``(prompt ids, completion ids)``, each tokenized on its own (no boundary to check)."""
        return self.prompt_ids(prompt), self.completion_ids(completion)


class ChatFormat:
    """``data.prompt_format: chat``: the tokenizer's chat template (see the module docstring).

    Raises ``ConfigError`` (naming ``data.prompt_format`` or ``data.system_prompt``) when
    the tokenizer has no chat template, the template fails to render, or its assistant turn
    cannot be split into the generated text and an end-of-turn suffix with a special token.
    """

    kind = "chat"

    def __init__(self, tokenizer, system_prompt: Optional[str] = None, template_kwargs: Optional[dict] = None):
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.template_kwargs = dict(template_kwargs or {})  # data.chat_template_kwargs
        self.name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                f"data.prompt_format is 'chat' but the tokenizer of {self.name} has no chat template; "
                "use data.prompt_format: template, or a model whose tokenizer defines chat_template"
            )
        msgs = self.messages(_PROBE_QUESTION)
        prompt = self._render(msgs, generation_prompt=True)
        full = self._render(msgs + [{"role": "assistant", "content": SENTINEL}], generation_prompt=False)
        self.end_of_turn = self._suffix(prompt, full)
        self.end_of_turn_id = self._end_of_turn_id(self.end_of_turn)
        self.stop_ids = (self.end_of_turn_id,)
        self.bos_id = self._own_bos()

    # ------------------------------------------------------------------ setup

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation_prompt, **self.template_kwargs
            )
        except Exception as e:  # jinja2 errors: a template that refuses a system role, say
            key = "data.system_prompt" if self.system_prompt is not None else "data.prompt_format"
            raise ConfigError(
                f"{key}: the chat template of {self.name} fails on a "
                f"[{', '.join(m['role'] for m in messages)}] conversation: {type(e).__name__}: {e}"
            ) from None
        if not isinstance(text, str):
            raise ConfigError(f"data.prompt_format: the chat template of {self.name} rendered {type(text).__name__}, not text")
        return text

    def _suffix(self, prompt: str, full: str) -> str:
        where = f"data.prompt_format: the chat template of {self.name}"
        if not full.startswith(prompt):
            raise ConfigError(
                f"{where} renders a finished conversation that does not begin with its generation prompt "
                f"(generation prompt ends {prompt[-60:]!r}; the conversation has {full[max(0, len(prompt) - 60):len(prompt) + 20]!r} "
                "there), so a completion cannot be appended to the prompt"
            )
        rest = full[len(prompt):]
        if not rest.startswith(SENTINEL):
            at = rest.find(SENTINEL)
            gap = rest[:at] if at >= 0 else rest[:60]
            raise ConfigError(
                f"{where} puts {gap!r} between the generation prompt and the assistant's text "
                f"(or drops the text); looper needs the assistant turn to be the generated text followed by "
                "an end-of-turn suffix"
            )
        suffix = rest[len(SENTINEL):]
        if not suffix:
            raise ConfigError(f"{where} ends an assistant turn with nothing; generation would have no token to stop on")
        return suffix

    def _special_ids(self) -> set[int]:
        ids = set(getattr(self.tokenizer, "all_special_ids", []) or [])
        added = getattr(self.tokenizer, "added_tokens_decoder", None) or {}
        ids.update(i for i, t in added.items() if getattr(t, "special", False))
        return ids

    def _end_of_turn_id(self, suffix: str) -> int:
        ids = self.tokenizer(suffix, add_special_tokens=False)["input_ids"]
        special = self._special_ids()
        for i in ids:
            if i in special:
                return i
        raise ConfigError(
            f"data.prompt_format: the chat template of {self.name} ends an assistant turn with {suffix!r}, "
            "which holds no special token for generation to stop on"
        )

    def _own_bos(self) -> Optional[int]:
        """BOS when the tokenizer puts it before any text by itself, else None."""
        bos = self.tokenizer.bos_token_id
        if bos is None:
            return None
        probe = self.tokenizer("a")["input_ids"]
        return bos if probe and probe[0] == bos else None

    # ------------------------------------------------------------------ text

    def messages(self, question: str) -> list[dict]:
        """The conversation the prompt renders: the system message (when set) and the question."""
        msgs = [] if self.system_prompt is None else [{"role": "system", "content": self.system_prompt}]
        return msgs + [{"role": "user", "content": question.strip()}]

    def prompt(self, question: str) -> str:
        return self._render(self.messages(question), generation_prompt=True)

    def conversation(self, messages: list[dict], completion: str) -> str:
        """The whole conversation with ``completion`` as the assistant's answer."""
        return self._render(list(messages) + [{"role": "assistant", "content": completion}], generation_prompt=False)

    # ------------------------------------------------------------------ tokens

    def text_ids(self, text: str) -> list[int]:
        """Tokens of rendered text: its own tokens, BOS in front only as described above."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        bos_text = self.tokenizer.bos_token
        if self.bos_id is not None and not (bos_text and text.startswith(bos_text)) and ids[:1] != [self.bos_id]:
            ids = [self.bos_id] + ids
        return ids

    def prompt_ids(self, prompt: str) -> list[int]:
        return self.text_ids(prompt)

    def completion_ids(self, text: str) -> list[int]:
        """The assistant turn: ``text`` + the end-of-turn suffix, tokenized together."""
        return self.tokenizer(text + self.end_of_turn, add_special_tokens=False)["input_ids"]

    def encode(
        self, prompt: str, completion: str, where: str = "", messages: Optional[list[dict]] = None
    ) -> tuple[list[int], list[int]]:
        """``(prompt ids, completion ids)``, checked against the whole conversation.

        With ``messages`` (the conversation before the answer) the conversation is rendered
        afresh and must read ``prompt + completion + end-of-turn``; without them (DPO pairs,
        which carry the prompt text) it is that string. Either way its tokens must be the
        prompt's followed by the completion's, or ``DataError`` names ``where``.
        """
        full_text = prompt + completion + self.end_of_turn
        if messages is not None:
            rendered = self.conversation(messages, completion)
            if rendered != full_text:
                at = _first_difference(rendered, full_text)
                raise DataError(
                    f"{where}the chat template renders this conversation differently from prompt + completion + "
                    f"{self.end_of_turn!r} (from character {at}: {rendered[at:at + 40]!r} vs "
                    f"{full_text[at:at + 40]!r}); it changes the prompt or the completion text (stripping "
                    "whitespace, say), so the completion tokens would not be the ones the model reads"
                )
        p, c = self.prompt_ids(prompt), self.completion_ids(completion)
        whole = self.text_ids(full_text)
        if p + c != whole:
            at = _first_difference(p + c, whole)
            tok = self.tokenizer
            raise DataError(
                f"{where}the prompt/completion boundary shifts under the chat format: prompt ({len(p)} tokens) + "
                f"completion ({len(c)} tokens) differ from the whole conversation ({len(whole)} tokens) from token "
                f"{at} ({tok.convert_ids_to_tokens((p + c)[at:at + 3])} vs {tok.convert_ids_to_tokens(whole[at:at + 3])}); "
                "the tokenizer merges across the boundary"
            )
        return p, c


PromptFormat = Union[TemplateFormat, ChatFormat]


def _first_difference(a: Sequence, b: Sequence) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def resolve(tokenizer: Any, data_cfg: Optional[DataConfig] = None) -> PromptFormat:
    """The format object of ``data_cfg.prompt_format`` for ``tokenizer``.

    ``template`` accepts ``tokenizer=None`` for prompt text alone. ``chat`` raises
    ``ConfigError`` naming ``data.prompt_format`` when the tokenizer has no chat template.
    Resolving renders the template twice: resolve once per stage, not per example.
    """
    data_cfg = data_cfg if data_cfg is not None else DataConfig()
    if data_cfg.prompt_format == "chat":
        if tokenizer is None:
            raise ValueError("the chat format needs a tokenizer")
        return ChatFormat(tokenizer, data_cfg.system_prompt, data_cfg.chat_template_kwargs)
    if data_cfg.prompt_format != "template":
        raise ConfigError(f"data.prompt_format must be 'template' or 'chat', got {data_cfg.prompt_format!r}")
    return TemplateFormat(tokenizer, data_cfg.prompt_template)


def format_prompt(question: str, tokenizer: Any, data_cfg: Optional[DataConfig] = None) -> str:
    """The prompt text of one question (resolves the format each call; loops use ``resolve``)."""
    return resolve(tokenizer, data_cfg).prompt(question)


def prompt_ids(tokenizer: Any, prompt: str, data_cfg: Optional[DataConfig] = None) -> list[int]:
    """The tokens of a prompt text (as generation and training read it)."""
    return resolve(tokenizer, data_cfg).prompt_ids(prompt)


def completion_ids(tokenizer: Any, text: str, data_cfg: Optional[DataConfig] = None) -> list[int]:
    """The tokens of a completion: + EOS (template) or + the end-of-turn suffix (chat)."""
    return resolve(tokenizer, data_cfg).completion_ids(text)


def add_stop_ids(model: Any, fmt: PromptFormat) -> None:
    """Make generation stop on ``fmt.stop_ids`` too: they join the model's
    ``generation_config.eos_token_id`` (which ``looper.engine`` reads), in memory only."""
    if not fmt.stop_ids:
        return
    gen = getattr(model, "generation_config", None)
    if gen is None:
        from transformers import GenerationConfig

        gen = model.generation_config = GenerationConfig()
    current = gen.eos_token_id
    ids = [] if current is None else [current] if isinstance(current, int) else list(current)
    gen.eos_token_id = ids + [i for i in fmt.stop_ids if i not in ids]
