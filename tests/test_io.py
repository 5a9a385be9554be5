"""looper.io: strict JSONL readers, atomic writes, folder swaps, digests, the appender."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from looper.io import (
    DataError,
    JsonlAppender,
    iter_jsonl,
    read_jsonl,
    read_jsonl_prefix,
    replace_dir,
    sha256_files,
    write_json_atomic,
    write_jsonl_atomic,
    write_text_atomic,
)


# --------------------------------------------------------------------------- readers


def test_iter_jsonl_numbers_lines_and_skips_blanks(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"a": 1}\n\n{"a": 2}\n')
    assert list(iter_jsonl(str(p))) == [(1, {"a": 1}), (3, {"a": 2})]


@pytest.mark.parametrize(
    "text, pattern",
    [
        ('{"a": 1}\n{"a": \n', r"a\.jsonl:2: malformed JSON"),
        ('{"a": 1}\n[1, 2]\n', r"a\.jsonl:2: expected a JSON object, got list"),
        ('{"a": 1}\n{"b": 2}\n', r"a\.jsonl:2: missing field\(s\) \['a'\]"),
    ],
)
def test_bad_lines_name_the_file_and_line(tmp_path, text, pattern):
    p = tmp_path / "a.jsonl"
    p.write_text(text)
    with pytest.raises(DataError, match=pattern):
        list(iter_jsonl(str(p), required=("a",)))


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="holds no records"):
        read_jsonl(str(tmp_path / "e.jsonl"))
    assert read_jsonl(str(tmp_path / "e.jsonl"), allow_empty=True) == []
    with pytest.raises(DataError, match="file not found"):
        read_jsonl(str(tmp_path / "missing.jsonl"))


def test_prefix_reader_drops_a_torn_last_line_and_refuses_inner_corruption(tmp_path):
    p = tmp_path / "out.jsonl"
    good = '{"question_id": "a"}\n{"question_id": "b"}\n'
    p.write_text(good + '{"question_id": "c", "tex')  # killed mid-write
    records, n_bytes = read_jsonl_prefix(str(p), "question_id")
    assert [r["question_id"] for r in records] == ["a", "b"]
    assert n_bytes == len(good.encode())
    p.write_text('{"question_id": "a"}\nnot json\n{"question_id": "b"}\n')
    with pytest.raises(DataError, match=r"out\.jsonl:2: corrupted record"):
        read_jsonl_prefix(str(p), "question_id")
    assert read_jsonl_prefix(str(tmp_path / "none.jsonl"), "question_id") == ([], 0)


# --------------------------------------------------------------------------- writers


def test_atomic_writers_round_trip_and_leave_no_temporary_file(tmp_path):
    recs = [{"a": 1, "t": "é"}, {"a": 2}]
    n = write_jsonl_atomic(str(tmp_path / "d" / "x.jsonl"), recs)
    assert n == 2 and read_jsonl(str(tmp_path / "d" / "x.jsonl")) == recs
    write_json_atomic(str(tmp_path / "d" / "y.json"), {"k": [1, 2]})
    assert json.loads((tmp_path / "d" / "y.json").read_text()) == {"k": [1, 2]}
    write_text_atomic(str(tmp_path / "d" / "z.md"), "# hi\n")
    assert (tmp_path / "d" / "z.md").read_text() == "# hi\n"
    assert sorted(os.listdir(tmp_path / "d")) == ["x.jsonl", "y.json", "z.md"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    p = tmp_path / "x.jsonl"
    write_jsonl_atomic(str(p), [{"a": 1}])

    def records():
        yield {"a": 2}
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_jsonl_atomic(str(p), records())
    assert read_jsonl(str(p)) == [{"a": 1}]
    assert os.listdir(tmp_path) == ["x.jsonl"]


def test_sha256_files_equals_hashlib_over_the_concatenation_and_skips_missing(tmp_path):
    (tmp_path / "a").write_bytes(b"abc")
    (tmp_path / "b").write_bytes(b"def")
    want = hashlib.sha256(b"abcdef").hexdigest()
    assert sha256_files([str(tmp_path / "a"), str(tmp_path / "missing"), str(tmp_path / "b")]) == want
    assert sha256_files([str(tmp_path / "b"), str(tmp_path / "a")]) != want  # order matters


def test_appender_truncates_to_the_valid_prefix_then_appends(tmp_path):
    p = tmp_path / "part.jsonl"
    p.write_text('{"question_id": "a"}\n{"question_id": "b", "x')
    _, good = read_jsonl_prefix(str(p), "question_id")
    with JsonlAppender(str(p), truncate_to=good) as out:
        out.write({"question_id": "b"})
    assert [r["question_id"] for r in read_jsonl(str(p))] == ["a", "b"]

# --------------------------------------------------------------------------- replace_dir


def _make(path: Path, files: dict[str, str]) -> Path:
    path.mkdir(parents=True)
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def _contents(path: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in path.iterdir()}


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_replace_dir(tmp_path, monkeypatch, exchange):
    import looper.io as io

    if not exchange:  # the fallback where the OS has no atomic exchange
        monkeypatch.setattr(io, "_exchange", lambda a, b: False)
    dst = _make(tmp_path / "dst", {"old.txt": "old", "shared.txt": "v1"})
    src = _make(tmp_path / ".tmp-dst", {"new.txt": "new", "shared.txt": "v2"})
    replace_dir(str(src), str(dst))
    assert _contents(dst) == {"new.txt": "new", "shared.txt": "v2"}  # old-only file gone
    assert sorted(os.listdir(tmp_path)) == ["dst"]

    # a destination that does not exist yet
    src2 = _make(tmp_path / ".tmp-other", {"a": "1"})
    replace_dir(str(src2), str(tmp_path / "other"))
    assert _contents(tmp_path / "other") == {"a": "1"}
    assert sorted(os.listdir(tmp_path)) == ["dst", "other"]


# --------------------------------------------------------------------------- run folders


def test_a_non_utf8_line_names_the_file_and_line(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_bytes(b'{"a": 1}\n{"a": 2}\n{"a": "caf\xe9"}\n{"a": 4}\n')
    seen = []
    with pytest.raises(DataError, match=r"a\.jsonl:3: not UTF-8") as info:
        for lineno, _ in iter_jsonl(str(p)):
            seen.append(lineno)
    assert seen == [1, 2]  # the good lines before it were read
    assert f"{p}:3:" in str(info.value)


def test_check_writable_refuses_a_path_under_a_file_and_creates_nothing(tmp_path):
    from looper.io import check_writable

    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    with pytest.raises(DataError, match=r"not_a_folder is a file, not a folder") as info:
        check_writable([str(tmp_path / "fresh" / "out.jsonl"), str(blocker / "run" / "metrics" / "sft.jsonl")])
    assert str(blocker / "run" / "metrics" / "sft.jsonl") in str(info.value)
    assert sorted(os.listdir(tmp_path)) == ["not_a_folder"] and blocker.read_text() == "x"

    # fresh paths (deep or not), and an existing file that would be replaced: fine, nothing created
    existing = tmp_path / "old.json"
    existing.write_text("{}")
    check_writable([str(tmp_path / "a" / "b" / "c.jsonl"), str(tmp_path / "d.json"), str(existing), str(tmp_path)])
    assert sorted(os.listdir(tmp_path)) == ["not_a_folder", "old.json"]


_TRY_LOCK = """
import sys
from looper.io import DataError, run_lock
try:
    with run_lock(sys.argv[1]):
        print("LOCKED")
