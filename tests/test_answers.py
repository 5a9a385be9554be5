"""Tests for looper.answers: the number grammar, canonical forms, equality, majority and
bounded answer extraction."""

from __future__ import annotations

import itertools
import subprocess
import sys
from decimal import Decimal

import pytest

from looper import answers
from looper.answers import (
    REL_TOL,
    WINDOW,
    answer_key,
    answer_value,
    answers_equal,
    canonical_number,
    extract_answer,
    extract_answer_strict,
    iter_numbers,
    majority,
    normalize_answer,
    number_value,
)

# --------------------------------------------------------------------------- numbers


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("1,000.00", "1000"),
        ("-3.50", "-3.5"),
        ("$ 18", "18"),
        ("5.", "5"),
        ("-0", "0"),
        ("-0.00", "0"),
        (".5", "0.5"),
        ("007", "7"),
        ("0.250", "0.25"),
        ("$-7", "-7"),
        ("-$1,234.50", "-1234.5"),
        ("**42**", "42"),
        ("18 dollars", "18"),
        ("\u22124", "-4"),  # the Unicode minus
        (70000, "70000"),
        (2.5, "2.5"),
        (1e-7, "0.0000001"),
        (Decimal("1E+3"), "1000"),
        (True, None),
        ("no number", None),
        ("", None),
        (None, None),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_canonical_number_is_exact_for_integers_and_rounds_long_decimals():
    assert canonical_number("-$1,000.50") == "-1000.5"
    assert canonical_number("1" + "0" * 5000) == "1" + "0" * 5000  # no int(): no limit
    # a non-integer keeps SIGNIFICANT_DIGITS (28) significant digits, half to even
    assert canonical_number("0." + "3" * 300) == "0." + "3" * 28
    assert canonical_number("0.000" + "6" * 40) == "0.000" + "6" * 27 + "7"
    assert canonical_number("0." + "9" * 40) == "1"  # rounds up to an integer
    assert canonical_number("1,000", max_digits=3) is None  # 4 digits as written
    assert canonical_number("-$-5") is None  # two signs
    assert canonical_number("$") is None


def test_number_value():
    assert number_value("$1,000.5") == 1000.5
    assert number_value(".25") == 0.25
    assert number_value("-3") == -3.0
    assert number_value("1" * 31, max_digits=30) is None
    assert number_value("1" * 30, max_digits=30) == float("1" * 30)


@pytest.mark.parametrize(
    "text, numbers",
    [
        # the comma rule: thousands groups of three digits after one to three digits
        ("1,000", ["1000"]),
        ("1,00", ["1", "0"]),
        ("10,5", ["10", "5"]),
        ("3,4,5", ["3", "4", "5"]),
        ("1234,567", ["1234", "567"]),
        ("1,0000", ["1", "0"]),
        ("12,345,67", ["12345", "67"]),
        ("$1,234,567.5 in total", ["1234567.5"]),
        # signs: a minus between operands is not a sign
        ("16-3", ["16", "3"]),
        ("x-3 and (2)-1", ["3", "2", "1"]),
        ("it is -3", ["-3"]),
        ("$-5, -$5 and $ -5", ["-5", "-5", "-5"]),
        # ASCII digits only
        ("\u0661\u0662 apples", []),
    ],
)
def test_number_grammar(text, numbers):
    assert list(iter_numbers(text)) == numbers


def test_huge_ints_give_none_not_an_exception():
    assert normalize_answer(10**5000) is None  # beyond Python's int-string limit
    assert answer_key(10**5000) is None
    assert normalize_answer(10**400) == "1" + "0" * 400
    assert normalize_answer(Decimal("1E+999999999")) is None


# --------------------------------------------------------------------------- equality


