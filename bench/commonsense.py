"""Commonsense and arithmetic evaluation with the LLM-Adapters protocol (the benchmarks of the ShareLoRA paper's
Table 2, and GSM8K of its Table 1).

Protocol, as in LLM-Adapters' ``commonsense_evaluate.py`` (read, not copied):

* Each test row is ``{"instruction", "input", "output", "answer"}`` (the ``commonsense_170k.json`` format);
  the prompt is the alpaca template the model was fine-tuned with (:data:`PROMPT_NO_INPUT`), which is byte for
  byte what Axolotl's ``type: alpaca`` builds.
* Batched generation with left padding: beam search (``num_beams=4``, ``max_new_tokens=32``, no sampling) by
  default; ``num_beams=1`` is greedy.
* The response is the generated text up to any further ``### Response:`` marker (LLM-Adapters splits the decoded
  sequence on the marker and keeps part ``[1]``). The prediction is the **first** match of the dataset's answer
  pattern in it (BoolQ ``true|false``, PIQA ``solution1|solution2``, SIQA/ARC/OBQA ``answer1``–``answer5``,
  HellaSwag ``ending1``–``ending4``, WinoGrande ``option1|option2``; case-sensitive like the original). No match
  counts as wrong. Accuracy per task and the unweighted mean over tasks ("Avg." in the paper).

Arithmetic test sets (GSM8K and LLM-Adapters' other number-answer sets: AddSub, MultiArith, SingleEq, SVAMP;
``dataset/<task>/test.json``, rows ``{"instruction", "input": "", "output", "answer": "576.0"}`` with the gold
number as a string) follow LLM-Adapters' ``evaluate.py`` (line numbers at commit 8166572): the same prompt
(``generate_prompt``, lines 141-160), beam search with ``num_beams=4``, ``max_new_tokens=256`` (lines 43-44);
the prediction is the **last** number in the response after removing thousands separators (an optional minus,
digits, an optional point and digits; ``extract_answer_number``, lines 272-287), no number counts as wrong
(upstream predicts ``inf``), and it is right when ``|prediction - float(answer)| <= 0.001`` (``miss``, lines 94,
109-112). ``--max-new-tokens`` therefore defaults to 256 for these (32 for the label tasks)::

    python -m bench.commonsense --base-model meta-llama/Llama-2-7b-hf --adapter OUT \\
        --data-dir LLM-Adapters/dataset --tasks gsm8k --output-dir OUT/gsm8k

Differences from the original script, all deliberate: the prompt has no stray indentation (the original's
triple-quoted template indents every line by 16 spaces at evaluation but the model is trained on Axolotl's
clean template, and train and test prompts must agree; for the same reason the trailing space after "request."
in its no-input template is dropped); the attention mask is passed to ``generate`` (the
original omits it, so left padding leaks into attention); the ``input`` field is used when present (empty in all
eight test sets); any base model + PEFT adapter works, including a ShareLoRA adapter, which is saved as a plain
LoRA and so loads without the plugin.

CLI (test sets: ``git clone https://github.com/AGI-Edgerunners/LLM-Adapters``; they live in ``dataset/<task>/test.json``)::

    python -m bench.commonsense --base-model meta-llama/Llama-2-7b-hf \\
        --adapter outputs/llama2_sharelora --data-dir LLM-Adapters/dataset --output-dir outputs/llama2_sharelora/eval

writes ``commonsense_results.json``, ``commonsense_results.md`` and ``predictions/<task>.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sharelora_plugin.planning.files import read_jsonl
from sharelora_plugin.planning.rules import PlanError

LOG = logging.getLogger("sharelora.commonsense")

PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
RESPONSE_MARKER = "### Response:"

# The answer vocabulary of each answer format, in the order LLM-Adapters' regexes list them.
ANSWER_FORMATS: dict[str, tuple[str, ...]] = {
    "true_false": ("true", "false"),
    "solution": ("solution1", "solution2"),
    "answer": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "ending": ("ending1", "ending2", "ending3", "ending4"),
    "option": ("option1", "option2"),
}
# The eight LLM-Adapters commonsense test sets (folder names of its ``dataset/``), in the paper's table order.
DATASET_FORMATS: dict[str, str] = {
    "boolq": "true_false",
    "piqa": "solution",
    "social_i_qa": "answer",
    "hellaswag": "ending",
    "winogrande": "option",
    "ARC-Easy": "answer",
    "ARC-Challenge": "answer",
    "openbookqa": "answer",
}
COMMONSENSE_TASKS: tuple[str, ...] = tuple(DATASET_FORMATS)
# LLM-Adapters' arithmetic test sets whose answers are numbers (AQuA's are letters and are not included).
NUMBER_FORMAT = "number"
MATH_TASKS: tuple[str, ...] = ("gsm8k", "AddSub", "MultiArith", "SingleEq", "SVAMP")
NUMBER_TOLERANCE = 0.001  # LLM-Adapters' ``miss``: |prediction - answer| <= 0.001 is right
NUMBER_PATTERN = re.compile(r"-?\d+\.?\d*")
MAX_NEW_TOKENS = {NUMBER_FORMAT: 256}  # label tasks: 32
RESULTS_JSON = "commonsense_results.json"
RESULTS_MD = "commonsense_results.md"


class EvaluationError(ValueError):
    """A user-facing problem with test data, task names or evaluation options."""


# --------------------------------------------------------------------------------------------------------------------
# Prompt and answer extraction (pure functions)


def build_prompt(instruction: str, input_text: str | None = None) -> str:
    """The alpaca prompt used for training and testing, ending right after ``### Response:\\n``."""
    if input_text:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input_text)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def response_text(generated: str) -> str:
    """The model's answer: generated text up to a further response marker (a model that runs on into another
    example), stripped — what LLM-Adapters gets from ``decoded.split("### Response:")[1].strip()``."""
    return generated.split(RESPONSE_MARKER, 1)[0].strip()


