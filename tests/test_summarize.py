"""Tests of llava/summarize.py: the numbers on a fixed set of reviews equal a hand computation."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "judge"
REVIEWS = FIXTURES / "reviews_two_repeats.jsonl"
SUMMARIZE_SCRIPT = ROOT / "llava" / "summarize.py"


summarize = load_script(SUMMARIZE_SCRIPT, "llava_summarize_under_test")

# The fixture, by hand ([reference, model] per question; q3 failed in repeat 1):
#   repeat 0: conv q0 [8,6] q3 [9,9]   detail q1 [10,5]   complex q2 [8,8]
#   repeat 1: conv q0 [8,7] q3 null    detail q1 [6,6]    complex q2 [10,5]
# Repeat 0, all: reference mean 35/4 = 8.75, model 28/4 = 7   -> relative 80, reference 87.5, model 70
# Repeat 1, all (failure left out): reference 24/3 = 8, model 18/3 = 6 -> relative 75, 80, 60
#   (upstream would count [-1,-1]: 23/4 and 17/4 -> 73.9)
# Sample std of two values a, b is |a - b| / sqrt(2).
S2 = math.sqrt(2)
EXPECTED = {
    "all": {
        "relative": (77.5, 5 / S2),
        "reference": (83.75, 7.5 / S2),
        "model": (65.0, 10 / S2),
        "n": 7,
        "f": 1,
    },
    # conv: repeat 0 reference 8.5, model 7.5 -> 88.235...; repeat 1 only q0: 8, 7 -> 87.5
    "conv": {
        "relative": ((7.5 / 8.5 * 100 + 87.5) / 2, (7.5 / 8.5 * 100 - 87.5) / S2),
        "reference": (82.5, 5 / S2),
        "model": (72.5, 5 / S2),
        "n": 3,
        "f": 1,
    },
    # detail: repeat 0 10,5 -> 50; repeat 1 6,6 -> 100
    "detail": {
        "relative": (75.0, 50 / S2),
        "reference": (80.0, 40 / S2),
        "model": (55.0, 10 / S2),
        "n": 2,
        "f": 0,
    },
    # complex: repeat 0 8,8 -> 100; repeat 1 10,5 -> 50
    "complex": {
        "relative": (75.0, 50 / S2),
        "reference": (90.0, 20 / S2),
        "model": (65.0, 30 / S2),
        "n": 2,
        "f": 0,
    },
}


def test_summary_equals_hand_computation() -> None:
    summary = summarize.summarize(summarize.group_runs([REVIEWS]))
    assert list(summary) == ["all", "conv", "detail", "complex"]
    for category, expected in EXPECTED.items():
        entry = summary[category]
        for metric in ("relative", "reference", "model"):
            mean, std = expected[metric]
            assert entry[metric] == pytest.approx(mean, abs=1e-9), (category, metric)
            assert entry[f"{metric}_std"] == pytest.approx(std, abs=1e-9), (category, metric)
        assert entry["n"] == expected["n"]
        assert entry["failures"] == expected["f"]
        assert entry["repeats"] == 2


def test_failure_is_excluded_not_counted_as_minus_one() -> None:
    runs = summarize.group_runs([REVIEWS])
    repeat1 = summarize.run_stats(runs[f"{REVIEWS}#1"])["all"]
    assert repeat1.relative == pytest.approx(75.0)
    assert repeat1.n == 3 and repeat1.failures == 1


def test_json_output_shape() -> None:
    done = subprocess.run(
        [sys.executable, str(SUMMARIZE_SCRIPT), str(REVIEWS), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert set(data) == {"all", "conv", "detail", "complex"}
    for entry in data.values():
        assert {"relative", "relative_std", "reference", "model", "n", "failures"} <= set(entry)
    assert data["all"]["relative"] == pytest.approx(77.5)
    assert data["all"]["relative_std"] == pytest.approx(5 / S2)
    assert data["all"]["failures"] == 1


def test_markdown_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert summarize.main([str(REVIEWS)]) == 0
    out = capsys.readouterr().out
    assert "| category | relative (%) | reference (×10) | model (×10) | n | failures | repeats |" in out
    assert "| all | 77.5 ± 3.5 | 83.8 ± 5.3 | 65.0 ± 7.1 | 7 | 1 | 2 |" in out
    assert "| conv | 87.9 ± 0.5 | 82.5 ± 3.5 | 72.5 ± 3.5 | 3 | 1 | 2 |" in out
    assert "| detail | 75.0 ± 35.4 | 80.0 ± 28.3 | 55.0 ± 7.1 | 2 | 0 | 2 |" in out
    assert "| complex | 75.0 ± 35.4 | 90.0 ± 14.1 | 65.0 ± 21.2 | 2 | 0 | 2 |" in out


def test_one_run_has_zero_std_and_files_are_runs(tmp_path: Path) -> None:
    lines = REVIEWS.read_text().splitlines()
    first, second = tmp_path / "run_a.jsonl", tmp_path / "run_b.jsonl"
    first.write_text("\n".join(line for line in lines if '"repeat": 0' in line) + "\n")
    # A second file written with --repeats 1 also has repeat 0: it is a run of its own.
    second.write_text("\n".join(line.replace('"repeat": 1', '"repeat": 0') for line in lines[4:]) + "\n")
    single = summarize.summarize(summarize.group_runs([first]))
    assert single["all"]["relative"] == pytest.approx(80.0) and single["all"]["relative_std"] == 0.0
    both = summarize.summarize(summarize.group_runs([first, second, first]))  # a path given twice counts once
    assert both["all"]["relative"] == pytest.approx(77.5)
    assert both["all"]["relative_std"] == pytest.approx(5 / S2)
    assert both["all"]["repeats"] == 2


def test_partial_line_and_duplicates_are_skipped(tmp_path: Path) -> None:
    copy = tmp_path / "reviews.jsonl"
    shutil.copy(REVIEWS, copy)
    with copy.open("a") as handle:
        handle.write(REVIEWS.read_text().splitlines()[0].replace("[8, 6]", "[1, 10]") + "\n")  # a duplicate
        handle.write('{"question_id": 9, "repeat": 0, "categ')  # a judge still writing
    summary = summarize.summarize(summarize.group_runs([copy]))
    assert summary["all"]["relative"] == pytest.approx(77.5)
    assert summary["all"]["n"] == 7


def test_no_reviews_is_an_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert summarize.main([str(empty)]) == 1


# ----------------------------------------------------------------------------------------------- upstream format

UPSTREAM_FIXTURE = FIXTURES / "upstream_reviews.jsonl"  # written in eval_gpt_review_bench.py's format
UPSTREAM_KEYS = ["id", "question_id", "answer1_id", "answer2_id", "category", "content", "tuple"]


def upstream_summarize_dir(directory: Path) -> dict[str, dict[str, float]]:
    """What upstream LLaVA's ``llava/eval/summarize_gpt_review.py -d DIRECTORY`` prints, as
    ``{config: {category: relative}}``.

    A test oracle that mirrors upstream's script (haotian-liu/LLaVA, llava/eval/summarize_gpt_review.py) and
    shares no code with summarize.py: the same file selection (``*.jsonl`` starting with ``gpt4_text``,
    ``reviews_`` or ``review_``), the same keys (``category`` and ``tuple``; ``score`` without a category), every
    line of a file pooled under its category and ``all``, numpy column means each rounded to 3 decimals, then
    ``round(model / reference * 100, 1)``.
    """
    printed: dict[str, dict[str, float]] = {}
    names = [
        name
        for name in os.listdir(directory)
        if name.endswith(".jsonl") and name.startswith(("gpt4_text", "reviews_", "review_"))
    ]
    for name in sorted(names):
        config = name.replace("gpt4_text_", "").replace(".jsonl", "")
        pooled: dict[str, list] = defaultdict(list)
        with open(directory / name) as handle:
            for line in handle:
                review = json.loads(line)
                if "category" in review:
                    pooled[review["category"]].append(review["tuple"])
                    pooled["all"].append(review["tuple"])
                else:
                    pooled["all"].append(review["tuple"] if "tuple" in review else review["score"])
        printed[config] = {}
        for category, values in sorted(pooled.items()):
            reference, model = (round(x, 3) for x in np.asarray(values).mean(0).tolist())
            printed[config][category] = round(model / reference * 100, 1)
    return printed


def upstream_scoring_by_file(summary: dict) -> dict[str, dict[str, float]]:
    """``--upstream-scoring --json`` output rearranged like :func:`upstream_summarize_dir`'s."""
    rows: dict[str, dict[str, float]] = defaultdict(dict)
    for category, entry in summary.items():
        for row in entry["per_repeat"]:
            config = Path(row["run"]).name.replace(".jsonl", "")
            rows[config]["all" if category == "all" else f"llava_bench_{category}"] = row["relative"]
    return dict(rows)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SUMMARIZE_SCRIPT), *args], capture_output=True, text=True, timeout=60
    )


