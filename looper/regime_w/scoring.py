"""Regime W group scoring: agreement, path consistency and checked arithmetic claims.

A *group* is the K trajectories sampled for one question. For trajectory ``i`` let
``a_i`` be its extracted, normalized answer (None if absent), ``n_i`` its token count and
``t_i`` its text. The scores (DESIGN.md, "Regime W"):

- ``s_end = max_a #{i : a_i == a} / K`` over non-None answers ``a``; 0 if every answer is None.
- ``s_path = 1 - min(1, var(n) / mean(n)**2)`` (population variance); 1 when K < 2 or mean(n) = 0.
- ``cf_i = step_weight * step_i + (1 - step_weight) * grounded_i`` (step_weight = 0.5), where
  ``step_i`` is the fraction of the arithmetic claims in ``t_i`` that hold (1 when there are
  none) and ``grounded_i`` is 1 when ``a_i`` equals the stated result of the last claim or
  appears as a number in the reasoning before the final-answer line (0 when ``a_i`` is None).
- ``s_cf = mean_i cf_i``.
- ``s_wm = w_end * s_end + w_path * s_path + w_cf * s_cf`` (0.5 / 0.3 / 0.2).

Arithmetic claims are read in two forms:

- calculator annotations ``<<expr=r>>`` (GSM8K style), and
- inline ``expr = r`` on one line, where ``expr`` is made only of numbers, ``+ - * / x × ÷``
  (the Unicode minus and en dash read as ``-``), parentheses and spaces, holds at least one
  binary operator, and ``r`` is a number. An inline claim is read conservatively, so that
  prose is not mistaken for a false claim:

  - text before the last character that cannot be part of an expression is dropped
    (``"Step 1. 3 + 4 = 7"`` reads ``3 + 4 = 7``), and so are up to three stray leading
    parentheses (``"(a) 3 + 4 = 7"``);
  - an expression that starts with ``* / x`` or with a sign glued to a word (``"60g * 4/5"``,
    ``"W - 3"``) lost its left operand to a word and is not a claim; a sign is only unary at
    the start or after ``(``, so ``"3x + 4 = 28"`` is not a claim either;
  - a result followed by more digits (``"= 3 1/2"``, ``"= 409 500"``) is not a claim;
  - ``r%`` reads as ``r/100`` (or ``r`` when both sides are percentages: ``45 + 21 + 28 = 94%``);
  - in a chain each ``=`` makes a claim, and the claim holds when the left value matches the
    leading number (``5 + 3 = 8 + 2 = 10``) or the whole right-hand expression
    (``4 * 60 / 5 = 4 * 12 = 48``, ``6/8 = 3/4``).

Numbers are read with the grammar of :mod:`looper.answers` (``$``, thousands commas
``1,000``, decimals ``.5``, ``2.25``; ASCII digits).
Claims are checked by a small recursive-descent evaluator over floats (never ``eval``).
A claim holds when the value is finite and ``math.isclose(value, r, rel_tol=rel_tol)``, or,
with ``allow_rounding``, when ``r`` is written with ``d >= 1`` decimals and
``|value - r| <= 0.5 * 10**-d`` (so ``10/3 = 3.33`` holds but ``7/2 = 3`` does not).
Division by zero or overflow makes a claim false. Powers (``^``, ``**``) are not part of the
grammar, so such text is not read as a claim at all.

Work is bounded on long or hostile text: only ``max_candidates`` ``=``-spots and
``max_claims`` claims are examined per trajectory (the first ones in the text), an
expression longer than ``max_expr_chars`` or a number with more than ``max_number_digits``
digits is not read, and nesting deeper than ``max_depth`` is rejected. Every regular
expression here runs in linear time.

Answers are compared numerically: ``"18"``, ``"18.0"`` and ``"$18"`` are the same answer.
Answer values, answer keys and the majority vote are :func:`looper.answers.answer_value`,
:func:`looper.answers.answer_key` and :func:`looper.answers.majority` (re-exported here).
"""

from __future__ import annotations

import heapq
import math
import re
import string
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import numpy as np

from looper.answers import NUMBER_BODY, NUMBER_RE, answer_key, answer_value, majority, number_value
from looper.config import RegimeWConfig

__all__ = [
    "Claim",
    "GroupScores",
    "answer_key",
    "answer_value",
    "evaluate_expression",
    "extract_claims",
    "final_answer_split",
    "grounded",
    "score_group",
    "score_trajectory",
]

