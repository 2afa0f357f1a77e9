"""Small-scale reproduction of the ShareLoRA claim on the embedded SmolLM2-135M-Instruct, CPU only.

    python bench/reproduce_small.py            # full run (`make reproduce`), about 50-55 min on 2 free CPU cores
    python bench/reproduce_small.py --quick    # the same pipeline on a couple of steps, about 4 min
    python bench/reproduce_small.py --threads 1   # on a machine shared with other work (2 contending threads
                                                  # run several times slower than 1)
    python bench/reproduce_small.py --seeds 0 --steps 40   # a shorter measurement
    python bench/reproduce_small.py --render   # rebuild the .md/.png from bench/results/reproduce_small.json

A finished run is reused when its generated YAML and share plan are unchanged (``--fresh`` retrains), so an
interrupted full run resumes where it stopped.

The paper's claim: at the same settings ShareLoRA reaches LoRA's accuracy with ~77-80 % of the trainable
parameters, and similarity-chosen share sets beat random adjacent sets (ShareLoRA*) and naive odd/even sharing.
This script measures that claim at a size that runs here, and reports what it finds whichever way it goes.

What runs (every method: same data, same seed(s), same steps, same learning rate, same schedule, LoRA r=8,
alpha 16, dropout 0.05 on q/k/v/up/down — nothing is tuned per method):

* ``lora``               plain LoRA, r = 8 (``adapter: lora``).
* ``sharelora``          ShareLoRA, greedy sets (Algorithm 1) at the ε that shares about one third of the layers
                         (``layers_saved`` closest to L/3, as in the paper), rank 8.
* ``sharelora_rx``       the same sets with rank expansion ``r' = ⌊L / (L − Σ|S| + |S|) · r⌋``.
* ``sharelora_optimal``  exact minimum-module sets (MILP) at the same ε, rank 8.
* ``sharelora_random``   ShareLoRA*: random adjacent sets saving as many layers as greedy (seeded per run).
* ``naive_share``        odd layer uses the even layer's modules: [[0, 1], [2, 3], ...].

Calibration runs once (the plugin's own calibration code on 64 Lee news texts, 16 in ``--quick``); every
ShareLoRA run then gets its plan through ``sharelora.plan_file``, so no run recalibrates. Each run is a real
``python -m axolotl.cli.train`` process with a generated YAML; the adapter it saves is evaluated in this process.

Data — all offline, and said exactly:

* Training: a rule-generated multiple-choice set in the exact ``commonsense_170k.json`` format
  (``instruction``/``input``/``output``/``answer``; LLM-Adapters' instruction wording and answer labels; trained
  with Axolotl's ``type: alpaca`` = the LLM-Adapters template, loss on the whole sequence), mixed with the 300
  Lee news articles (``lee_background.jsonl``, ``type: completion``).
* Five rule tasks, one per answer format of the eight commonsense sets: ``rule_boolq`` (true/false: is a word an
  example of a category), ``rule_piqa`` (solution1/2: which everyday action reaches a goal), ``rule_arc``
  (answer1-4: two-number addition/subtraction), ``rule_hellaswag`` (ending1-4: next number of an arithmetic
  sequence), ``rule_winogrande`` (option1/2: who fits the blank after a comparison). Train and test are disjoint
  by construction: held-out words, goals, number pairs, sequences and names never appear in training.
* Test: accuracy on the rule tasks' test split (24 rows per task, labels exactly balanced so a constant answer
  scores chance) with :mod:`sharelora_plugin.commonsense` (the LLM-Adapters protocol, greedy decoding, 8 new
  tokens); held-out answer loss (mean NLL per response token on the test split); held-out perplexity on the 50
  Lee test articles (``lee_test.jsonl``, first 256 tokens each, never trained on).
* Budget (``FULL``): 48 steps × micro-batch 4 × ≤128 tokens, lr 1e-3 (linear, 4 warmup steps), seeds 0 and 1:
  12 training runs. At this size the model learns the answer format but not the task content (see the caveats
  in the results), so Lee perplexity and the answer loss carry most of the comparison.

Outputs: ``bench/results/reproduce_small.{json,md,png}`` (``--quick``: ``<workdir>/quick/``; ``--results-dir`` to
change), run folders under ``--workdir`` (default ``outputs/reproduce_small``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from sharelora_plugin.commonsense import build_prompt, evaluate_tasks  # noqa: E402
from sharelora_plugin.embedded import data_dir, model_dir  # noqa: E402

OFFLINE_ENV = {
    "AXOLOTL_DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
}
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
LORA_R, LORA_ALPHA, LORA_DROPOUT = 8, 16, 0.05
DATA_SEED = 1234  # the task data is the same for every run and seed
IM_END = "<|im_end|>"


@dataclass(frozen=True)
class Method:
    """One arm of the comparison: how its share plan is made (``None`` = plain LoRA)."""

    name: str
    label: str
    strategy: str | None
    rank_expansion: bool = False


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("lora", "LoRA r=8", None),
        Method("sharelora", "ShareLoRA (greedy)", "greedy"),
        Method("sharelora_rx", "ShareLoRA (greedy) + rank expansion", "greedy", rank_expansion=True),
        Method("sharelora_optimal", "ShareLoRA (optimal)", "optimal"),
        Method("sharelora_random", "ShareLoRA* (random adjacent sets)", "random"),
        Method("naive_share", "Naive share (odd = even)", "alternate"),
    )
}


@dataclass(frozen=True)
class Budget:
    """Sizes that decide the run time; ``--quick`` shrinks all of them."""

    steps: int
    seeds: tuple[int, ...]
    train_per_task: int
    test_per_task: int
    calibration_samples: int
    lee_test_texts: int
    micro_batch_size: int = 4
    sequence_len: int = 128
    learning_rate: float = 1e-3
    eval_batch_size: int = 16
    max_new_tokens: int = 8


FULL = Budget(
    steps=48, seeds=(0, 1), train_per_task=300, test_per_task=24, calibration_samples=64, lee_test_texts=50
)
QUICK = Budget(
    steps=2, seeds=(0,), train_per_task=40, test_per_task=2, calibration_samples=8, lee_test_texts=2
)


# ====================================================================================================================
# Rule-generated multiple-choice tasks in the commonsense_170k format

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

COMPARISONS: list[tuple[str, str, str]] = [
    # (comparative, what the greater one did, what the lesser one did)
    ("taller", "reached the top shelf without a ladder", "needed a ladder to reach the top shelf"),
    ("stronger", "carried the heavy box alone", "needed help to carry the heavy box"),
    ("faster", "won the race", "lost the race"),
    ("older", "was born first", "was born later"),
    ("richer", "bought the expensive car", "could not afford the expensive car"),
    ("hungrier", "ate the whole pizza", "ate only one slice"),
    ("louder", "was heard across the hall", "could barely be heard"),
    ("heavier", "made the scale show the bigger number", "made the scale show the smaller number"),
    ("more tired", "fell asleep first", "stayed awake longer"),
    ("more careful", "made no mistakes", "made many mistakes"),
    ("more generous", "gave away more money", "gave away less money"),
    ("shyer", "stayed quiet at the party", "talked to everyone at the party"),
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


# ====================================================================================================================
# Plans (one calibration, every ShareLoRA variant from it)


def choose_threshold(similarity, num_layers: int) -> float:
    """ε on a 0.001 grid whose greedy plan saves the number of layers closest to L/3 (the paper: "about one
    third of the layers share"; LLaMA-7B saves 10 of 32); ties go to the highest ε."""
    from sharelora_plugin.planning import greedy_share_sets, layers_saved

    target = num_layers / 3
    best: tuple[float, float] | None = None  # (distance, -threshold)
    for step in range(500, 1000):
        threshold = step / 1000
        saved = layers_saved(greedy_share_sets(similarity, threshold))
        key = (abs(saved - target), -threshold)
        if best is None or key < best:
            best = key
    return -best[1]


def _num_layers() -> int:
    config = json.loads((model_dir() / "config.json").read_text(encoding="utf-8"))
    return int(config["num_hidden_layers"])


def calibrate_once(samples: int, workdir: Path, log: Callable[[str], None]):
    """Run the plugin's calibration (``workflow.run_calibration``) on ``samples`` Lee background texts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sharelora_plugin.args import ShareLoRAConfig
    from sharelora_plugin.workflow import run_calibration

    settings = ShareLoRAConfig(
        calibration={
            "path": str(data_dir() / "lee_background.jsonl"),
            "num_samples": samples,
            "max_length": 256,
            "batch_size": 16,
        }
    ).model_dump()
    model = AutoModelForCausalLM.from_pretrained(model_dir(), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir())
    start = time.perf_counter()
    result = run_calibration(model, tokenizer, settings, {"base_model": str(model_dir())})
    log(
        f"calibration: {result.num_samples} texts, {result.num_tokens} tokens, {time.perf_counter() - start:.1f} s"
    )
    del model
    return result, settings


def make_plans(result, settings: dict, seeds: Sequence[int], methods: Sequence[str], workdir: Path) -> dict:
    """Plan files per (method, seed) from one calibration; returns {method: {seed: path}} and the ε used."""
    from sharelora_plugin.planning import PlanError
    from sharelora_plugin.workflow import plan_from_calibration

    similarity = result.similarity(settings["metric"])
    threshold = choose_threshold(similarity, result.num_layers)
    plans: dict[str, dict[int, Path]] = {}
    for name in methods:
        method = METHODS[name]
        if method.strategy is None:
            continue
        plans[name] = {}
        # Only ShareLoRA* depends on the seed; the others are one plan reused for every seed.
        for seed in seeds if method.strategy == "random" else seeds[:1]:
            plan_settings = {
                **settings,
                "strategy": method.strategy,
                "threshold": threshold,
                "rank_expansion": method.rank_expansion,
                "seed": seed,
            }
            try:
                plan = plan_from_calibration(result, plan_settings, LORA_R)
            except PlanError as err:
                raise RuntimeError(f"{name}: could not make a plan at ε={threshold}: {err}") from None
            plan.metadata["model"] = str(model_dir())
            path = workdir / "plans" / f"{name}_seed{seed}.json"
            plan.save(path)
            plans[name][seed] = path
        if method.strategy != "random":
            plans[name] = {seed: plans[name][seeds[0]] for seed in seeds}
    return {"files": plans, "threshold": threshold}


# ====================================================================================================================
# Training (one axolotl.cli.train process per method and seed)


def run_config(
    method: Method, seed: int, budget: Budget, paths: dict, plan_file: Path | None, out: Path
) -> dict:
    """The Axolotl YAML of one run. Everything except the adapter block is identical across methods."""
    cfg: dict[str, Any] = {
        "base_model": str(model_dir()),
        "model_type": "AutoModelForCausalLM",
        "tokenizer_type": "AutoTokenizer",
        "datasets": [
            {"path": str(paths["train"]), "type": "alpaca"},
            {"path": str(data_dir() / "lee_background.jsonl"), "type": "completion", "field": "text"},
        ],
        "dataset_prepared_path": str(paths["prepared"]),
        "val_set_size": 0,
        "train_on_inputs": True,
        "output_dir": str(out),
        "sequence_len": budget.sequence_len,
        "sample_packing": False,
        "micro_batch_size": budget.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "max_steps": budget.steps,
        "num_epochs": 1,
        "optimizer": "adamw_torch",
        "lr_scheduler": "linear",
        "learning_rate": budget.learning_rate,
        "warmup_steps": max(1, budget.steps // 10),
        "weight_decay": 0.0,
        "logging_steps": max(1, budget.steps // 10),
        "save_strategy": "no",
        "seed": seed,
        "lora_r": LORA_R,
        "lora_alpha": LORA_ALPHA,
        "lora_dropout": LORA_DROPOUT,
        "lora_target_modules": TARGET_MODULES,
        "bf16": False,
        "fp16": False,
        "tf32": False,
        "flash_attention": False,
        "sdp_attention": False,
        "gradient_checkpointing": False,
        "special_tokens": {"eos_token": IM_END, "pad_token": IM_END},
    }
    if method.strategy is None:
        cfg["adapter"] = "lora"
    else:
        cfg["plugins"] = ["sharelora_plugin.ShareLoRAPlugin"]
        cfg["adapter"] = "sharelora"
        # The plan (sets, rank) comes from plan_file; strategy only documents how it was made.
        cfg["sharelora"] = {"strategy": method.strategy, "plan_file": str(plan_file), "save_heatmap": False}
    return cfg


def _last_float(pattern: str, text: str) -> float | None:
    found = re.findall(pattern, text)
    return float(found[-1]) if found else None


def train_run(cfg: dict, out: Path, log: Callable[[str], None]) -> dict:
    """Run ``python -m axolotl.cli.train`` on ``cfg``; wall time, the trainer's train_runtime and train loss."""
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "run.yml"
    config_path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    log_path = out / "train.log"
    env = {**os.environ, **OFFLINE_ENV}
    start = time.perf_counter()
    with log_path.open("w", encoding="utf-8") as handle:
        proc = subprocess.run(
            [sys.executable, "-m", "axolotl.cli.train", str(config_path)],
            cwd=REPO,
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            check=False,
        )
    wall = time.perf_counter() - start
    text = log_path.read_text(encoding="utf-8", errors="replace")
    if proc.returncode != 0 or not (out / "adapter_config.json").is_file():
        tail = "\n".join(text.splitlines()[-40:])
        raise RuntimeError(f"training failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    return {
        "wall_seconds": round(wall, 2),
        "train_seconds": _last_float(r"'train_runtime': '?([0-9.]+)", text),
        "train_loss": _last_float(r"'train_loss': '?([0-9.]+)", text),
    }


# ====================================================================================================================
# Evaluation


def count_adapter_parameters(adapter_dir: Path) -> dict:
    """Distinct LoRA parameters of a saved adapter. A ShareLoRA adapter is saved as a plain LoRA with equal
    copies in every member of a share set; the copies are checked equal and counted once."""
    from safetensors.torch import load_file

    from sharelora_plugin.planning import SharePlan

    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    plan_path = adapter_dir / "sharelora_plan.json"
    leader_of: dict[int, int] = {}
    if plan_path.is_file():
        plan = SharePlan.load(plan_path)
        leader_of = {m: s[0] for s in plan.share_sets for m in s[1:]}
    layer_re = re.compile(r"\.layers\.(\d+)\.")
    total = distinct = 0
    for key, tensor in tensors.items():
        total += tensor.numel()
        match = layer_re.search(key)
        layer = int(match.group(1)) if match else None
        if layer in leader_of:
            lead_key = layer_re.sub(f".layers.{leader_of[layer]}.", key, count=1)
            if not (tensors[lead_key].shape == tensor.shape and bool((tensors[lead_key] == tensor).all())):
                raise RuntimeError(f"{adapter_dir}: {key} differs from its share-set leader {lead_key}")
            continue
        distinct += tensor.numel()
    return {"saved_params": total, "trainable_params": distinct, "ties_verified": bool(leader_of)}


def response_loss(model, tokenizer, rows: Sequence[dict], batch_size: int = 16) -> float:
    """Mean NLL per response token (``output`` + eos) given the alpaca prompt, over held-out rows. The LM head
    runs on the response positions only (the 49k-word vocabulary projection of every prompt token would
    cost as much as the rest of the model)."""
    import torch

    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    total_nll, total_tokens = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            ids, labels = [], []
            for row in chunk:
                prompt = tokenizer(build_prompt(row["instruction"], row.get("input")))["input_ids"]
                answer = tokenizer(row["output"])["input_ids"] + [tokenizer.eos_token_id]
                ids.append(prompt + answer)
                labels.append([-100] * len(prompt) + answer)
            width = max(map(len, ids))
            pad = tokenizer.pad_token_id
            input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids])
            mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
            target = torch.tensor([y + [-100] * (width - len(y)) for y in labels])
            hidden = causal.model(input_ids=input_ids, attention_mask=mask).last_hidden_state[:, :-1]
            scored = target[:, 1:] != -100
            logits = causal.lm_head(hidden[scored]).float()
            total_nll += float(
                torch.nn.functional.cross_entropy(logits, target[:, 1:][scored], reduction="sum")
            )
            total_tokens += int(scored.sum())
    return total_nll / max(1, total_tokens)


