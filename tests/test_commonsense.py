"""The commonsense evaluator: LLM-Adapters prompt and answer extraction, batched left-padded generation,
accuracy accounting, outputs, and the CLI on base + adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.commonsense import (
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
# GSM8K and the other arithmetic sets (LLM-Adapters evaluate.py at 8166572: prompt lines 141-160, last number lines
# 272-287, |pred - float(answer)| <= 0.001 lines 94 and 109-112)

GSM8K_FIXTURE_DIR = Path(__file__).parent / "fixtures"

# LLM-Adapters evaluate.py's no-input template (lines 154-160) as the model sees it: every line after the first
# indented by 16 spaces, a space after "request.". We drop both, so that test prompts equal training prompts.
UPSTREAM_MATH_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request. \n"
    "\n"
    "                ### Instruction:\n"
    "                {instruction}\n"
    "\n"
    "                ### Response:\n"
    "                "
)


def test_gsm8k_prompt_is_upstream_template_without_indentation():
    question = "Edgar eats 18 pretzels a day. How many does he eat in a week?"
    upstream = UPSTREAM_MATH_PROMPT.format(instruction=question)
    assert build_prompt(question) == "\n".join(line.strip() for line in upstream.split("\n"))
    assert build_prompt(question) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        f"request.\n\n### Instruction:\n{question}\n\n### Response:\n"
    )
    assert build_prompt(question, "") == build_prompt(question)  # the empty `input` of every GSM8K row


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("Natalia sold 48 + 24 = 72 clips. The answer is 72.", 72.0),  # the last number, trailing period
        ("The answer is 576.", 576.0),
        ("It costs 1,234 dollars", 1234.0),  # thousands separators removed first
        ("1,234,567 people live there", 1234567.0),
        ("The total is $1,234.50.", 1234.5),  # separator and decimals together
        ("The temperature fell to -3.5 degrees", -3.5),
        ("5 - 15 = -10", -10.0),  # a negative integer
        ("She has 0.25 of the cake left", 0.25),
        ("3 boxes of 7 make 21", 21.0),
        ("21 is made of 3 boxes of 7", 7.0),  # several numbers: the last, not the largest or the first
        ("Step 1: 12 - 5 = 7\nStep 2: 7 * 2 = 14\nThe answer is 14", 14.0),
        ("I cannot tell", None),  # no number: wrong
        ("", None),
    ],
)
def test_extract_number_takes_the_last_number(response, expected):
    from bench.commonsense import extract_number

    assert extract_number(response) == expected


def test_number_tolerance_is_llm_adapters():
    from bench.commonsense import number_is_right

    assert number_is_right(18.0, 18) and number_is_right(18.0005, "18") and number_is_right(17.9995, 18.0)
    assert not number_is_right(18.002, 18) and not number_is_right(None, 18)
    with pytest.raises(EvaluationError, match="not a number"):
        number_is_right(1.0, "seven")


def test_number_tolerance_boundary_is_inclusive():
    from bench.commonsense import NUMBER_TOLERANCE, number_is_right

    assert NUMBER_TOLERANCE == 0.001
    # |0.001 - 0| is exactly 0.001 in floating point: right under upstream's `<=`, wrong under `<`
    assert number_is_right(0.001, 0) and number_is_right(-0.001, "0")
    assert not number_is_right(0.0011, 0) and not number_is_right(-0.0011, "0.0")
    # gold answers are strings like "576.0" in LLM-Adapters' test.json
    assert number_is_right(576.0, "576.0") and number_is_right(-10.0, "-10.0")
    assert not number_is_right(10.0, "-10.0") and not number_is_right(577.0, "576.0")


def test_arithmetic_sets_have_the_number_format():
    from bench.commonsense import MATH_TASKS, NUMBER_FORMAT, infer_answer_format

    assert infer_answer_format("gsm8k", [_row("q", "5")]) == NUMBER_FORMAT
    assert all(infer_answer_format(task, []) == NUMBER_FORMAT for task in MATH_TASKS)
    assert infer_answer_format("my_math", [_row("q", 3.5), _row("q", "12")]) == NUMBER_FORMAT
    assert infer_answer_format("my_bool", [_row("q", "true")]) == "true_false"


def test_gsm8k_fixture_loads_in_llm_adapters_format():
    from bench.commonsense import NUMBER_FORMAT, infer_answer_format

    rows = load_test_rows(GSM8K_FIXTURE_DIR / "gsm8k" / "test.json")
    assert [row["answer"] for row in rows] == ["1234.5", "7.0", "234.5", "-10.0"]
    assert all(set(row) == {"instruction", "input", "output", "answer"} for row in rows)
    # string answers that happen to be numbers are recognised even under another task name
    assert infer_answer_format("my_gsm8k_copy", rows) == NUMBER_FORMAT


def test_gsm8k_accuracy_with_scripted_replies(smollm2_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    rows = [
        _row("How many clips?", 72),
        _row("How much money?", "1234"),
        _row("How warm?", -3.5),
        _row("x?", 9),
        _row("How many tiles?", "576.0"),
        _row("How many pretzels?", "63.0"),
    ]
    replies = {
        build_prompt(rows[0]["instruction"]): " 48 + 24 = 72. The answer is 72",  # right
        build_prompt(rows[1]["instruction"]): " She has 1,234 dollars",  # right after removing the comma
        build_prompt(rows[2]["instruction"]): " It is -3.4 degrees",  # off by 0.1: wrong
        build_prompt(rows[3]["instruction"]): " no idea",  # no number: wrong, unanswered
        build_prompt(rows[4]["instruction"]): " 576 tiles\n\n### Response: 12",  # cut at the marker: right
        # a worked answer longer than the 32 tokens of the label tasks: the arithmetic default of 256 must apply
        build_prompt(
            rows[5]["instruction"]
        ): " Edgar eats 18 pretzels a day. His brother eats 1/2 as many, so he "
        "eats 18 * 1/2 = 9 pretzels a day. In a week, he eats 9 * 7 = 63 pretzels. The answer is 63.",
    }
    model = ScriptedModel(tokenizer, replies)
    result = evaluate_rows(model, tokenizer, "gsm8k", rows, batch_size=4, num_beams=1, progress=False)
    assert result.answer_format == "number" and (result.correct, result.total, result.unanswered) == (4, 6, 1)
    assert [p["pred"] for p in result.predictions] == [72.0, 1234.0, -3.4, "", 576.0, 63.0]
    assert [p["flag"] for p in result.predictions] == [True, True, False, False, True, True]
    assert len(tokenizer(replies[build_prompt(rows[5]["instruction"])])["input_ids"]) > 32
    assert result.predictions[4]["output_pred"] == "576 tiles"


def bigram_lm(tokenizer, after_token: int, reply: str, scale: float = 50.0):
    """A Llama that deterministically generates ``reply`` and then eos after any prompt ending in ``after_token``.

    Its layers add nothing to the residual stream (``o_proj`` and ``down_proj`` are zero), so the last position's
    hidden state is that token's embedding; each token of the chain gets its own one-hot embedding and the LM head
    maps it to the next token with a logit of ``scale * sqrt(hidden)``, which beam search cannot leave."""
    import torch

    ids = tokenizer(reply, add_special_tokens=False)["input_ids"]
    chain = [after_token, *ids]
    assert len(set(chain)) == len(chain), f"reply tokens must be distinct to form a bigram chain: {chain}"
    model = tiny_lm(tokenizer, num_layers=1)
    eos = tokenizer.eos_token_id
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed, head = model.model.embed_tokens.weight, model.lm_head.weight
        embed.zero_()
        head.zero_()
        embed[:, 0] = 1.0  # every other token: state 0, which ends the reply
        head[eos, 0] = scale
        for state, (token, following) in enumerate(zip(chain, [*ids, eos], strict=True), start=1):
            embed[token] = 0.0
            embed[token, state] = 1.0
            head[following, state] = scale
    return model


def test_cli_gsm8k_end_to_end_on_fixture(smollm2_dir, tmp_path, capsys):
    """The CLI's default arithmetic protocol (4 beams, 256 new tokens) on a model that answers every question with
    "7 boxes cost $1,234.5": only the row whose answer is the last number, separators removed, is right."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    prompt_end = tokenizer(build_prompt("q"))["input_ids"][-1]
    reply = " 7 boxes cost $1,234.5"
    model = bigram_lm(tokenizer, prompt_end, reply)
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    out = tmp_path / "eval"
    argv = ["--base-model", str(tmp_path / "base"), "--data-dir", str(GSM8K_FIXTURE_DIR), "--tasks", "gsm8k"]
    argv += ["--batch-size", "3", "--device", "cpu", "--output-dir", str(out), "--no-progress"]
    assert main(argv) == 0

    predictions = [
        json.loads(line) for line in (out / "predictions" / "gsm8k.jsonl").read_text().splitlines()
    ]
    assert [p["output_pred"] for p in predictions] == [reply.strip()] * 4  # the model really generated it
    assert [p["pred"] for p in predictions] == [1234.5] * 4
    assert [p["answer"] for p in predictions] == ["1234.5", "7.0", "234.5", "-10.0"]  # rows in order
    assert [p["flag"] for p in predictions] == [True, False, False, False]
    results = json.loads((out / "commonsense_results.json").read_text())
    gsm8k = results["tasks"]["gsm8k"]
    assert (gsm8k["answer_format"], gsm8k["correct"], gsm8k["total"], gsm8k["unanswered"]) == (
        "number",
        1,
        4,
        0,
    )
    assert gsm8k["accuracy"] == 0.25 and results["average"] == 0.25
    assert results["settings"]["num_beams"] == 4 and "256 (numbers)" in results["settings"]["max_new_tokens"]
    markdown = (out / "commonsense_results.md").read_text()
    assert "| gsm8k | number | 4 | 25.0 |" in markdown and markdown in capsys.readouterr().out
