"""Tests of llava/convert_instruct.py: upstream LLaVA-Instruct JSON → Axolotl chat_template JSONL rows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import load_script

from sharelora_plugin.conversations import split_placeholders

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "llava" / "convert_instruct.py"
SAMPLE = ROOT / "tests" / "fixtures" / "llava" / "llava_instruct_sample.json"
MISSING_IMAGE_ID = "000000319154"
VALID_IDS = ["000000033471", "000000052846", "000000334872"]


convert = load_script(SCRIPT, "llava_convert_instruct_under_test")
RECORDS = json.loads(SAMPLE.read_text())
BY_ID = {r["id"]: r for r in RECORDS}


@pytest.fixture
def image_root(tmp_path: Path) -> Path:
    """Image root holding every image the sample names except the one that must be reported missing."""
    from PIL import Image

    root = tmp_path / "images"
    for record in RECORDS:
        if record.get("image") and record["id"] != MISSING_IMAGE_ID:
            path = root / record["image"]
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (10, 20, 30)).save(path, format="JPEG")
    return root


def test_round_trip_of_upstream_records(image_root: Path) -> None:
    report = convert.ConversionReport()
    rows = list(convert.convert_records(RECORDS, image_root=image_root, report=report))
    by_id = {row["id"]: row for row in rows}
    for record_id in VALID_IDS + ["text-only-1"]:
        back = convert.to_upstream(by_id[record_id], image_root=image_root)
        assert back == BY_ID[record_id]


def test_rows_are_axolotl_multimodal_messages(image_root: Path) -> None:
    rows = list(convert.convert_records(RECORDS, image_root=image_root))
    first = next(r for r in rows if r["id"] == "000000033471")
    assert set(first) == {
        "id",
        "messages",
    }  # a top-level "image" column would be misread by Axolotl's collator
    assert [m["role"] for m in first["messages"]] == ["user", "assistant", "user", "assistant"]
    image, text = first["messages"][0]["content"]
    assert image["type"] == "image" and Path(image["path"]).is_absolute() and Path(image["path"]).is_file()
    assert text == {"type": "text", "text": "What are the colors of the bus in the image?"}
    assert first["messages"][1]["content"] == [
        {"type": "text", "text": "The bus in the image is white and red."}
    ]
    # placeholder after the text keeps the image after the text
    second = next(r for r in rows if r["id"] == "000000052846")
    assert [p["type"] for p in second["messages"][0]["content"]] == ["text", "image"]
    # image names with folders resolve under the root
    third = next(r for r in rows if r["id"] == "000000334872")
    assert third["messages"][0]["content"][0]["path"] == str((image_root / "coco/000000334872.jpg").resolve())
    # text-only records stay, without image entries
    text_only = next(r for r in rows if r["id"] == "text-only-1")
    assert all(p["type"] == "text" for m in text_only["messages"] for p in m["content"])


def test_skipped_rows_are_reported_with_reasons(image_root: Path) -> None:
    report = convert.ConversionReport()
    rows = list(convert.convert_records(RECORDS, image_root=image_root, report=report))
    assert report.converted == len(rows) == 4
    assert report.text_only == 1
    reasons = {s["id"]: s["reason"] for s in report.skipped}
    assert set(reasons) == {MISSING_IMAGE_ID, "bad-role", "two-placeholders"}
    assert (
        reasons[MISSING_IMAGE_ID].startswith("missing image:")
        and MISSING_IMAGE_ID in reasons[MISSING_IMAGE_ID]
    )
    assert "unknown role" in reasons["bad-role"]
    assert "placeholder" in reasons["two-placeholders"]
    assert report.reasons() == {"missing image": 1, "bad record": 2}
    assert "skipped 3" in report.summary()


def test_system_prompt_and_unchecked_images(image_root: Path) -> None:
    rows = list(
        convert.convert_records(
            RECORDS[:4], image_root=image_root, check_images=False, system_prompt=convert.VICUNA_V1_SYSTEM
        )
    )
    assert len(rows) == 4  # the missing image is not checked
    assert all(r["messages"][0]["role"] == "system" for r in rows)
    assert convert.to_upstream(rows[0], image_root=image_root) == RECORDS[0]


def test_split_placeholders_canonical_forms() -> None:
    assert split_placeholders("<image>\nWhat is it?") == [None, "What is it?"]
    assert split_placeholders("What is it?\n<image>") == ["What is it?", None]
    assert split_placeholders("No image here.") == ["No image here."]


def test_cli_writes_rows_and_skipped_file(image_root: Path, tmp_path: Path) -> None:
    out, skipped = tmp_path / "train.jsonl", tmp_path / "skipped.jsonl"
    cmd = [sys.executable, str(SCRIPT), str(SAMPLE), str(out), "--image-root", str(image_root)]
    proc = subprocess.run([*cmd, "--skipped", str(skipped)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "converted 4 of 7 rows" in proc.stderr and "missing image: 1" in proc.stderr
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == VALID_IDS + ["text-only-1"]
    assert {json.loads(line)["id"] for line in skipped.read_text().splitlines()} == {
        MISSING_IMAGE_ID,
        "bad-role",
        "two-placeholders",
    }
    strict = subprocess.run(
        [*cmd, "--max-skipped-fraction", "0.1"], capture_output=True, text=True, check=False
    )
    assert strict.returncode == 1 and "more than --max-skipped-fraction" in strict.stderr
    bad_root = subprocess.run(
        [sys.executable, str(SCRIPT), str(SAMPLE), str(out), "--image-root", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad_root.returncode == 2 and "--image-root" in bad_root.stderr


PLACEMENTS = {
    "before the text": "<image>\nWhat is in the picture?",
    "after the text": "What is in the picture?\n<image>",
    "no placeholder": "What is in the picture?",
}


@pytest.mark.parametrize("value", PLACEMENTS.values(), ids=PLACEMENTS.keys())
def test_calibration_and_training_put_the_image_in_the_same_place(value, tiny_llava: Path) -> None:
    """The same upstream record, (a) converted by convert_instruct.py and processed by Axolotl's own multimodal
    ProcessingStrategy (what training sees), and (b) read directly by visual-text calibration, renders to the
    same text with the image token at the same position."""
    from axolotl.processing_strategies import get_processing_strategy
    from transformers import AutoProcessor

    from sharelora_plugin.multimodal import row_to_messages

    images = tiny_llava / "data" / "images"
    name = sorted(p.name for p in images.iterdir())[0]
    record = {
        "id": "placement",
        "image": name,
        "conversations": [
            {"from": "human", "value": value},
            {"from": "gpt", "value": "A shape."},
            {"from": "human", "value": "What colour?"},
            {"from": "gpt", "value": "Red."},
        ],
    }
    processor = AutoProcessor.from_pretrained(tiny_llava / "model")
    strategy = get_processing_strategy(processor, processor.chat_template, "llava")
    trained = strategy([convert.convert_record(record, image_root=images)])[0]["messages"]
    calibrated, loaded = row_to_messages(record, image_roots=[images])
    assert len(loaded) == 1

    def shape(messages):
        return [(m["role"], [(p["type"], p.get("text")) for p in m["content"]]) for m in messages]

    assert shape(trained) == shape(calibrated)
    render = processor.apply_chat_template
    assert render(trained, tokenize=False) == render(calibrated, tokenize=False)
    first_user = shape(calibrated)[0][1]
    expected_first = "text" if value.startswith("What") and value.endswith("<image>") else "image"
    assert first_user[0][0] == expected_first