def test_export_writes_upstream_format(tmp_path: Path) -> None:
    out = tmp_path / "upstream"
    done = run_cli(str(REVIEWS), "--export-upstream", str(out))
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["reviews_repeat0.jsonl", "reviews_repeat1.jsonl"]
    umask = os.umask(0)
    os.umask(umask)
    lines = [json.loads(line) for line in (out / "reviews_repeat1.jsonl").read_text().splitlines()]
    assert (out / "reviews_repeat1.jsonl").stat().st_mode & 0o777 == 0o666 & ~umask
    assert all(list(line) == UPSTREAM_KEYS for line in lines)  # upstream's keys, in upstream's order
    assert [line["id"] for line in lines] == [1, 2, 3, 4]
    assert [line["question_id"] for line in lines] == [0, 1, 2, 3]
    assert [line["category"] for line in lines] == [
        "llava_bench_conv",
        "llava_bench_detail",
        "llava_bench_complex",
        "llava_bench_conv",
    ]
    assert [line["tuple"] for line in lines] == [[8, 7], [6, 6], [10, 5], [-1, -1]]  # q3 failed in repeat 1
    assert lines[3]["content"] == "I am unable to score these answers."
    assert lines[0]["answer1_id"] == 0 and lines[0]["answer2_id"] == 0  # no answer ids: the question id
    # a second export into the same folder would mix with the first when upstream reads it with -d: refused
    again = run_cli(str(REVIEWS), "--export-upstream", str(out))
    assert again.returncode == 1 and "already holds review file(s)" in again.stderr
    assert sorted(p.name for p in out.iterdir()) == ["reviews_repeat0.jsonl", "reviews_repeat1.jsonl"]


