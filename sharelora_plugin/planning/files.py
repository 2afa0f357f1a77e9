"""Reading JSON / JSONL and writing files so that readers see the old content or the new, never half of it —
for the plan and calibration files and the repo's scripts (data preparation, LLaVA conversion, judge)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sharelora_plugin.planning.rules import PlanError


def write_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``. The file gets the
    permissions a plain ``open(path, "w")`` would give (0666 minus the umask), not ``mkstemp``'s private 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_name, 0o666 & ~umask)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> int:
    """Write ``rows`` as JSON lines (UTF-8, non-ASCII kept) atomically; returns how many were written."""
    lines = [json.dumps(row, ensure_ascii=False) + "\n" for row in rows]
    write_atomic(path, "".join(lines).encode("utf-8"))
    return len(lines)


def _read_text(path: str | os.PathLike, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PlanError(f"{what} not found: {path}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise PlanError(f"cannot read {path}: {err}") from None


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """Parse a JSON file; :class:`PlanError` names the file (as ``what``) and, for bad JSON, the line and
    column."""
    try:
        return json.loads(_read_text(path, what))
    except json.JSONDecodeError as err:
        raise PlanError(
            f"{path} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})"
        ) from None


def read_jsonl(path: str | os.PathLike, what: str = "file") -> list[Any]:
    """The records of a JSON-lines file (blank lines skipped); :class:`PlanError` names the file and the line of
    a record that is not valid JSON."""
    records = []
    for number, line in enumerate(_read_text(path, what).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise PlanError(f"{path} line {number} is not valid JSON ({err.msg})") from None
    return records