def answer_pattern(answer_format: str) -> re.Pattern[str]:
    """The regex of an answer format (alternatives in LLM-Adapters' order, case-sensitive)."""
    if answer_format not in ANSWER_FORMATS:
        raise EvaluationError(
            f"unknown answer format {answer_format!r}; valid: {', '.join(sorted(ANSWER_FORMATS))}"
        )
    return re.compile("|".join(re.escape(label) for label in ANSWER_FORMATS[answer_format]))


def extract_answer(response: str, answer_format: str) -> str:
    """First label of ``answer_format`` in ``response`` (``""`` when there is none, which counts as wrong)."""
    match = answer_pattern(answer_format).search(response.strip())
    return match.group(0) if match else ""


def extract_number(response: str) -> float | None:
    """The last number in ``response`` after removing thousands separators (LLM-Adapters' ``extract_answer_number``
    for GSM8K and the other arithmetic sets); ``None`` when there is no number, which counts as wrong."""
    found = NUMBER_PATTERN.findall(response.replace(",", ""))
    return float(found[-1]) if found else None


def number_is_right(predicted: float | None, answer: Any) -> bool:
    """``|predicted - answer| <= 0.001`` (LLM-Adapters' tolerance); no prediction is wrong."""
    if predicted is None:
        return False
    try:
        gold = float(answer)
    except (TypeError, ValueError):
        raise EvaluationError(f"arithmetic answer {answer!r} is not a number") from None
    return abs(gold - predicted) <= NUMBER_TOLERANCE


def _is_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int | float):
        return math.isfinite(value)
    try:
        return math.isfinite(float(str(value)))
    except ValueError:
        return False


