"""Files: JSONL reading with errors that name the file and line, and every atomic write.

- ``iter_jsonl`` / ``read_jsonl`` / ``read_jsonl_prefix``: strict readers;
- ``write_atomic`` / ``write_text_atomic`` / ``write_json_atomic`` / ``write_jsonl_atomic``: a
  temporary file beside the target, then a rename, so a reader never sees half a file;
- ``replace_dir``: move a finished folder into place (an atomic swap where the OS allows);
- ``sha256_files``: one digest over several files (missing ones are skipped);
- ``JsonlAppender``: one flushed line per record, for resumable outputs;
- ``run_lock``: an advisory lock that keeps a second process out of a run folder;
- ``check_writable``: a clear error before any work when an output cannot be written.

Standard library only (``looper.regime_w`` and ``looper prefs`` use it without torch).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from typing import Any, Iterable, Iterator, Optional, Sequence


class DataError(ValueError):
    """Bad input data. The message names the file and line, and what was expected."""


def iter_jsonl(path: str, required: Sequence[str] = ()) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, record)`` for each non-blank line; blank lines are skipped.

    A line that is not a JSON object, or lacks a ``required`` field, raises ``DataError``.
    """
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found")
    if os.path.isdir(path):
        raise DataError(f"{path}: is a folder, expected a JSONL file")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 text (byte {e.start} of the line); expected JSON lines") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            missing = [k for k in required if k not in rec]
            if missing:
                raise DataError(
                    f"{path}:{lineno}: missing field(s) {missing}; each record needs {list(required)}"
                )
            yield lineno, rec


def read_jsonl(path: str, required: Sequence[str] = (), allow_empty: bool = False) -> list[dict]:
    """Read a whole JSONL file; an empty file is an error unless ``allow_empty``."""
    records = [rec for _, rec in iter_jsonl(path, required)]
    if not records and not allow_empty:
        raise DataError(f"{path}: the file holds no records")
    return records


def read_jsonl_prefix(path: str, key: str) -> tuple[list[dict], int]:
    """Read the complete records of a file that is being appended to (for resume).

    Returns the records and the byte length of the valid prefix. A torn last line (a
    crash mid-write, no trailing newline) is ignored; a malformed line anywhere else is
    corruption and raises ``DataError`` rather than being overwritten.
    """
    if not os.path.exists(path):
        return [], 0
    with open(path, "rb") as f:
        data = f.read()
    records: list[dict] = []
    good = 0
    lines = data.split(b"\n")
    for i, raw in enumerate(lines):
        is_last = i == len(lines) - 1
        if is_last:  # text after the final newline: a torn write, never a complete record
            break
        if not raw.strip():
            good += len(raw) + 1
            continue
        try:
            rec = json.loads(raw)
            if not isinstance(rec, dict) or key not in rec:
                raise ValueError
        except ValueError:
            raise DataError(
                f"{path}:{i + 1}: corrupted record in a partial output file (expected a JSON object "
                f"with '{key}'); move the file away or fix that line, it will not be overwritten"
            ) from None
        records.append(rec)
        good += len(raw) + 1
    return records, good


