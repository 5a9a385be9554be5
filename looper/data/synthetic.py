"""Offline generator of short GSM8K-style word problems (the default data set).

Each problem is a chain of one to a few arithmetic steps on one running quantity
(someone's apples, the money in a wallet, the marbles in a jar), written in small
regular English so a tiny model trained from scratch on a CPU can learn it, yet varied
in names, objects, verbs and question phrasing. Solutions use the GSM8K format, one line
per step with a calculator annotation and a final ``#### N`` line::

    Question: Tom has 5 apples. He buys 3 more apples. He gives 2 apples to Mia.
              How many apples does Tom have now?
    Answer:   Tom has 5 + 3 = <<5+3=8>>8 apples.
              Now Tom has 8 - 2 = <<8-2=6>>6 apples.
              #### 6

Every intermediate result is an integer from 2 to ``max_result`` (so "1 apples" never
appears), and division only appears when it is exact. Generation is deterministic for a seed and uses
its own ``random.Random``, never the global state. Standard library only.
"""

from __future__ import annotations

import random
from typing import Iterable, Optional, Sequence

from looper.config import ABEL_PROMPT

__all__ = ["OPS", "generate_problems", "corpus"]

OPS = ("+", "-", "*", "/")

# (name, subject pronoun, object pronoun, possessive)
_HE = ("He", "him", "his")
_SHE = ("She", "her", "her")
_NAMES: list[tuple[str, tuple[str, str, str]]] = [
    ("Tom", _HE), ("Mia", _SHE), ("Sam", _HE), ("Ana", _SHE), ("Ben", _HE), ("Lily", _SHE),
    ("Max", _HE), ("Emma", _SHE), ("Leo", _HE), ("Zoe", _SHE), ("Jack", _HE), ("Nora", _SHE),
    ("Omar", _HE), ("Ella", _SHE), ("Ravi", _HE), ("Ruby", _SHE), ("Luis", _HE), ("Ivy", _SHE),
    ("Noah", _HE), ("Sara", _SHE), ("Kai", _HE), ("Amy", _SHE), ("Dan", _HE), ("Rosa", _SHE),
]

_OBJECTS = [
    "apples", "marbles", "stickers", "books", "pencils", "cookies", "cards", "shells",
    "coins", "stamps", "eggs", "candies", "toys", "flowers", "balloons", "beads",
    "rocks", "cupcakes", "oranges", "crayons", "buttons", "plums",
]

_CONTAINERS = ["box", "basket", "jar", "bag", "bowl", "crate"]

_TIMES = {2: "doubles", 3: "triples", 4: "quadruples"}
_FRACTIONS = {2: "half", 3: "a third", 4: "a quarter", 5: "a fifth"}

# Question-side phrasings per theme and operation. Placeholders: {N} name, {P} subject
# pronoun, {o} object pronoun, {poss} possessive, {F} another name, {O} objects,
# {C} container, {b} operand, {verb} "doubles"..., {frac} "half"...
_OWN = {
    "start": ["{N} has {a} {O}.", "{N} owns {a} {O}.", "{N} starts with {a} {O}."],
    "start_mul": ["{N} buys {a} bags of {O} with {b} {O} in each bag.",
                  "{N} has {a} boxes with {b} {O} in each box."],
    "+": ["{P} buys {b} more {O}.", "{P} finds {b} more {O}.", "{F} gives {o} {b} {O}.",
          "{P} gets {b} more {O} from {F}."],
    "-": ["{P} gives {b} {O} to {F}.", "{P} loses {b} {O}.", "{P} sells {b} {O}.",
          "{P} uses {b} {O}."],
    "*": ["Then {P_l} {verb} {poss} {O}.", "{P} {verb} {poss} {O}."],
    "*k": ["Then {P_l} gets {b} times as many {O} as before."],
    "/": ["{P} keeps {frac} of {poss} {O} and gives the rest away.",
          "{P} keeps only {frac} of {poss} {O}."],
    "question": ["How many {O} does {N} have now?", "How many {O} does {P_l} have in the end?",
                 "How many {O} does {N} have left?"],
    "line": "{N} has {expr} {O}.",
}

