"""Summarise LLaVA-Bench (in-the-wild) reviews written by ``judge.py``: mean ± std over repeated judgements.

For each run and each category (``conv``, ``detail``, ``complex``, and ``all`` = every question pooled), as upstream
LLaVA's ``summarize_gpt_review.py``:

* ``reference`` = mean reference score × 10, ``model`` = mean model score × 10,
* ``relative`` = mean model score / mean reference score × 100 (the number the papers report).

Unlike upstream, failed reviews (``scores: null``) are left out of the means and counted in ``failures``, and
nothing is rounded before the division.

A *run* is one ``repeat`` value in one file: a file written with ``--repeats 3`` holds three runs, and three files
written with ``--repeats 1`` are three runs too. Across runs each number is reported as mean ± sample standard
deviation (ddof = 1; 0 when there is a single run). ``n`` and ``failures`` are totals over all runs (e.g. 180 for
60 questions judged 3 times). A run where a category has no scored review does not count towards that category.

Usage: ``python llava/summarize.py reviews*.jsonl [--json] [--per-repeat]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

LOG = logging.getLogger("llava.summarize")

CATEGORY_ORDER = ("all", "conv", "detail", "complex")


@dataclass(frozen=True)
class RunStats:
    """One run's numbers for one category; the scores are None when no review in it was scored."""

    relative: float | None
    reference: float | None
    model: float | None
    n: int
    failures: int


def read_reviews(path: str | Path) -> list[dict[str, Any]]:
    """The review lines of one file; a partial or invalid line (e.g. a judge still writing) is skipped with a
    warning."""
    reviews = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                review = json.loads(line)
            except json.JSONDecodeError:
                LOG.warning("%s:%d: not valid JSON, skipped", path, number)
                continue
            if (
                not isinstance(review, dict)
                or not {"question_id", "repeat", "category", "scores"} <= review.keys()
            ):
                LOG.warning(
                    "%s:%d: not a review line (needs question_id, repeat, category, scores), skipped",
                    path,
                    number,
                )
                continue
            reviews.append(review)
    return reviews


def group_runs(paths: Sequence[str | Path]) -> dict[str, list[dict[str, Any]]]:
    """Reviews grouped into runs named ``"file#repeat"`` (files in the given order, repeats ascending), one review
    per question in each run (the first is kept)."""
    runs: dict[tuple[int, str, Any], dict[str, dict[str, Any]]] = {}
    for order, path in enumerate(dict.fromkeys(str(p) for p in paths)):
        for review in read_reviews(path):
            run = runs.setdefault((order, path, review["repeat"]), {})
            key = str(review["question_id"])
            if key in run:
                LOG.warning(
                    "%s: repeat %s question %s reviewed twice; the first is kept", path, review["repeat"], key
                )
                continue
            run[key] = review

    def run_order(run: tuple[int, str, Any]) -> tuple[int, int, Any]:
        repeat = run[2]
        return (run[0], 0, repeat) if isinstance(repeat, int) else (run[0], 1, str(repeat))

    return {
        f"{path}#{repeat}": list(runs[(o, path, repeat)].values())
        for o, path, repeat in sorted(runs, key=run_order)
    }


def valid_scores(scores: Any) -> tuple[float, float] | None:
    """(reference, model) from a review's ``scores``, or None for a failure (null, or anything not two numbers)."""
    if not isinstance(scores, list | tuple) or len(scores) != 2:
        return None
    if not all(isinstance(s, int | float) and not isinstance(s, bool) for s in scores):
        return None
    return float(scores[0]), float(scores[1])


def category_stats(pairs: Sequence[tuple[float, float]], failures: int) -> RunStats:
    """Upstream's numbers for one run and one category, from its scored (reference, model) pairs."""
    if not pairs:
        return RunStats(None, None, None, 0, failures)
    reference = statistics.fmean(pair[0] for pair in pairs)
    model = statistics.fmean(pair[1] for pair in pairs)
    relative = model / reference * 100 if reference else None
    return RunStats(relative, reference * 10, model * 10, len(pairs), failures)


