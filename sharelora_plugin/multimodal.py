"""Visual-text calibration batches for a LLaVA-style model (paper §4.2: 128 visual-text samples for LLaVA-1.5).

A calibration row is an image + text conversation, in any of the shapes Axolotl's multimodal ``chat_template``
datasets accept:

* ``messages`` (or ``sharelora.calibration.messages_field``) in OpenAI style, where ``content`` is a string or a
  list of ``{"type": "text", "text": ...}`` / ``{"type": "image", "path" | "url" | "base64" | "image": ...}``
  entries (what ``llava/convert_instruct.py`` writes);
* ShareGPT/LLaVA style ``conversations`` (``from: human/gpt``, ``value`` with an ``<image>`` placeholder) plus an
  ``image`` column (upstream LLaVA-Instruct records, used directly as a separate calibration set);
* an ``image``/``images`` column with messages that hold no image entry: the image is added to the first user
  message, as Axolotl's ``ProcessingStrategy`` does.

Every row is rendered with the training chat template (``processor.apply_chat_template(..., tokenize=False)``) and
encoded by the model's processor, which expands each ``<image>`` into the vision tower's number of image tokens.
Rows are encoded one at a time and padded afterwards with the tokenizer's padding side, so truncation to
``max_length`` can be checked never to cut into an image's tokens. ``position_ids`` count real tokens only, so a
left-padded row sees the same positions as the unpadded one. The batches go through the full VLM (vision tower,
projector, language model); :func:`sharelora_plugin.calibration.calibrate` measures the language model's decoder
layers only, at each row's last real token.

Relative image paths are resolved against, in order: the folders given (``image_roots``: the calibration file's
folder, ``sharelora.calibration.image_root`` when the config has one), then the working directory.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sharelora_plugin.args import config_value
from sharelora_plugin.conversations import IMAGE_PLACEHOLDER, ConversationError, conversations_to_messages
from sharelora_plugin.distributed import LOG
from sharelora_plugin.images import load_image
from sharelora_plugin.layers import unwrap_peft

IMAGE_KEYS = ("image", "path", "url", "base64")
TEXT_KEYS = ("input_ids", "attention_mask")
# Processor outputs with one entry per token (padded like the input ids): Gemma 3's token_type_ids, Qwen2-VL's
# mm_token_type_ids, Llama 3.2 Vision's cross_attention_mask [seq, images, tiles]. Integer outputs shaped
# [1, seq, ...] are treated the same.
PER_TOKEN_KEYS = ("token_type_ids", "mm_token_type_ids", "cross_attention_mask")
# Outputs that mark a layout with one entry per row (not per image): Idefics3/SmolVLM [rows, images, ...] with a
# pixel mask, Llama 3.2 Vision [rows, images, tiles, ...] with aspect ratios. A text-only row then gets zeros
# (no image: Idefics3 drops all-zero images; mllama's cross-attention mask is 0 for it).
ROW_LAYOUT_KEYS = ("pixel_attention_mask", "aspect_ratio_ids", "aspect_ratio_mask")
VISION_TOWER_NAMES = ("vision_tower", "visual", "vision_model", "vision_encoder")


class VisualCalibrationError(ValueError):
    """A calibration row cannot be turned into model inputs; the message names the row and the problem."""


@dataclass
class EncodedSample:
    """One row after the processor: unpadded token ids and its per-image tensors."""

    input_ids: list[int]
    per_image: dict[str, torch.Tensor]
    num_images: int
    num_image_tokens: int
    per_token: dict[str, torch.Tensor] = field(default_factory=dict)


class VisualBatches(list):
    """Calibration batches (a list of model-input dicts) that also know how many images each batch holds."""

    def __init__(self, batches: Sequence[dict[str, torch.Tensor]], images_per_batch: Sequence[int]):
        super().__init__(batches)
        self.images_per_batch = list(images_per_batch)


def is_multimodal(model: torch.nn.Module) -> bool:
    """True for a vision-language model (a config with a ``vision_config``, e.g. ``LlavaForConditionalGeneration``),
    also when wrapped in a ``PeftModel``."""
    return getattr(getattr(unwrap_peft(model), "config", None), "vision_config", None) is not None


def _drop_none(value: Any) -> Any:
    # datasets unifies the keys of a list of structs, filling the absent ones with None
    if isinstance(value, Mapping):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def _content_list(content: Any) -> list[dict]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, list):
        return [dict(part) for part in content]
    raise TypeError(f"message content must be a string or a list, got {type(content).__name__}")


def row_to_messages(
    row: Mapping[str, Any], *, messages_field: str = "messages", image_roots: Sequence[Path] = ()
) -> tuple[list[dict], list[Any]]:
    """Messages with bare ``{"type": "image"}`` entries, and the PIL images those entries stand for, in order."""
    row = _drop_none(dict(row))
    column = row.get("images", row.get("image"))
    column_images = [] if column is None else list(column) if isinstance(column, list) else [column]
    if isinstance(row.get(messages_field), list):
        messages = [
            {"role": m["role"], "content": _content_list(m.get("content"))} for m in row[messages_field]
        ]
    elif isinstance(row.get("conversations"), list):
        # upstream LLaVA rows: placeholders → bare image entries, filled from the image column below
        try:
            messages = conversations_to_messages(
                row["conversations"], [{"type": "image"}] * len(column_images)
            )
        except ConversationError as err:
            raise VisualCalibrationError(str(err)) from None
    else:
        raise VisualCalibrationError(
            f"no {messages_field!r} messages and no 'conversations' (columns: {sorted(row)}); "
            "set sharelora.calibration.messages_field"
        )
    images: list[Any] = []
    bare_entries = 0
    for message in messages:
        for k, part in enumerate(message["content"]):
            if part.get("type") != "image":
                continue
            ref = next((part[key] for key in IMAGE_KEYS if part.get(key) is not None), None)
            if ref is None:
                if bare_entries >= len(column_images):
                    raise VisualCalibrationError(
                        "an image entry without path/url/image/base64 and no image left in the "
                        "'image'/'images' column"
                    )
                ref = column_images[bare_entries]
                bare_entries += 1
            images.append(load_image(ref, image_roots))
            message["content"][k] = {"type": "image"}
    if not images and column_images:
        # Axolotl's ProcessingStrategy: a column image goes into the first user message
        first_user = next((m for m in messages if m["role"] == "user"), messages[0] if messages else None)
        if first_user is None:
            raise VisualCalibrationError("an image column but no messages to attach it to")
        first_user["content"].append({"type": "image"})
        images.append(load_image(column_images[0], image_roots))
    return messages, images


def encode_sample(
    processor, messages: list[dict], images: list[Any], *, chat_template: str | None, max_length: int
) -> EncodedSample:
    """Render ``messages`` with the chat template and run the processor (which expands the image tokens);
    truncate to ``max_length`` tokens unless that would cut an image's tokens."""
    text = processor.apply_chat_template(
        messages, chat_template=chat_template, tokenize=False, add_generation_prompt=False
    )
    enc = processor(images=images or None, text=[text], return_tensors="pt")
    ids = enc["input_ids"][0].tolist()
    image_token_id = _image_token_id(processor)
    num_image_tokens = sum(1 for t in ids if t == image_token_id)
    if images and num_image_tokens == 0:
        raise VisualCalibrationError(
            f"the chat template rendered no {getattr(processor, 'image_token', IMAGE_PLACEHOLDER)!r} for the "
            "row's image; use the model's chat template (chat_template: llava for LLaVA-1.5)"
        )
    if len(ids) > max_length:
        kept = sum(1 for t in ids[:max_length] if t == image_token_id)
        if kept != num_image_tokens:
            raise VisualCalibrationError(
                f"sharelora.calibration.max_length={max_length} cuts into the image tokens of a row with "
                f"{len(ids)} tokens ({num_image_tokens} of them image tokens); raise max_length"
            )
        ids = ids[:max_length]
    full_length = int(enc["input_ids"].shape[1])
    per_token, per_image = {}, {}
    for key, value in enc.items():
        if key in TEXT_KEYS or not isinstance(value, torch.Tensor):
            continue
        if _is_per_token(key, value, full_length):
            per_token[key] = value[0, : len(ids)]
        else:
            per_image[key] = value
    return EncodedSample(
        input_ids=ids,
        per_image=per_image,
        num_images=len(images),
        num_image_tokens=num_image_tokens,
        per_token=per_token,
    )


