"""LLaVA-Bench answer generation: a LLaVA base model plus a (ShareLoRA or LoRA) adapter answers the benchmark's
questions, greedy and batched, into the answer JSONL that ``llava/judge.py`` reads.

Follows upstream LLaVA's ``llava/eval/model_vqa.py`` where it defines the protocol: the question becomes
``"<image>\\n" + text`` in one user turn of the model's conversation format, the answer is generated greedily
(upstream's LLaVA-Bench runs use temperature 0) with at most ``--max-new-tokens`` (1024, as upstream) new tokens,
and each answer line holds ``question_id``, ``prompt`` (the question text), ``text`` (the answer), ``answer_id``,
``model_id`` and ``metadata``.

Where this script differs, on purpose:

* It loads a transformers ``LlavaForConditionalGeneration`` folder (``llava-hf/llava-1.5-7b-hf``) and applies the
  adapter with plain PEFT — no ShareLoRA code is needed: the saved adapter is an ordinary LoRA (plus the trained
  projector in ``modules_to_save``). ``--merge`` folds it into the weights first (faster generation).
* The prompt is rendered by the processor's chat template (``USER: <image>\\n{question} ASSISTANT:`` for
  LLaVA-1.5); ``--system-prompt vicuna_v1`` puts upstream's system sentence in front, as upstream's ``vicuna_v1``
  conversation mode does. Use the same choice as in training.
* Questions are answered in batches (``--batch-size``) with left padding. Generation stops at the tokenizer's EOS
  or at a ``--stop`` string (default ``USER:``: a model fine-tuned with a template that has no EOS after the
  answer would otherwise go on with the next turn); the stop string is cut from the answer.
* Resumable: every answer is appended as one JSONL line and fsync'ed; on start, a cut-off last line and invalid or
  duplicate lines are removed and the questions already answered are skipped.

Run ``python llava/answer.py --help``. Exit status: 0 done, 2 bad input.
"""

from __future__ import annotations

import argparse
import logging
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sharelora_plugin.planning.files import read_jsonl
from sharelora_plugin.planning.rules import PlanError

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared JSONL module beside this script
from resumable_jsonl import JsonlAppender, recover_jsonl  # noqa: E402

LOG = logging.getLogger("llava.answer")

VICUNA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
SYSTEM_PRESETS = {"vicuna_v1": VICUNA_V1_SYSTEM}
QUESTION_KEYS = ("question_id", "image", "text")
ANSWER_KEYS = ("question_id", "prompt", "text", "answer_id", "model_id", "metadata")
DEFAULT_MAX_NEW_TOKENS = 1024
DEFAULT_STOP = ("USER:",)

EXIT_OK = 0
EXIT_INPUT_ERROR = 2


class InputError(ValueError):
    """A question file, image or model folder is missing or malformed; the message says which and why."""