# --------------------------------------------------------------------------- lexing

# Characters an inline expression can be made of (no newline: a claim stays on one line).
_EXPR_CLASS = r"[0-9.,$+\-\u2212\u2013*/x\u00d7\u00f7() \t]"
# A maximal run of expression characters directly followed by a single "=".
_INLINE_RE = re.compile(rf"(?<!{_EXPR_CLASS})({_EXPR_CLASS}+)=(?!=)")
# GSM8K calculator annotation.
_ANNOT_RE = re.compile(r"<<([^<>\n]*)>>")

# The body of a written number: "12", "1,000", "2.25", ".5" (looper.answers' grammar).
_NUM_BODY = NUMBER_BODY
# The result right after an inline "=": optional sign, "$" and "%" ("= -5", "= $1,200", "= 50%").
# Each run of blanks belongs to one quantifier, so a failed match is linear in its length.
_RHS_RE = re.compile(
    rf"[ \t]*(?:(?P<neg>-)[ \t]*)?(?:\$[ \t]*)?(?P<neg2>-)?(?P<num>{_NUM_BODY})(?![0-9])(?P<pct>[ \t]*%)?"
)
# A result followed by more digits is a mixed number or spaced thousands ("3 1/2", "409 500").
_MIXED_RE = re.compile(r"[ \t]+[0-9]")
# The expression characters that follow an "=" (the right-hand side of a chain).
_RUN_RE = re.compile(rf"{_EXPR_CLASS}*")
# The result of an annotation: the whole text after the last "=".
_ANNOT_RESULT_RE = re.compile(rf"\s*(?:(?P<neg>-)\s*)?(?:\$\s*)?(?P<neg2>-)?(?P<num>{_NUM_BODY})\s*")
# One token of an expression.
_TOKEN_RE = re.compile(
    rf"\s*(?:(?P<num>\$?{_NUM_BODY})|(?P<op>[-+*/x\u00d7\u00f7()])|(?P<minus>[\u2212\u2013])|(?P<junk>\S))"
)

_MUL_OPS = frozenset("*x\u00d7")
_DIV_OPS = frozenset("/\u00f7")
# At most this many leading parentheses are trimmed off an inline expression.
_MAX_TRIM = 3
_PARENS = (("op", "("), ("op", ")"))


def _decimals(text: str) -> int:
    """How many digits follow the decimal point in a written number."""
    return len(text.split(".", 1)[1]) if "." in text else 0


# --------------------------------------------------------------------------- evaluator


class _SyntaxError(Exception):
    """The token list is not an expression of the claim grammar."""


class _TooDeep(_SyntaxError):
    """Nesting beyond ``max_depth``: the text is not read as a claim, trimmed or not."""


class _Parser:
    """Recursive descent over the grammar, evaluating in floats as it goes::

        expr    := term (("+" | "-") term)*
        term    := unary (("*" | "x" | "×" | "/" | "÷") unary)*
        unary   := ("+" | "-") unary | primary
        primary := NUMBER | "(" expr ")"

    Division by zero yields NaN and overflow yields inf; both propagate to the result, so
    a syntactically valid claim with an invalid value is simply false.
    """

    def __init__(self, tokens: Sequence[tuple[str, object]], max_depth: int):
        self.tokens = tokens
        self.pos = 0
        self.depth = 0
        self.max_depth = max_depth
        self.binary_ops = 0

    def parse(self) -> float:
        value = self._expr()
        if self.pos != len(self.tokens):
            raise _SyntaxError("trailing tokens")
        return value

    def _peek(self) -> Optional[tuple[str, object]]:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def _enter(self) -> None:
        self.depth += 1
        if self.depth > self.max_depth:
            raise _TooDeep("nesting too deep")

    def _expr(self) -> float:
        value = self._term()
        while (tok := self._peek()) is not None and tok[0] == "op" and tok[1] in ("+", "-"):
            self.pos += 1
            self.binary_ops += 1
            rhs = self._term()
            value = value + rhs if tok[1] == "+" else value - rhs
        return value

    def _term(self) -> float:
        value = self._unary()
        while (tok := self._peek()) is not None and tok[0] == "op" and (
            tok[1] in _MUL_OPS or tok[1] in _DIV_OPS
        ):
            self.pos += 1
            self.binary_ops += 1
            rhs = self._unary()
            if tok[1] in _MUL_OPS:
                value = value * rhs
            elif rhs == 0.0 or not math.isfinite(rhs):
                value = math.nan
            else:
                value = value / rhs
        return value

    def _unary(self) -> float:
        tok = self._peek()
        # a sign only opens an expression or follows "(": "3x + 4" is not 3 * (+4)
        at_start = self.pos == 0 or self.tokens[self.pos - 1] == ("op", "(")
        if tok is not None and tok[0] == "op" and tok[1] in ("+", "-") and at_start:
            self.pos += 1
            self._enter()
            value = self._unary()
            self.depth -= 1
            return -value if tok[1] == "-" else value
        return self._primary()

    def _primary(self) -> float:
        tok = self._peek()
        if tok is None:
            raise _SyntaxError("unexpected end")
        if tok[0] == "num":
            self.pos += 1
            return float(tok[1])  # type: ignore[arg-type]
        if tok == ("op", "("):
            self.pos += 1
            self._enter()
            value = self._expr()
            if self._peek() != ("op", ")"):
                raise _SyntaxError("missing ')'")
            self.pos += 1
            self.depth -= 1
            return value
        raise _SyntaxError(f"unexpected token {tok}")


