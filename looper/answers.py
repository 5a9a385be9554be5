"""Numbers and final answers: one grammar, one canonical form, one equality, one majority.

Standard library only (no torch, no numpy): :mod:`looper.data.gsm8k` (grading) and
:mod:`looper.regime_w` (scoring) both build on this module, so a number is read, written
and compared the same way everywhere.

Numbers
    A number as written in text (:data:`NUMBER`) is an optional sign, an optional ``$``
    and a body (:data:`NUMBER_BODY`) of ASCII digits: ``12``, ``1,000`` (thousands groups
    of exactly three digits after one to three leading digits), ``2.25`` or ``.5``. A body
    is never directly preceded or followed by another digit. A ``-`` is a sign only when it
    does not follow a word character or a closing bracket, so ``"16-3"`` reads 16 and 3
    while ``"is -3"`` reads -3; ``"$-5"``, ``"-$5"`` and ``"$ -5"`` all read -5.

    The comma rule, worked out: ``"1,000"`` is 1000; ``"1,00"`` is 1 then 0 (``"00"``);
    ``"10,5"`` is 10 then 5; ``"3,4,5"`` is 3, 4, 5; ``"1234,567"`` is 1234 then 567 (a
    thousands group follows one to three leading digits); ``"1,0000"`` is 1 then 0.

Canonical form (:func:`canonical_number`, :func:`normalize_answer`)
    ``$``, thousands commas, leading zeros and trailing decimal zeros are dropped and
    ``-0`` is ``0``::

        "1,000.00" -> "1000"    "-3.50" -> "-3.5"    "$ 18" -> "18"    "5." -> "5"

    Integers are kept exactly, at any length; a non-integer with more than
    :data:`SIGNIFICANT_DIGITS` significant digits is rounded to that many (half to even,
    ``"0.333...3"`` with 300 threes -> 28 threes). The work is done on the digit string
    (never through ``int()``), so no length of number raises.

Equality (:func:`answers_equal`)
    Two answers are equal when their canonical forms are equal or, as floats,
    ``math.isclose(a, b, rel_tol=REL_TOL)`` (no absolute tolerance). A number outside the
    float range (it would overflow to inf or underflow to 0) is equal only to the same
    canonical form.

Votes (:func:`answer_value`, :func:`answer_key`, :func:`majority`)
    An answer's key is ``(0, float value)`` when it is a number of at most ``max_digits``
    digits (default :data:`MAX_VALUE_DIGITS`, Regime W's ``max_number_digits``), else
    ``(1, text)``. The majority is the most common key among the non-None answers; a tie
    goes to the smallest key (numbers before text, the smaller number first, text in
    code-point order) and the representative answer is the smallest stripped answer
    string with that key, so neither depends on the order of the answers.

Extraction (:func:`extract_answer_strict`, :func:`extract_answer`) does bounded work:

- only the last :data:`WINDOW` characters of a text are read (the final-answer forms live
  at the end of a completion). When a text is longer than that, the window's leading run
  of non-space characters is dropped too, as it may be a token cut in half (``"12|345"``
  must not read 345), so the result depends only on the last :data:`WINDOW` characters;
- a number is therefore shorter than :data:`WINDOW` characters, and it is converted
  without ``int()`` (see above): no exception, whatever its length;
- every regular expression here runs in linear time: no two neighbouring quantifiers can
  match the same character, so a failed match never re-scans a run of spaces, stars or
  digits more than once.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from decimal import MAX_EMAX, MIN_EMIN, ROUND_HALF_EVEN, Context, Decimal
from typing import Any, Iterable, Iterator, Optional

__all__ = [
    "MAX_VALUE_DIGITS",
    "NUMBER",
    "NUMBER_BODY",
    "NUMBER_RE",
    "REL_TOL",
    "SIGNIFICANT_DIGITS",
    "WINDOW",
    "answer_key",
    "answer_value",
    "answers_equal",
    "canonical_number",
    "extract_answer",
    "extract_answer_strict",
    "iter_numbers",
    "majority",
    "normalize_answer",
    "number_value",
]

REL_TOL = 1e-6  # relative tolerance of numeric answer equality
WINDOW = 4000  # characters at the end of a text that answer extraction reads
SIGNIFICANT_DIGITS = 28  # a longer non-integer is rounded to this many significant digits
MAX_VALUE_DIGITS = 30  # default: an answer with more digits has no float value (keyed as text)

# --------------------------------------------------------------------------- grammar

# The body of a written number: "12", "1,000", "2.25", ".5"; never followed by a digit.
NUMBER_BODY = r"(?:(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.[0-9]+)?|\.[0-9]+)(?![0-9])"
# A number in free text: sign (unless it is a minus between operands, "16-3"), currency
# (possibly followed by a space and the sign, "$ -5") and a body not preceded by a digit.
NUMBER = r"(?:(?<![\w)\]])-)?" r"(?:\$[ \t]?-?)?" r"(?<![0-9])" + NUMBER_BODY
NUMBER_RE = re.compile(NUMBER)

# Characters of a number token that carry no digit: currency, separators, the sign.
_NOT_DIGITS = str.maketrans("", "", "$, \t-")
_ASCII_DIGITS = frozenset("0123456789")
# Rounding of long non-integers; the exponent range is unlimited and nothing traps.
_CONTEXT = Context(prec=SIGNIFICANT_DIGITS, rounding=ROUND_HALF_EVEN, Emax=MAX_EMAX, Emin=MIN_EMIN, traps=[])
# A Decimal answer with a larger exponent is not read (format() would write it out).
_MAX_EXPONENT = 4300

# Spaces, then optionally bold stars and more spaces ("#### **18**").
_SEP = r"[ \t]*(?:\*+[ \t]*)?"
# Strict final-answer forms, each capturing its number in group "num". The separators are
# written so that no two neighbouring quantifiers overlap (linear time, see module doc).
_STRICT_PATTERNS = (
    # "#### 18", "#### $1,000"
    re.compile(r"####" + _SEP + r"(?P<num>" + NUMBER + r")"),
    # "The answer is 18", "the final answer is: $18.00 per day", "The answer is **18**",
    # "the answer is \boxed{18}"
    re.compile(
        r"\banswer\s+is\s*(?::[ \t]*)?(?:\*+[ \t]*)?(?:\\boxed\{[ \t]*)?(?P<num>" + NUMBER + r")",
        re.IGNORECASE,
    ),
    # "Answer: 18" with the number on the same line (so the Abel prompt's
    # "Answer:\nLet's think step by step." never counts).
    re.compile(r"\banswer[ \t]*:" + _SEP + r"(?P<num>" + NUMBER + r")", re.IGNORECASE),
)
# The leading run of non-space characters of a window (possibly a token cut in half).
_LEADING_TOKEN_RE = re.compile(r"\S*")


# --------------------------------------------------------------------------- numbers


def _parts(token: str) -> Optional[tuple[bool, str, str]]:
    """``(negative, integer digits, fraction digits)`` of a number token such as
    ``"-$1,000.50"``; None when it holds no digit or is not a plain decimal number."""
    if token.count("-") > 1:  # "-$-5": two signs are not a number
        return None
    whole, _, frac = token.translate(_NOT_DIGITS).partition(".")
    if not (whole or frac) or not _ASCII_DIGITS.issuperset(whole) or not _ASCII_DIGITS.issuperset(frac):
        return None
    return "-" in token, whole, frac


def _bounded_parts(token: str, max_digits: Optional[int]) -> Optional[tuple[bool, str, str]]:
    """``_parts(token)``, or None when it has more than ``max_digits`` digits as written."""
    parts = _parts(token)
    if parts is None or (max_digits is not None and len(parts[1]) + len(parts[2]) > max_digits):
        return None
    return parts


def canonical_number(token: str, max_digits: Optional[int] = None) -> Optional[str]:
    """Canonical string of one number token (``"-$1,000.50"`` -> ``"-1000.5"``).

    ``token`` is a match of :data:`NUMBER` (a sign, ``$``, blanks and commas may surround
    the digits). Returns None when it holds no digit, is not a plain decimal number, or
    has more than ``max_digits`` digits as written (no bound by default).
    """
    parts = _bounded_parts(token, max_digits)
    if parts is None:
        return None
    negative, whole, frac = parts
    whole, frac = whole.lstrip("0"), frac.rstrip("0")
    significant = len(whole) + len(frac) if whole else len(frac.lstrip("0"))
    if frac and significant > SIGNIFICANT_DIGITS:  # may round up to an integer: 0.99..9 -> 1
        exact = Decimal(("-" if negative else "") + (whole or "0") + "." + frac)
        return format(_CONTEXT.normalize(exact), "f")
    text = (whole or "0") + ("." + frac if frac else "")
    return "-" + text if negative and text != "0" else text


def number_value(token: str, max_digits: Optional[int] = None) -> Optional[float]:
    """Float value of a number token (``"$1,000.5"`` -> 1000.5, the nearest float to the
    digits as written); None if it is not one or has more than ``max_digits`` digits."""
    parts = _bounded_parts(token, max_digits)
    if parts is None:
        return None
    negative, whole, frac = parts
    value = float((whole or "0") + "." + (frac or "0"))
    return -value if negative else value


def iter_numbers(text: str) -> Iterator[str]:
    """The canonical forms of the numbers written in ``text``, in text order."""
    for m in NUMBER_RE.finditer(text):
        value = canonical_number(m.group(0))
        if value is not None:
            yield value


def _answer_token(s: Any) -> Optional[str]:
    """The number token an answer stands for: the answer itself when it is a bare number
    (after stripping blanks, ``**`` and a trailing ``.``), else the first number in it; an
    ``int``, ``float`` or ``Decimal`` is written out in positional notation. None when
    there is no number."""
    if s is None or isinstance(s, bool):
        return None
    if isinstance(s, int):
        try:
            return str(s)
        except ValueError:  # beyond Python's int-string conversion limit
            return None
    if isinstance(s, float):
        if not math.isfinite(s):
            return None
        s = Decimal(repr(s))
    if isinstance(s, Decimal):
        if not s.is_finite() or abs(s.adjusted()) > _MAX_EXPONENT:
            return None
        return format(s, "f")
    text = str(s).replace("\u2212", "-").strip()
    text = text.strip("*").strip()
    text = text.rstrip(".").strip()
    if not text:
        return None
    m = NUMBER_RE.fullmatch(text) or NUMBER_RE.search(text)
    return None if m is None else m.group(0)


def normalize_answer(s: Any) -> Optional[str]:
    """The canonical numeric string of an answer, or None if it holds no number.

    Strips whitespace, ``$``, thousands separators, a trailing ``.`` and surrounding
    ``**``; trailing zeros after the decimal point are dropped (the Unicode minus reads
    as ``-``)::

        "1,000.00" -> "1000"    "-3.50" -> "-3.5"    "5." -> "5"    "$ 18" -> "18"

    When the text is not a bare number (``"18 dollars"``), the first number in it is
    used. ``int``, ``float`` and ``Decimal`` values are accepted; ``bool`` is not, nor an
    ``int`` beyond Python's int-string conversion limit (4,300 digits) or a ``Decimal``
    whose exponent is beyond +-4,300 (None, never an exception).
    """
    token = _answer_token(s)
    return None if token is None else canonical_number(token)


def answer_value(answer: Any, max_digits: int = MAX_VALUE_DIGITS) -> Optional[float]:
    """Float value of an answer (``"$1,000."`` -> 1000.0): the number
    :func:`normalize_answer` reads, or None when there is none or it has more than
    ``max_digits`` digits as written."""
    token = _answer_token(answer)
    return None if token is None else number_value(token, max_digits)


def _as_text(answer: Any) -> str:
    """``str(answer).strip()``, or ``""`` for a value that cannot be printed (a huge int)."""
    try:
        return str(answer).strip()
    except ValueError:
        return ""


def answer_key(answer: Any, max_digits: int = MAX_VALUE_DIGITS) -> Optional[tuple]:
    """Key under which answers agree: ``(0, value)`` for numbers, ``(1, text)`` otherwise.

    ``text`` is the canonical form of a number too long to have a value (more than
    ``max_digits`` digits), else the stripped answer. None (or blank) answers have no key:
    they never agree with anything.
    """
    if answer is None:
        return None
    value = answer_value(answer, max_digits)
    if value is not None:
        return (0, value + 0.0)  # -0.0 -> 0.0
    text = normalize_answer(answer) or _as_text(answer)
    return (1, text) if text else None


def _float_or_none(canonical: str) -> Optional[float]:
    """The float of a canonical number, or None when it does not fit (inf, or 0.0 for a
    nonzero number)."""
    value = float(canonical)
    if math.isinf(value) or (value == 0.0 and canonical != "0"):
        return None
    return value


def answers_equal(a: Any, b: Any, rel_tol: float = REL_TOL) -> bool:
    """Whether two answers are the same number: equal canonical forms, or floats within
    ``rel_tol`` of each other (``math.isclose``, relative, no absolute tolerance).

    An answer that holds no number (None, ``""``, ``"seven"``) equals nothing; a number
    outside the float range equals only its own canonical form.
    """
    p, g = normalize_answer(a), normalize_answer(b)
    if p is None or g is None:
        return False
    if p == g:
        return True
    x, y = _float_or_none(p), _float_or_none(g)
    if x is None or y is None:
        return False
    return math.isclose(x, y, rel_tol=rel_tol, abs_tol=0.0)


def majority(answers: Iterable[Any], max_digits: int = MAX_VALUE_DIGITS) -> tuple[Optional[tuple], int, Optional[str]]:
    """``(key, count, representative)`` of the most common answer (keys: :func:`answer_key`).

    None answers never count. A tie goes to the smallest key (numbers before text, then
    the smaller number or the code-point-first text); the representative is the smallest
    stripped answer string with that key. Neither depends on the order of ``answers``.
    ``(None, 0, None)`` when no answer has a key.
    """
    answers = list(answers)
    keys = [answer_key(a, max_digits) for a in answers]
    counts = Counter(k for k in keys if k is not None)
    if not counts:
        return None, 0, None
    top = max(counts.values())
    key = min(k for k, c in counts.items() if c == top)
    representative = min(_as_text(a) for a, k in zip(answers, keys) if k == key)
    return key, top, representative


# --------------------------------------------------------------------------- extraction


def _window(text: str) -> str:
    """The part of ``text`` that extraction reads: its last :data:`WINDOW` characters,
    less their leading run of non-space characters when the text is longer."""
    if len(text) <= WINDOW:
        return text
    tail = text[-WINDOW:]
    return tail[_LEADING_TOKEN_RE.match(tail).end():]


def extract_answer_strict(text: str) -> Optional[str]:
    """The last explicit final answer in ``text``, normalized; None if there is none.

    Accepted forms: ``#### N``, ``The answer is N`` (any case, optional ``:``, ``**``,
    ``\\boxed{``, ``$`` and trailing text) and ``Answer: N`` with the number on the same
    line. Only the end of the text is read (see the module docstring).
    """
    if not text:
        return None
    window = _window(text)
    best_pos = -1
    best: Optional[str] = None
    for pattern in _STRICT_PATTERNS:
        for m in pattern.finditer(window):
            pos = m.start("num")
            if pos > best_pos:
                value = canonical_number(m.group("num"))
                if value is not None:
                    best_pos, best = pos, value
    return best


def extract_answer(text: str) -> Optional[str]:
    """The final answer in ``text``: a strict form if present, else the last number.

    Handles money (``$1,234.50``), thousands separators, negatives and decimals. Returns
    the normalized string, or None when the end of the text holds no number.
    """
    if not text:
        return None
    strict = extract_answer_strict(text)
    if strict is not None:
        return strict
    last: Optional[str] = None
    for last in iter_numbers(_window(text)):
        pass
    return last
