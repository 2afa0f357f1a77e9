"""The tasks: one JSONL format for every task, the two built-in tasks converted to it, and a user's own file checked
row by row.

A task row is ``{"prompt": str, "answer": str, "split": "train" | "test", "choices": [str, ...]}``; ``choices`` is
optional and, when present, holds ``answer`` (accuracy is then the argmax of the choices' log-likelihoods; without
choices it is exact match: every answer token and the end token are the model's top prediction, which is what
greedy decoding produces). A training example is the prompt followed by the answer and the end token.

Built-in tasks, made from data nobody in this project wrote (``make setup`` puts it under ``.cache/data``):

* ``sentiment``: movie-review sentences with mean human ratings (vaderSentiment 3.3.2 source distribution).
  ``|rating| >= 1`` only, duplicate texts dropped, a balanced test split, the rest the training pool.
* ``analogy``: ``questions-words.txt`` (gensim). In every relation a share of the word *pairs* is held out; no word
  of a held-out pair appears anywhere in training, and few-shot examples come from training pairs only.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.embedded import data_dir
from sharelora_plugin.planning.files import read_jsonl, write_jsonl

DATA_SEED = 1234  # the task data is the same for every run, arm and seed
SPLITS = ("train", "test")
SENTIMENT_PROMPT = "Review: {text}\nSentiment:"
SENTIMENT_CHOICES = (" positive", " negative")
ANALOGY_HELD_OUT = 0.3  # share of each relation's word pairs held out for testing
ANALOGY_SHOTS = 2


class TaskError(ValueError):
    """A task file that cannot be used; the message names the file, the row and the fix."""


@dataclass
class Task:
    """One task's rows, split."""

    name: str
    train: list[dict]
    test: list[dict]

    @property
    def has_choices(self) -> bool:
        return bool(self.test) and "choices" in self.test[0]


def check_task_rows(rows: Sequence[object], source: str) -> list[dict]:
    """Validate task rows; raises :class:`TaskError` naming the first bad row (1-based line) and the fix."""
    checked = []
    for line, row in enumerate(rows, start=1):
        where = f"{source} row {line}"
        if not isinstance(row, dict):
            raise TaskError(
                f"{where}: must be a JSON object with prompt, answer, split; got {type(row).__name__}"
            )
        missing = [key for key in ("prompt", "answer", "split") if key not in row]
        if missing:
            raise TaskError(
                f"{where}: missing key(s) {', '.join(missing)}; every row needs prompt, answer, split"
            )
        for key in ("prompt", "answer"):
            if not isinstance(row[key], str) or not row[key]:
                raise TaskError(f"{where}: {key} must be a non-empty string; got {row[key]!r}")
        if row["split"] not in SPLITS:
            raise TaskError(f"{where}: split must be 'train' or 'test'; got {row['split']!r}")
        if "choices" in row:
            choices = row["choices"]
            if (
                not isinstance(choices, list)
                or len(choices) < 2
                or not all(isinstance(c, str) and c for c in choices)
            ):
                raise TaskError(
                    f"{where}: choices must be a list of at least 2 non-empty strings; got {choices!r}"
                )
            if len(set(choices)) != len(choices):
                raise TaskError(f"{where}: choices repeat a value: {choices!r}")
            if row["answer"] not in choices:
                raise TaskError(f"{where}: answer {row['answer']!r} is not one of its choices {choices!r}")
        checked.append({key: row[key] for key in ("prompt", "answer", "split", "choices") if key in row})
    with_choices = {("choices" in row) for row in checked}
    if len(with_choices) > 1:
        raise TaskError(
            f"{source}: some rows have choices and some do not; give choices on every row or on none"
        )
    for split in SPLITS:
        if not any(row["split"] == split for row in checked):
            raise TaskError(f"{source}: no {split!r} rows; the task needs both train and test rows")
    return checked


def load_task(path: str | Path) -> Task:
    """A user's task file, validated."""
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"--task {path}: file not found")
    try:
        rows = read_jsonl(path)
    except Exception as err:  # the reader's own error names the line
        raise TaskError(f"--task {path}: {err}") from None
    rows = check_task_rows(rows, str(path))
    return Task(
        name=path.stem,
        train=[r for r in rows if r["split"] == "train"],
        test=[r for r in rows if r["split"] == "test"],
    )