def _tokenize(text: str, max_digits: int, starts: Optional[list[int]] = None) -> list[tuple[str, object]]:
    """Tokens ``("num", value) | ("op", ch) | ("junk", ch)``; an over-long number is junk.

    When ``starts`` is given, the start offset of each token is appended to it.
    """
    tokens: list[tuple[str, object]] = []
    # every non-space character starts a token, so finditer never skips text
    for m in _TOKEN_RE.finditer(text):
        kind = m.lastgroup
        if kind is None:  # trailing whitespace
            break
        if starts is not None:
            starts.append(m.start(kind))
        tok = m.group(kind)
        if kind == "num":
            value = number_value(tok, max_digits)
            tokens.append(("junk", "#") if value is None else ("num", value))
        elif kind == "minus":  # the Unicode minus and the en dash read as "-"
            tokens.append(("op", "-"))
        else:
            tokens.append((kind, tok))
    return tokens


def _parse_tokens(tokens: Sequence[tuple[str, object]], max_depth: int) -> tuple[float, int]:
    """Evaluate a full token list; returns ``(value, number_of_binary_operators)``.

    A junk token anywhere makes it a syntax error (the grammar has no place for it).
    """
    parser = _Parser(tokens, max_depth)
    try:
        value = parser.parse()
    except RecursionError:  # only reachable with a huge configured max_depth
        raise _TooDeep("nesting too deep") from None
    return value, parser.binary_ops


def evaluate_expression(expr: str, cfg: Optional[RegimeWConfig] = None) -> Optional[float]:
    """Value of an arithmetic expression of the claim grammar, or None if it is not one.

    The value may be NaN (division by zero) or inf (overflow). Expressions longer than
    ``cfg.max_expr_chars`` are rejected (None).

    >>> evaluate_expression("2 x (3 + $1,000) / 4")
    501.5
    """
    cfg = cfg or RegimeWConfig()
    if len(expr) > cfg.max_expr_chars:
        return None
    try:
        value, _ = _parse_tokens(_tokenize(expr, cfg.max_number_digits), cfg.max_depth)
    except _SyntaxError:
        return None
    return value


# --------------------------------------------------------------------------- claims


@dataclass(frozen=True)
class Claim:
    """One arithmetic claim ``expr = result`` found at character ``position`` of a text."""

    position: int
    kind: str  # "annotation" | "inline"
    expr: str
    result: float  # the value the text states
    value: float  # what expr evaluates to (NaN on division by zero)
    holds: bool


def _holds(value: float, result: float, decimals: int, cfg: RegimeWConfig) -> bool:
    """Whether ``value`` matches a stated ``result`` written with ``decimals`` decimals.

    ``isclose(value, result, rel_tol)``, or with ``allow_rounding`` and ``decimals >= 1``,
    ``|value - result| <= 0.5 * 10**-decimals`` (the result is ``value`` rounded).
    """
    if not math.isfinite(value):
        return False
    if math.isclose(value, result, rel_tol=cfg.rel_tol, abs_tol=1e-12):
        return True
    if cfg.allow_rounding and decimals >= 1:
        return abs(value - result) <= 0.5 * 10.0 ** (-decimals) * (1 + 1e-9)
    return False