def text_loss(model, tokenizer, texts: Sequence[str], max_length: int = 256, batch_size: int = 4) -> float:
    """Token-weighted mean NLL of ``texts`` (first ``max_length`` tokens each); perplexity is its exp."""
    import torch

    total_nll, total_tokens = 0.0, 0
    model.eval()
    tokenizer.padding_side = "right"
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(
                list(texts[start : start + batch_size]),
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=max_length,
            )
            logits = model(**enc).logits[:, :-1].float()
            target = enc["input_ids"][:, 1:].masked_fill(enc["attention_mask"][:, 1:] == 0, -100)
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="sum"
            )
            total_nll += float(nll)
            total_tokens += int((target != -100).sum())
    return total_nll / max(1, total_tokens)


def evaluate_model(adapter_dir: Path | None, tests: dict, lee_texts: list[str], budget: Budget) -> dict:
    """Accuracy (LLM-Adapters protocol, greedy), held-out response loss and Lee perplexity of base (+ adapter)."""
    from sharelora_plugin.commonsense import load_model_and_tokenizer

    start = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(
        str(model_dir()), str(adapter_dir) if adapter_dir else None, device="cpu", dtype="float32"
    )
    report = evaluate_tasks(
        model,
        tokenizer,
        tests,
        batch_size=budget.eval_batch_size,
        num_beams=1,
        max_new_tokens=budget.max_new_tokens,
        progress=False,
    )
    all_rows = [row for rows in tests.values() for row in rows]
    answer_loss = response_loss(model, tokenizer, all_rows, batch_size=budget.eval_batch_size)
    lee_loss = text_loss(model, tokenizer, lee_texts)
    return {
        "accuracy": {name: round(r.accuracy, 6) for name, r in report.tasks.items()},
        "average_accuracy": round(report.average, 6),
        "unanswered": sum(r.unanswered for r in report.tasks.values()),
        "num_test": sum(r.total for r in report.tasks.values()),
        "heldout_answer_loss": round(answer_loss, 6),
        "lee_loss": round(lee_loss, 6),
        "lee_ppl": round(math.exp(lee_loss), 4),
        "eval_seconds": round(time.perf_counter() - start, 2),
        "sample_outputs": {
            name: [r.predictions[0]["output_pred"]] for name, r in list(report.tasks.items())[:2]
        },
    }


