"""Visual-text calibration on today's VLMs: a tiny random model of each family (tests/tiny_vlms.py) with its own
processor, through the plugin's batching and calibration.

Rows differ in image size (so per-image tensors differ in shape: LLaVA-NeXT's patch count, Pixtral's height and
width, Qwen2-VL's patch count and ``image_grid_thw``, Idefics3's and mllama's images per row), one row holds two
images and one none. For each model:

* batching any way (one row per batch, three per batch, left or right padding) gives the same L x L matrix as one
  row at a time: padding, per-token and per-image tensors line up with their rows;
* exactly the language model's decoder layers are measured (never the vision tower's);
* a plan is made and, for Llama 3.2 Vision, never mixes its cross-attention layers with self-attention ones.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import tiny_vlms
import torch
from PIL import Image

from sharelora_plugin import multimodal
from sharelora_plugin.calibration import calibrate
from sharelora_plugin.layer_kinds import layer_kinds
from sharelora_plugin.layers import find_decoder_layers
from sharelora_plugin.planning import make_plan

pytestmark = pytest.mark.archs

ROOT = Path(__file__).resolve().parents[1]

# image sizes (height, width) chosen so every family gets at least two different per-image shapes
SIZES = [(56, 84), (112, 56), (40, 40), (64, 120)]
LAYER_PATHS = {
    "llava_next": "model.language_model.layers",
    "qwen2_vl": "model.language_model.layers",
    "qwen2_5_vl": "model.language_model.layers",
    "gemma3": "model.language_model.layers",
    "mistral3": "model.language_model.layers",
    "idefics3": "model.text_model.layers",
    "smolvlm": "model.text_model.layers",
    "mllama": "model.language_model.layers",
}


def _image(size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8))


def _rows() -> list[dict]:
    def turn(question: str, answer: str, images: int) -> list[dict]:
        content = [{"type": "image"}] * images + [{"type": "text", "text": question}]
        return [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]

    return [
        {"messages": turn("What is in the picture?", "Noise.", 1), "images": [_image(SIZES[0], 0)]},
        {
            "messages": turn("Describe it in a few words, please.", "Random coloured pixels everywhere.", 1),
            "images": [_image(SIZES[1], 1)],
        },
        {
            "messages": turn("Compare the two.", "Both are noise.", 2),
            "images": [_image(SIZES[2], 2), _image(SIZES[3], 3)],
        },
        {"messages": turn("Say hello.", "Hello there, how can I help?", 0)},
        {"messages": turn("Which colour dominates?", "None.", 1), "images": [_image(SIZES[3], 4)]},
    ]


@pytest.fixture(scope="module", params=sorted(tiny_vlms.BUILDERS))
def vlm(request, smollm2_dir):
    model, processor = tiny_vlms.BUILDERS[request.param](smollm2_dir)
    return request.param, model, processor


def _calibrate(model, processor, rows, *, side: str, batch_size: int):
    processor.tokenizer.padding_side = side
    try:
        batches = multimodal.visual_text_batches(
            processor,
            rows,
            batch_size=batch_size,
            max_length=512,
            chat_template=processor.chat_template,
            pixel_dtype=multimodal.vision_dtype(model),
            sort_by_length=False,
        )
    finally:
        processor.tokenizer.padding_side = "right"
    return calibrate(model, batches, progress=False), batches


def test_batched_calibration_equals_one_row_at_a_time(vlm) -> None:
    name, model, processor = vlm
    rows = _rows()
    alone, single_batches = _calibrate(model, processor, rows, side="right", batch_size=1)
    assert alone.num_samples == len(rows)
    assert single_batches.images_per_batch == [1, 1, 2, 0, 1]
    for side in ("right", "left"):
        together, batches = _calibrate(model, processor, rows, side=side, batch_size=3)
        assert batches.images_per_batch == [4, 1]
        assert together.num_samples == len(rows)
        np.testing.assert_allclose(
            together.angular_distance, alone.angular_distance, atol=2e-5, err_msg=f"{name} {side}"
        )
        np.testing.assert_allclose(
            together.per_sample_angular, alone.per_sample_angular, atol=5e-5, err_msg=f"{name} {side}"
        )
    # the rows are not all alike: the test would notice rows swapped between batches
    assert np.abs(alone.per_sample_angular[0] - alone.per_sample_angular[1]).max() > 1e-3


def _reference_angular(model, processor, row: dict) -> np.ndarray:
    """The row's L x L angular distances from the model's own forward on the processor's output (one row, no
    padding, no position ids given: the model numbers the tokens itself), hooks on the decoder layers."""
    messages, images = multimodal.row_to_messages(row)
    text = processor.apply_chat_template(messages, tokenize=False)
    enc = dict(processor(images=images or None, text=[text], return_tensors="pt"))
    if "pixel_values" in enc:
        enc["pixel_values"] = enc["pixel_values"].to(multimodal.vision_dtype(model))
    layers = find_decoder_layers(model).layers
    outputs = [None] * len(layers)

    def hook(index):
        def keep(_module, _inputs, output):
            outputs[index] = (output[0] if isinstance(output, tuple) else output)[0, -1].float()

        return keep

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            model(**enc, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    for i, out in enumerate(outputs):  # a layer the model skipped passes its input on
        outputs[i] = out if out is not None else outputs[i - 1]
    states = torch.nn.functional.normalize(torch.stack(outputs), dim=-1)
    cosine = (states @ states.T).clamp(-1, 1)
    return (torch.arccos(cosine) / torch.pi).numpy()


def test_calibration_matches_the_models_own_forward(vlm) -> None:
    name, model, processor = vlm
    rows = _rows()
    result, _ = _calibrate(model, processor, rows, side="left", batch_size=3)
    for index, row in enumerate(rows):
        reference = _reference_angular(model, processor, row)
        np.testing.assert_allclose(
            result.per_sample_angular[index], reference, atol=5e-4, err_msg=f"{name} row {index}"
        )


def test_only_the_language_model_layers_are_measured(vlm) -> None:
    name, model, processor = vlm
    text_layers = model.config.get_text_config().num_hidden_layers
    result, _ = _calibrate(model, processor, _rows()[:2], side="right", batch_size=2)
    assert result.layers_path == LAYER_PATHS[name]
    assert result.num_layers == text_layers == tiny_vlms.NUM_LAYERS
    assert multimodal.vision_tower(model) is not None
    assert not any(
        p is q
        for p in multimodal.vision_tower(model).parameters()
        for q in find_decoder_layers(model).layers.parameters()
    )


def test_plan_keeps_layer_kinds_apart(vlm) -> None:
    name, model, processor = vlm
    result, _ = _calibrate(model, processor, _rows(), side="right", batch_size=5)
    kinds = layer_kinds(find_decoder_layers(model).layers)
    similarity = np.ones_like(
        result.angular_distance
    )  # every pair "similar": only the kinds can keep layers apart
    plan = make_plan(
        num_layers=result.num_layers,
        similarity=similarity,
        threshold=0.5,
        strategy="optimal",
        layer_kinds=None if kinds.uniform else kinds.kinds,
    )
    if name == "mllama":
        cross = model.config.text_config.cross_attention_layers
        assert not kinds.uniform
        for share_set in plan.share_sets:
            assert len({layer in cross for layer in share_set}) == 1, plan.share_sets
    else:
        assert kinds.uniform
        assert plan.share_sets == [list(range(tiny_vlms.NUM_LAYERS))]
    assert torch.isfinite(torch.as_tensor(result.angular_distance)).all()


# ----------------------------------------------------------------------------------------------------------------
# README table: model_type -> (what the processor gives per image / per row, what is tested, result and notes)
CALIBRATION = "batched = one at a time, = model's own forward, LM layers only, plan"
TABLE = {
    "llava": (
        "`pixel_values` [images, 3, H, W]",
        "calibration (tests/test_llava_calibration.py), `axolotl.cli.train` (tests/test_llava_e2e.py)",
        "pass",
    ),
    "llava_next": (
        "`pixel_values` [images, patches, 3, H, W] (patch count varies: zero-padded), `image_sizes`",
        CALIBRATION,
        "pass",
    ),
    "qwen2_vl": (
        "`pixel_values` [patches, 1176], `image_grid_thw`, `mm_token_type_ids`; M-RoPE positions left to the model",
        f"{CALIBRATION}; one step of `axolotl.cli.train` (tests/test_vlm_train.py)",
        "pass (note: the test builds the processor without its video processor, which needs torchvision)",
    ),
    "qwen2_5_vl": (
        "as Qwen2-VL",
        f"{CALIBRATION}; recipes/qwen2_5_vl_7b_sharelora.yml validated",
        "pass (note: as Qwen2-VL)",
    ),
    "gemma3": (
        "`pixel_values` [images, 3, H, W], `token_type_ids` per token",
        f"{CALIBRATION}; one step of `axolotl.cli.train` (tests/test_vlm_train.py)",
        "pass",
    ),
    "mistral3": (
        "`pixel_values` [images, 3, H, W] (H, W vary: zero-padded), `image_sizes`",
        CALIBRATION,
        "pass (note: transformers' Pixtral processor module imports torchvision; the test gives it the PIL image "
        "processor's helper)",
    ),
    "idefics3": (
        "`pixel_values` [rows, images, 3, H, W], `pixel_attention_mask` (images per row vary: zero-padded)",
        CALIBRATION,
        "pass",
    ),
    "smolvlm": (
        "as Idefics3",
        CALIBRATION,
        "pass (note: its processor needs `num2words`; built without its video processor)",
    ),
    "mllama": (
        "`pixel_values` [rows, images, tiles, 3, H, W], `aspect_ratio_ids`/`_mask`, `cross_attention_mask` per token",
        f"{CALIBRATION}; cross-attention layers are their own layer kind",
        "pass",
    ),
}


def readme_table() -> str:
    """The README's "Supported vision-language models" table, rendered from :data:`TABLE`."""
    rows = [
        "| VLM (`model_type`) | Processor outputs batched | Tested | Result |",
        "|---|---|---|---|",
    ]
    rows += [
        f"| `{name}` | {outputs} | {tested} | {result} |" for name, (outputs, tested, result) in TABLE.items()
    ]
    return "\n".join(rows)


def test_readme_table_lists_every_tested_vlm() -> None:
    assert set(TABLE) == set(tiny_vlms.BUILDERS) | {"llava"}
    text = (ROOT / "README.md").read_text()
    section = re.search(r"^## Supported vision-language models\n(.*?)^## ", text, re.S | re.M)
    assert section, "README.md needs a '## Supported vision-language models' section"
    table = "\n".join(line for line in section.group(1).splitlines() if line.startswith("|"))
    assert table == readme_table(), (
        "README table is stale: paste the output of `python tests/test_vlm_calibration.py`"
    )


if __name__ == "__main__":
    print(readme_table())