def run_stats(reviews: Iterable[Mapping[str, Any]]) -> dict[str, RunStats]:
    """One run's :class:`RunStats` per category, plus ``all`` over every question."""
    pairs: dict[str, list[tuple[float, float]]] = {"all": []}
    failures: dict[str, int] = {"all": 0}
    for review in reviews:
        scores = valid_scores(review["scores"])
        for name in dict.fromkeys(("all", str(review["category"]))):
            pairs.setdefault(name, [])
            failures.setdefault(name, 0)
            if scores is None:
                failures[name] += 1
            else:
                pairs[name].append(scores)
    return {name: category_stats(pairs[name], failures[name]) for name in pairs}


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof=1; 0 for one value; None for none)."""
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per category: mean and std across runs of relative/reference/model, total n and failures, per-run rows."""
    per_run = {name: run_stats(reviews) for name, reviews in runs.items()}
    categories = sorted(
        {category for stats in per_run.values() for category in stats},
        key=lambda c: (CATEGORY_ORDER.index(c) if c in CATEGORY_ORDER else len(CATEGORY_ORDER), c),
    )
    summary: dict[str, dict[str, Any]] = {}
    for category in categories:
        rows = {name: stats[category] for name, stats in per_run.items() if category in stats}
        scored = [row for row in rows.values() if row.relative is not None]
        entry: dict[str, Any] = {}
        for metric in ("relative", "reference", "model"):
            entry[metric], entry[f"{metric}_std"] = mean_std([getattr(row, metric) for row in scored])
        entry["n"] = sum(row.n for row in rows.values())
        entry["failures"] = sum(row.failures for row in rows.values())
        entry["repeats"] = len(scored)
        entry["per_repeat"] = [{"run": name, **asdict(row)} for name, row in rows.items()]
        summary[category] = entry
    return summary


def _cell(mean: float | None, std: float | None) -> str:
    return "n/a" if mean is None else f"{mean:.1f} ± {std:.1f}"


def markdown_table(summary: Mapping[str, Mapping[str, Any]], *, per_repeat: bool = False) -> str:
    """The summary as a Markdown table (numbers to one decimal, as the papers print them)."""
    lines = [
        "| category | relative (%) | reference (×10) | model (×10) | n | failures | repeats |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for category, entry in summary.items():
        cells = [_cell(entry[m], entry[f"{m}_std"]) for m in ("relative", "reference", "model")]
        lines.append(
            f"| {category} | {' | '.join(cells)} | {entry['n']} | {entry['failures']} | {entry['repeats']} |"
        )
    if per_repeat:
        lines += ["", "| category | run | relative (%) | reference (×10) | model (×10) | n | failures |"]
        lines.append("|---|---|---:|---:|---:|---:|---:|")
        for category, entry in summary.items():
            for row in entry["per_repeat"]:
                cells = [
                    "n/a" if row[m] is None else f"{row[m]:.1f}" for m in ("relative", "reference", "model")
                ]
                lines.append(
                    f"| {category} | {row['run']} | {' | '.join(cells)} | {row['n']} | {row['failures']} |"
                )
    return "\n".join(lines)


def judge_models(runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[str]:
    """The judge models the reviews name (the server-reported one when there is one)."""
    names = {
        str(review.get("judge_model_reported") or review.get("judge_model"))
        for reviews in runs.values()
        for review in reviews
        if review.get("judge_model_reported") or review.get("judge_model")
    }
    return sorted(names)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the summary of the given review files; 1 when there is nothing to summarise."""
    parser = argparse.ArgumentParser(
        description="Summarise LLaVA-Bench judge reviews: mean ± std over repeats."
    )
    parser.add_argument("reviews", nargs="+", help="review JSONL file(s) written by judge.py")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")
    parser.add_argument("--per-repeat", action="store_true", help="also print one row per run and category")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    try:
        runs = group_runs(args.reviews)
    except OSError as error:
        LOG.error("%s", error)
        return 1
    if not runs:
        LOG.error("no review lines in %s", ", ".join(args.reviews))
        return 1
    summary = summarize(runs)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    models = judge_models(runs)
    if len(models) > 1:
        LOG.warning("reviews come from different judges: %s", ", ".join(models))
    print(
        f"LLaVA-Bench (in-the-wild), judge {', '.join(models) or 'unknown'}, {len(runs)} run(s); "
        "mean ± sample std across runs; failures excluded from the means\n"
    )
    print(markdown_table(summary, per_repeat=args.per_repeat))
    return 0


if __name__ == "__main__":
    sys.exit(main())
