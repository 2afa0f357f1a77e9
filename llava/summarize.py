"""Summarise LLaVA-Bench (in-the-wild) reviews: mean ± std over repeated judgements, or upstream LLaVA's numbers.

Reads review files written by ``judge.py`` and review files written by upstream LLaVA's
``llava/eval/eval_gpt_review_bench.py`` (``tuple`` instead of ``scores``, ``llava_bench_*`` categories,
``[-1, -1]`` for a reply that did not parse, no ``repeat``: one run per file), alone or mixed.

For each run and each category (``conv``, ``detail``, ``complex``, and ``all`` = every question pooled), as upstream
LLaVA's ``summarize_gpt_review.py``:

* ``reference`` = mean reference score × 10, ``model`` = mean model score × 10,
* ``relative`` = mean model score / mean reference score × 100 (the number the papers report).

Two scorings:

* **ours** (the default): a *run* is one ``repeat`` value in one file (a file written with ``--repeats 3`` holds
  three runs; three files written with ``--repeats 1`` are three runs too). Failed reviews (``scores: null``, or an
  upstream ``[-1, -1]``) are left out of the means and counted in ``failures``; nothing is rounded before the
  division. Across runs each number is mean ± sample standard deviation (ddof = 1; 0 for a single run); a run where
  a category has no scored review does not count towards that category.
* **upstream** (``--upstream-scoring``), upstream's arithmetic exactly: every line of a file is pooled (all its
  repeats together), a failure is averaged in as ``[-1, -1]``, the two means are rounded to 3 decimals before the
  ratio and the ratio to 1 decimal. One row per file, as upstream prints; across files, mean ± sample std of those
  rows (upstream prints no such line). To score each repeat of one file on its own, export it first.

``n`` (scored reviews) and ``failures`` are totals over all runs. ``--export-upstream DIR`` writes one upstream
review file per run, ``DIR/reviews_repeat{k}.jsonl``, that upstream's summarizer reads unchanged
(``python llava/eval/summarize_gpt_review.py -d DIR``).

Usage: ``python llava/summarize.py reviews*.jsonl [--json] [--per-repeat] [--upstream-scoring]
[--export-upstream DIR]``.
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

import numpy

sys.path.insert(0, str(Path(__file__).resolve().parent))  # judge.py beside this script owns the review format
from judge import RULE_PREFIX, is_review_line, valid_scores  # noqa: E402

LOG = logging.getLogger("llava.summarize")

CATEGORY_ORDER = ("all", "conv", "detail", "complex")
# What upstream's eval_gpt_review_bench.py writes for a reply that does not parse.
UPSTREAM_FAILURE = (-1, -1)
# The file names upstream's summarize_gpt_review.py picks up from a directory given with -d.
UPSTREAM_PREFIXES = ("gpt4_text", "reviews_", "review_")


@dataclass(frozen=True)
class RunStats:
    """One run's numbers for one category; the scores are None when no review in it was scored."""

    relative: float | None
    reference: float | None
    model: float | None
    n: int
    failures: int


# --------------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------------


def short_category(name: str) -> str:
    """``conv`` for ``llava_bench_conv`` (upstream's review category), any other name as it is."""
    return name[len(RULE_PREFIX) :] if name.startswith(RULE_PREFIX) else name


def from_upstream(record: Any) -> dict[str, Any] | None:
    """An upstream review line (``question_id``, ``category``, ``tuple``, ``content``, ``answer1_id``,
    ``answer2_id``) as one of ours, in repeat 0; None if it is not one. ``[-1, -1]`` becomes a failure."""
    if not isinstance(record, dict) or "question_id" not in record or "tuple" not in record:
        return None
    if not isinstance(record.get("category"), str):
        return None
    raw = record["tuple"]
    failed = isinstance(raw, list) and tuple(raw) == UPSTREAM_FAILURE
    scores = None if failed else valid_scores(raw)
    if not failed and scores is None:
        return None
    return {
        "question_id": record["question_id"],
        "repeat": 0,
        "category": short_category(record["category"]),
        "scores": None if scores is None else list(scores),
        "review": record.get("content"),
        "reference_answer_id": record.get("answer1_id"),
        "answer_id": record.get("answer2_id"),
        "format": "upstream",
    }


def read_reviews(path: str | Path) -> list[dict[str, Any]]:
    """Every review line of one file, in file order, upstream lines turned into ours (:func:`from_upstream`);
    a partial or invalid line (e.g. a judge still writing) is skipped with a warning."""
    reviews = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                LOG.warning("%s:%d: not valid JSON, skipped", path, number)
                continue
            review = record if is_review_line(record) else from_upstream(record)
            if review is None:
                LOG.warning(
                    "%s:%d: not a review line (judge.py: question_id, repeat, category, scores; upstream: "
                    "question_id, category, tuple), skipped",
                    path,
                    number,
                )
                continue
            reviews.append(review)
    return reviews


def read_files(paths: Sequence[str | Path]) -> dict[str, list[dict[str, Any]]]:
    """The review lines of each file (a path given twice is read once), in the given order."""
    return {path: read_reviews(path) for path in dict.fromkeys(str(p) for p in paths)}


