"""The data of the reproduction: five rule-generated multiple-choice tasks in the commonsense_170k format (one per
answer format of the eight commonsense sets; train and test disjoint by construction), written where a run's YAML
finds them, and the Lee test texts for perplexity."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.common import read_lee_texts

DATA_SEED = 1234  # the task data is the same for every run and seed

CATEGORIES: dict[str, list[str]] = {
    "fruit": "apple banana cherry grape lemon mango peach pear plum strawberry watermelon pineapple apricot "
    "kiwi raspberry coconut".split(),
    "vegetable": "carrot potato onion cabbage lettuce spinach broccoli cucumber celery radish turnip garlic "
    "pumpkin beetroot leek cauliflower".split(),
    "mammal": "dog cat horse cow sheep goat lion tiger bear wolf rabbit mouse elephant giraffe monkey "
    "zebra".split(),
    "bird": "sparrow eagle owl parrot pigeon crow duck goose swan robin penguin ostrich hawk flamingo "
    "peacock pelican".split(),
    "fish": "salmon trout tuna cod shark carp herring sardine goldfish catfish mackerel perch pike eel "
    "haddock halibut".split(),
    "tool": "hammer screwdriver wrench saw drill chisel pliers shovel rake axe spanner crowbar trowel mallet "
    "hacksaw sledgehammer".split(),
    "vehicle": "car bus truck bicycle motorcycle train tram van taxi tractor scooter lorry ambulance jeep "
    "minibus limousine".split(),
    "musical instrument": "piano guitar violin drum flute trumpet cello harp saxophone clarinet trombone "
    "banjo ukulele oboe tuba accordion".split(),
    "color": "red blue green yellow purple pink brown black white gray violet turquoise crimson beige "
    "maroon magenta".split(),
    "piece of furniture": "chair table sofa bed desk wardrobe bookcase stool bench dresser cupboard armchair "
    "couch cabinet ottoman sideboard".split(),
    "country": "France Germany Japan Brazil Canada Egypt India Kenya Mexico Norway Peru Spain Italy Chile "
    "Sweden Vietnam".split(),
    "part of the body": "hand foot knee elbow shoulder ankle wrist finger toe nose ear chin neck thumb hip "
    "eyebrow".split(),
}

BOOL_TEMPLATES = (
    "is {word} an example of a {category}?",
    "is {word} a kind of {category}?",
    "would you call {word} a {category}?",
)

GOALS: list[tuple[str, str]] = [
    ("cut a sheet of paper", "use a pair of scissors"),
    ("drive a nail into wood", "hit it with a hammer"),
    ("boil water for tea", "heat it in a kettle"),
    ("keep milk fresh", "store it in the fridge"),
    ("dry wet hair", "use a hair dryer"),
    ("see in a dark room", "switch on a lamp"),
    ("tighten a loose screw", "turn it with a screwdriver"),
    ("dig a hole in the garden", "use a shovel"),
    ("sweep the kitchen floor", "use a broom"),
    ("measure the length of a table", "use a tape measure"),
    ("open a locked door", "turn the key in the lock"),
    ("wash dirty dishes", "scrub them with soap and hot water"),
    ("keep rain off your head", "hold an umbrella"),
    ("cool down a hot drink", "add a few ice cubes"),
    ("brush your teeth", "use a toothbrush and toothpaste"),
    ("find your way in a new city", "look at a map"),
    ("take a photo of a sunset", "use a camera"),
    ("wake up on time", "set an alarm clock"),
    ("iron a wrinkled shirt", "press it with a hot iron"),
    ("light a candle", "strike a match"),
    ("clean a dusty shelf", "wipe it with a damp cloth"),
    ("cut the grass", "push a lawn mower over it"),
    ("stay warm in winter", "wear a thick coat"),
    ("peel a potato", "use a vegetable peeler"),
    ("water the plants", "use a watering can"),
    ("toast a slice of bread", "put it in a toaster"),
    ("read very small print", "use a magnifying glass"),
    ("protect your eyes from bright sun", "wear sunglasses"),
    ("weigh a bag of flour", "put it on a kitchen scale"),
    ("catch a fish in a lake", "use a fishing rod"),
    ("paint a wall", "use a paint roller"),
    ("saw a plank in half", "use a hand saw"),
    ("keep soup warm", "cover the pot with a lid"),
    ("carry water on a hike", "fill a water bottle"),
    ("remove a stain from a shirt", "wash it with stain remover"),
    ("reach a high shelf", "stand on a step ladder"),
    ("hang a picture on the wall", "use a nail and a hook"),
    ("unblock a sink", "use a plunger"),
    ("write a note", "use a pen and paper"),
    ("keep bread from going stale", "seal it in a bag"),
]

# One comparison a line: comparative | what the greater one did | what the lesser one did
COMPARISONS: list[tuple[str, ...]] = [
    tuple(line.split(" | "))
    for line in """
