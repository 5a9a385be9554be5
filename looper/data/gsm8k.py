"""GSM8K data: loading (JSONL, Hugging Face ids, GSM8K-Platinum), the prompt, and grading.

Everything here is plain Python: torch is never imported, and ``datasets`` is imported
only inside the functions that download from the Hugging Face hub or receive a
``datasets.Dataset``.

Every loader returns a list of question records::

    {"question_id": str, "question": str, "answer": str, "gold": str}

where ``answer`` is the full reference solution (ending in ``#### N``) and ``gold`` is the
normalized final answer (see :func:`normalize_answer`).

Answer extraction comes in two flavours (both from :mod:`looper.answers`, which also
holds the number grammar, the canonical form and the bounds on the work done):

- :func:`extract_answer_strict` accepts only explicit final-answer forms
  (``#### N``, ``The answer is N``, ``Answer: N``) and returns the last one;
- :func:`extract_answer` tries the strict forms first and otherwise falls back to the
  last number in the text.

Both read only the end of a completion (``looper.answers.WINDOW`` characters).
:func:`is_correct` is :func:`looper.answers.answers_equal` (relative tolerance
``looper.answers.REL_TOL``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

from looper.answers import REL_TOL, answers_equal, extract_answer, extract_answer_strict, normalize_answer
from looper.config import ABEL_PROMPT, DataConfig
from looper.io import DataError, iter_jsonl

__all__ = [
    "GSM8K_HF_ID",
    "PLATINUM_HF_ID",
    "normalize_answer",
    "gold_answer",
    "extract_answer_strict",
    "extract_answer",
    "is_correct",
    "strip_calculator",
    "format_prompt",
    "format_completion",
    "load_gsm8k",
    "load_platinum",
    "load_questions",
]

GSM8K_HF_ID = "openai/gsm8k"
PLATINUM_HF_ID = "madrylab/gsm8k-platinum"

_GSM8K_ALIASES = {"gsm8k", GSM8K_HF_ID}
_PLATINUM_ALIASES = {"platinum", "gsm8k-platinum", PLATINUM_HF_ID}

Source = Union[str, "os.PathLike[str]", Sequence[dict], Any]

# --------------------------------------------------------------------------- answers

# The number grammar, canonical form, answer extraction and equality live in
# looper.answers (shared with Regime W scoring); this module re-exports them.


def gold_answer(answer_field: str) -> str:
    """Normalized final answer of a GSM8K solution: the number after the last ``####``.

    Raises ``ValueError`` when the solution has no ``####`` line or no number after it.
    """
    if not isinstance(answer_field, str):
        raise ValueError(f"expected a GSM8K solution string, got {type(answer_field).__name__}")
    if "####" not in answer_field:
        snippet = answer_field.strip().replace("\n", " ")[-80:]
        raise ValueError(
            f"the solution has no final '#### <number>' line (it ends with: {snippet!r})"
        )
    tail = answer_field.rsplit("####", 1)[1].strip()
    gold = normalize_answer(tail)
    if gold is None:
        raise ValueError(f"the '####' line holds no number: '#### {tail[:80]}'")
    return gold


def is_correct(prediction: Any, gold: Any, rel_tol: float = REL_TOL) -> bool:
    """Whether ``prediction`` equals ``gold`` numerically (relative tolerance ``rel_tol``).

    Both sides are normalized first, so ``$``, ``,`` and a trailing ``.`` are ignored.
    A None (or non-numeric) prediction is never correct. Same rule as
    :func:`looper.answers.answers_equal`.
    """
    return answers_equal(prediction, gold, rel_tol)


# --------------------------------------------------------------------------- text

_CALC_RE = re.compile(r"<<[^<>]*>>")


def strip_calculator(text: str) -> str:
    """Remove GSM8K calculator annotations: ``"4*2=<<4*2=8>>8"`` -> ``"4*2=8"``."""
    return _CALC_RE.sub("", text)


def format_prompt(question: str, template: str = ABEL_PROMPT) -> str:
    """The model prompt for one question (the Abel tutoring template by default)."""
    if "{question}" not in template:
        raise ValueError("the prompt template must contain the placeholder '{question}'")
    return template.replace("{question}", question.strip())


def format_completion(answer_field: str, strip_calc: bool = False) -> str:
    """The training target for one question: the reference solution, ``#### N`` line kept.

    Surrounding whitespace is removed; with ``strip_calc`` the ``<<...>>`` calculator
    annotations are removed too.
    """
    text = strip_calculator(answer_field) if strip_calc else answer_field
    return text.strip()


# --------------------------------------------------------------------------- loading


def _is_dataset(obj: Any) -> bool:
    """Whether ``obj`` looks like a ``datasets.Dataset`` (checked without importing it)."""
    return type(obj).__module__.startswith("datasets") and hasattr(obj, "column_names")


def _looks_like_path(source: str) -> bool:
    """Whether a string that names no existing file is still meant as a file path."""
    return (
        source.endswith((".jsonl", ".json", ".jl"))
        or source.startswith((".", "/", "~"))
        or (os.sep in source and not re.fullmatch(r"[\w.-]+/[\w.-]+", source))
    )


def _build_records(
    rows: Iterable[tuple[int, str, dict]],
    name: str,
    split: str,
    where: str,
    platinum: Optional[bool] = None,
) -> list[dict]:
    """Turn raw rows into question records.

    ``rows`` yields ``(row_index, location, row)`` where ``location`` is used in error
    messages ("file.jsonl:12" or "openai/gsm8k[test] row 12"). The row index is the
    position in the original source, so ids stay stable when rows are filtered out.
    ``platinum``: None = decide from the first row (a ``cleaning_status`` field).
    """
    records: list[dict] = []
    seen_ids: dict[str, str] = {}
    n_rows = 0
    for index, loc, row in rows:
        n_rows += 1
        if not isinstance(row, dict):
            raise DataError(f"{loc}: expected a record with 'question' and 'answer', got {type(row).__name__}")
        missing = [k for k in ("question", "answer") if k not in row or row[k] is None]
        if missing:
            raise DataError(
                f"{loc}: missing field(s) {missing}; each row needs 'question' and 'answer' "
                f"(the GSM8K solution ending in '#### <number>')"
            )
        if platinum is None:
            platinum = "cleaning_status" in row
        if platinum:
            status = str(row.get("cleaning_status", "")).strip().lower()
            if status == "rejected":
                continue
        question, answer = row["question"], row["answer"]
        if not isinstance(question, str) or not question.strip():
            raise DataError(f"{loc}: 'question' must be a non-empty string, got {question!r:.80}")
        if not isinstance(answer, str):
            raise DataError(f"{loc}: 'answer' must be a string, got {type(answer).__name__}")
        try:
            gold = gold_answer(answer)
        except ValueError as e:
            raise DataError(f"{loc}: bad 'answer': {e}") from None
        qid = row.get("question_id")
        if not isinstance(qid, str) or not qid:
            qid = f"{name}-{split}-{index:05d}"
        if qid in seen_ids:
            raise DataError(f"{loc}: duplicate question_id {qid!r} (first seen at {seen_ids[qid]})")
        seen_ids[qid] = loc
        records.append({"question_id": qid, "question": question, "answer": answer, "gold": gold})
    if n_rows == 0:
        raise DataError(f"{where}: no rows (empty data set)")
    if not records:
        raise DataError(f"{where}: all {n_rows} rows were dropped (every row is 'rejected')")
    return records


def _jsonl_rows(path: str) -> Iterator[tuple[int, str, dict]]:
    for index, (lineno, rec) in enumerate(iter_jsonl(path)):
        yield index, f"{path}:{lineno}", rec


def _sequence_rows(rows: Iterable[Any], label: str) -> Iterator[tuple[int, str, dict]]:
    for index, rec in enumerate(rows):
        yield index, f"{label} row {index}", rec


def _load_jsonl(path: str, split: str, platinum: Optional[bool] = None, name: Optional[str] = None) -> list[dict]:
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    stem = name or Path(path).stem
    return _build_records(_jsonl_rows(path), stem, split, path, platinum=platinum)


def _load_hf(hf_id: str, hf_config: Optional[str], split: str) -> Any:
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a declared dependency
        raise DataError(f"loading {hf_id!r} needs the 'datasets' package: {e}") from None
    try:
        if hf_config:
            return datasets.load_dataset(hf_id, hf_config, split=split)
        return datasets.load_dataset(hf_id, split=split)
    except Exception as e:  # network, unknown id, unknown split: say what was asked for
        raise DataError(
            f"could not load Hugging Face dataset {hf_id!r} (config {hf_config!r}, split {split!r}): "
            f"{type(e).__name__}: {e}. Pass a local JSONL path instead when offline."
        ) from e


def _dataset_name(ds: Any, default: str) -> str:
    info = getattr(ds, "info", None)
    name = getattr(info, "dataset_name", None) if info is not None else None
    return str(name) if name else default


def load_gsm8k(source: Source = GSM8K_HF_ID, split: str = "test", hf_config: str = "main") -> list[dict]:
    """Load GSM8K-format questions.

    ``source`` is a JSONL path (one ``{"question", "answer"}`` object per line), a Hugging
    Face dataset id (``"openai/gsm8k"`` or the shorthand ``"gsm8k"``, loaded as
    ``load_dataset(id, hf_config, split=split)``), a ``datasets.Dataset`` or a list of
    dicts. A JSONL file whose rows carry ``cleaning_status`` is read as GSM8K-Platinum
    (rejected rows dropped). Ids are ``f"{name}-{split}-{row_index:05d}"`` unless the rows
    carry their own ``question_id``.
    """
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if isinstance(source, str):
        key = source.strip()
        if key.lower() in _PLATINUM_ALIASES:
            return load_platinum(PLATINUM_HF_ID, split=split)
        if os.path.exists(key) or _looks_like_path(key):
            return _load_jsonl(key, split)
        hf_id = GSM8K_HF_ID if key.lower() in _GSM8K_ALIASES else key
        ds = _load_hf(hf_id, hf_config, split)
        name = "gsm8k" if hf_id == GSM8K_HF_ID else hf_id.split("/")[-1]
        return _build_records(_sequence_rows(ds, f"{hf_id}[{split}]"), name, split, f"{hf_id}[{split}]")
    if _is_dataset(source):
        name = _dataset_name(source, "dataset")
        label = f"dataset {name!r}"
        return _build_records(_sequence_rows(source, label), name, split, label)
    if isinstance(source, (list, tuple)):
        return _build_records(_sequence_rows(source, "rows"), "rows", split, "rows")
    raise DataError(
        f"unsupported data source {source!r}: expected a JSONL path, a Hugging Face id, "
        f"a datasets.Dataset or a list of dicts"
    )


def load_platinum(source: Source = PLATINUM_HF_ID, split: str = "test", hf_config: str = "main") -> list[dict]:
    """Load GSM8K-Platinum, dropping the rows whose ``cleaning_status`` is ``"rejected"``.

    ``source`` is the Hugging Face id (``"madrylab/gsm8k-platinum"`` or ``"platinum"``),
    a local JSONL with the columns ``question``, ``answer`` and ``cleaning_status``, a
    ``datasets.Dataset`` or a list of dicts. Ids (``platinum-test-00042``) use the row
    index in the full source, so they match the GSM8K test row of the same question.
    """
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if isinstance(source, str):
        key = source.strip()
        if key.lower() in _PLATINUM_ALIASES:
            ds = _load_hf(PLATINUM_HF_ID, hf_config, split)
            label = f"{PLATINUM_HF_ID}[{split}]"
            return _build_records(_sequence_rows(ds, label), "platinum", split, label, platinum=True)
        if os.path.exists(key) or _looks_like_path(key):
            return _load_jsonl(key, split, platinum=True)
        ds = _load_hf(key, hf_config, split)
        label = f"{key}[{split}]"
        return _build_records(_sequence_rows(ds, label), key.split("/")[-1], split, label, platinum=True)
    if _is_dataset(source) or isinstance(source, (list, tuple)):
        label = "rows" if isinstance(source, (list, tuple)) else f"dataset {_dataset_name(source, 'platinum')!r}"
        return _build_records(_sequence_rows(source, label), "platinum", split, label, platinum=True)
    raise DataError(f"unsupported Platinum source {source!r}")


_SYNTH_SPLIT_OFFSET = {"train": 0, "test": 1_000_000, "val": 2_000_000}


def _synthetic_split(split: str, data_cfg: DataConfig) -> list[dict]:
    """Synthetic questions for one split; test/val never repeat a train question."""
    from looper.data.synthetic import generate_problems

    sc = data_cfg.synthetic
    if split not in _SYNTH_SPLIT_OFFSET:
        raise DataError(f"synthetic data has splits {sorted(_SYNTH_SPLIT_OFFSET)}, got {split!r}")
    kwargs = dict(min_steps=sc.min_steps, max_steps=sc.max_steps, max_number=sc.max_number)
    train = generate_problems(sc.n_train, seed=sc.seed, **kwargs)
    if split == "train":
        return train
    exclude = {p["question"] for p in train}
    if split == "val":
        n = sc.n_val
        test = generate_problems(
            sc.n_test, seed=sc.seed + _SYNTH_SPLIT_OFFSET["test"], exclude=exclude, unique=True, **kwargs
        )
        exclude |= {p["question"] for p in test}
    else:
        n = sc.n_test
    return generate_problems(
        n, seed=sc.seed + _SYNTH_SPLIT_OFFSET[split], exclude=exclude, unique=True, **kwargs
    )


def load_questions(source: Source, split: str, data_cfg: Optional[DataConfig] = None) -> list[dict]:
    """Load the questions of one split from any supported source (used by every stage).

    - ``None``: the offline synthetic generator (``data_cfg.synthetic``). ``"train"`` uses
      ``synthetic.seed``; ``"test"`` and ``"val"`` use derived seeds and never contain a
      train question (val also avoids the test questions).
    - ``"gsm8k"`` / ``"openai/gsm8k"``: the Hugging Face dataset (``data_cfg.hf_config``).
    - ``"platinum"`` / ``"madrylab/gsm8k-platinum"``: GSM8K-Platinum, rejected rows dropped.
    - an existing path: JSONL (Platinum-aware via ``cleaning_status``).
    - any other string: a Hugging Face dataset id.
    - a ``datasets.Dataset`` or a list of dicts.
    """
    data_cfg = data_cfg if data_cfg is not None else DataConfig()
    if source is None:
        return _synthetic_split(split, data_cfg)
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if isinstance(source, str):
        key = source.strip()
        if not key:
            raise DataError("empty data source string; use null for the synthetic data set")
        if key.lower() in _PLATINUM_ALIASES:
            return load_platinum(PLATINUM_HF_ID, split=split, hf_config=data_cfg.hf_config)
        return load_gsm8k(key, split=split, hf_config=data_cfg.hf_config)
    return load_gsm8k(source, split=split, hf_config=data_cfg.hf_config)