_MONEY = {
    "start": ["{N} has {a} dollars.", "{N} saves {a} dollars.", "{N} has {a} dollars in {poss} wallet."],
    "start_mul": ["{N} works {a} hours and earns {b} dollars each hour."],
    "+": ["{P} earns {b} more dollars.", "{F} gives {o} {b} dollars.", "{P} finds {b} dollars."],
    "-": ["{P} spends {b} dollars on lunch.", "{P} pays {b} dollars for a book.",
          "{P} gives {b} dollars to {F}.", "{P} spends {b} dollars on a toy."],
    "*": ["Then {P_l} {verb} {poss} money."],
    "*k": ["Then {P_l} has {b} times as much money as before."],
    "/": ["{P} keeps {frac} of {poss} money and spends the rest.",
          "{P} saves only {frac} of {poss} money."],
    "question": ["How many dollars does {N} have now?", "How much money does {P_l} have now?",
                 "How many dollars does {N} have left?"],
    "line": "{N} has {expr} dollars.",
}

_BOX = {
    "start": ["A {C} has {a} {O}.", "There are {a} {O} in a {C}."],
    "start_mul": ["A {C} has {a} rows of {O} with {b} {O} in each row."],
    "+": ["{N} puts {b} more {O} in the {C}.", "{N} adds {b} {O} to the {C}."],
    "-": ["{N} takes {b} {O} out of the {C}.", "{N} moves {b} of the {O} to a shelf.",
          "{N} gives {b} of the {O} to {F}."],
    "*": ["Then {N} {verb} the number of {O} in the {C}."],
    "*k": ["Then the {C} gets {b} times as many {O} as before."],
    "/": ["{N} takes out all but {frac} of the {O}.", "Only {frac} of the {O} stay in the {C}."],
    "question": ["How many {O} are in the {C} now?", "How many {O} are left in the {C}?"],
    "line": "The {C} has {expr} {O}.",
}

_THEMES = [_OWN, _OWN, _MONEY, _BOX]


def _fill(template: str, slots: dict) -> str:
    return template.format(**slots)


