"""Tiny random vision-language models with working processors, built offline for the VLM calibration tests.

Each builder returns ``(model, processor)``: a random ``*ForConditionalGeneration`` of the real class (a 2-layer
vision tower on small images, a 4-layer language model of hidden size 64) and the model's own processor class,
made from its image processor class and the embedded SmolLM2 tokenizer with the model's special tokens added.
Nothing is downloaded. The chat templates are small ones in each family's format (the image placeholder the
processor expands, in the place the real template puts it).

Qwen2-VL / Qwen2.5-VL processors also hold a video processor, which needs torchvision; no torchvision build for
the CPU torch is installable here, so :class:`_ImageOnly` lets those processors be built without one (images only,
which is all calibration uses).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch

NUM_LAYERS = 4
TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": NUM_LAYERS,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
}
# a 2-layer vision tower on 32x32 images of 8x8 patches (16 patches per image)
VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 8,
}


def _tokenizer(smollm2_dir: Path, tokens: list[str], **extra_special_tokens: str):
    from transformers import AutoTokenizer

    kwargs = {"extra_special_tokens": extra_special_tokens} if extra_special_tokens else {}
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir, **kwargs)
    tokenizer.add_special_tokens({"additional_special_tokens": tokens}, replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _ids(tokenizer, *tokens: str) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(t) for t in tokens]


def _model(model_type: str, **config):
    from transformers import AutoConfig, AutoModelForImageTextToText

    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(AutoConfig.for_model(model_type, **config))
    return model.eval()


def _template(open_turn: str, close_turn: str, image: str) -> str:
    """A chat template: ``open_turn`` / ``close_turn`` around each message (``{role}`` is replaced), ``image``
    where an image entry stands, text entries as they are."""
    head = open_turn.replace("{role}", "' + message['role'] + '")
    return (
        "{% for message in messages %}"
        f"{{{{ '{head}' }}}}"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for part in message['content'] %}"
        f"{{% if part['type'] == 'image' %}}{{{{ '{image}' }}}}"
        "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
        "{% endfor %}{% endif %}"
        f"{{{{ '{close_turn}' }}}}"
        "{% endfor %}"
    )


CHATML = ("<|im_start|>{role}\n", "<|im_end|>\n")


def _image_only(processor_cls):
    class _ImageOnly(processor_cls):
        """``processor_cls`` without its video processor (which needs torchvision)."""

        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    _ImageOnly.__name__ = processor_cls.__name__
    return _ImageOnly


def llava_next(smollm2_dir: Path):
    from transformers import LlavaNextImageProcessor, LlavaNextProcessor

    tokenizer = _tokenizer(smollm2_dir, ["<image>"])
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
        image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]],
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS, dropped by the "default" feature selection
        chat_template=_template("{role}: ", " ", "<image>\n"),
    )
    model = _model(
        "llava_next",
        text_config={"model_type": "llama", "vocab_size": len(tokenizer), **TEXT},
        vision_config={
            "model_type": "clip_vision_model",
            **VISION,
            "projection_dim": 32,
        },
        image_token_id=_ids(tokenizer, "<image>")[0],
        image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]],
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    return model, processor


def _qwen_vl(smollm2_dir: Path, model_type: str, processor_name: str, vision: dict):
    import transformers
    from transformers import Qwen2VLImageProcessor

    tokenizer = _tokenizer(
        smollm2_dir, ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    )
    image_processor = Qwen2VLImageProcessor(
        min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16, patch_size=14, merge_size=2, temporal_patch_size=2
    )
    processor = _image_only(getattr(transformers, processor_name))(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=_template(*CHATML, "<|vision_start|><|image_pad|><|vision_end|>"),
    )
    start, end, image, video = _ids(
        tokenizer, "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"
    )
    model = _model(
        model_type,
        text_config={
            "vocab_size": len(tokenizer),
            **TEXT,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        },
        vision_config=vision,
        image_token_id=image,
        video_token_id=video,
        vision_start_token_id=start,
        vision_end_token_id=end,
    )
    return model, processor


def qwen2_vl(smollm2_dir: Path):
    vision = {
        "depth": 2,
        "embed_dim": 32,
        "hidden_size": 64,
        "num_heads": 2,
        "mlp_ratio": 2,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    return _qwen_vl(smollm2_dir, "qwen2_vl", "Qwen2VLProcessor", vision)


def qwen2_5_vl(smollm2_dir: Path):
    vision = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "out_hidden_size": 64,
        "num_heads": 2,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 56,
        "fullatt_block_indexes": [1],
    }
    return _qwen_vl(smollm2_dir, "qwen2_5_vl", "Qwen2_5_VLProcessor", vision)


def gemma3(smollm2_dir: Path):
    from transformers import Gemma3ImageProcessor, Gemma3Processor

    special = {
        "boi_token": "<start_of_image>",
        "image_token": "<image_soft_token>",
        "eoi_token": "<end_of_image>",
    }
    tokenizer = _tokenizer(smollm2_dir, list(special.values()), **special)
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessor(size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
        image_seq_length=4,
        chat_template=_template("<start_of_turn>{role}\n", "<end_of_turn>\n", "<start_of_image>"),
    )
    boi, image, eoi = _ids(tokenizer, *special.values())
    model = _model(
        "gemma3",
        text_config={
            "model_type": "gemma3_text",
            "vocab_size": len(tokenizer),
            **TEXT,
            "head_dim": 16,
            "sliding_window": 16,
        },
        vision_config={
            "model_type": "siglip_vision_model",
            **VISION,
        },
        mm_tokens_per_image=4,
        boi_token_index=boi,
        eoi_token_index=eoi,
        image_token_index=image,
    )
    return model, processor


def _pixtral_processor_class():
    """transformers' ``PixtralProcessor``. Its module imports one helper from the torchvision image processor,
    which the PIL image processor module defines too; without torchvision, the import is given that module."""
    import importlib
    import sys

    try:
        return importlib.import_module("transformers.models.pixtral.processing_pixtral").PixtralProcessor
    except ModuleNotFoundError as err:
        if err.name != "torchvision":
            raise
    name = "transformers.models.pixtral.image_processing_pixtral"
    sys.modules[name] = importlib.import_module("transformers.models.pixtral.image_processing_pil_pixtral")
    try:
        return importlib.import_module("transformers.models.pixtral.processing_pixtral").PixtralProcessor
    finally:
        del sys.modules[name]


def mistral3(smollm2_dir: Path):
    from transformers import PixtralImageProcessorPil

    PixtralProcessor = _pixtral_processor_class()
    tokenizer = _tokenizer(smollm2_dir, ["[IMG]", "[IMG_BREAK]", "[IMG_END]"])
    processor = PixtralProcessor(
        image_processor=PixtralImageProcessorPil(size={"longest_edge": 64}, patch_size=8),
        tokenizer=tokenizer,
        patch_size=8,
        spatial_merge_size=2,
        chat_template=_template("[INST]", "[/INST]", "[IMG]"),
    )
    model = _model(
        "mistral3",
        text_config={"model_type": "mistral", "vocab_size": len(tokenizer), **TEXT},
        vision_config={
            "model_type": "pixtral",
            **VISION,
            "head_dim": 16,
            "image_size": 64,
        },
        image_token_index=_ids(tokenizer, "[IMG]")[0],
        spatial_merge_size=2,
        vision_feature_layer=-1,
    )
    return model, processor


def _idefics(smollm2_dir: Path, model_type: str, processor_cls, image_processor_cls):

    rows_cols = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
    tokenizer = _tokenizer(
        smollm2_dir,
        ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>", *rows_cols],
    )
    image_processor = image_processor_cls(
        size={"longest_edge": 64}, max_image_size={"longest_edge": 32}, do_image_splitting=True
    )
    if model_type == "smolvlm":
        processor_cls = _image_only(processor_cls)
    extra = {"video_processor": None} if model_type == "smolvlm" else {}
    processor = processor_cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=4,
        **extra,
        chat_template=_template("{role}: ", "<end_of_utterance>\n", "<image>"),
    )
    if model_type == "smolvlm":
        # its apply_chat_template reads the video sampling defaults even for image-only conversations
        processor.video_processor = SimpleNamespace(num_frames=64, fps=1)
    model = _model(
        model_type,
        text_config={"model_type": "llama", "vocab_size": len(tokenizer), **TEXT},
        vision_config={
            **VISION,
        },
        image_token_id=_ids(tokenizer, "<image>")[0],
        scale_factor=2,
    )
    return model, processor


def idefics3(smollm2_dir: Path):
    # imported from their modules: the top-level names are torchvision placeholders when torchvision is missing
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
    from transformers.models.idefics3.processing_idefics3 import Idefics3Processor

    return _idefics(smollm2_dir, "idefics3", Idefics3Processor, Idefics3ImageProcessorPil)


def smolvlm(smollm2_dir: Path):
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil
    from transformers.models.smolvlm.processing_smolvlm import SmolVLMProcessor

    return _idefics(smollm2_dir, "smolvlm", SmolVLMProcessor, SmolVLMImageProcessorPil)


def mllama(smollm2_dir: Path):
    from transformers import MllamaImageProcessor, MllamaProcessor

    tokenizer = _tokenizer(smollm2_dir, ["<|image|>", "<|python_tag|>"])
    processor = MllamaProcessor(
        image_processor=MllamaImageProcessor(size={"height": 32, "width": 32}, max_image_tiles=2),
        tokenizer=tokenizer,
        chat_template=_template("<|start_header_id|>{role}<|end_header_id|>\n", "<|eot_id|>", "<|image|>"),
    )
    model = _model(
        "mllama",
        text_config={
            "vocab_size": len(tokenizer) + 8,
            **TEXT,
            "cross_attention_layers": [2],
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_global_layers": 1,
            "attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
            "max_num_tiles": 2,
            "vision_output_dim": 64,
            "intermediate_layers_indices": [0],
            "supported_aspect_ratios": [[1, 1], [1, 2], [2, 1]],
        },
        image_token_index=_ids(tokenizer, "<|image|>")[0],
    )
    return model, processor


BUILDERS: dict[str, Callable] = {
    "llava_next": llava_next,
    "qwen2_vl": qwen2_vl,
    "qwen2_5_vl": qwen2_5_vl,
    "gemma3": gemma3,
    "mistral3": mistral3,
    "idefics3": idefics3,
    "smolvlm": smolvlm,
    "mllama": mllama,
}


# The processor class a saved Qwen2-VL / Qwen2.5-VL / SmolVLM folder names in its ``auto_map``: transformers' own
# processor without the video processor (which needs torchvision), loaded with ``trust_remote_code``.
_REMOTE_PROCESSOR = '''\
import transformers


class ImageOnlyProcessor(transformers.{name}):
    """transformers.{name} without its video processor (which needs torchvision)."""

    @classmethod
    def get_attributes(cls):
        return [a for a in super().get_attributes() if a != "video_processor"]
'''


def save(name: str, smollm2_dir: Path, out: Path) -> Path:
    """Build model ``name`` and save it with its processor (tokenizer, image processor, chat template) to
    ``out``, loadable by ``AutoProcessor`` — with ``trust_remote_code`` for the processors that hold a video
    processor, which then load without it."""
    import json

    model, processor = BUILDERS[name](smollm2_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    if getattr(processor, "video_processor", "absent") == "absent":
        processor.save_pretrained(out)
        return out
    processor.tokenizer.save_pretrained(out)
    processor.image_processor.save_pretrained(out)
    (out / "chat_template.jinja").write_text(processor.chat_template)
    base = type(processor).__mro__[1].__name__
    (out / "processing_image_only.py").write_text(_REMOTE_PROCESSOR.format(name=base))
    config = {
        "processor_class": base,
        "auto_map": {"AutoProcessor": "processing_image_only.ImageOnlyProcessor"},
    }
    (out / "processor_config.json").write_text(json.dumps(config, indent=2))
    return out
