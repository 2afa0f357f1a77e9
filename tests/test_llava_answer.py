"""Tests of llava/answer.py on the tiny LLaVA: answer fields the judge reads, resume, batched = unbatched,
merged = unmerged."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
FIELDS = {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
MAX_NEW_TOKENS = "6"


answer = load_script(ROOT / "llava" / "answer.py", "llava_answer_under_test")
build_tiny = load_script(ROOT / "llava" / "build_tiny.py", "llava_build_tiny_under_test")
judge = load_script(ROOT / "llava" / "judge.py", "llava_judge_under_test")


@pytest.fixture(scope="module")
def adapter(tiny_llava: Path, tmp_path_factory) -> Path:
    """A LoRA adapter with non-zero weights and a changed projector (modules_to_save), saved with plain PEFT."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    base = LlavaForConditionalGeneration.from_pretrained(tiny_llava / "model", dtype=torch.float32)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=r"model\.language_model\.layers\.\d+\.self_attn\.(q|v)_proj",
        modules_to_save=["multi_modal_projector"],
        init_lora_weights=False,
    )
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "modules_to_save" in name:
                param.add_(0.05 * torch.randn_like(param))
    out = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(out)
    return out


def _run(tiny_llava: Path, adapter: Path, answers: Path, *extra: str) -> int:
    bench = tiny_llava / "bench"
    argv = [
        "--model-base",
        str(tiny_llava / "model"),
        "--adapter",
        str(adapter),
        "--question-file",
        str(bench / "questions.jsonl"),
        "--image-folder",
        str(bench / "images"),
        "--answers-file",
        str(answers),
        "--max-new-tokens",
        MAX_NEW_TOKENS,
        "--dtype",
        "float32",
        "--device",
        "cpu",
        *extra,
    ]
    return answer.main(argv)


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_answers_fields_resume_and_judge_format(
    tiny_llava: Path, adapter: Path, tmp_path: Path, caplog
) -> None:
    questions = [
        json.loads(line) for line in (tiny_llava / "bench" / "questions.jsonl").read_text().splitlines()
    ]
    answers = tmp_path / "answers.jsonl"
    assert _run(tiny_llava, adapter, answers, "--batch-size", "4", "--model-id", "tiny-sharelora") == 0
    first = _lines(answers)
    assert [a["question_id"] for a in first] == [q["question_id"] for q in questions]
    for row, question in zip(first, questions, strict=True):
        assert set(row) == FIELDS
        assert row["prompt"] == question["text"]
        assert isinstance(row["text"], str) and row["text"]
        assert row["model_id"] == "tiny-sharelora"
        assert row["metadata"]["category"] == question["category"]
        assert row["metadata"]["decoding"] == "greedy" and row["metadata"]["merged"] is False
    assert len({a["answer_id"] for a in first}) == len(first)

    # a crash after two answers and half of the third line: the rerun keeps the two, redoes the rest
    raw = answers.read_text().splitlines(keepends=True)
    answers.write_text("".join(raw[:2]) + raw[2][:25])
    with caplog.at_level(logging.WARNING):
        assert _run(tiny_llava, adapter, answers, "--batch-size", "1", "--model-id", "tiny-sharelora") == 0
    assert "incomplete" in caplog.text
    second = _lines(answers)
    assert second[:2] == first[:2]  # kept as they were (same answer_id)
    assert [a["question_id"] for a in second] == [q["question_id"] for q in questions]
    # greedy: batched (left-padded, 4 per call) and one-by-one answers agree
    assert [a["text"] for a in second] == [a["text"] for a in first]
    assert {a["answer_id"] for a in second[2:]}.isdisjoint({a["answer_id"] for a in first[2:]})

    # nothing left to do: the file does not change
    before = answers.read_bytes()
    assert _run(tiny_llava, adapter, answers, "--model-id", "tiny-sharelora") == 0
    assert answers.read_bytes() == before

    # the judge joins these answers with the questions
    contexts = [{"image": q["image"], "caption": "a shape"} for q in questions]
    rules = judge.load_rules(ROOT / "llava" / "rule.json")
    items = judge.join_inputs(questions, contexts, second, second, rules)
    assert [item.question_id for item in items] == [q["question_id"] for q in questions]
    assert all(item.model_id == "tiny-sharelora" for item in items)


def test_merged_adapter_gives_the_same_answers(tiny_llava: Path, adapter: Path, tmp_path: Path) -> None:
    plain, merged = tmp_path / "plain.jsonl", tmp_path / "merged.jsonl"
    assert _run(tiny_llava, adapter, plain, "--batch-size", "4") == 0
    assert _run(tiny_llava, adapter, merged, "--batch-size", "4", "--merge") == 0
    assert [a["text"] for a in _lines(merged)] == [a["text"] for a in _lines(plain)]
    assert all(a["metadata"]["merged"] for a in _lines(merged))
    assert _lines(plain)[0]["model_id"] == adapter.name


def test_bad_inputs_name_the_problem(tiny_llava: Path, adapter: Path, tmp_path: Path, capsys) -> None:
    questions = tmp_path / "questions.jsonl"
    questions.write_text(
        json.dumps({"question_id": 7, "image": "nope.png", "text": "?", "category": "conv"}) + "\n"
    )
    argv = ["--model-base", str(tiny_llava / "model"), "--question-file", str(questions)]
    argv += [
        "--image-folder",
        str(tiny_llava / "bench" / "images"),
        "--answers-file",
        str(tmp_path / "a.jsonl"),
    ]
    assert answer.main(argv) == answer.EXIT_INPUT_ERROR
    assert "7: nope.png" in capsys.readouterr().err
    questions.write_text(json.dumps({"question_id": 7, "text": "?"}) + "\n")
    assert answer.main(argv) == answer.EXIT_INPUT_ERROR
    assert "lacks ['image']" in capsys.readouterr().err
    not_adapter = ["--adapter", str(tmp_path)]
    questions.write_text(json.dumps({"question_id": 7, "image": "bench_001.png", "text": "?"}) + "\n")
    assert answer.main(argv + not_adapter) == answer.EXIT_INPUT_ERROR
    assert "no adapter_config.json" in capsys.readouterr().err
