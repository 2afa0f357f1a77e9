"""Convert LLaVA-Instruct (80K / 150K / 665K mix) JSON into Axolotl ``chat_template`` JSONL rows with image entries.

Upstream format (``liuhaotian/LLaVA-Instruct-150K``, e.g. ``llava_instruct_80k.json``) is one JSON list of::

    {"id": "000000215677", "image": "000000215677.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is the man doing?"},
                       {"from": "gpt", "value": "He is riding a horse."}, ...]}

Each record becomes one JSONL row in the multimodal ``messages`` format of Axolotl's ``docs/multimodal.qmd``::

    {"id": "000000215677",
     "messages": [{"role": "user", "content": [{"type": "image", "path": "/data/coco/train2017/000000215677.jpg"},
                                               {"type": "text", "text": "What is the man doing?"}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "He is riding a horse."}]}]}

* Roles: ``human`` → ``user``, ``gpt`` → ``assistant``, ``system`` → ``system``.
* The ``<image>`` placeholder (upstream writes ``"<image>\\n" + text`` or ``text + "\\n<image>"``) becomes an image
  entry at the same place in the content list; the newline that separated it from the text is dropped. A record
  with an ``image`` but no placeholder gets the image in front of its first user message (upstream's own
  preprocessing does the same). :func:`to_upstream` inverts the conversion for these canonical forms.
* Image paths are ``--image-root`` joined with the record's ``image`` (COCO train2017 for LLaVA-Instruct), written
  absolute by default because Axolotl (transformers' ``load_image``) opens them relative to the working directory.
* Rows are **skipped, never silently**: a missing image file, a record without conversations, an unknown role, or
  more ``<image>`` placeholders than images. Every skip is counted by reason, the first few are logged, and
  ``--skipped FILE`` writes all of them (``{"index", "id", "reason"}``) as JSONL. The exit status is 1 when no row
  was converted, or when skipped rows exceed ``--max-skipped-fraction``.
* Records without an ``image`` (text-only turns in the 665K mix) are kept as text-only rows.

Run ``python llava/convert_instruct.py --help``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sharelora_plugin.conversations import (
    FROM_OF,
    IMAGE_PLACEHOLDER,
    ConversationError,
    conversations_to_messages,
)
from sharelora_plugin.planning.files import read_jsonl, write_jsonl

LOG = logging.getLogger("llava.convert_instruct")

# The conversation system prompt of upstream LLaVA-1.5 (``conv_vicuna_v1``), for --system-prompt vicuna_v1.
VICUNA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
SYSTEM_PRESETS = {"vicuna_v1": VICUNA_V1_SYSTEM}
LOGGED_SKIPS = 10


class RecordError(ValueError):
    """A record cannot be converted; the message says why (it becomes the skip reason)."""


@dataclass
class ConversionReport:
    """What a conversion did: rows written, rows skipped (with reasons), images referenced."""

    converted: int = 0
    skipped: list[dict[str, Any]] = field(default_factory=list)
    text_only: int = 0

    @property
    def total(self) -> int:
        return self.converted + len(self.skipped)

    def reasons(self) -> Counter:
        """Skips counted by their reason kind (the text before the first colon)."""
        return Counter(s["reason"].split(":", 1)[0] for s in self.skipped)

    def summary(self) -> str:
        """One line for people: ``converted 79998 of 80000 rows; skipped 2 (missing image: 2)``."""
        line = f"converted {self.converted} of {self.total} rows"
        if self.text_only:
            line += f" ({self.text_only} text-only)"
        if self.skipped:
            kinds = ", ".join(f"{k}: {n}" for k, n in sorted(self.reasons().items()))
            line += f"; skipped {len(self.skipped)} ({kinds})"
        return line


def convert_record(
    record: dict[str, Any],
    *,
    image_root: Path | None,
    check_images: bool = True,
    absolute: bool = True,
    system_prompt: str | None = None,
) -> dict[str, Any]:
    """One upstream record → one Axolotl row (``id`` and ``messages``; the image is an entry in the content).

    Raises :class:`RecordError` when the record cannot be used; the caller skips and reports it.
    """
    if not isinstance(record, dict):
        raise RecordError(f"bad record: expected an object, got {type(record).__name__}")
    turns = record.get("conversations")
    image_name = record.get("image")
    if isinstance(image_name, list):
        if len(image_name) != 1:
            raise RecordError(f"bad record: {len(image_name)} images; one image per row is supported")
        image_name = image_name[0]
    image_entry = None
    if image_name:
        path = Path(str(image_name))
        if image_root is not None and not path.is_absolute():
            path = image_root / path
        if check_images and not path.is_file():
            raise RecordError(f"missing image: {path}")
        image_entry = {"type": "image", "path": str(path.resolve() if absolute else path)}
    try:
        messages = conversations_to_messages(
            turns, [image_entry] if image_entry is not None else [], system_prompt=system_prompt
        )
    except ConversationError as err:
        raise RecordError(f"bad record: {err}") from None
    # No top-level ``image`` column: Axolotl's multimodal collator would read it as a list of images.
    return {"id": record.get("id"), "messages": messages}


def to_upstream(row: dict[str, Any], image_root: Path | None = None) -> dict[str, Any]:
    """Inverse of :func:`convert_record` for upstream's canonical placeholder forms (``<image>\\n`` before or
    ``\\n<image>`` after the text); system messages are dropped (upstream keeps the system prompt in code).
    The ``image`` name is the image path relative to ``image_root`` (the path itself without a root)."""
    conversations = []
    image_path: str | None = None
    for message in row["messages"]:
        if message["role"] == "system":
            continue
        content = message["content"]
        if isinstance(content, str):
            value = content
        else:
            value = "\n".join(
                IMAGE_PLACEHOLDER if part["type"] == "image" else part["text"] for part in content
            )
            image_path = next((p["path"] for p in content if p["type"] == "image"), image_path)
        conversations.append({"from": FROM_OF[message["role"]], "value": value})
    record: dict[str, Any] = {"id": row.get("id")}
    if image_path is not None:
        path = Path(image_path)
        if image_root is not None and path.is_absolute():
            path = path.relative_to(Path(image_root).resolve())
        record["image"] = path.as_posix()
    record["conversations"] = conversations
    return record


def read_records(path: Path) -> list[Any]:
    """Records of a ``.json`` list (upstream) or a ``.jsonl`` file (one record per line)."""
    if path.suffix.lower() == ".jsonl":
        return read_jsonl(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def convert_records(
    records: Iterable[Any],
    *,
    image_root: Path | None,
    check_images: bool = True,
    absolute: bool = True,
    system_prompt: str | None = None,
    report: ConversionReport | None = None,
) -> Iterator[dict[str, Any]]:
    """Convert records lazily, appending every skip to ``report`` (created if not given)."""
    report = report if report is not None else ConversionReport()
    for index, record in enumerate(records):
        try:
            row = convert_record(
                record,
                image_root=image_root,
                check_images=check_images,
                absolute=absolute,
                system_prompt=system_prompt,
            )
        except RecordError as err:
            record_id = record.get("id") if isinstance(record, dict) else None
            report.skipped.append({"index": index, "id": record_id, "reason": str(err)})
            if len(report.skipped) <= LOGGED_SKIPS:
                LOG.warning("skipping record %d (id=%s): %s", index, record_id, err)
            elif len(report.skipped) == LOGGED_SKIPS + 1:
                LOG.warning("more records skipped; see the summary (and --skipped FILE for the full list)")
            continue
        report.converted += 1
        if not any(p.get("type") == "image" for m in row["messages"] for p in m["content"]):
            report.text_only += 1
        yield row


def convert_file(
    input_path: Path,
    output_path: Path,
    *,
    image_root: Path | None = None,
    check_images: bool = True,
    absolute: bool = True,
    system_prompt: str | None = None,
    limit: int | None = None,
    skipped_path: Path | None = None,
) -> ConversionReport:
    """Convert ``input_path`` into ``output_path``; images are looked up under ``image_root`` (default: the
    input file's folder). Returns the report; ``skipped_path`` receives the skipped records as JSONL."""
    records = read_records(input_path)
    if limit is not None:
        records = records[:limit]
    root = image_root if image_root is not None else input_path.resolve().parent
    report = ConversionReport()
    write_jsonl(
        output_path,
        convert_records(
            records,
            image_root=root,
            check_images=check_images,
            absolute=absolute,
            system_prompt=system_prompt,
            report=report,
        ),
    )
    if skipped_path is not None:
        write_jsonl(skipped_path, report.skipped)
    return report


def build_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", type=Path, help="upstream JSON list (llava_instruct_80k.json) or JSONL")
    parser.add_argument("output", type=Path, help="Axolotl JSONL to write")
    parser.add_argument(
        "--image-root",
        type=Path,
        default=None,
        help="folder the records' 'image' names are relative to (LLaVA-Instruct: COCO train2017); "
        "default: the input file's folder",
    )
    parser.add_argument(
        "--no-check-images",
        action="store_true",
        help="do not check that image files exist (rows are then never skipped for a missing image)",
    )
    parser.add_argument(
        "--relative-paths",
        action="store_true",
        help="write image paths as image-root/name without resolving them to absolute paths",
    )
    parser.add_argument(
        "--system-prompt",
        default=None,
        help="add a system message to every row: a literal text, or 'vicuna_v1' for upstream LLaVA-1.5's",
    )
    parser.add_argument("--limit", type=int, default=None, help="convert only the first N records")
    parser.add_argument("--skipped", type=Path, default=None, help="write the skipped records here (JSONL)")
    parser.add_argument(
        "--max-skipped-fraction",
        type=float,
        default=1.0,
        help="exit with status 1 when more than this fraction of the records was skipped (default: 1.0, "
        "i.e. only when nothing was converted)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 1 too many rows skipped, 2 bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not args.input.is_file():
        parser.error(f"input {str(args.input)!r} is not a file")
    if args.image_root is not None and not args.image_root.is_dir():
        parser.error(f"--image-root {str(args.image_root)!r} is not a folder")
    if args.limit is not None and args.limit <= 0:
        parser.error(f"--limit must be a positive integer, got {args.limit}")
    if not 0.0 <= args.max_skipped_fraction <= 1.0:
        parser.error(f"--max-skipped-fraction must be in [0, 1], got {args.max_skipped_fraction}")
    system_prompt = SYSTEM_PRESETS.get(args.system_prompt, args.system_prompt)
    try:
        report = convert_file(
            args.input,
            args.output,
            image_root=args.image_root,
            check_images=not args.no_check_images,
            absolute=not args.relative_paths,
            system_prompt=system_prompt,
            limit=args.limit,
            skipped_path=args.skipped,
        )
    except (OSError, ValueError) as err:
        print(f"error: {args.input}: {err}", file=sys.stderr)
        return 2
    print(f"{args.output}: {report.summary()}", file=sys.stderr)
    if report.converted == 0:
        print("error: no row was converted", file=sys.stderr)
        return 1
    if report.total and len(report.skipped) / report.total > args.max_skipped_fraction:
        print(
            f"error: {len(report.skipped)} of {report.total} rows skipped, more than "
            f"--max-skipped-fraction={args.max_skipped_fraction}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