def _signed_result(m: re.Match, cfg: RegimeWConfig) -> Optional[tuple[float, int]]:
    """``(value, decimals)`` of a matched result number; None when it has too many digits."""
    num = m.group("num")
    value = number_value(num, cfg.max_number_digits)
    if value is None:
        return None
    if m.group("neg") or m.group("neg2"):
        value = -value
    return value, _decimals(num)


def _annotation_claims(text: str, cfg: RegimeWConfig) -> Iterator[tuple[int, Optional[Claim]]]:
    """``(position, claim or None)`` for each ``<<expr=r>>`` spot, in text order."""
    for m in _ANNOT_RE.finditer(text):
        expr, eq, res = m.group(1).rpartition("=")
        claim = None
        if eq and len(expr) <= cfg.max_expr_chars and len(res) <= cfg.max_expr_chars:
            rm = _ANNOT_RESULT_RE.fullmatch(res)
            result = _signed_result(rm, cfg) if rm else None
            if result is not None:
                try:
                    value, _ = _parse_tokens(_tokenize(expr, cfg.max_number_digits), cfg.max_depth)
                except _SyntaxError:
                    pass
                else:
                    r, d = result
                    claim = Claim(m.start(), "annotation", expr.strip(), r, value, _holds(value, r, d, cfg))
        yield m.start(), claim


def _inline_result(masked: str, at: int, cfg: RegimeWConfig) -> Optional[list[tuple[float, int]]]:
    """Read the right-hand side of an inline claim whose ``=`` ends just before ``at``.

    Returns the accepted readings ``[(result, decimals), ...]``, the stated number first,
    or None when there is no plain result. The readings are:

    - the leading number (``= 50%`` reads 0.5 with two more decimals, and also 50, since
      "45 + 21 + 28 = 94%" writes percentages on both sides);
    - the whole right-hand expression when it holds an operator, so chains
      (``4 * 60 / 5 = 4 * 12 = 48``) and fractions (``6/8 = 3/4``) are read as written.
    """
    rm = _RHS_RE.match(masked, at)
    result = _signed_result(rm, cfg) if rm else None
    if result is None:
        return None
    r, d = result
    if rm.group("pct"):
        return [(r / 100.0, d + 2), (r, d)]
    if _MIXED_RE.match(masked, rm.end()):
        return None
    readings = [(r, d)]
    rhs = _RUN_RE.match(masked, at).group(0)
    if len(rhs) <= cfg.max_expr_chars:
        tokens = _tokenize(rhs, cfg.max_number_digits)
        cut = next((i for i, t in enumerate(tokens) if t[0] == "junk"), len(tokens))
        try:
            value, n_ops = _parse_tokens(tokens[:cut], cfg.max_depth)
        except _SyntaxError:
            pass
        else:
            if n_ops:
                readings.append((value, 0))
    return readings


def _plausible_start(tokens: list, starts: list[int], i: int, run: str, before: str) -> bool:
    """Whether an inline expression may begin at token ``i``.

    Not at a binary operator ("60g * 4/5": the left operand was cut off), and a leading
    sign must be glued to its operand and not follow a letter or digit ("60g - 4").
    ``before`` is the character just before ``run`` in the text.
    """
    kind, tok = tokens[i]
    if kind != "op" or tok in ("(", ")"):
        return True
    if tok not in ("+", "-") or i + 1 >= len(tokens) or starts[i + 1] != starts[i] + 1:
        return False
    prev = run[starts[i] - 1] if starts[i] > 0 else before
    return not (prev.isalnum() or prev in "_%")