def _pick_op(
    rng: random.Random,
    cur: int,
    ops: Sequence[str],
    max_number: int,
    max_result: int,
    max_factor: int,
) -> Optional[tuple[str, int]]:
    """A random (op, operand) whose result stays a non-negative integer <= max_result."""
    choices: list[tuple[str, int]] = []
    order = list(ops)
    rng.shuffle(order)
    for op in order:
        if op == "+":
            hi = min(max_number, max_result - cur)
            if hi >= 2:
                choices.append(("+", rng.randint(2, hi)))
        elif op == "-":
            hi = min(max_number, cur - 2)  # keep at least two (plural nouns stay right)
            if hi >= 2:
                choices.append(("-", rng.randint(2, hi)))
        elif op == "*":
            hi = min(max_factor, max_result // max(cur, 1))
            if hi >= 2:
                choices.append(("*", rng.randint(2, hi)))
        elif op == "/":
            divisors = [k for k in range(2, min(max_factor, 5) + 1) if cur % k == 0 and cur // k >= 2]
            if divisors:
                choices.append(("/", rng.choice(divisors)))
        else:  # pragma: no cover - validated by the caller
            raise ValueError(f"unknown op {op!r}")
    if not choices:
        return None
    return choices[0]


def _apply(cur: int, op: str, b: int) -> int:
    if op == "+":
        return cur + b
    if op == "-":
        return cur - b
    if op == "*":
        return cur * b
    return cur // b


def _one_problem(
    rng: random.Random,
    steps: int,
    max_number: int,
    max_result: int,
    ops: Sequence[str],
    max_factor: int,
) -> Optional[tuple[str, str, int]]:
    """One (question, answer, gold) with exactly ``steps`` steps, or None on a dead end."""
    theme = rng.choice(_THEMES)
    (name, (pron, obj, poss)) = rng.choice(_NAMES)
    friend = rng.choice([n for n, _ in _NAMES if n != name])
    slots = {
        "N": name, "P": pron, "P_l": pron.lower(), "o": obj, "poss": poss, "F": friend,
        "O": rng.choice(_OBJECTS), "C": rng.choice(_CONTAINERS),
    }
    sentences: list[str] = []
    lines: list[str] = []
    # The first step either combines a start amount with an operation, or is a product
    # ("3 bags with 4 in each").
    if "*" in ops and rng.random() < 0.25:
        a = rng.randint(2, max(2, min(max_factor + 1, max_number)))
        b = rng.randint(2, max(2, min(max_number, max_result // a)))
        if a * b > max_result:
            return None
        sentences.append(_fill(rng.choice(theme["start_mul"]), {**slots, "a": a, "b": b}))
        cur = a * b
        lines.append(_fill(theme["line"], {**slots, "expr": f"{a} * {b} = <<{a}*{b}={cur}>>{cur}"}))
        remaining = steps - 1
        last_op = "*"
    else:
        cur = rng.randint(2, max_number)
        sentences.append(_fill(rng.choice(theme["start"]), {**slots, "a": cur}))
        remaining = steps
        last_op = ""
    for _ in range(remaining):
        picked = _pick_op(rng, cur, ops, max_number, max_result, max_factor)
        if picked is None:
            return None
        op, b = picked
        extra = {"b": b}
        if op == "*":
            key = "*" if b in _TIMES and rng.random() < 0.7 else "*k"
            extra["verb"] = _TIMES.get(b, "")
        elif op == "/":
            key = "/"
            extra["frac"] = _FRACTIONS[b]
        else:
            key = op
        sentences.append(_fill(rng.choice(theme[key]), {**slots, **extra}))
        new = _apply(cur, op, b)
        expr = f"{cur} {op} {b} = <<{cur}{op}{b}={new}>>{new}"
        line = _fill(theme["line"], {**slots, "expr": expr})
        if lines:  # later steps read "Now Tom has ..." / "Now the box has ..."
            line = "Now " + (line[0].lower() + line[1:] if line.startswith("The ") else line)
        lines.append(line)
        cur = new
        last_op = op
    # "... have left?" only reads right after something was taken away.
    questions = [q for q in theme["question"] if last_op in ("-", "/") or " left" not in q]
    sentences.append(_fill(rng.choice(questions), slots))
    lines.append(f"#### {cur}")
    return " ".join(sentences), "\n".join(lines), cur


def generate_problems(
    n: int,
    seed: int = 0,
    min_steps: int = 1,
    max_steps: int = 3,
    max_number: int = 20,
    max_result: int = 100,
    ops: Sequence[str] = OPS,
    max_factor: int = 4,
    exclude: Optional[Iterable[str]] = None,
    unique: bool = False,
) -> list[dict]:
    """Generate ``n`` word problems as ``{question_id, question, answer, gold}`` records.

    Args:
        n: number of problems.
        seed: seed of the private ``random.Random``; the same arguments give the same list.
        min_steps, max_steps: range of the number of arithmetic steps (solution lines
            before ``#### N``), drawn uniformly per problem.
        max_number: largest start amount and largest added/subtracted operand (the
            smallest is 2, so nouns stay plural).
        max_result: bound on every intermediate and final result.
        ops: allowed operations, a subset of ``("+", "-", "*", "/")``. ``*`` uses factors
            2..``max_factor``; ``/`` is always exact ("keeps a third of them").
        max_factor: largest multiplication factor (and divisor, at most 5).
        exclude: question texts that must not be produced (e.g. the train split).
        unique: also never repeat a question within this list.

    ``question_id`` is ``f"synth-{seed}-{i:05d}"``; ``gold`` is the final answer as a string.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 1 <= min_steps <= max_steps:
        raise ValueError(f"need 1 <= min_steps <= max_steps, got {min_steps}, {max_steps}")
    if max_number < 2:
        raise ValueError(f"max_number must be >= 2, got {max_number}")
    if max_result < max_number:
        raise ValueError(f"max_result ({max_result}) must be >= max_number ({max_number})")
    if max_factor < 2:
        raise ValueError(f"max_factor must be >= 2, got {max_factor}")
    ops = tuple(ops)
    bad = [o for o in ops if o not in OPS]
    if not ops or bad:
        raise ValueError(f"ops must be a non-empty subset of {OPS}, got {list(ops)}")

    rng = random.Random(seed)
    banned = set(exclude or ())
    out: list[dict] = []
    attempts = 0
    max_attempts = 100 * n + 1000
    while len(out) < n:
        attempts += 1
        if attempts > max_attempts:
            raise ValueError(
                f"could only generate {len(out)} of {n} distinct problems with these settings "
                f"(steps {min_steps}-{max_steps}, max_number {max_number}, ops {list(ops)}); "
                f"widen the ranges or ask for fewer"
            )
        steps = rng.randint(min_steps, max_steps)
        made = _one_problem(rng, steps, max_number, max_result, ops, max_factor)
        if made is None:
            continue
        question, answer, gold = made
        if question in banned:
            continue
        if unique:
            banned.add(question)
        out.append(
            {"question_id": f"synth-{seed}-{len(out):05d}", "question": question,
             "answer": answer, "gold": str(gold)}
        )
    return out


def corpus(n: int, seed: int = 0, template: str = ABEL_PROMPT, **kwargs) -> list[str]:
    """``n`` prompt + solution texts (for training a tokenizer on the synthetic domain).

    Extra keyword arguments go to :func:`generate_problems`.
    """
    texts = []
    for p in generate_problems(n, seed=seed, **kwargs):
        prompt = template.replace("{question}", p["question"].strip())
        texts.append(prompt + p["answer"])
    return texts