def infer_answer_format(task: str, rows: Sequence[dict]) -> str:
    """The answer format of a task: from :data:`DATASET_FORMATS` for the eight known test sets, ``number`` for
    the arithmetic sets (:data:`MATH_TASKS`, or every gold ``answer`` a number), otherwise the format whose
    vocabulary contains every gold ``answer`` (e.g. a rule-generated ``rule_boolq`` set)."""
    if task in DATASET_FORMATS:
        return DATASET_FORMATS[task]
    if task in MATH_TASKS or (rows and all(_is_number(row.get("answer")) for row in rows)):
        return NUMBER_FORMAT
    labels = {str(row.get("answer")) for row in rows}
    fitting = [name for name, vocab in ANSWER_FORMATS.items() if labels <= set(vocab)]
    if not fitting:
        known = ", ".join(name + ": " + "/".join(vocab) for name, vocab in ANSWER_FORMATS.items())
        raise EvaluationError(
            f"task {task!r}: gold answers {sorted(labels)} fit no answer format ({known}); "
            f"pass --format {task}=NAME"
        )
    return fitting[0]


def load_test_rows(path: str | Path) -> list[dict]:
    """Read a test set: a JSON list (LLM-Adapters ``test.json``) or JSONL, each row with ``instruction`` and
    ``answer`` (``input`` optional)."""
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"test file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        rows = json.loads(text) if text.lstrip().startswith("[") else read_jsonl(path)
    except (json.JSONDecodeError, PlanError) as err:
        raise EvaluationError(f"{path} is not a JSON list or JSONL file: {err}") from None
    for k, row in enumerate(rows):
        if not isinstance(row, dict) or "instruction" not in row or "answer" not in row:
            raise EvaluationError(
                f"{path} row {k} needs 'instruction' and 'answer' fields (commonsense_170k format); got "
                f"{sorted(row) if isinstance(row, dict) else type(row).__name__}"
            )
    return rows


# --------------------------------------------------------------------------------------------------------------------
# Results


@dataclass
class TaskResult:
    """Accuracy of one test set and the per-example predictions (LLM-Adapters' ``output_pred``/``pred``/``flag``)."""

    task: str
    answer_format: str
    correct: int
    total: int
    unanswered: int
    predictions: list[dict] = field(default_factory=list, repr=False)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def summary(self) -> dict[str, Any]:
        """JSON-able numbers without the predictions."""
        return {
            "answer_format": self.answer_format,
            "accuracy": round(self.accuracy, 6),
            "correct": self.correct,
            "total": self.total,
            "unanswered": self.unanswered,
            "stderr": round(math.sqrt(self.accuracy * (1 - self.accuracy) / self.total), 6)
            if self.total
            else 0.0,
        }


@dataclass
class EvaluationReport:
    """Per-task results, the macro average and the settings that produced them."""

    tasks: dict[str, TaskResult]
    settings: dict[str, Any]
    seconds: float

    @property
    def average(self) -> float:
        """Unweighted mean of the task accuracies (the paper's "Avg.")."""
        return sum(r.accuracy for r in self.tasks.values()) / len(self.tasks) if self.tasks else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "average": round(self.average, 6),
            "tasks": {name: result.summary() for name, result in self.tasks.items()},
            "num_examples": sum(r.total for r in self.tasks.values()),
            "seconds": round(self.seconds, 2),
            "settings": self.settings,
        }

    def to_markdown(self, title: str = "Commonsense evaluation (LLM-Adapters protocol)") -> str:
        lines = [
            f"# {title}",
            "",
            f"Model: `{self.settings.get('base_model', '?')}`"
            + (f" + adapter `{self.settings['adapter']}`" if self.settings.get("adapter") else ""),
            f"Decoding: num_beams={self.settings.get('num_beams')}, max_new_tokens="
            f"{self.settings.get('max_new_tokens')}, batch_size={self.settings.get('batch_size')}, left padding; "
            "prediction = first answer label after the response marker (numbers: the last number, right within "
            "0.001), none = wrong.",
            "",
            "| Task | Format | N | Accuracy (%) | ± s.e. | No answer |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for name, result in self.tasks.items():
            s = result.summary()
            lines.append(
                f"| {name} | {result.answer_format} | {result.total} | {100 * result.accuracy:.1f} | "
                f"{100 * s['stderr']:.1f} | {result.unanswered} |"
            )
        lines.append(
            f"| **Avg.** | | {sum(r.total for r in self.tasks.values())} | **{100 * self.average:.1f}** | | |"
        )
        return "\n".join(lines) + "\n"

    def save(self, folder: str | Path) -> list[Path]:
        """Write ``commonsense_results.{json,md}`` and ``predictions/<task>.jsonl`` into ``folder``."""
        folder = Path(folder)
        (folder / "predictions").mkdir(parents=True, exist_ok=True)
        written = [folder / RESULTS_JSON, folder / RESULTS_MD]
        written[0].write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        written[1].write_text(self.to_markdown(), encoding="utf-8")
        for name, result in self.tasks.items():
            path = folder / "predictions" / f"{name}.jsonl"
            with path.open("w", encoding="utf-8") as out:
                for row in result.predictions:
                    out.write(json.dumps(row, ensure_ascii=False) + "\n")
            written.append(path)
        return written


# --------------------------------------------------------------------------------------------------------------------
# Generation


def prepare_tokenizer_for_generation(tokenizer) -> None:
    """Left padding, and a pad token when the tokenizer has none (LLaMA: ``<unk>``, as LLM-Adapters uses id 0;
    otherwise eos). The attention mask keeps pads out of attention either way."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token


def generate_responses(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    batch_size: int = 8,
    num_beams: int = 4,
    max_new_tokens: int = 32,
    progress: bool = True,
) -> list[str]:
    """Generate a response per prompt (batched, left padded, deterministic). Prompts are batched by length to
    cut padding; the output is in the input order. Returns the decoded generated text of each prompt."""
    import torch
    from tqdm.auto import tqdm

    if batch_size < 1 or num_beams < 1 or max_new_tokens < 1:
        raise EvaluationError(
            f"batch_size, num_beams and max_new_tokens must be positive; got {batch_size}, {num_beams}, "
            f"{max_new_tokens}"
        )
    prepare_tokenizer_for_generation(tokenizer)
    device = next(p.device for p in model.parameters())
    lengths = [len(tokenizer(p)["input_ids"]) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    outputs: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    eos = tokenizer.eos_token_id
    try:
        with torch.no_grad():
            for start in tqdm(
                range(0, len(order), batch_size), desc="generate", unit="batch", disable=not progress
            ):
                chunk = order[start : start + batch_size]
                enc = tokenizer([prompts[i] for i in chunk], return_tensors="pt", padding=True).to(device)
                generated = model.generate(
                    **enc,
                    do_sample=False,
                    num_beams=num_beams,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=eos,
                )
                texts = tokenizer.batch_decode(
                    generated[:, enc["input_ids"].shape[1] :], skip_special_tokens=True
                )
                for i, text in zip(chunk, texts, strict=True):
                    outputs[i] = text
    finally:
        model.train(was_training)
    return outputs


def evaluate_rows(
    model,
    tokenizer,
    task: str,
    rows: Sequence[dict],
    *,
    answer_format: str | None = None,
    batch_size: int = 8,
    num_beams: int = 4,
    max_new_tokens: int | None = None,
    progress: bool = True,
) -> TaskResult:
    """Accuracy of ``model`` on one test set under the LLM-Adapters protocol (``max_new_tokens`` defaults to 256
    for arithmetic sets, 32 otherwise)."""
    if not rows:
        raise EvaluationError(f"task {task!r} has no test rows")
    answer_format = answer_format or infer_answer_format(task, rows)
    if max_new_tokens is None:
        max_new_tokens = MAX_NEW_TOKENS.get(answer_format, 32)
    prompts = [build_prompt(row["instruction"], row.get("input")) for row in rows]
    generated = generate_responses(
        model,
        tokenizer,
        prompts,
        batch_size=batch_size,
        num_beams=num_beams,
        max_new_tokens=max_new_tokens,
        progress=progress,
    )
    correct = unanswered = 0
    predictions = []
    for row, text in zip(rows, generated, strict=True):
        response = response_text(text)
        if answer_format == NUMBER_FORMAT:
            number = extract_number(response)
            flag = number_is_right(number, row["answer"])
            predicted: Any = "" if number is None else number
        else:
            predicted = extract_answer(response, answer_format)
            flag = predicted == str(row["answer"])
        correct += flag
        unanswered += predicted == ""
        predictions.append({**row, "output_pred": response, "pred": predicted, "flag": flag})
    return TaskResult(task, answer_format, correct, len(rows), unanswered, predictions)


def evaluate_tasks(
    model,
    tokenizer,
    tasks: dict[str, Sequence[dict]],
    *,
    formats: dict[str, str] | None = None,
    batch_size: int = 8,
    num_beams: int = 4,
    max_new_tokens: int | None = None,
    progress: bool = True,
    settings: dict[str, Any] | None = None,
) -> EvaluationReport:
    """Evaluate every task in ``tasks`` (name -> rows); ``formats`` overrides inferred answer formats."""
    formats = formats or {}
    start = time.perf_counter()
    results = {}
    for name, rows in tasks.items():
        results[name] = evaluate_rows(
            model,
            tokenizer,
            name,
            rows,
            answer_format=formats.get(name),
            batch_size=batch_size,
            num_beams=num_beams,
            max_new_tokens=max_new_tokens,
            progress=progress,
        )
        LOG.info(
            "%s: accuracy %.4f (%d/%d)",
            name,
            results[name].accuracy,
            results[name].correct,
            results[name].total,
        )
    return EvaluationReport(
        tasks=results,
        settings={
            **(settings or {}),
            "num_beams": num_beams,
            "max_new_tokens": max_new_tokens if max_new_tokens is not None else "32 (labels) / 256 (numbers)",
            "batch_size": batch_size,
            "prompt_template": PROMPT_NO_INPUT,
            "protocol": "LLM-Adapters commonsense_evaluate.py / evaluate.py: alpaca prompt, left padding; labels: "
            "first answer label after the response marker; numbers: last number, |pred - answer| <= 0.001; "
            "nothing found = wrong",
        },
        seconds=time.perf_counter() - start,
    )


# --------------------------------------------------------------------------------------------------------------------
# Model loading and CLI


def resolve_device_and_dtype(device: str = "auto", dtype: str = "auto"):
    """``auto``: CUDA with bf16 (fp16 without bf16 support) when a GPU is present, else CPU with fp32."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        if device.startswith("cuda"):
            dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        else:
            dtype = "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise EvaluationError(f"--dtype must be auto, float32, bfloat16 or float16; got {dtype!r}")
    return torch.device(device), getattr(torch, dtype)


def load_model_and_tokenizer(
    base_model: str, adapter: str | None = None, *, device: str = "auto", dtype: str = "auto"
):
    """Base model (+ a PEFT adapter folder, e.g. a trained LoRA or ShareLoRA ``output_dir``) and its tokenizer.

    The tokenizer comes from the adapter folder when it holds one (Axolotl saves the tokenizer it trained with,
    including added pad tokens), else from the base model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_device, torch_dtype = resolve_device_and_dtype(device, dtype)
    tokenizer_source = (
        adapter if adapter and (Path(adapter) / "tokenizer_config.json").is_file() else base_model
    )
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch_dtype)
    if adapter:
        from peft import PeftModel

        if not (Path(adapter) / "adapter_config.json").is_file():
            raise EvaluationError(
                f"--adapter {adapter} has no adapter_config.json (not a PEFT adapter folder)"
            )
        model = PeftModel.from_pretrained(model, adapter)
    model.to(torch_device)
    model.eval()
    return model, tokenizer


def sharelora_plan_summary(adapter: str | None) -> dict | None:
    """Strategy, sets, rank and parameter counts from the adapter's ``sharelora_plan.json`` (None without one)."""
    if not adapter or not (Path(adapter) / "sharelora_plan.json").is_file():
        return None
    plan = json.loads((Path(adapter) / "sharelora_plan.json").read_text(encoding="utf-8"))
    meta = plan.get("metadata") or {}
    return {
        "strategy": plan.get("strategy"),
        "threshold": plan.get("threshold"),
        "share_sets": plan.get("share_sets"),
        "rank": plan.get("rank"),
        "base_rank": plan.get("base_rank"),
        "lora_params": meta.get("lora_params"),
        "sharelora_params": meta.get("sharelora_params"),
    }


def collect_tasks(
    data_dir: str | None, task_names: Sequence[str], task_files: Sequence[str], limit: int | None
) -> dict[str, list[dict]]:
    """Rows per task from ``--data-dir DIR`` (``DIR/<task>/test.json``) and ``--task NAME=PATH`` entries."""
    paths: dict[str, Path] = {}
    if data_dir:
        for name in task_names:
            paths[name] = Path(data_dir) / name / "test.json"
    for item in task_files:
        if "=" not in item:
            raise EvaluationError(f"--task expects NAME=PATH, got {item!r}")
        name, path = item.split("=", 1)
        paths[name] = Path(path)
    if not paths:
        raise EvaluationError(
            "no test sets: pass --data-dir (LLM-Adapters' dataset/ folder) and/or --task NAME=PATH"
        )
    tasks = {}
    for name, path in paths.items():
        rows = load_test_rows(path)
        tasks[name] = rows[:limit] if limit else rows
    return tasks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.commonsense",
        description="Commonsense accuracy with the LLM-Adapters protocol (base model + optional PEFT adapter).",
    )
    parser.add_argument("--base-model", required=True, help="Hub id or folder of the base model")
    parser.add_argument("--adapter", help="PEFT adapter folder (a LoRA or ShareLoRA output_dir)")
    parser.add_argument("--data-dir", help="LLM-Adapters' dataset/ folder: <data-dir>/<task>/test.json")
    parser.add_argument(
        "--tasks",
        nargs="+",
        default=list(COMMONSENSE_TASKS),
        help=f"task folders under --data-dir (default: {' '.join(COMMONSENSE_TASKS)})",
    )
    parser.add_argument("--task", action="append", default=[], metavar="NAME=PATH", help="extra test file")
    parser.add_argument(
        "--format",
        action="append",
        default=[],
        metavar="NAME=FORMAT",
        help=f"answer format of a task not in the eight ({', '.join([*ANSWER_FORMATS, NUMBER_FORMAT])}); "
        "inferred when omitted",
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-beams", type=int, default=4, help="4 as LLM-Adapters; 1 = greedy")
    parser.add_argument(
        "--max-new-tokens", type=int, help="default 32 for label tasks, 256 for arithmetic tasks (gsm8k, ...)"
    )
    parser.add_argument("--limit", type=int, help="first N rows per task (smoke tests)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    try:
        formats = dict(item.split("=", 1) for item in args.format)
    except ValueError:
        parser.error(f"--format expects NAME=FORMAT, got {args.format}")
    for name, value in formats.items():
        if value not in ANSWER_FORMATS and value != NUMBER_FORMAT:
            parser.error(
                f"--format {name}={value}: valid formats are {', '.join([*ANSWER_FORMATS, NUMBER_FORMAT])}"
            )
    try:
        tasks = collect_tasks(args.data_dir, args.tasks, args.task, args.limit)
        model, tokenizer = load_model_and_tokenizer(
            args.base_model, args.adapter, device=args.device, dtype=args.dtype
        )
        report = evaluate_tasks(
            model,
            tokenizer,
            tasks,
            formats=formats,
            batch_size=args.batch_size,
            num_beams=args.num_beams,
            max_new_tokens=args.max_new_tokens,
            progress=not args.no_progress,
            settings={
                "base_model": args.base_model,
                "adapter": args.adapter,
                "sharelora_plan": sharelora_plan_summary(args.adapter),
                "limit": args.limit,
            },
        )
    except EvaluationError as err:
        parser.exit(2, f"error: {err}\n")
    written = report.save(args.output_dir)
    print(report.to_markdown())
    print("wrote " + ", ".join(str(p) for p in written[:2]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