except DataError as e:
    print("REFUSED", e)
"""

_HOLD_LOCK = """
import sys, time
from looper.io import run_lock
with run_lock(sys.argv[1]):
    print("HOLDING", flush=True)
    time.sleep(600)
"""


def _try_lock(folder: Path) -> str:
    import subprocess
    import sys

    from conftest import subprocess_env

    proc = subprocess.run([sys.executable, "-c", _TRY_LOCK, str(folder)], env=subprocess_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_run_lock_is_reentrant_here_and_keeps_another_process_out(tmp_path):
    from looper.io import run_lock

    folder = tmp_path / "run"
    with run_lock(str(folder)):
        assert folder.is_dir() and os.listdir(folder) == []  # the lock is the folder itself: no file
        with run_lock(str(folder / ".." / "run")):  # the same folder, spelled otherwise: re-entered
            out = _try_lock(folder)
            assert out.startswith("REFUSED") and "in use by another looper process" in out, out
            assert f"pid {os.getpid()}" in out, out
        out = _try_lock(folder)  # the inner block has ended: still held by the outer one
        assert out.startswith("REFUSED") and f"pid {os.getpid()}" in out, out
    assert _try_lock(folder) == "LOCKED"  # released at the end of the outer block
    assert os.listdir(folder) == []


def test_run_lock_held_by_a_killed_process_is_free_again(tmp_path):
    import signal
    import subprocess
    import sys

    from conftest import subprocess_env
    from looper.io import run_lock

    folder = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(folder)], env=subprocess_env(),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "HOLDING"
        with pytest.raises(DataError, match=rf"in use by another looper process \(pid {holder.pid}\b"):
            with run_lock(str(folder)):
                pass
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        holder.stdout.close()
    assert holder.returncode == -signal.SIGKILL
    with run_lock(str(folder)):  # the OS dropped the dead process's lock: nothing stale left
        assert os.listdir(folder) == []
    assert _try_lock(folder) == "LOCKED"