def _is_per_token(key: str, value: torch.Tensor, length: int) -> bool:
    if key in PER_TOKEN_KEYS:
        return True
    return (
        not value.is_floating_point()
        and value.dim() >= 2
        and value.shape[0] == 1
        and value.shape[1] == length
    )


def _image_token_id(processor) -> int | None:
    token_id = getattr(processor, "image_token_id", None)
    if token_id is None and getattr(processor, "image_token", None):
        token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    return token_id


def pad_samples(
    tokenizer, samples: Sequence[EncodedSample], *, pixel_dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Pad samples into one batch on the tokenizer's padding side; ``position_ids`` count real tokens only
    (0 for padding). Per-token outputs are padded like the ids (with 0). Per-image outputs are concatenated in row
    order, as the model consumes them, each first zero-padded to the largest shape in the batch: LLaVA-NeXT's
    patch count per image (the model keeps ``image_sizes``' share), Pixtral's height and width (cropped back by
    ``image_sizes``), Idefics3's and mllama's images per row (all-zero images / zero masks are padding to them)."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    width = max(len(s.input_ids) for s in samples)
    left = tokenizer.padding_side == "left"
    input_ids = torch.full((len(samples), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), width), dtype=torch.long)
    for row, sample in enumerate(samples):
        n = len(sample.input_ids)
        cols = slice(width - n, width) if left else slice(0, n)
        input_ids[row, cols] = torch.tensor(sample.input_ids, dtype=torch.long)
        attention_mask[row, cols] = 1
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
    for key in dict.fromkeys(k for s in samples for k in s.per_token):
        parts = [s.per_token.get(key) for s in samples]
        like = next(p for p in parts if p is not None)
        trailing = _max_shape([p.shape[1:] for p in parts if p is not None])
        out = torch.zeros((len(samples), width, *trailing), dtype=like.dtype)
        for row, part in enumerate(parts):
            if part is not None:
                n = part.shape[0]
                out[row, slice(width - n, width) if left else slice(0, n)] = _zero_pad(part, trailing)
        batch[key] = out
    row_layout = any(key in s.per_image for s in samples for key in ROW_LAYOUT_KEYS)
    for key in dict.fromkeys(k for s in samples for k in s.per_image):
        parts = [s.per_image.get(key) for s in samples]
        like = next(p for p in parts if p is not None)
        if row_layout:  # one entry per row: a row without images gets an empty (all-zero) one
            parts = [
                p if p is not None else torch.zeros((1, *like.shape[1:]), dtype=like.dtype) for p in parts
            ]
        parts = [p for p in parts if p is not None]
        trailing = _max_shape([p.shape[1:] for p in parts])
        batch[key] = torch.cat([_zero_pad(p, trailing) for p in parts], dim=0)
    if pixel_dtype is not None and "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].to(pixel_dtype)
    return batch


def _max_shape(shapes: Sequence[torch.Size]) -> tuple[int, ...]:
    ranks = {len(shape) for shape in shapes}
    if len(ranks) != 1:
        raise VisualCalibrationError(
            f"processor outputs of different ranks cannot be batched: {list(shapes)}"
        )
    return tuple(max(dims) for dims in zip(*shapes, strict=True)) if shapes and shapes[0] else ()


def _zero_pad(tensor: torch.Tensor, trailing: tuple[int, ...]) -> torch.Tensor:
    if tuple(tensor.shape[1:]) == trailing:
        return tensor
    out = torch.zeros((tensor.shape[0], *trailing), dtype=tensor.dtype)
    out[(slice(None), *(slice(0, d) for d in tensor.shape[1:]))] = tensor
    return out


def visual_text_batches(
    processor,
    rows: Sequence[Mapping[str, Any]],
    *,
    batch_size: int,
    max_length: int,
    chat_template: str | None = None,
    messages_field: str = "messages",
    image_roots: Sequence[Path] = (),
    pixel_dtype: torch.dtype | None = None,
    sort_by_length: bool = True,
) -> list[dict[str, torch.Tensor]]:
    """Calibration batches (``input_ids``, ``attention_mask``, ``position_ids``, ``pixel_values`` …) from
    image+text rows. Rows are sorted by length so batches carry little padding (the result does not depend on the
    order: every sample contributes to the mean on its own); ``sort_by_length=False`` keeps the rows' (random)
    order, so any prefix of the batches is a random sample, as calibration that may stop early needs. Text-only
    rows are allowed alongside."""
    samples = []
    for index, row in enumerate(rows):
        try:
            messages, images = row_to_messages(row, messages_field=messages_field, image_roots=image_roots)
            samples.append(
                encode_sample(processor, messages, images, chat_template=chat_template, max_length=max_length)
            )
        except (VisualCalibrationError, FileNotFoundError, TypeError, KeyError) as err:
            row_id = row.get("id") if isinstance(row, Mapping) else None
            raise VisualCalibrationError(f"calibration row {index} (id={row_id}): {err}") from err
    if not samples:
        raise VisualCalibrationError("no calibration rows; check sharelora.calibration (path, num_samples)")
    with_images = sum(1 for s in samples if s.num_images)
    if with_images == 0:
        raise VisualCalibrationError(
            "none of the calibration rows has an image; visual-text calibration needs image+text samples "
            "(give image entries in the messages or an 'image' column)"
        )
    if with_images < len(samples):
        LOG.warning(
            "ShareLoRA: %d of %d calibration rows have no image", len(samples) - with_images, len(samples)
        )
    order = list(range(len(samples)))
    if sort_by_length:
        order.sort(key=lambda i: len(samples[i].input_ids))
    chunks = [
        [samples[i] for i in order[start : start + batch_size]] for start in range(0, len(order), batch_size)
    ]
    return VisualBatches(
        [pad_samples(processor.tokenizer, chunk, pixel_dtype=pixel_dtype) for chunk in chunks],
        [sum(s.num_images for s in chunk) for chunk in chunks],
    )


def load_calibration_processor(cfg: Any, tokenizer):
    """The processor Axolotl trains with (``axolotl.loaders.load_processor``; ``processor_config`` is set for
    multimodal configs), else ``AutoProcessor`` of the base model; its tokenizer is the one given."""
    processor_config = config_value(cfg, "processor_config")
    if processor_config:
        from axolotl.loaders import load_processor

        return load_processor(cfg, tokenizer)
    base_model = config_value(cfg, "base_model")
    if not base_model:
        raise VisualCalibrationError(
            "cannot load the processor: the config has no base_model / processor_config"
        )
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(
        base_model, trust_remote_code=bool(config_value(cfg, "trust_remote_code"))
    )
    processor.tokenizer = tokenizer
    return processor


def training_chat_template(cfg: Any, tokenizer, processor) -> str | None:
    """The chat template the multimodal collator renders with: the config's ``chat_template`` (resolved like
    Axolotl does) when set, else the processor's or the tokenizer's own."""
    if config_value(cfg, "chat_template"):
        from axolotl.utils.chat_templates import get_chat_template_from_config

        return get_chat_template_from_config(cfg=cfg, tokenizer=tokenizer)
    template = getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None)
    if not template:
        raise VisualCalibrationError(
            "the processor has no chat template; set chat_template (e.g. chat_template: llava) in the config"
        )
    return template


