"""Tests of llava/summarize.py: the numbers on a fixed set of reviews equal a hand computation."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

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