def _inline_claims(masked: str, cfg: RegimeWConfig) -> Iterator[tuple[int, Optional[Claim]]]:
    """``(position, claim or None)`` for each ``run-of-expression-chars =`` spot, in order.

    ``masked`` is the text with annotations blanked out (same length). A claim holds when
    the left value matches one reading of the right-hand side (see ``_inline_result``).
    """
    for m in _INLINE_RE.finditer(masked):
        pos = m.end() - 1  # the "="
        run = m.group(1)
        rhs = _inline_result(masked, m.end(), cfg) if len(run) <= cfg.max_expr_chars else None
        if rhs is None:
            yield pos, None
            continue
        starts: list[int] = []
        tokens = _tokenize(run, cfg.max_number_digits, starts)
        # keep what follows the last junk token ("1. 3 + 4" -> "3 + 4")
        first = 1 + max((i for i, t in enumerate(tokens) if t[0] == "junk"), default=-1)
        before = masked[m.start(1) - 1] if m.start(1) > 0 else "\n"
        claim = None
        for start in range(first, min(first + _MAX_TRIM + 1, len(tokens))):
            if start > first and tokens[start - 1] not in _PARENS:
                break  # only stray parentheses are trimmed: "(a) 3 + 4", "(3 + 4 = 7)"
            if not _plausible_start(tokens, starts, start, run, before):
                break
            try:
                value, n_ops = _parse_tokens(tokens[start:], cfg.max_depth)
            except _TooDeep:
                break
            except _SyntaxError:
                continue
            if n_ops == 0:  # a bare number restated ("= 5") is not an arithmetic claim
                break
            r = next((res for res, d in rhs if _holds(value, res, d, cfg)), None)
            holds = r is not None
            claim = Claim(pos, "inline", run[starts[start]:].strip(), rhs[0][0] if r is None else r, value, holds)
            break
        yield pos, claim


def extract_claims(text: str, cfg: Optional[RegimeWConfig] = None) -> list[Claim]:
    """All checkable arithmetic claims of ``text`` in text order (bounded, see module doc).

    An inline ``expr = <<...>>r`` next to an annotation is counted once, as the annotation.
    """
    cfg = cfg or RegimeWConfig()
    masked = _ANNOT_RE.sub(lambda m: "\n" * len(m.group(0)), text)
    merged = heapq.merge(_annotation_claims(text, cfg), _inline_claims(masked, cfg), key=lambda x: x[0])
    claims: list[Claim] = []
    for n_seen, (_, claim) in enumerate(merged, start=1):
        if claim is not None:
            claims.append(claim)
            if len(claims) >= cfg.max_claims:
                break
        if n_seen >= cfg.max_candidates:
            break
    return claims


# --------------------------------------------------------------------------- answers

# Lower-cases ASCII letters only, so string positions do not move.
_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)


def final_answer_split(text: str, markers: Sequence[str] = ("####", "The answer is", "Answer:")) -> tuple[str, str]:
    """Split ``text`` into ``(reasoning, final_answer_line)``.

    The final-answer line is the last line holding one of ``markers`` (ASCII letters match
    in any case); without a marker it is the last non-blank line. The reasoning is
    everything before that line.
    """
    lowered = text.translate(_ASCII_LOWER)
    anchor = max((lowered.rfind(m.translate(_ASCII_LOWER)) for m in markers), default=-1)
    if anchor < 0:  # no marker: the last non-blank character
        anchor = max(len(text.rstrip()) - 1, 0)
    start = text.rfind("\n", 0, anchor) + 1
    end = text.find("\n", start)
    return text[:start], text[start:] if end < 0 else text[start:end]


def _text_numbers(text: str, max_digits: int) -> set[float]:
    """The distinct numbers written in ``text`` (signed where the sign is attached), read
    with :data:`looper.answers.NUMBER_RE`; numbers with more than ``max_digits`` digits
    are left out."""
    values: set[float] = set()
    for token in set(NUMBER_RE.findall(text)):
        value = number_value(token, max_digits)
        if value is not None:
            values.add(value + 0.0)
    return values


def grounded(text: str, answer: object, claims: Sequence[Claim], cfg: Optional[RegimeWConfig] = None) -> float:
    """``grounded_i``: 1.0 when the answer equals the last claim's stated result or appears
    as a number in the reasoning before the final-answer line; else 0.0 (and 0.0 for None
    or a non-numeric answer)."""
    cfg = cfg or RegimeWConfig()
    a = answer_value(answer, cfg.max_number_digits)
    if a is None:
        return 0.0
    if claims and math.isclose(claims[-1].result, a, rel_tol=cfg.rel_tol, abs_tol=1e-12):
        return 1.0
    reasoning, _ = final_answer_split(text, cfg.answer_markers)
    numbers = _text_numbers(reasoning, cfg.max_number_digits)
    if a in numbers or any(math.isclose(v, a, rel_tol=cfg.rel_tol, abs_tol=1e-12) for v in numbers):
        return 1.0
    return 0.0