def group_runs(paths: Sequence[str | Path]) -> dict[str, list[dict[str, Any]]]:
    """Reviews grouped into runs named ``"file#repeat"`` (files in the given order, repeats ascending), one review
    per question in each run (the first is kept)."""
    runs: dict[tuple[int, str, Any], dict[str, dict[str, Any]]] = {}
    for order, (path, reviews) in enumerate(read_files(paths).items()):
        for review in reviews:
            run = runs.setdefault((order, path, review["repeat"]), {})
            key = str(review["question_id"])
            if key in run:
                LOG.warning(
                    "%s: repeat %s question %s reviewed twice; the first is kept", path, review["repeat"], key
                )
                continue
            run[key] = review

    return {f"{path}#{repeat}": list(runs[(o, path, repeat)].values()) for o, path, repeat in sorted(runs)}


# --------------------------------------------------------------------------------------------------------------
# Our scoring: failures left out, nothing rounded, mean ± std over runs
# --------------------------------------------------------------------------------------------------------------


def category_stats(pairs: Sequence[tuple[float, float]], failures: int) -> RunStats:
    """Upstream's numbers for one run and one category, from its scored (reference, model) pairs."""
    if not pairs:
        return RunStats(None, None, None, 0, failures)
    reference = statistics.fmean(pair[0] for pair in pairs)
    model = statistics.fmean(pair[1] for pair in pairs)
    relative = model / reference * 100 if reference else None
    return RunStats(relative, reference * 10, model * 10, len(pairs), failures)


def _by_category(reviews: Iterable[Mapping[str, Any]]) -> dict[str, list[tuple[float, float] | None]]:
    # Each review goes to "all" and to its category, in file order; None marks a failure.
    scores: dict[str, list[tuple[float, float] | None]] = {"all": []}
    for review in reviews:
        pair = valid_scores(review["scores"])
        for name in dict.fromkeys(("all", str(review["category"]))):
            scores.setdefault(name, []).append(pair)
    return scores


def run_stats(reviews: Iterable[Mapping[str, Any]]) -> dict[str, RunStats]:
    """One run's :class:`RunStats` per category, plus ``all`` over every question."""
    return {
        name: category_stats([p for p in pairs if p is not None], sum(p is None for p in pairs))
        for name, pairs in _by_category(reviews).items()
    }


# --------------------------------------------------------------------------------------------------------------
# Upstream's scoring (LLaVA llava/eval/summarize_gpt_review.py), reproduced exactly
# --------------------------------------------------------------------------------------------------------------


def upstream_category_stats(pairs: Sequence[tuple[float, float] | None]) -> RunStats:
    """Upstream's numbers for one file and one category: failures (None) averaged in as ``[-1, -1]``, the
    column means (numpy, as upstream, so that the float sums agree to the last bit) rounded to 3 decimals, then
    ``relative`` = round(model / reference × 100, 1). ``reference``/``model`` are the rounded means × 10."""
    values = [UPSTREAM_FAILURE if pair is None else pair for pair in pairs]
    reference, model = (round(mean, 3) for mean in numpy.asarray(values).mean(0).tolist())
    relative = round(model / reference * 100, 1) if reference else None  # upstream divides by zero there
    failures = sum(pair is None for pair in pairs)
    return RunStats(relative, reference * 10, model * 10, len(pairs) - failures, failures)


def upstream_file_stats(reviews: Iterable[Mapping[str, Any]]) -> dict[str, RunStats]:
    """One file's :class:`RunStats` per category with upstream's arithmetic, every line pooled (all repeats)."""
    return {name: upstream_category_stats(pairs) for name, pairs in _by_category(reviews).items()}


# --------------------------------------------------------------------------------------------------------------
# Across runs
# --------------------------------------------------------------------------------------------------------------


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof=1; 0 for one value; None for none)."""
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize_runs(per_run: Mapping[str, Mapping[str, RunStats]], scoring: str = "ours") -> dict[str, dict]:
    """Per category: mean and std across runs of relative/reference/model, total n and failures, per-run rows."""
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
        entry["scoring"] = scoring
        entry["per_repeat"] = [{"run": name, **asdict(row)} for name, row in rows.items()]
        summary[category] = entry
    return summary


def summarize(runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Our scoring of runs (see :func:`group_runs`): failures excluded, mean ± std across runs."""
    return summarize_runs({name: run_stats(reviews) for name, reviews in runs.items()})


