"""bench/quality (`python -m bench.quality`): the statistics and decision rules on known inputs, honest data
(disjoint splits, no duplicate text across splits, balanced labels, held-out analogy words never trained on), the
task file format and its errors, the scoring, and `--quick` end to end."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest

from bench.common import REPO
from bench.quality import stats
from bench.quality.__main__ import main
from bench.quality.analysis import analyze, decide
from bench.quality.data import (
    SENTIMENT_CHOICES,
    Task,
    TaskError,
    analogy_rows,
    check_task_rows,
    load_task,
    sentiment_rows,
)
from bench.quality.settings import ARMS, FULL, QUICK_ARMS
from bench.quality.signal import permutation_test, random_same_shape, within_set_mean

# ---------------------------------------------------------------------------------------------------------------
# statistics and rules


def test_paired_interval_on_known_values():
    p = stats.paired_interval([1.0, 2.0, 3.0])
    half = 4.302652729911275 / math.sqrt(3)  # t(0.975, 2) * sd 1 / sqrt(3)
    assert p.mean == pytest.approx(2.0)
    assert (p.low, p.high) == (pytest.approx(2.0 - half), pytest.approx(2.0 + half))
    assert (p.lower, p.higher, p.n) == (0, 3, 3)
    mixed = stats.paired_interval([-0.5, 0.25, -0.25, 0.0])
    assert (mixed.lower, mixed.higher) == (2, 1)
    single = stats.paired_interval([0.3])
    assert math.isnan(single.low) and math.isnan(single.high) and single.as_dict()["low"] is None


def test_relative_percent():
    assert stats.relative_percent([101.0, 99.0], [100.0, 100.0]) == [pytest.approx(1.0), pytest.approx(-1.0)]


def _paired(low: float, high: float) -> stats.Paired:
    return stats.Paired(n=4, mean=(low + high) / 2, low=low, high=high, lower=0, higher=0, values=[])


@pytest.mark.parametrize(
    ("low", "high", "margin", "expected"),
    [
        (-0.3, 0.4, 0.5, "holds"),
        (0.5, 0.9, 0.5, "fails"),
        (0.2, 0.7, 0.5, "inconclusive"),
        (-0.1, 0.25, 0.25, "inconclusive"),  # H1-style strict bound: 0.25 is not below 0.25
    ],
)
def test_non_inferiority_outcomes(low, high, margin, expected):
    assert stats.non_inferior(_paired(low, high), margin, strict=True) == expected


def test_h3_bound_is_inclusive():
    assert stats.non_inferior(_paired(-0.1, 0.25), 0.25, strict=False) == "holds"
    assert stats.non_inferior(_paired(0.25, 0.4), 0.25, strict=False) == "inconclusive"
    assert stats.non_inferior(_paired(0.26, 0.4), 0.25, strict=False) == "fails"


@pytest.mark.parametrize(
    ("low", "high", "expected"), [(-1.0, -0.1, "holds"), (0.1, 1.0, "fails"), (-0.5, 0.5, "inconclusive")]
)
def test_better_outcomes(low, high, expected):
    assert stats.better(_paired(low, high)) == expected
    assert stats.better(stats.paired_interval([-1.0])) == "inconclusive"  # no interval from one seed


def test_gate():
    assert stats.gate(_paired(-5.0, -3.0)) == "passes"
    assert stats.gate(_paired(-3.0, 0.5)) == "fails"  # interval reaches 0
    assert stats.gate(_paired(-1.5, -0.5)) == "fails"  # below the 2 % margin
    assert stats.accuracy_informative({"mean": 5.0, "low": 1.0})
    assert not stats.accuracy_informative({"mean": 1.0, "low": 0.2})


def test_paired_bootstrap_accuracy():
    arm = np.ones((3, 50))
    same = stats.paired_bootstrap_accuracy(arm, arm)
    assert same["mean"] == same["low"] == same["high"] == 0.0
    up = stats.paired_bootstrap_accuracy(arm, np.zeros((1, 50)))  # an unseeded reference broadcasts
    assert up["mean"] == up["low"] == up["high"] == 100.0
    rng = np.random.default_rng(0)
    noisy = stats.paired_bootstrap_accuracy(rng.integers(0, 2, (4, 200)), rng.integers(0, 2, (4, 200)))
    assert noisy["low"] < noisy["mean"] < noisy["high"]


def _fake_run(arm: str, seed: int, ppl: float, draw: int = 0) -> dict:
    items = {"nll": [1.0], "tokens": [1], "answer_nll": [1.0], "answer_tokens": [1], "correct": [1, 0, 1, 1]}
    task = {"summary": {"answer_loss": math.log(ppl), "accuracy": 0.75}, "items": items}
    return {"arm": arm, "seed": seed, "draw": draw, "ppl": ppl, "lee_ppl": 20.0, "tasks": {"t": task}}


def test_rules_applied_to_runs():
    """greedy clearly within +0.5 % of LoRA → H1 holds; greedy beats random → H2 holds; rank expansion 1 % worse →
    H3 fails; gradient vs greedy straddles 0 → H4 inconclusive."""
    offsets = [0.0, 0.02, -0.02, 0.01]
    runs = []
    for seed, e in enumerate(offsets):
        lora = 100.0 + seed
        runs += [
            _fake_run("lora", seed, lora),
            _fake_run("greedy", seed, lora * (1.001 + e / 100)),
            _fake_run("greedy_rx", seed, lora * (1.01 + e / 100)),
            _fake_run("random", seed, lora * 1.02, draw=0),
            _fake_run("random", seed, lora * 1.03, draw=1),
            _fake_run("gradient", seed, lora * (1.001 + (0.004 if seed % 2 else -0.004))),
        ]
    base = _fake_run("base", 0, 130.0)
    result = analyze(runs, base, ["base", "lora", "greedy", "greedy_rx", "random", "gradient"])
    outcomes = {k: v["outcome"] for k, v in result["decisions"].items() if k != "gate"}
    assert result["decisions"]["gate"]["outcome"] == "passes"
    assert outcomes == {"H1": "holds", "H2": "holds", "H3": "fails", "H4": "inconclusive"}
    # ShareLoRA* draws are averaged per seed before pairing
    assert result["per_seed_ppl"]["random"][0] == pytest.approx(102.5)
    # without a working LoRA nothing is judged
    flat = [dict(r, ppl=r["ppl"] * (130.0 / 100.0)) if r["arm"] == "lora" else r for r in runs]
    gated = analyze(flat, base, ["base", "lora", "greedy"])["decisions"]
    assert gated["gate"]["outcome"] == "fails" and gated["H1"]["outcome"].startswith("not judged")
    assert decide({})["H2"]["outcome"] == "not run"


# ---------------------------------------------------------------------------------------------------------------
# data


def _reviews():
    rows = [
        {"id": i, "rating": r, "text": f"film number {i}"} for i, r in enumerate([2.0, -2.5, 0.5, -0.4] * 30)
    ]
    rows += [
        {"id": 900, "rating": 3.0, "text": "Same text"},
        {"id": 901, "rating": 2.0, "text": "  same   TEXT "},  # duplicate after normalising
        {"id": 902, "rating": 2.0, "text": "Rated both ways"},
        {"id": 903, "rating": -2.0, "text": "rated both ways"},
    ]
    return rows


def test_sentiment_rows_split_balance_and_duplicates():
    rows = sentiment_rows(_reviews(), test_size=20)
    test = [r for r in rows if r["split"] == "test"]
    train = [r for r in rows if r["split"] == "train"]
    assert Counter(r["answer"] for r in test) == {" positive": 10, " negative": 10}
    texts = [r["prompt"] for r in rows]
    assert len(texts) == len(set(texts)) == 61  # 60 with |rating| >= 1, one of the duplicates, no conflict
    assert not {r["prompt"] for r in test} & {r["prompt"] for r in train}
    assert all(r["choices"] == list(SENTIMENT_CHOICES) and r["answer"] in r["choices"] for r in rows)
    assert not any("both ways" in r["prompt"].lower() for r in rows)
    assert sentiment_rows(_reviews(), test_size=20) == rows  # deterministic


def test_real_sentiment_data_is_balanced_and_disjoint(data_dir):
    from sharelora_plugin.planning.files import read_jsonl

    source = read_jsonl(data_dir / "movie_reviews.jsonl")
    assert len(source) == 10_605
    rows = sentiment_rows(source, test_size=400)
    test = [r for r in rows if r["split"] == "test"]
    assert Counter(r["answer"] for r in test) == {" positive": 200, " negative": 200}
    normal = [" ".join(r["prompt"].lower().split()) for r in rows]
    assert len(normal) == len(set(normal))


def test_analogy_held_out_words_never_in_training(data_dir):
    from sharelora_plugin.planning.files import read_jsonl

    source = read_jsonl(data_dir / "analogies.jsonl")
    assert len(source) == 19_544 and len({r["relation"] for r in source}) == 14
    rows = analogy_rows(source)
    test = [r for r in rows if r["split"] == "test"]
    train = [r for r in rows if r["split"] == "train"]
    assert test and train
    train_words = {w.lower() for r in train for w in (r["prompt"] + r["answer"]).replace(":", " ").split()}
    for row in test:
        query = row["prompt"].splitlines()[-1].split(" :")[0]
        assert row["answer"].strip().lower() not in train_words
        assert query.lower() not in train_words
        # the examples of a test prompt are training pairs
        for line in row["prompt"].splitlines()[:-1]:
            a, b = line.split(" : ")
            assert a.lower() in train_words and b.lower() in train_words
    for row in train:
        examples = row["prompt"].splitlines()[:-1]
        assert f"{row['prompt'].splitlines()[-1]}{row['answer']}" not in examples  # never its own example


# ---------------------------------------------------------------------------------------------------------------
# the task format


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"prompt": "p", "split": "train"}], "row 1: missing key(s) answer"),
        ([{"prompt": "p", "answer": "a", "split": "dev"}], "row 1: split must be 'train' or 'test'"),
        (
            [
                {"prompt": "p", "answer": "a", "split": "train"},
                {"prompt": "q", "answer": "c", "split": "test", "choices": ["x", "y"]},
            ],
            "row 2: answer 'c' is not one of its choices",
        ),
        ([{"prompt": "p", "answer": "a", "split": "train"}], "no 'test' rows"),
        (
            [
                {"prompt": "p", "answer": "a", "split": "train", "choices": ["a", "b"]},
                {"prompt": "q", "answer": "c", "split": "test"},
            ],
            "some rows have choices and some do not",
        ),
        ([{"prompt": "", "answer": "a", "split": "train"}], "row 1: prompt must be a non-empty string"),
        ([["not", "an", "object"]], "row 1: must be a JSON object"),
    ],
)
def test_task_rows_errors_name_the_row(rows, message):
    with pytest.raises(TaskError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_task_rows(rows, "mine.jsonl")


def test_task_file_and_cli_error(tmp_path, capsys):
    good = tmp_path / "mine.jsonl"
    good.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"prompt": "2+2=", "answer": " 4", "split": "train"},
                {"prompt": "3+3=", "answer": " 6", "split": "test"},
            ]
        )
    )
    task = load_task(good)
    assert (task.name, len(task.train), len(task.test), task.has_choices) == ("mine", 1, 1, False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "answer": "a", "split": "train"}))
    assert main(["--task", str(bad), "--workdir", str(tmp_path / "w")]) == 2
    assert "no 'test' rows" in capsys.readouterr().err
    assert main(["--task", str(tmp_path / "missing.jsonl"), "--workdir", str(tmp_path / "w")]) == 2
    assert "file not found" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# scoring


def test_single_token_choice_scoring_equals_full_scoring(smollm2_dir):
    """The fast path (choices read at the prompt's last position) and scoring each choice's sequence agree, and
    exact match is the teacher-forced top prediction of every answer token and the end token."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.quality.evaluation import _choice_correct, encode, score_task

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    reviews = ["A wonderful, moving film.", "Dull and far too long.", "I loved every minute.", "A mess."]
    rows = [
        {
            "prompt": f"Review: {t}\nSentiment:",
            "answer": a,
            "choices": [" positive", " negative"],
            "split": "test",
        }
        for t, a in zip(reviews, [" positive", " negative", " positive", " negative"], strict=True)
    ]
    fast = score_task(model, tokenizer, Task("s", [], rows), batch_size=3)
    with torch.no_grad():
        assert fast["correct"] == _choice_correct(model, tokenizer, rows, batch_size=8)
    exact = score_task(
        model,
        tokenizer,
        Task("a", [], [{"prompt": "Paris : France\nRome :", "answer": " Italy", "split": "test"}]),
        4,
    )
    ids, start = encode(tokenizer, "Paris : France\nRome :", " Italy")
    with torch.no_grad():
        top = model(torch.tensor([ids])).logits[0, start - 1 : len(ids) - 1].argmax(-1)
    assert exact["correct"] == [int(top.tolist() == ids[start:])]
    assert exact["answer_tokens"] == [len(ids) - start] and exact["tokens"] == [len(ids) - 1]


# ---------------------------------------------------------------------------------------------------------------
# the gradient signal's plan comparisons


def test_random_same_shape_and_permutation_test():
    rng = np.random.default_rng(0)
    for _ in range(200):
        sets = random_same_shape(12, [2, 3, 2], rng)
        assert sorted(len(s) for s in sets) == [2, 2, 3]
        flat = [x for s in sets for x in s]
        assert len(flat) == len(set(flat)) and min(flat) >= 0 and max(flat) < 12
        assert all(s == list(range(s[0], s[0] + len(s))) for s in sets)
    overlap = np.full((8, 8), 0.1)
    overlap[2, 3] = overlap[3, 2] = 0.9
    np.fill_diagonal(overlap, 1.0)
    assert within_set_mean(overlap, [[2, 3]]) == pytest.approx(0.9)
    result = permutation_test(overlap, [[2, 3]], draws=2000)
    assert result["p_value"] < 0.3 and result["observed"] > result["random_mean"]


# ---------------------------------------------------------------------------------------------------------------
# end to end


@pytest.mark.e2e
def test_quick_end_to_end(tmp_path):
    """`--quick`: calibrate (angular and gradient sketches), plan, train through axolotl.cli.train, score, report;
    a second call reuses the finished runs."""
    work = tmp_path / "work"
    committed = REPO / "bench" / "results" / "quality.json"
    before = committed.read_bytes() if committed.is_file() else None
    argv = ["--quick", "--threads", "1", "--workdir", str(work)]
    assert main(argv) == 0
    assert (committed.read_bytes() if committed.is_file() else None) == before  # --quick never overwrites it
    report = json.loads((work / "quick" / "quality.json").read_text())
    assert report["quick"] is True and report["arms"] == list(QUICK_ARMS)
    assert {(r["arm"], r["seed"]) for r in report["runs"]} == {("lora", 0), ("greedy", 0)}
    greedy = next(r for r in report["runs"] if r["arm"] == "greedy")
    lora = next(r for r in report["runs"] if r["arm"] == "lora")
    assert greedy["ties_verified"] and greedy["trainable_params"] < lora["trainable_params"]
    for run in (greedy, lora, report["base"]):
        assert math.isfinite(run["ppl"]) and set(run["tasks"]) == {"sentiment", "analogy"}
    assert report["signal"]["random_level"] < report["signal"]["adjacent_mean"] <= 1.0
    assert set(report["analysis"]["decisions"]) == {"gate", "H1", "H2", "H3", "H4"}
    md = (work / "quick" / "quality.md").read_text()
    assert md.index("Decision rules") < md.index("## Decisions")  # the rules come before the numbers
    assert (work / "quick" / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plan = json.loads((work / "runs" / "greedy_seed0" / "sharelora_plan.json").read_text())
    assert plan["share_sets"] == report["plans"]["greedy"]["share_sets"]  # loaded from the plan file
    stamp = (work / "runs" / "lora_seed0" / "result.json").stat().st_mtime
    assert main(argv) == 0
    assert (work / "runs" / "lora_seed0" / "result.json").stat().st_mtime == stamp  # reused, not retrained


def test_arms_cover_the_issue():
    assert set(ARMS) == {"base", "lora", "greedy", "greedy_rx", "random", "naive", "gradient"}
    assert len(FULL.seeds) >= 4 and FULL.random_plans >= 2


def test_committed_results_are_a_full_run_and_render_again(tmp_path, capsys):
    """bench/results/quality.json holds a full run (every arm at every seed, the ShareLoRA* draws) and --render
    rebuilds its Markdown unchanged."""
    committed = REPO / "bench" / "results" / "quality.json"
    report = json.loads(committed.read_text())
    assert report["quick"] is False and report["arms"] == list(ARMS)
    seeds = report["budget"]["seeds"]
    assert len(seeds) >= 4 and report["budget"]["steps"] == FULL.steps
    expected = {
        (arm, seed, draw)
        for arm in ARMS
        if ARMS[arm].trained
        for seed in seeds
        for draw in range(report["budget"]["random_plans"] if arm == "random" else 1)
    }
    assert {(r["arm"], r["seed"], r["draw"]) for r in report["runs"]} == expected
    assert all(r["ties_verified"] for r in report["runs"] if r["arm"] != "lora")
    assert set(report["analysis"]["decisions"]) == {"gate", "H1", "H2", "H3", "H4"}
    assert report["signal"]["greedy_vs_random_plans"]["draws"] == 10_000
    (tmp_path / "quality.json").write_text(committed.read_text())
    assert main(["--render", "--output", str(tmp_path)]) == 0
    assert (tmp_path / "quality.md").read_text() == committed.with_suffix(".md").read_text()
    assert (tmp_path / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    assert main(["--render", "--output", str(tmp_path / "empty")]) == 2
    assert "run without --render first" in capsys.readouterr().err