def read_questions(path: str | Path) -> list[dict[str, Any]]:
    """Questions of a LLaVA-Bench ``questions.jsonl`` (``question_id``, ``image``, ``text``, ``category``);
    raises :class:`InputError` naming the line of bad JSON, or the malformed or duplicate question."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--question-file {str(path)!r} is not a file")
    try:
        records = read_jsonl(path, "--question-file")
    except PlanError as err:
        raise InputError(str(err)) from err
    questions, seen = [], set()
    for number, record in enumerate(records, start=1):
        missing = [k for k in QUESTION_KEYS if not isinstance(record, dict) or k not in record]
        if missing:
            raise InputError(f"{path}: question {number} lacks {missing} (needs {list(QUESTION_KEYS)})")
        key = str(record["question_id"])
        if key in seen:
            raise InputError(
                f"{path}: question {number}: question_id {record['question_id']!r} appears twice"
            )
        seen.add(key)
        questions.append(record)
    return questions


def _valid_answer(record: Any) -> bool:
    return isinstance(record, dict) and all(k in record for k in ANSWER_KEYS)


def recover_answers(path: str | Path) -> dict[str, dict[str, Any]]:
    """Answers already in ``path`` by ``str(question_id)``. A cut-off last line, lines that are not answer JSON
    and second answers to a question are removed (the file is rewritten atomically) and answered again."""
    return recover_jsonl(path, is_valid=_valid_answer, key_of=lambda r: str(r["question_id"]), what="answer")


AnswerWriter = JsonlAppender


def _dtype(name: str):
    import torch

    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError as err:
        raise InputError(f"--dtype must be auto, float32, bfloat16 or float16, got {name!r}") from err


def load_model(
    model_base: str | Path,
    adapter: str | Path | None = None,
    *,
    merge: bool = False,
    dtype: str = "auto",
    device: str = "auto",
):
    """The base VLM with the adapter applied (PEFT, merged into the weights with ``merge``), in eval mode."""
    import torch
    from transformers import AutoModelForImageTextToText

    base_path = Path(model_base)
    if base_path.exists() and not (base_path / "config.json").is_file():
        raise InputError(f"--model-base {str(model_base)!r} has no config.json")
    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        raise InputError(f"--adapter {str(adapter)!r} has no adapter_config.json (a PEFT adapter folder)")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForImageTextToText.from_pretrained(str(model_base), dtype=_dtype(dtype))
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
        if merge:
            model = model.merge_and_unload()
    elif merge:
        raise InputError("--merge needs --adapter")
    return model.to(device).eval()


def load_processor(model_base: str | Path, adapter: str | Path | None = None, processor: str | None = None):
    """The processor: ``--processor`` if given, else the adapter folder's (Axolotl saves one there), else the
    base model's. Padding is set to the left for batched generation."""
    from transformers import AutoProcessor

    source = processor
    if source is None and adapter is not None and (Path(adapter) / "processor_config.json").is_file():
        source = str(adapter)
    loaded = AutoProcessor.from_pretrained(source or str(model_base))
    loaded.tokenizer.padding_side = "left"
    if loaded.tokenizer.pad_token is None:
        loaded.tokenizer.pad_token = loaded.tokenizer.eos_token
    return loaded