def summarize_upstream(files: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Upstream's scoring of each file (see :func:`read_files`), then mean ± std across files."""
    per_file = {path: upstream_file_stats(reviews) for path, reviews in files.items() if reviews}
    return summarize_runs(per_file, scoring="upstream")


# --------------------------------------------------------------------------------------------------------------
# Export in upstream's review format
# --------------------------------------------------------------------------------------------------------------


def _question_order(question_id: Any) -> tuple[int, Any]:
    # Numeric ids in numeric order (LLaVA-Bench's are 0..59, in upstream's question-file order), then the rest.
    if isinstance(question_id, int) and not isinstance(question_id, bool):
        return 0, question_id
    return 1, str(question_id)


def upstream_review_line(review: Mapping[str, Any], line_id: int) -> dict[str, Any]:
    """A review as upstream's eval_gpt_review_bench.py writes one: its keys in its order, ``id`` counting lines
    from 1, the answer ids falling back to the question id (as upstream does for Assistant 1), a failure as
    ``[-1, -1]``."""
    question_id = review["question_id"]
    reference_id, answer_id = review.get("reference_answer_id"), review.get("answer_id")
    scores = valid_scores(review["scores"])
    return {
        "id": line_id,
        "question_id": question_id,
        "answer1_id": question_id if reference_id is None else reference_id,
        "answer2_id": question_id if answer_id is None else answer_id,
        "category": RULE_PREFIX + str(review["category"]),
        "content": review.get("review") or "",
        "tuple": list(UPSTREAM_FAILURE) if scores is None else list(scores),
    }


def export_upstream(runs: Mapping[str, Sequence[Mapping[str, Any]]], directory: str | Path) -> list[Path]:
    """Write run k (in :func:`group_runs` order: for one file, k is the repeat) to
    ``directory/reviews_repeat{k}.jsonl`` in upstream's format, questions in id order.

    Refuses (FileExistsError, nothing written) when ``directory`` already holds a file that upstream's
    summarizer would read with ``-d``: it would be averaged in with the new ones.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    present = sorted(
        p.name
        for p in directory.iterdir()
        if p.name.endswith(".jsonl") and p.name.startswith(UPSTREAM_PREFIXES)
    )
    if present:
        raise FileExistsError(
            f"{directory} already holds review file(s) that upstream's summarize_gpt_review.py -d would also "
            f"read: {', '.join(present)}; export into an empty or new directory"
        )
    written = []
    for k, reviews in enumerate(runs.values()):
        ordered = sorted(reviews, key=lambda r: _question_order(r["question_id"]))
        # json.dumps with its defaults (ASCII, ", " and ": "), as upstream writes its lines
        text = "".join(json.dumps(upstream_review_line(r, i)) + "\n" for i, r in enumerate(ordered, 1))
        target = directory / f"reviews_repeat{k}.jsonl"
        with open(target, "x", encoding="utf-8") as handle:  # "x": 0666 minus umask, never over a file
            handle.write(text)
        written.append(target)
    return written


# --------------------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------------------


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


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(
        description="Summarise LLaVA-Bench judge reviews (judge.py's or upstream LLaVA's): mean ± std over "
        "repeats, or upstream's arithmetic."
    )
    parser.add_argument("reviews", nargs="+", help="review JSONL file(s), judge.py's or upstream's format")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")
    parser.add_argument("--per-repeat", action="store_true", help="also print one row per run and category")
    parser.add_argument(
        "--upstream-scoring",
        action="store_true",
        help="upstream's arithmetic: each file's lines pooled, failures averaged in as [-1, -1], means rounded "
        "to 3 decimals before the ratio; one run per file",
    )
    parser.add_argument(
        "--export-upstream",
        metavar="DIR",
        help="write DIR/reviews_repeat{k}.jsonl, one upstream-format review file per run, and print nothing else",
    )
    return parser


def _export(runs: Mapping[str, Sequence[Mapping[str, Any]]], directory: str) -> int:
    try:
        written = export_upstream(runs, directory)
    except OSError as error:
        LOG.error("%s", error)
        return 1
    for target, (name, reviews) in zip(written, runs.items(), strict=True):
        failures = sum(valid_scores(r["scores"]) is None for r in reviews)
        print(f"{target}: run {name}, {len(reviews)} review(s), {failures} failure(s) written as [-1, -1]")
    print(f"upstream: python llava/eval/summarize_gpt_review.py -d {directory}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Print the summary of the given review files (or export them); 1 when there is nothing to summarise."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    try:
        # upstream pools a file's lines whatever their repeat; everything else works on runs
        pooled = args.upstream_scoring and not args.export_upstream
        runs = read_files(args.reviews) if pooled else group_runs(args.reviews)
    except OSError as error:
        LOG.error("%s", error)
        return 1
    if not any(runs.values()):
        LOG.error("no review lines in %s", ", ".join(args.reviews))
        return 1
    if args.export_upstream:
        return _export(runs, args.export_upstream)
    summary = summarize_upstream(runs) if args.upstream_scoring else summarize(runs)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    models = judge_models(runs)
    if len(models) > 1:
        LOG.warning("reviews come from different judges: %s", ", ".join(models))
    if args.upstream_scoring:
        how = (
            f"{len(summary['all']['per_repeat'])} file(s); upstream LLaVA's arithmetic per file (every line "
            "pooled, failures averaged in as [-1, -1], means rounded to 3 decimals before the ratio); "
            "mean ± sample std across files"
        )
    else:
        how = f"{len(runs)} run(s); mean ± sample std across runs; failures excluded from the means"
    print(f"LLaVA-Bench (in-the-wild), judge {', '.join(models) or 'unknown'}, {how}\n")
    print(markdown_table(summary, per_repeat=args.per_repeat))
    return 0


if __name__ == "__main__":
    sys.exit(main())