def sentiment_rows(source: Sequence[dict], test_size: int, seed: int = DATA_SEED) -> list[dict]:
    """Task rows from the rated movie-review snippets: ``|rating| >= 1`` labelled positive / negative, texts
    deduplicated (case and surrounding space ignored; a text rated both ways is dropped), a balanced test split of
    ``test_size`` (half each label) and the rest for training."""
    by_text: dict[str, set[str]] = defaultdict(set)
    first: dict[str, str] = {}
    for row in source:
        if abs(float(row["rating"])) < 1:
            continue
        key = " ".join(row["text"].lower().split())
        by_text[key].add("positive" if float(row["rating"]) > 0 else "negative")
        first.setdefault(key, row["text"].strip())
    items = [(first[key], labels.pop()) for key, labels in by_text.items() if len(labels) == 1]
    rng = random.Random(seed)
    rng.shuffle(items)
    per_label = test_size // 2
    taken = {"positive": 0, "negative": 0}
    rows = []
    for text, label in items:
        split = "train"
        if taken[label] < per_label:
            taken[label] += 1
            split = "test"
        rows.append(
            {
                "prompt": SENTIMENT_PROMPT.format(text=text),
                "answer": f" {label}",
                "choices": list(SENTIMENT_CHOICES),
                "split": split,
            }
        )
    return rows


def analogy_rows(
    source: Sequence[dict],
    held_out: float = ANALOGY_HELD_OUT,
    shots: int = ANALOGY_SHOTS,
    train_prompts_per_pair: int = 4,
    test_prompts_per_pair: int = 2,
    seed: int = DATA_SEED,
) -> list[dict]:
    """Task rows from analogy questions: per relation, its word pairs ``(a, b)``; ``held_out`` of them (at least
    one) become test queries ``c : ?`` with answer ``d``. Training pairs are those sharing no word with any held-out
    pair of any relation. Each held-out pair is asked ``test_prompts_per_pair`` times with different
    examples. Every prompt is ``shots`` example lines ``a : b`` from training pairs of the same relation,
    then ``c :``; training prompts query training pairs (never an example of themselves)."""
    rng = random.Random(seed)
    pairs: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for row in source:
        for pair in ((row["a"], row["b"]), (row["c"], row["d"])):
            if pair not in pairs[row["relation"]]:
                pairs[row["relation"]].append(pair)
    test_pairs: dict[str, list[tuple[str, str]]] = {}
    held_words: set[str] = set()
    for relation, members in sorted(pairs.items()):
        shuffled = sorted(members)
        rng.shuffle(shuffled)
        count = max(1, round(held_out * len(shuffled)))
        test_pairs[relation] = shuffled[:count]
        held_words.update(word.lower() for pair in shuffled[:count] for word in pair)
    rows = []
    for relation, members in sorted(pairs.items()):
        train_pairs = [p for p in sorted(members) if not {p[0].lower(), p[1].lower()} & held_words]
        if len(train_pairs) < shots + 1:
            continue  # too few training pairs for examples; the relation is left out
        for c, d in test_pairs[relation]:
            for _ in range(test_prompts_per_pair):
                rows.append(_analogy_row(rng.sample(train_pairs, shots), c, d, "test"))
        for c, d in train_pairs:
            others = [p for p in train_pairs if p != (c, d)]
            for _ in range(train_prompts_per_pair):
                rows.append(_analogy_row(rng.sample(others, shots), c, d, "train"))
    return rows


def _analogy_row(examples: Sequence[tuple[str, str]], c: str, d: str, split: str) -> dict:
    lines = [f"{a} : {b}" for a, b in examples]
    return {"prompt": "\n".join([*lines, f"{c} :"]), "answer": f" {d}", "split": split}


def builtin_tasks(test_rows: int, folder: Path) -> list[Path]:
    """Write the two built-in tasks in the task format under ``folder``; returns their paths."""
    reviews = data_dir() / "movie_reviews.jsonl"
    analogies = data_dir() / "analogies.jsonl"
    for path in (reviews, analogies):
        if not path.is_file():
            raise TaskError(f"{path} is missing; run `make setup` (its asset step writes it)")
    folder.mkdir(parents=True, exist_ok=True)
    sentiment = folder / "sentiment.jsonl"
    write_jsonl(sentiment, sentiment_rows(read_jsonl(reviews), test_rows))
    analogy = folder / "analogy.jsonl"
    write_jsonl(analogy, analogy_rows(read_jsonl(analogies)))
    return [sentiment, analogy]


def subsample(task: Task, train_rows: int, test_rows: int, seed: int = DATA_SEED) -> Task:
    """At most ``train_rows`` training and ``test_rows`` test rows, drawn once with a fixed seed (the same rows for
    every arm and seed)."""
    rng = random.Random(f"{seed}:{task.name}")
    train = rng.sample(task.train, min(train_rows, len(task.train)))
    test = rng.sample(task.test, min(test_rows, len(task.test)))
    return Task(task.name, train, test)