def build_prompt(processor, question: str, system_prompt: str | None = None) -> str:
    """The generation prompt for one question with its image, rendered by the processor's chat template."""
    messages: list[dict[str, Any]] = []
    if system_prompt:
        messages.append({"role": "system", "content": [{"type": "text", "text": system_prompt}]})
    messages.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]})
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to the first stop string, stripped."""
    for marker in stop:
        if marker and marker in text:
            text = text[: text.index(marker)]
    return text.strip()


def generate_answers(
    model,
    processor,
    prompts: Sequence[str],
    images: Sequence[Any],
    *,
    max_new_tokens: int,
    stop: Sequence[str] = DEFAULT_STOP,
) -> list[str]:
    """Greedy answers for one batch (left-padded prompts, one image each)."""
    import torch

    inputs = processor(images=list(images), text=list(prompts), padding=True, return_tensors="pt")
    device = next(model.parameters()).device
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    inputs = {k: v.to(device) for k, v in inputs.items()}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    tokenizer = processor.tokenizer
    extra = {"stop_strings": list(stop), "tokenizer": tokenizer} if stop else {}
    with torch.inference_mode():
        output = model.generate(
            **inputs,
            do_sample=False,
            num_beams=1,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            **extra,
        )
    new_tokens = output[:, inputs["input_ids"].shape[1] :]
    texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return [cut_at_stop(t, stop) for t in texts]


def open_image(image_folder: Path, name: str):
    """The RGB image ``image_folder / name``."""
    from PIL import Image

    with Image.open(image_folder / name) as image:
        return image.convert("RGB")


def answer_questions(
    questions: Sequence[dict[str, Any]],
    *,
    model,
    processor,
    image_folder: Path,
    answers_file: Path,
    model_id: str,
    batch_size: int = 8,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    system_prompt: str | None = None,
    stop: Sequence[str] = DEFAULT_STOP,
    metadata: dict[str, Any] | None = None,
) -> int:
    """Answer the questions not yet in ``answers_file`` (appending, in question order); returns how many."""
    from tqdm import tqdm

    done = recover_answers(answers_file)
    todo = [q for q in questions if str(q["question_id"]) not in done]
    if done:
        LOG.info("%s: %d answer(s) present, %d question(s) to go", answers_file, len(done), len(todo))
    writer = AnswerWriter(answers_file)
    try:
        with tqdm(total=len(todo), desc="answers", unit="q") as bar:
            for start in range(0, len(todo), batch_size):
                batch = todo[start : start + batch_size]
                prompts = [build_prompt(processor, q["text"], system_prompt) for q in batch]
                images = [open_image(image_folder, q["image"]) for q in batch]
                texts = generate_answers(
                    model, processor, prompts, images, max_new_tokens=max_new_tokens, stop=stop
                )
                for question, text in zip(batch, texts, strict=True):
                    writer.write(
                        {
                            "question_id": question["question_id"],
                            "prompt": question["text"],
                            "text": text,
                            "answer_id": uuid.uuid4().hex,
                            "model_id": model_id,
                            "metadata": {
                                "category": question.get("category"),
                                "image": question["image"],
                                **(metadata or {}),
                            },
                        }
                    )
                bar.update(len(batch))
    finally:
        writer.close()
    return len(todo)


def build_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model-base", required=True, help="base LLaVA folder or Hub id (llava-hf/llava-1.5-7b-hf)"
    )
    parser.add_argument(
        "--adapter", default=None, help="PEFT adapter folder (Axolotl's output_dir); none: the base"
    )
    parser.add_argument(
        "--merge", action="store_true", help="merge the adapter into the weights before generating"
    )
    parser.add_argument("--question-file", required=True, type=Path, help="LLaVA-Bench questions.jsonl")
    parser.add_argument("--image-folder", required=True, type=Path, help="folder of the questions' images")
    parser.add_argument("--answers-file", required=True, type=Path, help="answer JSONL to write (appended)")
    parser.add_argument(
        "--model-id", default=None, help="model_id of the answers (default: adapter/base name)"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="questions per generate call (default 8)")
    parser.add_argument(
        "--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, help="per answer (default 1024)"
    )
    parser.add_argument(
        "--system-prompt",
        default=None,
        help="system message: a text, or 'vicuna_v1' for upstream LLaVA-1.5's",
    )
    parser.add_argument(
        "--stop",
        action="append",
        default=None,
        help="stop string, repeatable (default: USER:); --stop '' for none",
    )
    parser.add_argument(
        "--processor", default=None, help="processor folder (default: adapter's, else base's)"
    )
    parser.add_argument(
        "--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 …")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.batch_size <= 0:
        parser.error(f"--batch-size must be a positive integer, got {args.batch_size}")
    if args.max_new_tokens <= 0:
        parser.error(f"--max-new-tokens must be a positive integer, got {args.max_new_tokens}")
    if not args.image_folder.is_dir():
        parser.error(f"--image-folder {str(args.image_folder)!r} is not a folder")
    stop = DEFAULT_STOP if args.stop is None else tuple(s for s in args.stop if s)
    system_prompt = SYSTEM_PRESETS.get(args.system_prompt, args.system_prompt)
    try:
        questions = read_questions(args.question_file)
        missing = [q for q in questions if not (args.image_folder / q["image"]).is_file()]
        if missing:
            names = ", ".join(f"{q['question_id']}: {q['image']}" for q in missing[:5])
            raise InputError(
                f"{len(missing)} question image(s) not in --image-folder {args.image_folder} ({names})"
            )
        model = load_model(
            args.model_base, args.adapter, merge=args.merge, dtype=args.dtype, device=args.device
        )
        processor = load_processor(args.model_base, args.adapter, args.processor)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    model_id = args.model_id or Path(str(args.adapter or args.model_base).rstrip("/")).name
    written = answer_questions(
        questions,
        model=model,
        processor=processor,
        image_folder=args.image_folder,
        answers_file=args.answers_file,
        model_id=model_id,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        system_prompt=system_prompt,
        stop=stop,
        metadata={
            "model_base": str(args.model_base),
            "adapter": str(args.adapter) if args.adapter else None,
            "merged": bool(args.merge),
            "decoding": "greedy",
            "max_new_tokens": args.max_new_tokens,
        },
    )
    LOG.info("%s: wrote %d answer(s)", args.answers_file, written)
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