@pytest.mark.parametrize(
    "a, b, expected",
    [
        ("18", "18", True),
        ("$18.00", "18", True),
        ("1,000", "1000", True),
        ("0.3333333", "0.33333333", True),  # 3e-9 apart: within 1e-6 relative
        ("0.333", "0.3333333", False),
        ("1000001", "1000000", True),  # 1e-6 relative
        ("1000002", "1000000", False),
        ("-5", "5", False),
        (None, "18", False),
        ("", "18", False),
        ("seven", "seven", False),  # no number: equal to nothing
        (18, "18.0", True),
        # outside the float range only the same canonical form is equal
        ("1" + "0" * 400, "1" + "0" * 399 + "1", False),
        ("1" + "0" * 400, "1" + "0" * 400 + ".0", True),
    ],
)
def test_answers_equal(a, b, expected):
    assert answers_equal(a, b) is expected


def test_answers_equal_tolerance_is_a_parameter():
    assert REL_TOL == 1e-6
    assert not answers_equal("100", "101")
    assert answers_equal("100", "101", rel_tol=0.01)
    assert not answers_equal("18", "18.00001", rel_tol=0.0)
    assert answers_equal("18", "18.00", rel_tol=0.0)


def test_answer_value_and_key():
    assert answer_value("$1,000.") == 1000.0
    assert answer_value("seven") is None
    assert answer_key("$1,000") == answer_key("1000.00") == answer_key(1000) == (0, 1000.0)
    assert answer_key("-0") == answer_key("0") == (0, 0.0)
    assert answer_key("18 dollars") == answer_key("18")  # keys agree with answers_equal
    assert answer_key(" abc ") == (1, "abc")
    assert answer_key("  ") is None and answer_key(None) is None
    # more than max_digits digits: keyed by its canonical text, not a float
    assert answer_key("1" * 31) == (1, "1" * 31)
    assert answer_key("$1,000", max_digits=3) == (1, "1000")
    assert answer_key(10**400) == (1, "1" + "0" * 400)


# --------------------------------------------------------------------------- majority


def test_majority_counts_keys_and_ignores_none():
    assert majority(["12", "12.0", "7", "7", None, None]) == ((0, 7.0), 2, "7")
    assert majority(["5", "$5.00", "6"]) == ((0, 5.0), 2, "$5.00")
    assert majority([None, None]) == (None, 0, None)
    assert majority([]) == (None, 0, None)
    # a number beats text on a tie; the code-point-first text beats other text
    assert majority(["abc", "5"]) == ((0, 5.0), 1, "5")
    assert majority(["b", "a "]) == ((1, "a"), 1, "a")


def test_majority_tie_rule_is_order_independent():
    # three-way tie (2 votes each): the smallest number wins, whatever the order
    group = ["10", "9", "abc", "10", "9.0", "abc"]
    results = {majority(list(p)) for p in itertools.permutations(group)}
    assert results == {((0, 9.0), 2, "9")}  # representative: min("9", "9.0")
    # the representative is the smallest stripped string, not the first one seen
    group = [" 18.0", "$18", "18", "5"]
    results = {majority(list(p)) for p in itertools.permutations(group)}
    assert results == {((0, 18.0), 3, "$18")}


def test_majority_max_digits():
    long = "1" * 31
    assert majority([long, long, "2"]) == ((1, long), 2, long)
    assert majority([long, long, "2"], max_digits=40) == ((0, float(long)), 2, long)


# --------------------------------------------------------------------------- extraction


def test_extraction_forms():
    assert extract_answer_strict("So 3 + 4 = 7.\n#### 7") == "7"
    assert extract_answer_strict("The answer is: **$1,000.50** per day") == "1000.5"
    assert extract_answer_strict("the final answer is \\boxed{12}") == "12"
    assert extract_answer_strict("Answer:  -4") == "-4"
    assert extract_answer_strict("Answer:\n42") is None  # number on another line
    assert extract_answer_strict("Answer: 7\nThe answer is 9") == "9"  # the last one
    assert extract_answer("Answer:\n42") == "42"  # flexible: the last number
    assert extract_answer("It costs $1,234.50 in total") == "1234.5"
    assert extract_answer("no number") is None and extract_answer("") is None