# ====================================================================================================================
# Summary and outputs


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(runs: list[dict], methods: Sequence[str]) -> list[dict]:
    """Per method: params, fraction of LoRA, time, losses and accuracy as mean and spread (sample std) over seeds."""
    lora_params = next((r["trainable_params"] for r in runs if r["method"] == "lora"), None)
    rows = []
    for name in methods:
        mine = [r for r in runs if r["method"] == name]
        if not mine:
            continue
        params = mine[0]["trainable_params"]
        row = {
            "method": name,
            "label": METHODS[name].label,
            "seeds": [r["seed"] for r in mine],
            "trainable_params": params,
            "params_by_seed": sorted({r["trainable_params"] for r in mine}),
            "fraction_of_lora": round(statistics.fmean(r["trainable_params"] for r in mine) / lora_params, 4)
            if lora_params
            else None,
            "rank": mine[0]["rank"],
        }
        for key in (
            "train_seconds",
            "wall_seconds",
            "train_loss",
            "heldout_answer_loss",
            "lee_ppl",
            "average_accuracy",
        ):
            mean, std = _mean_std([r[key] for r in mine])
            row[key] = {"mean": round(mean, 6), "std": round(std, 6)}
        tasks = mine[0]["accuracy"].keys()
        row["accuracy"] = {t: round(statistics.fmean(r["accuracy"][t] for r in mine), 6) for t in tasks}
        row["no_answer_rate"] = round(statistics.fmean(r["unanswered"] / r["num_test"] for r in mine), 6)
        rows.append(row)
    return rows