def test_round_trip_ours_export_upstream_reader(tmp_path: Path) -> None:
    out = tmp_path / "upstream"
    assert summarize.main([str(REVIEWS), "--export-upstream", str(out)]) == 0
    exported = sorted(out.glob("reviews_repeat*.jsonl"))
    # upstream's summarizer on the exported folder == our --upstream-scoring on the same files
    oracle = upstream_summarize_dir(out)
    done = run_cli(*map(str, exported), "--upstream-scoring", "--json")
    assert done.returncode == 0, done.stderr
    assert upstream_scoring_by_file(json.loads(done.stdout)) == oracle
    assert oracle == {
        "reviews_repeat0": {
            "all": 80.0,
            "llava_bench_complex": 100.0,
            "llava_bench_conv": 88.2,
            "llava_bench_detail": 50.0,
        },
        # the failure averaged in as [-1, -1]: (23/4) / (17/4), not 75.0 as ours
        "reviews_repeat1": {
            "all": 73.9,
            "llava_bench_complex": 50.0,
            "llava_bench_conv": 85.7,
            "llava_bench_detail": 100.0,
        },
    }
    # and our own scoring reads the exported files back to the numbers of the original file
    original = summarize.summarize(summarize.group_runs([REVIEWS]))
    back = summarize.summarize(summarize.group_runs(exported))
    for category, entry in original.items():
        for key in ("relative", "relative_std", "reference", "reference_std", "model", "model_std"):
            assert back[category][key] == pytest.approx(entry[key], abs=1e-12), (category, key)
        for key in ("n", "failures", "repeats"):
            assert back[category][key] == entry[key]


def test_upstream_scoring_pools_every_repeat_of_a_file(tmp_path: Path) -> None:
    # upstream averages every line of a file; our two-repeat file scored as one upstream file of both exports
    out = tmp_path / "upstream"
    assert summarize.main([str(REVIEWS), "--export-upstream", str(out)]) == 0
    pooled = tmp_path / "pooled"
    pooled.mkdir()
    (pooled / "reviews_both.jsonl").write_text(
        "".join(p.read_text() for p in sorted(out.glob("reviews_repeat*.jsonl")))
    )
    summary = summarize.summarize_upstream(summarize.read_files([REVIEWS]))
    ours = {c: e["per_repeat"][0]["relative"] for c, e in summary.items()}
    oracle = upstream_summarize_dir(pooled)["reviews_both"]
    assert ours == {
        "all": oracle["all"],
        **{c: oracle[f"llava_bench_{c}"] for c in ("conv", "detail", "complex")},
    }
    # (8*2+9+8 - 1) / 4 = 6.0 and (6+9+7-1)/4 = 5.25: 87.5; ours is the mean of 88.2 and 87.5
    assert ours == {"all": 77.6, "conv": 87.5, "detail": 68.8, "complex": 72.2}
    assert summary["all"]["failures"] == 1 and summary["all"]["n"] == 7 and summary["all"]["repeats"] == 1