taller | reached the top shelf without a ladder | needed a ladder to reach the top shelf
stronger | carried the heavy box alone | needed help to carry the heavy box
faster | won the race | lost the race
older | was born first | was born later
richer | bought the expensive car | could not afford the expensive car
hungrier | ate the whole pizza | ate only one slice
louder | was heard across the hall | could barely be heard
heavier | made the scale show the bigger number | made the scale show the smaller number
more tired | fell asleep first | stayed awake longer
more careful | made no mistakes | made many mistakes
more generous | gave away more money | gave away less money
shyer | stayed quiet at the party | talked to everyone at the party
""".strip().splitlines()
]

NAMES = (
    "Adam Alice Ben Beth Carl Clara Dan Diana Eric Emma Frank Fiona George Grace Henry Hannah Ivan Iris Jack "
    "Julia Kevin Kate Leo Laura Mark Maria Nick Nina Oscar Olivia Paul Paula Ryan Rachel Sam Sarah Tom Tina "
    "Victor Vera"
).split()


def _split(items: Sequence, test_fraction: float, rng: random.Random) -> tuple[list, list]:
    """Shuffle and cut: (train keys, test keys); both non-empty."""
    items = list(items)
    rng.shuffle(items)
    cut = max(1, round(len(items) * test_fraction))
    return items[cut:], items[:cut]


def _choices(correct: str, distractors: Sequence[str], position: int, rng: random.Random) -> list[str]:
    """Options with ``correct`` at 1-based ``position`` and the distractors shuffled around it."""
    options = list(distractors)
    rng.shuffle(options)
    options.insert(position - 1, correct)
    return options


def _mc_row(instruction: str, answer: str) -> dict[str, str]:
    """One row in the commonsense_170k format."""
    return {
        "instruction": instruction,
        "input": "",
        "output": f"the correct answer is {answer}",
        "answer": answer,
    }


class RuleTasks:
    """Generators for the five rule tasks. Keys (words, goals, number pairs, sequences, names) are split once
    into disjoint train/test partitions, so no test item can be answered by recalling a training item. Each
    generator takes the split (``part``: 0 train, 1 test) and the 1-based position of the correct answer, which
    the caller cycles so that labels are exactly balanced (a constant answer scores chance, not more)."""

    def __init__(self, seed: int = DATA_SEED):
        rng = random.Random(seed)
        self.words = {c: _split(ws, 0.25, rng) for c, ws in CATEGORIES.items()}
        self.goals = _split(range(len(GOALS)), 0.25, rng)
        pairs = [
            (op, a, b)
            for op in ("plus", "minus")
            for a in range(2, 40)
            for b in range(2, 40)
            if op == "plus" or a > b
        ]
        self.pairs = _split(pairs, 0.2, rng)
        seqs = [(start, step, sign) for start in range(1, 30) for step in range(2, 10) for sign in (1, -1)]
        self.sequences = _split(seqs, 0.2, rng)
        self.names = _split(NAMES, 0.25, rng)

    def rule_boolq(self, rng: random.Random, part: int, position: int) -> dict:
        category = rng.choice(sorted(CATEGORIES))
        if position == 1:
            word, answer = rng.choice(self.words[category][part]), "true"
        else:
            other = rng.choice(sorted(c for c in CATEGORIES if c != category))
            word, answer = rng.choice(self.words[other][part]), "false"
        question = rng.choice(BOOL_TEMPLATES).format(word=word, category=category)
        return _mc_row(
            f"Please answer the following question with true or false, question: {question}\n\n"
            "Answer format: true/false",
            answer,
        )

    def rule_piqa(self, rng: random.Random, part: int, position: int) -> dict:
        goal, solution = GOALS[rng.choice(self.goals[part])]
        wrong = GOALS[rng.choice([i for i in range(len(GOALS)) if GOALS[i][1] != solution])][1]
        options = _choices(solution, [wrong], position, rng)
        return _mc_row(
            f"Please choose the correct solution to the question: How do I {goal}?\n\n"
            f"Solution1: {options[0]}\n\nSolution2: {options[1]}\n\nAnswer format: solution1/solution2",
            f"solution{position}",
        )

    def rule_arc(self, rng: random.Random, part: int, position: int) -> dict:
        op, a, b = rng.choice(self.pairs[part])
        value = a + b if op == "plus" else a - b
        near = [value + d for d in (-10, -2, -1, 1, 2, 10) if value + d >= 0 and value + d != value]
        options = _choices(str(value), [str(v) for v in rng.sample(near, 3)], position, rng)
        listed = " ".join(f"Answer{k + 1}: {o}" for k, o in enumerate(options))
        return _mc_row(
            f"Please choose the correct answer to the question: What is {a} {op} {b}?\n\n{listed}\n\n"
            "Answer format: answer1/answer2/answer3/answer4",
            f"answer{position}",
        )

    def rule_hellaswag(self, rng: random.Random, part: int, position: int) -> dict:
        start, step, sign = rng.choice(self.sequences[part])
        if sign < 0:
            start += 5 * step  # counting down stays positive
        terms = [start + sign * step * k for k in range(5)]
        shown, nxt = terms[:4], terms[4]
        wrong = {nxt + 1, nxt - 1, terms[3], nxt + sign * step, start}
        wrong.discard(nxt)
        options = _choices(f"{nxt}.", [f"{w}." for w in rng.sample(sorted(wrong), 3)], position, rng)
        direction = "up" if sign > 0 else "down"
        listed = " ".join(f"Ending{k + 1}: {o}" for k, o in enumerate(options))
        return _mc_row(
            "Please choose the correct ending to complete the given sentence: "
            f"Counting {direction} in steps of {step}, a child says {', '.join(map(str, shown))}, and then\n\n"
            f"{listed}\n\nAnswer format: ending1/ending2/ending3/ending4",
            f"ending{position}",
        )

    def rule_winogrande(self, rng: random.Random, part: int, position: int) -> dict:
        comparative, greater, lesser = rng.choice(COMPARISONS)
        first, second = rng.sample(self.names[part], 2)
        fits_first = rng.random() < 0.5
        sentence = f"{first} is {comparative} than {second}, so _ {greater if fits_first else lesser}."
        options = _choices(first if fits_first else second, [second if fits_first else first], position, rng)
        return _mc_row(
            "Please choose the correct answer to fill in the blank to complete the given sentence: "
            f"{sentence}\n\nOption1: {options[0]} Option2: {options[1]} Answer format: option1/option2",
            f"option{position}",
        )

    @property
    def generators(self) -> dict[str, tuple[Callable[[random.Random, int, int], dict], int]]:
        """Task name -> (generator, number of answer options)."""
        return {
            "rule_boolq": (self.rule_boolq, 2),
            "rule_piqa": (self.rule_piqa, 2),
            "rule_arc": (self.rule_arc, 4),
            "rule_hellaswag": (self.rule_hellaswag, 4),
            "rule_winogrande": (self.rule_winogrande, 2),
        }


def make_rule_data(train_per_task: int, test_per_task: int, seed: int = DATA_SEED) -> tuple[list[dict], dict]:
    """(training rows of all tasks, shuffled; {task: test rows}). Rows are unique within a split and no test
    instruction occurs in training (checked)."""
    tasks = RuleTasks(seed)
    rng = random.Random(seed + 1)
    train: list[dict] = []
    tests: dict[str, list[dict]] = {}
    for name, (generate, num_options) in tasks.generators.items():
        for part, count, sink in ((0, train_per_task, train), (1, test_per_task, None)):
            rows, seen, attempts = [], set(), 0
            while len(rows) < count:
                attempts += 1
                if attempts > 200 * count:
                    raise RuntimeError(f"{name}: cannot draw {count} distinct rows for split {part}")
                row = generate(rng, part, len(rows) % num_options + 1)
                if row["instruction"] not in seen:
                    seen.add(row["instruction"])
                    rows.append(row)
            if sink is None:
                tests[name] = rows
            else:
                sink.extend(rows)
    train_instructions = {row["instruction"] for row in train}
    leaked = [r for rows in tests.values() for r in rows if r["instruction"] in train_instructions]
    if leaked:
        raise RuntimeError(f"{len(leaked)} test rows also occur in training")
    rng.shuffle(train)
    return train, tests


@dataclass(frozen=True)
class TaskData:
    """What every run trains and is tested on: the rule tasks' rows, the Lee test texts and the files a run's
    YAML names (``train``: the training rows, ``prepared``: Axolotl's tokenized cache)."""

    train_rows: list[dict]
    tests: dict[str, list[dict]]
    lee_texts: list[str]
    paths: dict[str, Path]


def prepare_data(train_per_task: int, test_per_task: int, lee_test_texts: int, workdir: Path) -> TaskData:
    """Generate the rule tasks, write the training rows to ``<workdir>/data/rule_commonsense_train.json`` and each
    task's test rows to ``<workdir>/data/<task>/test.json``, and take the first ``lee_test_texts`` Lee test texts."""
    train_rows, tests = make_rule_data(train_per_task, test_per_task)
    paths = {"train": workdir / "data" / "rule_commonsense_train.json", "prepared": workdir / "prepared"}
    paths["train"].parent.mkdir(parents=True, exist_ok=True)
    paths["train"].write_text(json.dumps(train_rows, indent=1), encoding="utf-8")
    for name, rows in tests.items():
        (workdir / "data" / name).mkdir(exist_ok=True)
        (workdir / "data" / name / "test.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
    lee_texts = read_lee_texts("lee_test.jsonl")[:lee_test_texts]
    return TaskData(train_rows, tests, lee_texts, paths)