def chance_accuracy(tests: dict[str, list[dict]]) -> float:
    """Mean over tasks of 1/number of labels: what a constant (or random) answer scores on balanced tests."""
    from sharelora_plugin.commonsense import infer_answer_format

    sizes = [len({r["answer"] for r in rows}) for rows in tests.values()]
    for name, rows in tests.items():
        infer_answer_format(name, rows)  # fails loudly on a malformed task
    return statistics.fmean(1.0 / n for n in sizes)


def _verdict(delta: float, spread: float) -> str:
    """How a difference reads against the seed spread (with one seed there is no spread to judge by)."""
    if abs(delta) < 1e-9:
        return "equal to"
    if abs(delta) <= spread:
        return "within the seed spread of"
    return "higher than" if delta > 0 else "lower than"


def findings(summary: list[dict], quick: bool, chance: float | None = None) -> list[str]:
    """Plain statements of what the numbers say, written whichever way they go. Losses: lower is better."""
    by = {row["method"]: row for row in summary}
    lines = []
    if quick:
        lines.append(
            "QUICK RUN: a couple of training steps per method — a pipeline check, not a measurement. "
            "Run without --quick for the result."
        )
    if summary and len(summary[0]["seeds"]) < 2:
        lines.append("One seed: there is no seed spread, so any difference below is unqualified by noise.")
    if chance is not None and summary:
        best = max(row["average_accuracy"]["mean"] for row in summary)
        worst = min(row["average_accuracy"]["mean"] for row in summary)
        near = all(abs(row["average_accuracy"]["mean"] - chance) <= 0.05 for row in summary)
        lines.append(
            f"Accuracy ranges {100 * worst:.1f}–{100 * best:.1f}% against {100 * chance:.1f}% for a constant answer"
            + (
                ": every method is at chance on the rule tasks, so accuracy does not separate the methods "
                "here; the held-out losses do."
                if near
                else "."
            )
        )
    lora = by.get("lora")
    for name, row in by.items():
        if name == "lora" or lora is None:
            continue
        acc, ref = row["average_accuracy"], lora["average_accuracy"]
        delta = acc["mean"] - ref["mean"]
        ppl, ref_ppl = row["lee_ppl"], lora["lee_ppl"]
        loss, ref_loss = row["heldout_answer_loss"], lora["heldout_answer_loss"]
        lines.append(
            f"{row['label']} ({100 * row['fraction_of_lora']:.0f}% of LoRA's trainable parameters): accuracy "
            f"{100 * acc['mean']:.1f}% vs {100 * ref['mean']:.1f}% ({_verdict(delta, max(acc['std'], ref['std']))} "
            f"LoRA); Lee perplexity {ppl['mean']:.3f} vs {ref_ppl['mean']:.3f} "
            f"({_verdict(ppl['mean'] - ref_ppl['mean'], max(ppl['std'], ref_ppl['std']))} LoRA); held-out answer "
            f"loss {loss['mean']:.4f} vs {ref_loss['mean']:.4f} "
            f"({_verdict(loss['mean'] - ref_loss['mean'], max(loss['std'], ref_loss['std']))} LoRA)."
        )
    greedy = by.get("sharelora")
    for other, what in (
        ("sharelora_random", "random adjacent sets (ShareLoRA*)"),
        ("naive_share", "naive odd/even"),
    ):
        row = by.get(other)
        if greedy and row:
            ppl, ref = greedy["lee_ppl"], row["lee_ppl"]
            lines.append(
                f"Similarity-chosen (greedy) sets vs {what}: Lee perplexity {ppl['mean']:.3f} vs {ref['mean']:.3f} "
                f"({_verdict(ppl['mean'] - ref['mean'], max(ppl['std'], ref['std']))} it), accuracy "
                f"{100 * greedy['average_accuracy']['mean']:.1f}% vs {100 * row['average_accuracy']['mean']:.1f}%, "
                f"at {100 * greedy['fraction_of_lora']:.0f}% vs {100 * row['fraction_of_lora']:.0f}% of LoRA's parameters."
            )
    return lines


