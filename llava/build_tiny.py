"""Build a tiny LLaVA offline, for tests and ``make llava-demo``: the real SmolLM2 language model, a small random
CLIP vision tower, a random projector, a working ``LlavaProcessor`` with the LLaVA chat template, a handful of
image+text training rows and a 4-question LLaVA-Bench-style question file.

It is a ``LlavaForConditionalGeneration`` exactly like ``llava-hf/llava-1.5-7b-hf`` in structure — vision tower →
``multi_modal_projector`` (linear, GELU, linear) → Llama decoder — only small: the vision tower is a 2-layer CLIP
ViT on 32×32 images with 8×8 patches (16 image tokens per image after dropping CLS, as LLaVA-1.5's ``default``
feature selection does), and the language model is the embedded SmolLM2-135M-Instruct (30 decoder layers) with
one added special token ``<image>``. The vision tower and projector are random (seeded), so the model "sees"
nothing meaningful; it exercises every code path of the real recipe in seconds on a CPU.

Output (default ``<repo>/.cache/tiny_llava``)::

    model/            HF folder: config, weights, tokenizer, processor (image processor + chat template)
    data/images/      generated PNGs (coloured shapes)
    data/llava_instruct_tiny.json   the rows in upstream LLaVA-Instruct format
    data/train.jsonl  the same rows converted by convert_instruct.py (Axolotl chat_template + image entries)
    bench/images/, bench/questions.jsonl   LLaVA-Bench-format questions for answer.py
    .built            version stamp; a second run with the same stamp returns at once

Run ``python llava/build_tiny.py [--out DIR] [--force]`` (needs ``make setup`` for SmolLM2).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the converter script beside this one
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # bench.embedded: the offline assets
import convert_instruct  # noqa: E402

LOG = logging.getLogger("llava.build_tiny")

BUILD_VERSION = "tiny-llava-1"
IMAGE_TOKEN = "<image>"
IMAGE_SIZE = 32
PATCH_SIZE = 8
SEED = 1234
# LLaVA-1.5's chat format, as llava-hf's processors and Axolotl's ``llava`` template render it:
# "USER: <image>\n{question} ASSISTANT: {answer} USER: ..."; a system message is written bare in front.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (230, 200, 30)}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = {"white": (250, 250, 250), "grey": (128, 128, 128)}


def default_out() -> Path:
    """``<cache>/tiny_llava`` where ``<cache>`` is ``$SHARELORA_CACHE`` or ``<repo>/.cache``."""
    from bench.embedded import cache_dir

    return cache_dir() / "tiny_llava"


def build_stamp() -> str:
    """What the build depends on: this script's version, the SmolLM2 asset, transformers' version."""
    import transformers

    from bench.embedded import model_dir

    marker = model_dir() / ".prepared"
    smollm = marker.read_text().strip() if marker.is_file() else "unprepared"
    return f"{BUILD_VERSION} smollm2=[{smollm}] transformers={transformers.__version__}\n"


def draw_shape(shape: str, colour: str, background: str, size: int = 48):
    """A ``size``×``size`` RGB picture of one filled shape on a plain background."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    lo, hi = size // 6, size - size // 6
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse([lo, lo, hi, hi], fill=fill)
    elif shape == "square":
        draw.rectangle([lo, lo, hi, hi], fill=fill)
    elif shape == "triangle":
        draw.polygon([(size // 2, lo), (hi, hi), (lo, hi)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return image


def _pictures() -> list[tuple[str, str, str]]:
    return [
        (shape, colour, background) for background in BACKGROUNDS for colour in COLOURS for shape in SHAPES
    ]


def training_records(image_dir: Path, num_rows: int) -> list[dict]:
    """Write ``num_rows`` pictures into ``image_dir`` and return upstream-format LLaVA-Instruct records about
    them (both placeholder positions, one- and two-round conversations)."""
    image_dir.mkdir(parents=True, exist_ok=True)
    pictures = _pictures()
    records = []
    for k in range(num_rows):
        shape, colour, background = pictures[k % len(pictures)]
        name = f"shape_{k:03d}.png"
        draw_shape(shape, colour, background).save(image_dir / name)
        if k % 2 == 0:
            first = f"{IMAGE_TOKEN}\nWhat shape is shown in the picture?"
        else:
            first = f"Describe the picture briefly.\n{IMAGE_TOKEN}"
        turns = [
            {"from": "human", "value": first},
            {"from": "gpt", "value": f"The picture shows a {colour} {shape} on a {background} background."},
        ]
        if k % 3 == 0:
            turns += [
                {"from": "human", "value": "What colour is the shape?"},
                {"from": "gpt", "value": f"The {shape} is {colour}."},
            ]
        records.append({"id": f"tiny-{k:03d}", "image": f"images/{name}", "conversations": turns})
    return records


def bench_questions(image_dir: Path) -> list[dict]:
    """Three pictures and four LLaVA-Bench-format questions about them (categories conv, detail, complex)."""
    image_dir.mkdir(parents=True, exist_ok=True)
    pictures = {"bench_001.png": ("circle", "blue", "white"), "bench_002.png": ("triangle", "yellow", "grey")}
    for name, spec in pictures.items():
        draw_shape(*spec).save(image_dir / name)
    rows = [
        ("bench_001.png", "What colour is the shape?", "conv"),
        ("bench_001.png", "Describe this picture in detail.", "detail"),
        ("bench_002.png", "What shape is this, and how many corners does it have?", "complex"),
        ("bench_002.png", "What is the background colour?", "conv"),
    ]
    return [
        {"question_id": k, "image": image, "text": text, "category": category}
        for k, (image, text, category) in enumerate(rows)
    ]


def build_model(out: Path) -> dict:
    """Assemble and save the tiny LLaVA (model + processor) into ``out``; returns a few facts about it."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from bench.embedded import model_dir

    source = model_dir()
    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"SmolLM2 is not prepared at {source}; run `make setup` first")
    tokenizer = AutoTokenizer.from_pretrained(source)
    language_model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    # The new row is random; it is never looked up (image positions get the projected features instead).
    language_model.resize_token_embeddings(len(tokenizer), mean_resizing=False)

    vision_config = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=64,
    )
    image_seq_length = (IMAGE_SIZE // PATCH_SIZE) ** 2
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=language_model.config,
        image_token_index=image_token_id,
        image_seq_length=image_seq_length,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    torch.manual_seed(SEED)
    model = LlavaForConditionalGeneration(config)
    model.model.language_model.load_state_dict(language_model.model.state_dict())
    model.tie_weights()
    if model.lm_head.weight.data_ptr() != model.model.language_model.embed_tokens.weight.data_ptr():
        model.lm_head.weight.data.copy_(language_model.lm_head.weight.data)
    eos_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped again by the "default" selection
        chat_template=CHAT_TEMPLATE,
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return {
        "image_token_id": image_token_id,
        "image_seq_length": image_seq_length,
        "num_hidden_layers": config.text_config.num_hidden_layers,
        "parameters": sum(p.numel() for p in model.parameters()),
        "projector_parameters": sum(p.numel() for p in model.model.multi_modal_projector.parameters()),
        "vision_parameters": sum(p.numel() for p in model.model.vision_tower.parameters()),
    }


def build(out: Path | None = None, *, force: bool = False, num_rows: int = 24) -> Path:
    """Build everything into ``out`` (default :func:`default_out`) unless the stamp says it is already there."""
    out = Path(out) if out is not None else default_out()
    marker = out / ".built"
    stamp = build_stamp() + f"rows={num_rows}\n"
    if not force and marker.is_file() and marker.read_text() == stamp:
        return out
    start = time.perf_counter()
    facts = build_model(out / "model")
    data = out / "data"
    records = training_records(data / "images", num_rows)
    upstream = data / "llava_instruct_tiny.json"
    upstream.write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
    report = convert_instruct.convert_file(upstream, data / "train.jsonl", image_root=data)
    if report.skipped:
        raise RuntimeError(f"converting the generated rows skipped some: {report.skipped}")
    bench = out / "bench"
    convert_instruct.write_jsonl(bench / "questions.jsonl", bench_questions(bench / "images"))
    facts["seconds"] = round(time.perf_counter() - start, 1)
    (out / "facts.json").write_text(json.dumps(facts, indent=1) + "\n")
    marker.write_text(stamp)
    LOG.info("built tiny LLaVA in %s (%.1f s): %s", out, facts["seconds"], facts)
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: .cache/tiny_llava)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the stamp matches")
    parser.add_argument("--num-rows", type=int, default=24, help="training rows to generate (default 24)")
    args = parser.parse_args(argv)
    if args.num_rows <= 0:
        parser.error(f"--num-rows must be positive, got {args.num_rows}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = build(args.out, force=args.force, num_rows=args.num_rows)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
