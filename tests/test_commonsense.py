"""The commonsense evaluator: LLM-Adapters prompt and answer extraction, batched left-padded generation,
accuracy accounting, outputs, and the CLI on base + adapter."""

from __future__ import annotations

import json

import pytest

from sharelora_plugin.commonsense import (
    COMMONSENSE_TASKS,
    DATASET_FORMATS,
    EvaluationError,
    build_prompt,
    evaluate_rows,
    evaluate_tasks,
    extract_answer,
    generate_responses,
    infer_answer_format,
    load_test_rows,
    main,
    response_text,
)


def tiny_lm(tokenizer, num_layers: int = 2, seed: int = 0):
    """A random Llama with the SmolLM2 vocabulary (so real prompts tokenize), small enough to generate in ms."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config).eval()


def _row(instruction: str, answer: str) -> dict:
    return {
        "instruction": instruction,
        "input": "",
        "output": f"the correct answer is {answer}",
        "answer": answer,
    }


# ----------------------------------------------------------------------------------------------------------------
# Prompt: what the model is trained on (Axolotl `type: alpaca`) is what it is tested on


def test_prompt_is_axolotl_alpaca_byte_for_byte():
    from axolotl.prompters import AlpacaPrompter

    prompter = AlpacaPrompter()
    instruction = "Please answer the following question with true or false, question: is ice cold?"
    assert build_prompt(instruction) == next(prompter.build_prompt(instruction, ""))
    assert build_prompt(instruction, "ctx") == next(prompter.build_prompt(instruction, "ctx"))
    # and the full training text is prompt + output
    assert build_prompt(instruction) + "the correct answer is true" == next(
        prompter.build_prompt(instruction, "", "the correct answer is true")
    )


def test_prompt_is_the_llm_adapters_template():
    assert build_prompt("Q?") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nQ?\n\n### Response:\n"
    )


# ----------------------------------------------------------------------------------------------------------------
# Answer extraction


@pytest.mark.parametrize(
    ("task", "response", "expected"),
    [
        ("boolq", "the correct answer is false", "false"),
        ("boolq", "true, not false", "true"),
        ("boolq", "The correct answer is True", ""),  # case-sensitive, as LLM-Adapters
        ("piqa", "the correct answer is solution2", "solution2"),
        ("social_i_qa", "answer3 or maybe answer1", "answer3"),  # first match in the text, not the smallest
        ("ARC-Challenge", "the correct answer is answer5", "answer5"),
        ("openbookqa", "I think answer4.", "answer4"),
        ("hellaswag", "ending2", "ending2"),
        ("hellaswag", "ending5", ""),  # not a HellaSwag label
        ("winogrande", "option2 is right", "option2"),
        ("winogrande", "the second one", ""),
    ],
)
def test_extract_answer_first_match_per_dataset(task, response, expected):
    assert extract_answer(response, DATASET_FORMATS[task]) == expected


def test_response_stops_at_a_further_response_marker():
    generated = " the correct answer is answer2\n\n### Instruction:\nmore\n\n### Response:\nanswer4"
    assert response_text(generated) == "the correct answer is answer2\n\n### Instruction:\nmore"
    assert extract_answer(response_text(generated), "answer") == "answer2"
    assert extract_answer(response_text("\n\n### Response: answer4"), "answer") == ""


def test_answer_format_known_and_inferred():
    assert [infer_answer_format(t, []) for t in COMMONSENSE_TASKS] == [
        DATASET_FORMATS[t] for t in COMMONSENSE_TASKS
    ]
    assert infer_answer_format("rule_x", [_row("a", "true"), _row("b", "false")]) == "true_false"
    assert infer_answer_format("rule_y", [_row("a", "ending4")]) == "ending"
    with pytest.raises(EvaluationError, match="fit no answer format"):
        infer_answer_format("mixed", [_row("a", "true"), _row("b", "option1")])


def test_load_test_rows_json_and_jsonl(tmp_path):
    rows = [_row("q1", "true"), _row("q2", "false")]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert load_test_rows(tmp_path / "a.json") == rows == load_test_rows(tmp_path / "b.jsonl")
    (tmp_path / "bad.json").write_text(json.dumps([{"question": "x"}]))
    with pytest.raises(EvaluationError, match="'instruction' and 'answer'"):
        load_test_rows(tmp_path / "bad.json")
    with pytest.raises(EvaluationError, match="not found"):
        load_test_rows(tmp_path / "missing.json")


# ----------------------------------------------------------------------------------------------------------------
# Accounting with a scripted model (exact control over what is "generated")


class ScriptedModel:
    """Stands in for a causal LM: ``generate`` appends the tokens of the scripted reply for each prompt."""

    def __init__(self, tokenizer, replies: dict[str, str]):
        import torch

        self.tokenizer = tokenizer
        self.replies = replies
        self.training = False
        self.batches: list[list[int]] = []
        self._param = torch.nn.Parameter(torch.zeros(1))

    def parameters(self):
        yield self._param

    def eval(self):
        return self

    def train(self, mode=True):
        return self

    def generate(self, input_ids, attention_mask, **kwargs):
        import torch

        assert self.tokenizer.padding_side == "left"
        assert kwargs["do_sample"] is False
        self.batches.append(attention_mask.sum(dim=1).tolist())
        rows = []
        for ids, mask in zip(input_ids, attention_mask, strict=True):
            prompt = self.tokenizer.decode(ids[mask.bool()])
            reply = self.tokenizer(self.replies[prompt])["input_ids"][: kwargs["max_new_tokens"]]
            rows.append(reply)
        width = max(map(len, rows))
        pad = self.tokenizer.pad_token_id
        new = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        return torch.cat([input_ids, new], dim=1)


def test_accuracy_counts_first_label_and_unanswered(smollm2_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    rows = [
        _row("short?", "answer1"),
        _row("a much longer question that sorts last in its batch?", "answer2"),
        _row("mid length question?", "answer3"),
        _row("q4?", "answer4"),
    ]
    replies = {
        build_prompt(rows[0]["instruction"]): " the correct answer is answer1",  # right
        build_prompt(rows[1]["instruction"]): " answer3, no, answer2",  # first match answer3: wrong
        build_prompt(rows[2]["instruction"]): " I do not know",  # no label: wrong, unanswered
        build_prompt(rows[3]["instruction"]): " answer4\n### Response: answer1",  # cut at marker: right
    }
    model = ScriptedModel(tokenizer, replies)
    result = evaluate_rows(model, tokenizer, "ARC-Easy", rows, batch_size=3, num_beams=1, progress=False)
    assert (result.correct, result.total, result.unanswered) == (2, 4, 1)
    assert [p["pred"] for p in result.predictions] == ["answer1", "answer3", "", "answer4"]
    assert [p["flag"] for p in result.predictions] == [True, False, False, True]
    assert result.predictions[3]["output_pred"] == "answer4"
    assert len(model.batches) == 2 and sorted(sum(model.batches, [])) == sum(model.batches, [])  # by length


def test_report_average_and_files(smollm2_dir, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    tasks = {
        "boolq": [_row("b1?", "true"), _row("b2?", "false")],
        "winogrande": [
            _row("w1?", "option1"),
            _row("w2?", "option2"),
            _row("w3?", "option1"),
            _row("w4?", "option2"),
        ],
    }
    replies = {build_prompt(r["instruction"]): " the correct answer is true" for r in tasks["boolq"]}
    replies.update({build_prompt(r["instruction"]): " option1" for r in tasks["winogrande"]})
    report = evaluate_tasks(
        ScriptedModel(tokenizer, replies),
        tokenizer,
        tasks,
        num_beams=1,
        progress=False,
        settings={"base_model": "m"},
    )
    assert report.tasks["boolq"].accuracy == 0.5 and report.tasks["winogrande"].accuracy == 0.5
    assert report.average == 0.5  # macro average over tasks
    written = report.save(tmp_path)
    data = json.loads((tmp_path / "commonsense_results.json").read_text())
    assert data["average"] == 0.5 and data["num_examples"] == 6
    assert data["tasks"]["winogrande"]["correct"] == 2 and data["settings"]["num_beams"] == 1
    assert "| **Avg.** | | 6 | **50.0** |" in (tmp_path / "commonsense_results.md").read_text()
    preds = [json.loads(line) for line in (tmp_path / "predictions" / "boolq.jsonl").read_text().splitlines()]
    assert [p["pred"] for p in preds] == ["true", "true"] and len(written) == 4


# ----------------------------------------------------------------------------------------------------------------
# Real generation: left padding must not change what a prompt generates


def test_batched_left_padded_generation_matches_one_by_one(smollm2_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = tiny_lm(tokenizer, seed=3)
    prompts = [
        build_prompt("hi"),
        build_prompt("a considerably longer instruction with many more tokens in it"),
    ]
    batched = generate_responses(
        model, tokenizer, prompts, batch_size=2, num_beams=1, max_new_tokens=6, progress=False
    )
    single = [
        generate_responses(
            model, tokenizer, [p], batch_size=1, num_beams=1, max_new_tokens=6, progress=False
        )[0]
        for p in prompts
    ]
    assert batched == single
    beams = generate_responses(
        model, tokenizer, prompts, batch_size=2, num_beams=2, max_new_tokens=4, progress=False
    )
    assert len(beams) == 2 and all(isinstance(t, str) for t in beams)
    with pytest.raises(EvaluationError, match="positive"):
        generate_responses(model, tokenizer, prompts, batch_size=0)


# ----------------------------------------------------------------------------------------------------------------
# CLI: base model + PEFT adapter (+ a ShareLoRA plan beside it)


def test_cli_on_base_plus_adapter(smollm2_dir, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    from sharelora_plugin.planning import make_plan

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    base = tiny_lm(tokenizer, num_layers=4)
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(tmp_path / "adapter")
    make_plan(num_layers=4, strategy="alternate").save(tmp_path / "adapter" / "sharelora_plan.json")
    data = tmp_path / "dataset"
    for task, answers in (("boolq", ["true", "false", "true"]), ("piqa", ["solution1", "solution2"])):
        (data / task).mkdir(parents=True)
        (data / task / "test.json").write_text(
            json.dumps([_row(f"{task} q{k}?", a) for k, a in enumerate(answers)])
        )
    (tmp_path / "extra.jsonl").write_text(json.dumps(_row("extra?", "ending2")) + "\n")

    out = tmp_path / "eval"
    argv = [
        "--base-model",
        str(tmp_path / "base"),
        "--adapter",
        str(tmp_path / "adapter"),
        "--data-dir",
        str(data),
    ]
    argv += [
        "--tasks",
        "boolq",
        "piqa",
        "--task",
        f"rule_hellaswag={tmp_path / 'extra.jsonl'}",
        "--limit",
        "2",
    ]
    argv += ["--num-beams", "1", "--max-new-tokens", "3", "--output-dir", str(out), "--no-progress"]
    assert main(argv) == 0
    results = json.loads((out / "commonsense_results.json").read_text())
    assert list(results["tasks"]) == ["boolq", "piqa", "rule_hellaswag"]
    assert [results["tasks"][t]["total"] for t in results["tasks"]] == [2, 2, 1]  # --limit 2
    assert results["tasks"]["rule_hellaswag"]["answer_format"] == "ending"
    assert results["settings"]["sharelora_plan"]["share_sets"] == [[0, 1], [2, 3]]
    assert (out / "predictions" / "piqa.jsonl").is_file() and "Avg." in capsys.readouterr().out


def test_cli_errors_are_readable(tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "--base-model",
                "x",
                "--data-dir",
                str(tmp_path),
                "--tasks",
                "boolq",
                "--output-dir",
                str(tmp_path),
            ]
        )
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        main(
            [
                "--base-model",
                "x",
                "--task",
                "t=a.json",
                "--format",
                "t=letters",
                "--output-dir",
                str(tmp_path),
            ]
        )


# --------------------------------------------------------------------------------------------------------------------
# GSM8K and the other arithmetic sets (LLM-Adapters evaluate.py: last number, |pred - answer| <= 0.001)


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("Natalia sold 48 + 24 = 72 clips. The answer is 72.", 72.0),  # the last number, trailing period
        ("It costs 1,234 dollars", 1234.0),  # thousands separators removed first
        ("The temperature fell to -3.5 degrees", -3.5),
        ("She has 0.25 of the cake left", 0.25),
        ("3 boxes of 7 make 21", 21.0),
        ("I cannot tell", None),  # no number: wrong
        ("", None),
    ],
)
def test_extract_number_takes_the_last_number(response, expected):
    from sharelora_plugin.commonsense import extract_number

    assert extract_number(response) == expected


def test_number_tolerance_is_llm_adapters():
    from sharelora_plugin.commonsense import number_is_right

    assert number_is_right(18.0, 18) and number_is_right(18.0005, "18") and number_is_right(17.9995, 18.0)
    assert not number_is_right(18.002, 18) and not number_is_right(None, 18)
    with pytest.raises(EvaluationError, match="not a number"):
        number_is_right(1.0, "seven")


def test_arithmetic_sets_have_the_number_format():
    from sharelora_plugin.commonsense import NUMBER_FORMAT, infer_answer_format

    assert infer_answer_format("gsm8k", [_row("q", "5")]) == NUMBER_FORMAT
    assert infer_answer_format("my_math", [_row("q", 3.5), _row("q", "12")]) == NUMBER_FORMAT
    assert infer_answer_format("my_bool", [_row("q", "true")]) == "true_false"


def test_gsm8k_accuracy_with_scripted_replies(smollm2_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    rows = [
        _row("How many clips?", 72),
        _row("How much money?", "1234"),
        _row("How warm?", -3.5),
        _row("x?", 9),
    ]
    replies = {
        build_prompt(rows[0]["instruction"]): " 48 + 24 = 72. The answer is 72",  # right
        build_prompt(rows[1]["instruction"]): " She has 1,234 dollars",  # right after removing the comma
        build_prompt(rows[2]["instruction"]): " It is -3.4 degrees",  # off by 0.1: wrong
        build_prompt(rows[3]["instruction"]): " no idea",  # no number: wrong, unanswered
    }
    model = ScriptedModel(tokenizer, replies)
    result = evaluate_rows(model, tokenizer, "gsm8k", rows, batch_size=4, num_beams=1, progress=False)
    assert result.answer_format == "number" and (result.correct, result.total, result.unanswered) == (2, 4, 1)
    assert [p["pred"] for p in result.predictions] == [72.0, 1234.0, -3.4, ""]
    assert [p["flag"] for p in result.predictions] == [True, True, False, False]


def test_cli_gsm8k_writes_the_same_reports(smollm2_dir, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    base = tiny_lm(tokenizer, num_layers=2)
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    data = tmp_path / "dataset" / "gsm8k"
    data.mkdir(parents=True)
    (data / "test.json").write_text(json.dumps([_row(f"What is {k} + {k}?", 2 * k) for k in range(3)]))
    out = tmp_path / "eval"
    argv = [
        "--base-model",
        str(tmp_path / "base"),
        "--data-dir",
        str(tmp_path / "dataset"),
        "--tasks",
        "gsm8k",
    ]
    argv += ["--num-beams", "1", "--max-new-tokens", "4", "--output-dir", str(out), "--no-progress"]
    assert main(argv) == 0
    results = json.loads((out / "commonsense_results.json").read_text())
    assert results["tasks"]["gsm8k"]["answer_format"] == "number" and results["tasks"]["gsm8k"]["total"] == 3
    predictions = [
        json.loads(line) for line in (out / "predictions" / "gsm8k.jsonl").read_text().splitlines()
    ]
    assert all(p["flag"] == (p["pred"] != "" and abs(p["pred"] - p["answer"]) <= 0.001) for p in predictions)
    assert "| gsm8k | number | 3 |" in (out / "commonsense_results.md").read_text()