def write_markdown(report: dict, path: Path) -> None:
    s = report["settings"]
    lines = [
        "# ShareLoRA small-scale reproduction (SmolLM2-135M, CPU)",
        "",
        f"**{'QUICK RUN (--quick): pipeline check only, not a result' if report['quick'] else 'Full run'}** — "
        f"created {report['created']} by `{report['command']}` on {report['machine']['cpus']} CPU cores: "
        f"{report['total_minutes']:.1f} min for this invocation; training + evaluation summed over the "
        f"{len(report['runs'])} runs {report['run_minutes']:.1f} min"
        + (f" ({report['reused_runs']} reused from an earlier invocation)" if report["reused_runs"] else "")
        + ".",
        "",
        "## Setup",
        "",
        f"- Model: embedded SmolLM2-135M-Instruct ({s['num_layers']} decoder layers), LoRA r={LORA_R}, α={LORA_ALPHA}, "
        f"dropout {LORA_DROPOUT}, targets {', '.join(TARGET_MODULES)}.",
        f"- Training (identical for every method): {s['steps']} steps × micro-batch {s['micro_batch_size']} "
        f"(sequence_len {s['sequence_len']}), AdamW, lr {s['learning_rate']}, linear schedule, "
        f"{s['warmup_steps']} warmup steps, seeds {s['seeds']}. Loss on the whole sequence "
        "(LLM-Adapters' train_on_inputs).",
        f"- Training data: {s['data']['train_rows']} rule-generated multiple-choice rows in the commonsense_170k "
        "format (5 tasks, see the script's docstring) + the 300 Lee news articles (completion).",
        f"- Test data: {s['data']['test_rows']} held-out rule rows ({s['data']['test_per_task']} per task; "
        "words/goals/number pairs/sequences/names disjoint from training), evaluated with "
        "`sharelora_plugin.commonsense` (LLM-Adapters protocol, greedy, "
        f"max_new_tokens {s['max_new_tokens']}); held-out response loss on the same rows; perplexity on "
        f"{s['lee_test_texts']} Lee test articles (first 256 tokens each).",
        f"- Calibration: once, {s['calibration']['num_samples']} Lee background texts (max 256 tokens), angular "
        f"similarity; ε = {s['threshold']} (greedy saves the number of layers closest to L/3). Every ShareLoRA run "
        "loads its plan via `sharelora.plan_file` (no recalibration).",
        "",
        "## Results (mean ± sample std over seeds)",
        "",
        "| Method | Trainable params | % of LoRA | rank | Train time (s) | Train loss | Held-out answer loss | "
        "Lee ppl | Accuracy (%) | No answer (%) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["summary"]:
        acc = row["average_accuracy"]
        lines.append(
            f"| {row['label']} | {row['trainable_params']:,} | {100 * row['fraction_of_lora']:.1f} | {row['rank']} | "
            f"{row['train_seconds']['mean']:.0f} | {row['train_loss']['mean']:.4f} | "
            f"{row['heldout_answer_loss']['mean']:.4f} ± {row['heldout_answer_loss']['std']:.4f} | "
            f"{row['lee_ppl']['mean']:.2f} ± {row['lee_ppl']['std']:.2f} | "
            f"{100 * acc['mean']:.1f} ± {100 * acc['std']:.1f} | {100 * row['no_answer_rate']:.1f} |"
        )
    base = report["base_model"]
    lines.append(
        f"| Base model, no training | 0 | 0 | – | – | – | {base['heldout_answer_loss']:.4f} | {base['lee_ppl']:.2f} | "
        f"{100 * base['average_accuracy']:.1f} | {100 * base['unanswered'] / max(1, base['num_test']):.1f} |"
    )
    lines.append(f"| Constant answer (chance) | | | | | | | | {100 * s['chance_accuracy']:.1f} | 0 |")
    tasks = list(report["summary"][0]["accuracy"]) if report["summary"] else []
    lines += ["", "Per-task accuracy (%), mean over seeds:", ""]
    lines.append("| Method | " + " | ".join(tasks) + " |")
    lines.append("|---|" + "---:|" * len(tasks))
    for row in report["summary"]:
        lines.append(
            f"| {row['label']} | " + " | ".join(f"{100 * row['accuracy'][t]:.1f}" for t in tasks) + " |"
        )
    lines += [
        "",
        "## Share plans",
        "",
        "| Method | seed | sets | layers saved | rank | meets ε |",
        "|---|---|---|---:|---:|---|",
    ]
    for name, by_seed in report["plans"].items():
        for seed, plan in by_seed.items():
            sets = " ".join("{" + ",".join(map(str, s)) + "}" for s in plan["share_sets"])
            lines.append(
                f"| {name} | {seed} | {sets} | {plan['layers_saved']} | {plan['rank']} | {plan['constraint']} |"
            )
    lines += ["", "## Findings", ""] + [f"- {line}" for line in report["findings"]]
    lines += [
        "",
        "## Caveats",
        "",
        "- 135M parameters, a few hundred examples, CPU: this tests whether the mechanism behaves as claimed at "
        "small scale; it is not the paper's 7B/170k-example experiment (use `recipes/llama*_*.yml` for that).",
        f"- {s['data']['test_rows']} test rows: one row of a task is {100 / max(1, s['data']['test_per_task']):.1f} "
        "pts of that task; differences smaller than the seed spread are noise. Lee perplexity and the held-out "
        "answer loss are the smoother signals.",
        "- What to expect from accuracy at this size: the model learns the answer *format* within a few dozen "
        "steps (no-answer rate → 0) but not the task *content*. Pilots before this script (a LoRA r=8 run of this "
        "pipeline at 100 steps: 39.0% vs 40% chance; a plain PEFT loop with loss on the response only, lr 2e-3 "
        "and 5e-3, up to 150 steps, on these and on simpler true/false rules) all stayed at a constant answer.",
        f"- The learning rate ({s['learning_rate']}) is larger than the paper's 2e-4 because the run is "
        f"{s['steps']} steps instead of ~32k; it is the same for every method and was not tuned for any of them.",
        "",
    ]
    path.write_text("\n".join(lines), encoding="utf-8")


def write_plot(report: dict, path: Path) -> None:
    """Accuracy, held-out answer loss and Lee perplexity against trainable parameters (error bars: sample std over
    seeds). Methods with the same parameter count are drawn side by side, a little apart, so none hides another."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(15, 5.4), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 3)
    colors = {
        "lora": "#1f77b4",
        "sharelora": "#d62728",
        "sharelora_rx": "#ff7f0e",
        "sharelora_optimal": "#9467bd",
        "sharelora_random": "#2ca02c",
        "naive_share": "#7f7f7f",
    }
    markers = {
        "lora": "o",
        "sharelora": "s",
        "sharelora_rx": "D",
        "sharelora_optimal": "^",
        "sharelora_random": "v",
        "naive_share": "X",
    }
    summary = report["summary"]
    dodge = 0.015 * max(r["trainable_params"] for r in summary) / 1e6  # x offset of a second method at one x
    seen: dict[int, int] = {}
    panels = (
        (axes[0], "average_accuracy", 100.0, "rule-task accuracy (%)"),
        (axes[1], "heldout_answer_loss", 1.0, "held-out answer loss (lower is better)"),
        (axes[2], "lee_ppl", 1.0, "Lee test perplexity (lower is better)"),
    )
    for row in summary:
        index = seen.get(row["trainable_params"], 0)
        seen[row["trainable_params"]] = index + 1
        x = row["trainable_params"] / 1e6 + dodge * index
        color = colors.get(row["method"], "black")
        for ax, key, scale, _ in panels:
            ax.errorbar(
                x,
                row[key]["mean"] * scale,
                yerr=row[key]["std"] * scale,
                fmt=markers.get(row["method"], "o"),
                markersize=7,
                color=color,
                capsize=4,
                label=row["label"],
            )
    chance = report["settings"].get("chance_accuracy")
    if chance is not None:
        axes[0].axhline(
            100 * chance, color="black", linestyle="--", linewidth=1, label="constant answer (chance)"
        )
    base = report.get("base_model") or {}
    notes = {
        "heldout_answer_loss": f"base model, no training: {base['heldout_answer_loss']:.3f}"
        if "heldout_answer_loss" in base
        else None,
        "lee_ppl": f"base model, no training: {base['lee_ppl']:.2f}" if "lee_ppl" in base else None,
    }
    for ax, key, _, ylabel in panels:
        ax.set_ylabel(ylabel)
        ax.set_xlabel("trainable LoRA parameters (M)")
        ax.grid(alpha=0.3)
        if notes.get(key):  # the base model is far off these scales; a line would flatten the differences
            ax.set_title(notes[key], fontsize=9)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    tag = "QUICK RUN (pipeline check)" if report["quick"] else f"{len(report['settings']['seeds'])} seeds"
    figure.suptitle(f"ShareLoRA vs LoRA on SmolLM2-135M — {tag}; error bars: std over seeds")
    figure.tight_layout(rect=(0, 0.1, 1, 1))
    figure.savefig(path)


# ====================================================================================================================
# Driver


def render(stem: Path) -> int:
    """Rebuild the Markdown and the plot of a finished run from its JSON report."""
    source = stem.with_suffix(".json")
    if not source.is_file():
        print(f"--render: no report at {source}; run the script without --render first", file=sys.stderr)
        return 2
    report = json.loads(source.read_text(encoding="utf-8"))
    report["findings"] = findings(report["summary"], report["quick"], report["settings"]["chance_accuracy"])
    source.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    write_markdown(report, stem.with_suffix(".md"))
    write_plot(report, stem.with_suffix(".png"))
    print(f"rendered {stem}.md/.png from {source}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="a couple of steps, 1 seed, tiny test split (~4 min)"
    )
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, help="override the seeds")
    parser.add_argument("--steps", type=int, help="override the training steps")
    parser.add_argument("--workdir", default=str(REPO / "outputs" / "reproduce_small"))
    parser.add_argument(
        "--results-dir",
        help="where reproduce_small.{json,md,png} go (default: bench/results; with --quick <workdir>/quick, so a "
        "pipeline check never overwrites the committed full-run results)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="torch/OpenMP threads for training and evaluation (default: all cores; use 1 on a busy machine, "
        "where 2 threads contending with other work run several times slower)",
    )
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="retrain every run (default: reuse a run whose YAML is unchanged)",
    )
    parser.add_argument(
        "--render",
        action="store_true",
        help="only rebuild reproduce_small.md/.png (and the findings) from the reproduce_small.json already in "
        "--results-dir; trains and evaluates nothing",
    )
    args = parser.parse_args(argv)
    if args.render:
        return render(Path(args.results_dir or REPO / "bench" / "results") / "reproduce_small")
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
        for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[key] = str(args.threads)

    budget = QUICK if args.quick else FULL
    if args.seeds:
        budget = Budget(**{**budget.__dict__, "seeds": tuple(args.seeds)})
    if args.steps:
        budget = Budget(**{**budget.__dict__, "steps": args.steps})
    methods = [m for m in METHODS if m in args.methods]
    if "lora" not in methods:
        parser.error("--methods must include lora (the baseline every fraction is measured against)")
    workdir = Path(args.workdir)
    if args.results_dir:
        results_dir = Path(args.results_dir)
    else:
        results_dir = workdir / "quick" if args.quick else REPO / "bench" / "results"
    workdir.mkdir(parents=True, exist_ok=True)
    results_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {message}", flush=True)

    train_rows, tests = make_rule_data(budget.train_per_task, budget.test_per_task)
    paths = {"train": workdir / "data" / "rule_commonsense_train.json", "prepared": workdir / "prepared"}
    paths["train"].parent.mkdir(parents=True, exist_ok=True)
    paths["train"].write_text(json.dumps(train_rows, indent=1), encoding="utf-8")
    for name, rows in tests.items():
        (workdir / "data" / name).mkdir(exist_ok=True)
        (workdir / "data" / name / "test.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
    lee_texts = [
        json.loads(line)["text"]
        for line in (data_dir() / "lee_test.jsonl").read_text(encoding="utf-8").splitlines()
        if line.strip()
    ][: budget.lee_test_texts]
    log(
        f"data: {len(train_rows)} train rows, {sum(map(len, tests.values()))} test rows in {workdir / 'data'}"
    )

    num_layers = _num_layers()
    plans: dict[str, Any] = {"files": {}, "threshold": None}
    if any(METHODS[name].strategy for name in methods):
        result, cal_settings = calibrate_once(budget.calibration_samples, workdir, log)
        plans = make_plans(result, cal_settings, budget.seeds, methods, workdir)
        log(f"ε = {plans['threshold']}; plans in {workdir / 'plans'}")

    base = evaluate_model(None, tests, lee_texts, budget)
    log(f"base model: accuracy {base['average_accuracy']:.3f}, Lee ppl {base['lee_ppl']:.2f}")

    from sharelora_plugin.planning import SharePlan

    runs = []
    reused = 0
    plan_info: dict[str, dict[int, dict]] = {}
    for seed in budget.seeds:
        for name in methods:
            method = METHODS[name]
            out = workdir / "runs" / f"{name}_seed{seed}"
            plan_file = plans["files"][name][seed] if method.strategy else None
            rank, structure = LORA_R, None
            if plan_file is not None:
                plan = SharePlan.load(plan_file)
                rank, structure = plan.rank, {"share_sets": plan.share_sets, "rank": plan.rank}
                plan_info.setdefault(name, {})[seed] = {
                    **structure,
                    "layers_saved": plan.layers_saved,
                    "param_fraction": round(plan.param_fraction, 4),
                    "constraint": "enforced" if plan.constraint_enforced else str(plan.constraint_satisfied),
                }
            cfg = run_config(method, seed, budget, paths, plan_file, out)
            saved = out / "result.json"
            if not args.fresh and saved.is_file():
                previous = json.loads(saved.read_text(encoding="utf-8"))
                if previous["config"] == cfg and previous["plan"] == structure:
                    runs.append(previous["run"])
                    reused += 1
                    log(f"reuse {name} seed {seed} ({saved}; --fresh retrains)")
                    continue
            log(f"train {name} seed {seed} ({budget.steps} steps)")
            timing = train_run(cfg, out, log)
            counts = count_adapter_parameters(out)
            scores = evaluate_model(out, tests, lee_texts, budget)
            run = {"method": name, "seed": seed, "rank": rank, **timing, **counts, **scores}
            runs.append(run)
            saved.write_text(
                json.dumps({"config": cfg, "plan": structure, "run": run}, indent=1), encoding="utf-8"
            )
            log(
                f"  {name} seed {seed}: params {counts['trainable_params']:,}, train {timing['train_seconds']} s, "
                f"acc {scores['average_accuracy']:.3f}, answer loss {scores['heldout_answer_loss']:.4f}, "
                f"Lee ppl {scores['lee_ppl']:.2f}"
            )

    summary = summarize(runs, methods)
    import torch

    report = {
        "quick": bool(args.quick),
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": "python bench/reproduce_small.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "total_minutes": round((time.perf_counter() - started) / 60, 2),
        "run_minutes": round(sum(r["wall_seconds"] + r["eval_seconds"] for r in runs) / 60, 2),
        "reused_runs": reused,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "settings": {
            "model": "SmolLM2-135M-Instruct (embedded)",
            "num_layers": num_layers,
            "steps": budget.steps,
            "micro_batch_size": budget.micro_batch_size,
            "sequence_len": budget.sequence_len,
            "learning_rate": budget.learning_rate,
            "warmup_steps": max(1, budget.steps // 10),
            "seeds": list(budget.seeds),
            "lora": {"r": LORA_R, "alpha": LORA_ALPHA, "dropout": LORA_DROPOUT, "targets": TARGET_MODULES},
            "threshold": plans["threshold"],
            "calibration": {
                "num_samples": budget.calibration_samples,
                "source": "lee_background.jsonl",
                "max_length": 256,
            },
            "data": {
                "train_rows": len(train_rows),
                "train_per_task": budget.train_per_task,
                "test_rows": sum(map(len, tests.values())),
                "test_per_task": budget.test_per_task,
                "tasks": list(tests),
                "data_seed": DATA_SEED,
                "extra_training_text": "lee_background.jsonl (300 news articles, completion)",
            },
            "max_new_tokens": budget.max_new_tokens,
            "num_beams": 1,
            "chance_accuracy": round(chance_accuracy(tests), 4),
            "lee_test_texts": len(lee_texts),
        },
        "plans": plan_info,
        "base_model": base,
        "runs": runs,
        "summary": summary,
    }
    report["findings"] = findings(summary, report["quick"], report["settings"]["chance_accuracy"])
    stem = results_dir / "reproduce_small"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    write_markdown(report, stem.with_suffix(".md"))
    write_plot(report, stem.with_suffix(".png"))
    log(f"wrote {stem}.json/.md/.png")
    print(stem.with_suffix(".md").read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