def test_a_10000_digit_number_is_no_exception():
    digits = "7" * 10_000
    # longer than the window: the number is cut by the window and not read
    assert extract_answer("The total is " + digits + ".\n") is None
    assert extract_answer("The total is " + digits + ".\n#### 5") == "5"
    assert extract_answer_strict("#### " + digits) is None
    # a 3,000-digit number inside the window is read exactly
    big = "9" * 3000
    assert extract_answer("The total is " + big + ".") == big
    assert extract_answer_strict("#### " + big) == big
    assert answers_equal(big, big) and not answers_equal(big, "9" * 2999 + "8")
    assert not answers_equal(big, "5")
    assert normalize_answer(digits) == digits
    assert normalize_answer("$" + ",".join(["123"] * 4000)) == "123" * 4000


def _no_numbers(n: int) -> str:
    """Exactly ``n`` characters of prose without a digit."""
    return ("and so on, " * (n // 11 + 1))[:n]


def test_answer_before_the_window_is_not_seen():
    # " #### 42" ends the window's first 8 characters: seen
    inside = "x" * 100 + " #### 42" + _no_numbers(WINDOW - 8)
    assert extract_answer_strict(inside) == "42"
    assert extract_answer(inside) == "42"
    # the same answer one space further back lies before the window: not seen
    outside = "x" * 100 + " #### 42" + " " + _no_numbers(WINDOW - 1)
    assert extract_answer_strict(outside) is None
    assert extract_answer(outside) is None
    # a shorter text is read whole
    assert extract_answer("#### 42" + _no_numbers(WINDOW - 7)) == "42"


def test_a_token_cut_by_the_window_is_not_read():
    # the window starts inside "12345": its leading "345" must not be read as a number
    text = "#### 12" + "345" + _no_numbers(WINDOW - 3)
    assert extract_answer(text) is None
    assert extract_answer_strict(text) is None


@pytest.mark.parametrize(
    "window",
    [
        "345 apples, so " + _no_numbers(WINDOW - 30) + "The answer is 9",
        "The answer is 12 " + _no_numbers(WINDOW - 17),
        "-5 and 6" + _no_numbers(WINDOW - 8),
        _no_numbers(WINDOW - 12) + "Answer: $1,0",
        "1,234," * (WINDOW // 6) + "1234",
        _no_numbers(WINDOW),
    ],
)
def test_only_the_last_window_characters_matter(window):
    assert len(window) == WINDOW
    prefixes = ["x", "#### 7\n", "The answer is 1", "12", "-", "$", "1,", "answer is ", "\n" * 500, "8" * 9000]
    strict = {extract_answer_strict(p + window) for p in prefixes}
    flexible = {extract_answer(p + window) for p in prefixes}
    assert len(strict) == 1 and len(flexible) == 1, (strict, flexible)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("answer is" + " " * 3000 + "x", None),  # many spaces after a marker
        ("#### " + " *" * 1500 + "5", "5"),
        ("Answer:" + "\t" * 3000 + "8", "8"),
        ("1,234," * 2_000_000, None),  # 12 MB of digits and commas, no space in the window
        ("-" * 1_000_000 + " 3", "3"),
        ("$ " * 500_000, None),
    ],
)
def test_hostile_texts(text, expected):
    assert extract_answer(text) == expected


def test_module_imports_only_the_standard_library():
    code = (
        "import sys, looper.answers, looper.data.gsm8k, looper.regime_w; "
        "bad = [m for m in ('torch', 'transformers', 'datasets') if m in sys.modules]; "
        "assert not bad, bad; "
        "import looper.regime_w.scoring as s, looper.answers as a; "
        "assert s.answer_key is a.answer_key and s.answer_value is a.answer_value"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    code = "import sys, looper.answers; assert 'numpy' not in sys.modules and 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert set(answers.__all__) >= {"normalize_answer", "answers_equal", "majority", "extract_answer"}