def test_upstream_written_file_in_our_summarizer(tmp_path: Path) -> None:
    # ours: the [-1, -1] line is a failure, left out; no "repeat" field: one run
    summary = summarize.summarize(summarize.group_runs([UPSTREAM_FIXTURE]))
    assert list(summary) == ["all", "conv", "detail", "complex"]
    expected = {
        "all": (55 / 8) / (68 / 8),
        "conv": 6.5 / 8.5,
        "detail": (20 / 3) / 8,
        "complex": (22 / 3) / 9,
    }
    for category, ratio in expected.items():
        assert summary[category]["relative"] == pytest.approx(ratio * 100, abs=1e-9)
        assert summary[category]["relative_std"] == 0.0 and summary[category]["repeats"] == 1
    assert summary["all"]["n"] == 8 and summary["all"]["failures"] == 1
    assert summary["conv"]["n"] == 2 and summary["conv"]["failures"] == 1
    assert summary["all"]["reference"] == pytest.approx(85.0)
    # upstream's arithmetic on the same file: (68 - 1) / 9 -> 7.444, (55 - 1) / 9 -> 6.0
    done = run_cli(str(UPSTREAM_FIXTURE), "--upstream-scoring", "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert {c: e["relative"] for c, e in data.items()} == {
        "all": 80.6,
        "conv": 75.0,
        "detail": 83.3,
        "complex": 81.5,
    }
    assert data["all"]["reference"] == pytest.approx(74.44) and data["all"]["scoring"] == "upstream"
    shutil.copy(UPSTREAM_FIXTURE, tmp_path / "review_upstream_reviews.jsonl")
    oracle = upstream_summarize_dir(tmp_path)["review_upstream_reviews"]
    assert upstream_scoring_by_file(data) == {"upstream_reviews": oracle}


def test_upstream_file_round_trips_through_export(tmp_path: Path) -> None:
    out = tmp_path / "again"
    assert summarize.main([str(UPSTREAM_FIXTURE), "--export-upstream", str(out)]) == 0
    original = [json.loads(line) for line in UPSTREAM_FIXTURE.read_text().splitlines()]
    exported = [json.loads(line) for line in (out / "reviews_repeat0.jsonl").read_text().splitlines()]
    assert exported == original


def test_export_numbers_runs_of_several_files_in_order(tmp_path: Path) -> None:
    out = tmp_path / "upstream"
    assert summarize.main([str(REVIEWS), str(UPSTREAM_FIXTURE), "--export-upstream", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["reviews_repeat0.jsonl", "reviews_repeat1.jsonl", "reviews_repeat2.jsonl"]
    third = [json.loads(line) for line in (out / "reviews_repeat2.jsonl").read_text().splitlines()]
    assert [line["answer2_id"] for line in third][:2] == ["Zx0abc", "Zx1abc"]


def test_strict_scores_shared_with_the_judge(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    reviews = tmp_path / "reviews.jsonl"
    good = {"question_id": 0, "repeat": 0, "category": "conv", "scores": [8, 6]}
    bad = [
        {**good, "question_id": 1, "scores": [True, 7]},  # a boolean is an int to Python, not a score
        {**good, "question_id": 2, "scores": ["8", "7"]},
        {**good, "question_id": 3, "repeat": True},
        {"id": 1, "question_id": 4, "category": "llava_bench_conv", "tuple": [False, 1]},
    ]
    reviews.write_text(
        "".join(json.dumps(r) + "\n" for r in [good, *bad]) + '{"question_id": 5, "scores": [NaN, 1]}\n'
    )
    assert [r["question_id"] for r in summarize.read_reviews(reviews)] == [0]
    assert caplog.text.count("not a review line") == 5
