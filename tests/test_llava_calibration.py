"""Visual-text calibration on the tiny LLaVA (llava/build_tiny.py): image + text rows through the whole VLM,
only the language model's decoder layers measured, correct under left and right padding."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_script

from sharelora_plugin import multimodal, workflow
from sharelora_plugin.calibration import calibrate, last_token_index
from sharelora_plugin.layers import find_decoder_layers

ROOT = Path(__file__).resolve().parents[1]


build_tiny = load_script(ROOT / "llava" / "build_tiny.py", "llava_build_tiny_under_test")


@pytest.fixture(scope="module")
def model_and_processor(tiny_llava: Path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(tiny_llava / "model", dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(tiny_llava / "model")
    return model, processor


@pytest.fixture(scope="module")
def rows(tiny_llava: Path) -> list[dict]:
    lines = (tiny_llava / "data" / "train.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines[:6]]


def _batches(processor, rows, side: str, batch_size: int, **kwargs):
    processor.tokenizer.padding_side = side
    try:
        return multimodal.visual_text_batches(
            processor, rows, batch_size=batch_size, max_length=128, **kwargs
        )
    finally:
        processor.tokenizer.padding_side = "right"


def test_calibration_measures_exactly_the_language_model_layers(model_and_processor, rows) -> None:
    model, processor = model_and_processor
    assert multimodal.is_multimodal(model)
    result = calibrate(model, _batches(processor, rows, "right", 4), progress=False)
    assert result.num_layers == model.config.text_config.num_hidden_layers == 30
    assert result.layers_path == "model.language_model.layers"
    assert find_decoder_layers(model).layers is model.model.language_model.layers
    assert result.num_samples == len(rows)
    assert result.angular_distance.shape == (30, 30)
    vision_layers = [m for m in model.model.vision_tower.modules() if type(m).__name__ == "CLIPEncoderLayer"]
    assert len(vision_layers) == 2  # the vision tower's layers are never measured or shared


def test_image_tokens_are_expanded_in_the_inputs(model_and_processor, rows, tiny_llava: Path) -> None:
    model, processor = model_and_processor
    facts = json.loads((tiny_llava / "facts.json").read_text())
    for side in ("left", "right"):
        batches = _batches(processor, rows, side, 4, pixel_dtype=torch.float32)
        total_images = 0
        for batch in batches:
            per_row = (batch["input_ids"] == model.config.image_token_id).sum(dim=1)
            assert per_row.tolist() == [facts["image_seq_length"]] * batch["input_ids"].shape[0]
            assert batch["pixel_values"].shape[0] == batch["input_ids"].shape[0]
            assert batch["pixel_values"].dtype == torch.float32
            # position ids count real tokens only, whatever the padding side
            real = batch["attention_mask"].bool()
            for row in range(real.shape[0]):
                assert batch["position_ids"][row][real[row]].tolist() == list(range(int(real[row].sum())))
            # the last real token is the end of the last answer, never padding
            last = last_token_index(batch["attention_mask"])
            assert bool(real[torch.arange(real.shape[0]), last].all())
            if side == "left":
                assert (last == batch["input_ids"].shape[1] - 1).all()
            total_images += batch["pixel_values"].shape[0]
        assert total_images == len(rows)


def test_left_and_right_padding_give_the_unpadded_result(model_and_processor, rows) -> None:
    model, processor = model_and_processor
    unpadded = calibrate(model, _batches(processor, rows, "right", 1), progress=False)
    for side in ("left", "right"):
        batches = _batches(processor, rows, side, 4)
        assert any((b["attention_mask"] == 0).any() for b in batches)  # there is padding to get right
        padded = calibrate(model, batches, progress=False)
        np.testing.assert_allclose(padded.angular_distance, unpadded.angular_distance, atol=1e-6)
        np.testing.assert_allclose(padded.cosine, unpadded.cosine, atol=1e-6)


def test_the_images_reach_the_language_model(model_and_processor, rows, tmp_path: Path) -> None:
    from PIL import Image

    model, processor = model_and_processor
    with_images = calibrate(model, _batches(processor, rows, "right", 4), progress=False)
    black = tmp_path / "black.png"
    Image.new("RGB", (48, 48), (0, 0, 0)).save(black)
    swapped = json.loads(json.dumps(rows))
    for row in swapped:
        for message in row["messages"]:
            for part in message["content"]:
                if part["type"] == "image":
                    part["path"] = str(black)
    other = calibrate(model, _batches(processor, swapped, "right", 4), progress=False)
    assert np.abs(other.angular_distance - with_images.angular_distance).max() > 1e-4


def test_upstream_records_and_relative_paths(model_and_processor, tiny_llava: Path) -> None:
    """An upstream LLaVA-Instruct record (conversations + image column, path relative to the calibration file)
    encodes to the same tokens as its converted row."""
    _, processor = model_and_processor
    data = tiny_llava / "data"
    upstream = json.loads((data / "llava_instruct_tiny.json").read_text())[:2]
    converted = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()[:2]]
    roots = multimodal.calibration_image_roots(str(data / "llava_instruct_tiny.json"), {})
    assert roots == [data.resolve()]
    a = multimodal.visual_text_batches(processor, upstream, batch_size=2, max_length=128, image_roots=roots)
    b = multimodal.visual_text_batches(processor, converted, batch_size=2, max_length=128)
    assert torch.equal(a[0]["input_ids"], b[0]["input_ids"])
    assert torch.equal(a[0]["pixel_values"], b[0]["pixel_values"])


def test_clear_errors(model_and_processor, rows) -> None:
    _, processor = model_and_processor
    broken = json.loads(json.dumps(rows[:1]))
    broken[0]["messages"][0]["content"][0]["path"] = "/nonexistent/picture.png"
    with pytest.raises(multimodal.VisualCalibrationError, match=r"row 0 \(id=tiny-000\).*picture.png"):
        multimodal.visual_text_batches(processor, broken, batch_size=1, max_length=128)
    with pytest.raises(multimodal.VisualCalibrationError, match="max_length=8 cuts into the image tokens"):
        multimodal.visual_text_batches(processor, rows[:1], batch_size=1, max_length=8)
    text_only = [{"messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"}]}]
    with pytest.raises(multimodal.VisualCalibrationError, match="none of the calibration rows has an image"):
        multimodal.visual_text_batches(processor, text_only, batch_size=1, max_length=128)


def _axolotl_cfg(tiny_llava: Path, sharelora_block: dict):
    """The Axolotl settings the tiny LLaVA recipe trains with, as far as calibration reads them."""
    from axolotl.utils.dict import DictDefault

    folder = str(tiny_llava / "model")
    return DictDefault(
        {
            "base_model": folder,
            "processor_config": folder,
            "processor_type": "AutoProcessor",
            "chat_template": "llava",
            "datasets": [{"path": str(tiny_llava / "data" / "train.jsonl"), "type": "chat_template"}],
            "sharelora": sharelora_block,
        }
    )


def test_run_calibration_takes_the_multimodal_branch(model_and_processor, tiny_llava: Path) -> None:
    """The plugin's entry point with an Axolotl config: processor via axolotl.loaders.load_processor, the
    training chat template (chat_template: llava), rows from the first training dataset."""
    from transformers import AutoTokenizer

    model, _ = model_and_processor
    folder = str(tiny_llava / "model")
    cfg = _axolotl_cfg(tiny_llava, {"calibration": {"num_samples": 6, "batch_size": 3, "max_length": 128}})
    settings = workflow.sharelora_settings(cfg)
    result = workflow.run_calibration(model, AutoTokenizer.from_pretrained(folder), settings, cfg)
    assert result.settings["modality"] == "visual-text"
    assert result.settings["num_images"] == result.num_samples == 6
    assert result.num_layers == 30 and result.settings["layers_path"] == "model.language_model.layers"


def test_visual_text_calibration_stops_when_stable(model_and_processor, tiny_llava: Path) -> None:
    """Stop-when-stable with image+text samples: the rule is checked after every batch from min_samples on, the
    images counted are those of the batches that ran, and the plan carries the bootstrap of the samples used."""
    from transformers import AutoTokenizer

    model, _ = model_and_processor
    folder = str(tiny_llava / "model")
    block = {
        "threshold": 0.9,
        "calibration": {
            "num_samples": 8,
            "batch_size": 2,
            "max_length": 128,
            "stop_when_stable": True,
            "min_samples": 4,
            "stability": 0.9,
            "bootstrap_resamples": 50,
        },
    }
    cfg = _axolotl_cfg(tiny_llava, block)
    settings = workflow.sharelora_settings(cfg)
    result = workflow.run_calibration(model, AutoTokenizer.from_pretrained(folder), settings, cfg)
    info = result.settings
    assert info["modality"] == "visual-text" and info["stop_when_stable"] and info["num_samples_cap"] == 8
    assert [check["num_samples"] for check in info["stability_checks"]] == list(
        range(4, result.num_samples + 1, 2)
    )
    assert info["num_images"] == result.num_samples == result.per_sample_angular.shape[0]
    assert (info["stop_reason"] == "stable") == (info["stability_checks"][-1]["plan_frequency"] >= 0.9)
    plan = workflow.plan_from_calibration(result, settings, 8)
    assert plan.stability["num_samples"] == result.num_samples and plan.stability["resamples"] == 50
