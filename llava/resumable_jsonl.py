"""Append-only JSONL output that survives crashes — shared by ``answer.py`` and ``judge.py``.

Each record is one ``write`` of a complete line followed by ``fsync``, so a crash (even ``kill -9``) loses at most
the line being written. On start, :func:`recover_jsonl` reads what is there, drops a last line without its
newline, lines that are not valid records and second copies of a key, rewrites the file atomically if anything
was dropped, and returns the kept records by key: the dropped ones are simply produced again.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Hashable, Mapping
from pathlib import Path
from typing import Any

LOG = logging.getLogger("llava.jsonl")


def _rewrite(path: Path, lines: list[bytes]) -> None:
    # write beside, fsync, rename over: a crash during the repair leaves the old or the new file, never half
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
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


class JsonlAppender:
    """Appends records as JSON lines, one locked write + fsync each, safe across threads."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
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
