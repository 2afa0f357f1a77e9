"""Append-only JSONL output that survives crashes — shared by ``answer.py`` and ``judge.py``.

Each record is one ``write`` of a complete line followed by ``fsync``, so a crash (even ``kill -9``) loses at most
the line being written. On start, one of two readers returns the records already there by key, so that only the
missing ones are produced again:

* :func:`recover_jsonl` (``answer.py``) drops a last line without its newline, lines that are not valid records
  and second copies of a key, and rewrites the file atomically (keeping its permissions) if anything was dropped.
* :func:`resume_own_jsonl` (``judge.py``) never rewrites: a file holding any line that is not one of its records
  is refused untouched, and the only repair is cutting off a last line that a crash left half-written.

New files get the permissions a plain ``open(path, "w")`` would give: 0666 minus the umask.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import tempfile
import threading
from collections.abc import Callable, Hashable, Mapping
from pathlib import Path
from typing import Any

LOG = logging.getLogger("llava.jsonl")


class ForeignFileError(ValueError):
    """The file holds a line this program did not write; the file was left exactly as it was."""


def _rewrite(path: Path, lines: list[bytes]) -> None:
    # write beside, fsync, rename over: a crash during the repair leaves the old or the new file, never half
    mode = stat.S_IMODE(path.stat().st_mode)  # mkstemp makes 0600; the repaired file keeps the old mode
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.writelines(lines)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def recover_jsonl(
    path: str | Path,
    *,
    is_valid: Callable[[Any], bool],
    key_of: Callable[[dict[str, Any]], Hashable],
    what: str = "record",
) -> dict[Hashable, dict[str, Any]]:
    """The valid records already in ``path`` by ``key_of(record)``, after repairing the file (see module doc)."""
    path = Path(path)
    if not path.exists():
        return {}
    chunks = path.read_bytes().split(b"\n")
    tail = chunks.pop()  # b"" when the file ends with a newline
    changed = bool(tail)
    if tail:
        LOG.warning(
            "%s: last line is incomplete (%d bytes, no newline); dropping it to redo", path, len(tail)
        )
    kept: dict[Hashable, dict[str, Any]] = {}
    lines: list[bytes] = []
    for number, chunk in enumerate(chunks, start=1):
        if not chunk.strip():
            changed = changed or bool(chunk)
            continue
        try:
            record = json.loads(chunk)
        except (json.JSONDecodeError, UnicodeDecodeError):
            record = None
        if not is_valid(record):
            LOG.warning("%s:%d: not a valid %s line; dropping it to redo", path, number, what)
            changed = True
            continue
        key = key_of(record)
        if key in kept:
            LOG.warning("%s:%d: second %s for %s; dropping it", path, number, what, key)
            changed = True
            continue
        kept[key] = record
        lines.append(chunk + b"\n")
    if changed:
        _rewrite(path, lines)
        LOG.info("%s: repaired, %d valid %s line(s) kept", path, len(lines), what)
    return kept


def resume_own_jsonl(
    path: str | Path,
    *,
    is_valid: Callable[[Any], bool],
    key_of: Callable[[dict[str, Any]], Hashable],
    line_start: bytes,
    explain: Callable[[Any], str] | None = None,
    what: str = "record",
) -> dict[Hashable, dict[str, Any]]:
    """The records already in ``path`` (a file only this program appends to) by ``key_of(record)``.

    Nothing that might be someone else's is dropped, rewritten or re-permissioned:

    * a complete line that is not valid JSON or not ``is_valid`` raises :class:`ForeignFileError` naming the line
      (``explain(record)`` says what it looks like instead), and the file is left byte for byte as it was;
    * a last line without its newline is dropped only if it starts like every record this program writes
      (``line_start``, e.g. ``b'{"question_id": '``): that is a write cut short by a crash. It is cut off in place
      (``truncate``: same file, same mode), so that the next record starts on a line of its own; any other
      unterminated last line is refused like a foreign line;
    * a second record for a key stays in the file and is ignored (the first wins, as every reader here does);
    * blank lines are skipped.
    """
    path = Path(path)
    if not path.exists():
        return {}
    data = path.read_bytes()
    chunks = data.split(b"\n")
    tail = chunks.pop()  # b"" when the file ends with a newline
    kept: dict[Hashable, dict[str, Any]] = {}
    for number, chunk in enumerate(chunks, start=1):
        if not chunk.strip():
            continue
        try:
            record = json.loads(chunk)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ForeignFileError(f"{path}:{number}: not JSON, so not a {what} line") from None
        if not is_valid(record):
            reason = explain(record) if explain else f"not a {what} line"
            raise ForeignFileError(f"{path}:{number}: {reason}")
        key = key_of(record)
        if key in kept:
            LOG.warning("%s:%d: second %s for %s; ignored, the first is kept", path, number, what, key)
            continue
        kept[key] = record
    if tail and not (tail.startswith(line_start) or line_start.startswith(tail)):
        try:
            record = json.loads(tail)
        except (json.JSONDecodeError, UnicodeDecodeError):
            record = None
        reason = (
            explain(record)
            if explain and record is not None
            else f"the last line has no newline and does not start like a {what} line ({tail[:60]!r})"
        )
        raise ForeignFileError(f"{path}:{len(chunks) + 1}: {reason}")
    if tail:
        LOG.warning(
            "%s: last line is incomplete (%d bytes, no newline): a write cut short; cutting it off to redo",
            path,
            len(tail),
        )
        os.truncate(path, len(data) - len(tail))
    return kept


class JsonlAppender:
    """Appends records as JSON lines, one locked write + fsync each, safe across threads."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)  # minus the umask
        self._lock = threading.Lock()

    def write(self, record: Mapping[str, Any]) -> None:
        """Append ``record`` as one JSON line and make it durable before returning."""
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
            os.fsync(self._fd)

    def close(self) -> None:
        """Close the file."""
        os.close(self._fd)

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