def calibration_image_roots(source: str, calibration: Mapping[str, Any]) -> list[Path]:
    """Folders that relative image paths of calibration rows are looked up in: ``calibration.image_root`` (if
    the ``sharelora.calibration`` block has that key), then the folder of the calibration file ``source``."""
    roots = []
    if calibration.get("image_root"):
        roots.append(Path(str(calibration["image_root"])).expanduser())
    path = Path(str(source)).expanduser()
    if path.is_file():
        roots.append(path.resolve().parent)
    elif path.is_dir():
        roots.append(path.resolve())
    return roots


def vision_tower(model: torch.nn.Module) -> torch.nn.Module | None:
    """The vision encoder of a VLM (``vision_tower`` in LLaVA/Gemma 3/Mistral 3, ``visual`` in Qwen2-VL,
    ``vision_model`` in Idefics3/SmolVLM/mllama), on the model or its inner ``model``; ``None`` for text models."""
    for owner in _inner_and_base(model):
        for name in VISION_TOWER_NAMES:
            tower = getattr(owner, name, None)
            if isinstance(tower, torch.nn.Module):
                return tower
    return None


def vision_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """The dtype of the vision tower's weights (what ``pixel_values`` must be cast to), if there is one."""
    tower = vision_tower(model)
    if tower is None:
        return None
    for param in tower.parameters():
        if param.is_floating_point():
            return param.dtype
    return None


def computes_own_positions(model: torch.nn.Module, batch: Mapping[str, Any]) -> bool:
    """True when the model must derive the position ids itself: multimodal RoPE (Qwen2-VL, Qwen2.5-VL, Qwen3-VL,
    GLM-4V …: a ``get_rope_index`` that gives image tokens 3-D positions from ``image_grid_thw`` and skips padding
    by the attention mask). A text-only batch of such a model takes ordinary 1-D positions."""
    if batch.get("image_grid_thw") is None and batch.get("video_grid_thw") is None:
        return False
    return any(hasattr(owner, "get_rope_index") for owner in _inner_and_base(model))


def _inner_and_base(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Where a VLM keeps its parts: the inner ``model`` (``LlavaModel``, ``Qwen2VLModel`` …), then the transformers
    model itself (unwrapped from PEFT)."""
    base = unwrap_peft(model)
    inner = getattr(base, "model", None)
    return [owner for owner in (inner, base) if isinstance(owner, torch.nn.Module)]