# --------------------------------------------------------------------------- scores


@dataclass
class GroupScores:
    """Regime W scores of one group of K trajectories.

    Question level: ``s_end``, ``s_path``, ``s_cf``, ``s_wm`` and the ``majority`` answer
    (the most common non-None answer; ties go to the smallest number, then the
    alphabetically first text, so the result does not depend on the order of the group).

    Per trajectory (numpy arrays of length K):
    ``agree`` (a_i == majority), ``length_dev`` = ``min(1, |n_i - mean n| / mean n)``
    (0 when mean n = 0), ``step``, ``grounded``, ``cf`` and ``n_claims``.
    """

    s_end: float
    s_path: float
    s_cf: float
    s_wm: float
    majority: Optional[str]
    agree: np.ndarray
    length_dev: np.ndarray
    step: np.ndarray
    grounded: np.ndarray
    cf: np.ndarray
    n_claims: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def k(self) -> int:
        return int(len(self.agree))

    def question_fields(self) -> dict:
        """The question-level fields of a rollout record (plain floats)."""
        return {"s_end": self.s_end, "s_path": self.s_path, "s_cf": self.s_cf, "s_wm": self.s_wm}


def score_trajectory(text: str, answer: object, cfg: Optional[RegimeWConfig] = None) -> tuple[float, float, int]:
    """``(step_i, grounded_i, n_claims)`` for one trajectory text and its answer."""
    cfg = cfg or RegimeWConfig()
    claims = extract_claims(text, cfg)
    step = sum(c.holds for c in claims) / len(claims) if claims else 1.0
    return step, grounded(text, answer, claims, cfg), len(claims)


def score_group(
    texts: Sequence[str],
    answers: Sequence[Optional[str]],
    num_tokens: Sequence[int],
    cfg: Optional[RegimeWConfig] = None,
) -> GroupScores:
    """Score one question's group of K trajectories (formulas in the module docstring).

    ``texts`` are the completions, ``answers`` their extracted normalized answers (None
    when absent) and ``num_tokens`` their token counts.
    """
    cfg = cfg or RegimeWConfig()
    k = len(texts)
    if k == 0:
        raise ValueError("score_group needs at least one trajectory")
    if len(answers) != k or len(num_tokens) != k:
        raise ValueError(
            f"texts, answers and num_tokens must have the same length, got {k}, {len(answers)}, {len(num_tokens)}"
        )
    n = np.asarray(num_tokens, dtype=np.float64)
    if n.ndim != 1 or not np.all(np.isfinite(n)) or np.any(n < 0):
        raise ValueError(f"num_tokens must be finite and >= 0, got {list(num_tokens)}")
    for t in texts:
        if not isinstance(t, str):
            raise ValueError(f"texts must be strings, got {type(t).__name__}")

    # s_end and the majority answer (looper.answers.majority: ties -> the smallest key)
    majority_key, top, majority_answer = majority(answers, cfg.max_number_digits)
    s_end = top / k
    keys = [answer_key(a, cfg.max_number_digits) for a in answers]
    agree = np.array([key is not None and key == majority_key for key in keys], dtype=bool)

    # s_path and per-trajectory length deviation
    mean = float(n.mean())
    if k < 2 or mean == 0.0:
        s_path = 1.0
    else:
        s_path = 1.0 - min(1.0, float(n.var()) / mean**2)
    length_dev = np.zeros(k) if mean == 0.0 else np.minimum(1.0, np.abs(n - mean) / mean)

    # cf_i
    per = [score_trajectory(t, a, cfg) for t, a in zip(texts, answers)]
    step = np.array([p[0] for p in per], dtype=np.float64)
    ground = np.array([p[1] for p in per], dtype=np.float64)
    n_claims = np.array([p[2] for p in per], dtype=np.int64)
    cf = cfg.step_weight * step + (1.0 - cfg.step_weight) * ground
    s_cf = float(cf.mean())

    s_wm = cfg.w_end * s_end + cfg.w_path * s_path + cfg.w_cf * s_cf
    return GroupScores(
        s_end=float(s_end),
        s_path=float(s_path),
        s_cf=s_cf,
        s_wm=float(s_wm),
        majority=majority_answer,
        agree=agree,
        length_dev=length_dev,
        step=step,
        grounded=ground,
        cf=cf,
        n_claims=n_claims,
    )