def write_jsonl_atomic(path: str, records: Iterable[dict]) -> int:
    """Write records to ``path`` through a temporary file and a rename. Returns the count."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    n = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                n += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return n


def write_atomic(path: str, write) -> None:
    """Call ``write(tmp)`` to write a temporary file beside ``path``, then rename it to
    ``path``; on any failure the temporary file is removed and ``path`` is left as it was.
    (For formats written by other libraries, e.g. ``safetensors.torch.save_file``.)"""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file beside it and a rename."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    write_atomic(path, write)


def write_json_atomic(path: str, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def sha256_files(paths: Sequence[str], h=None) -> str:
    """Hex SHA-256 over the bytes of ``paths`` in order (missing files are skipped).

    Pass ``h`` (a ``hashlib`` object) to feed the bytes into a larger digest; the return
    value is then its hex digest so far.
    """
    h = h if h is not None else hashlib.sha256()
    for p in paths:
        if os.path.isfile(p):
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()


def _exchange(a: str, b: str) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False if unsupported."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def replace_dir(src: str, dst: str) -> None:
    """Move finished folder ``src`` to ``dst``, replacing an old ``dst``.

    Where the OS allows it the two folders are swapped atomically, so ``dst`` is never
    missing, even if the process dies mid-way; elsewhere two renames are used.
    """
    if not os.path.exists(dst):
        os.rename(src, dst)
    elif _exchange(src, dst):
        shutil.rmtree(src, ignore_errors=True)  # src now holds the old folder
    else:
        old = f"{dst}.old.{os.getpid()}"
        os.rename(dst, old)
        os.rename(src, dst)
        shutil.rmtree(old, ignore_errors=True)


class JsonlAppender:
    """Append one record per line and flush it, so a killed run loses at most one line."""

    def __init__(self, path: str, truncate_to: Optional[int] = None):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if truncate_to is not None and os.path.exists(path):
            with open(path, "r+b") as f:
                f.truncate(truncate_to)
        self._f = open(path, "a", encoding="utf-8")

    def write(self, rec: dict) -> None:
        self._f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --------------------------------------------------------------------------- run folders


def check_writable(paths: Sequence[str]) -> None:
    """Raise ``DataError`` unless every path can be created: probe the deepest folder of each
    that exists with a temporary file (permissions alone mislead, e.g. for root or on a
    read-only mount)."""
    probed: set[str] = set()
    for path in paths:
        folder = os.path.abspath(path)
        if os.path.isfile(folder):
            folder = os.path.dirname(folder)  # an existing file is replaced beside itself
        while not os.path.exists(folder):
            folder = os.path.dirname(folder)
        if folder in probed:
            continue
        probed.add(folder)
        if not os.path.isdir(folder):
            raise DataError(f"cannot write {path}: {folder} is a file, not a folder")
        probe = os.path.join(folder, f".looper-write-probe-{os.getpid()}")
        try:
            with open(probe, "w") as f:
                f.write("")
            os.remove(probe)
        except OSError as e:
            raise DataError(f"cannot write {path}: {folder} is not writable ({e.strerror})") from None


_HELD: dict[str, list] = {}  # locked folder -> [file descriptor, depth], for re-entry in one process


def _lock_holder(folder: str) -> str:
    """Who holds the flock on ``folder``: ``pid N: command`` from /proc (Linux), or a shrug."""
    try:
        inode = os.stat(folder).st_ino
        with open("/proc/locks") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5].rsplit(":", 1)[-1] == str(inode):
                    pid = parts[4]
                    with open(f"/proc/{pid}/cmdline", "rb") as c:
                        cmd = c.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
                    return f"pid {pid}: {cmd}"
    except OSError:
        pass
    return "another process"


@contextlib.contextmanager
def run_lock(folder: str):
    """Hold an advisory lock on run folder ``folder`` while the block runs.

    The lock is a ``flock`` on the folder itself, so no file is written for it. A second
    process asking for it fails at once with a ``DataError`` naming the holder's pid and
    command. The operating system drops the lock when its process dies, so a crashed run
    never leaves a stale lock. Re-entrant within one process (the pipeline holds it while
    its stages take it again). Where ``fcntl`` is missing, nothing is locked.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    key = os.path.realpath(folder)
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield
        finally:
            _HELD[key][1] -= 1
        return
    try:
        os.makedirs(key, exist_ok=True)
        fd = os.open(key, os.O_RDONLY)
    except OSError as e:
        raise DataError(f"cannot use run folder {folder}: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise DataError(
            f"{folder} is in use by another looper process ({_lock_holder(key)}); wait for it to finish, "
            "or give this run another run.output_dir"
        ) from None
    _HELD[key] = [fd, 1]
    try:
        yield
    finally:
        _HELD[key][1] -= 1
        if _HELD[key][1] == 0:
            del _HELD[key]
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
