"""Every planning rule gives the same answer through each way in: the YAML ``sharelora:`` block (the schema Axolotl
validates), the library (``make_plan`` / ``plan_with_stability``) and the CLI (``sharelora plan --matrix``).

Each case is one setting, valid or not; all three entry points must accept it, or all three must refuse it
naming the key. The rules themselves live in ``sharelora_plugin/planning/rules.py``; this test catches an entry
point that restates a rule instead of calling it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from sharelora_plugin.args import ShareLoRAConfig
from sharelora_plugin.cli import main
from sharelora_plugin.planning import PlanError, make_plan, plan_with_stability, save_per_sample

NUM_LAYERS = 6


@dataclass(frozen=True)
class Case:
    """One setting: the ``sharelora:`` keys, whether it is valid, and a word every refusal must contain."""

    settings: dict[str, Any]
    valid: bool
    names: str = ""  # a key (or value) the refusal message must mention
    calibration: dict[str, Any] = field(default_factory=dict)  # keys of sharelora.calibration (bootstrap)


CASES = {
    # threshold: a similarity in (0, 1]
    "threshold 0.85": Case({"threshold": 0.85}, True),
    "threshold 1": Case({"threshold": 1.0}, True),
    "threshold 0": Case({"threshold": 0.0}, False, "threshold"),
    "threshold 1.5": Case({"threshold": 1.5}, False, "threshold"),
    "threshold -0.2": Case({"threshold": -0.2}, False, "threshold"),
    # strategy and metric: named choices
    "strategy optimal": Case({"strategy": "optimal"}, True),
    "strategy unknown": Case({"strategy": "fancy"}, False, "fancy"),
    "metric cosine": Case({"metric": "cosine"}, True),
    "metric unknown": Case({"metric": "l2"}, False, "l2"),
    # contiguous: optimal only
    "contiguous optimal": Case({"strategy": "optimal", "contiguous": True}, True),
    "contiguous greedy": Case({"strategy": "greedy", "contiguous": True}, False, "contiguous"),
    "contiguous manual": Case(
        {"strategy": "manual", "share_sets": [[1, 2]], "contiguous": True}, False, "contiguous"
    ),
    # share sets: manual only; at least two distinct layers each; disjoint
    "manual sets": Case({"strategy": "manual", "share_sets": [[1, 2], [3, 4, 5]]}, True),
    "manual one-layer set": Case({"strategy": "manual", "share_sets": [[1]]}, False, "share_sets"),
    "manual overlapping sets": Case(
        {"strategy": "manual", "share_sets": [[1, 2], [2, 3]]}, False, "disjoint"
    ),
    "sets without manual": Case({"strategy": "greedy", "share_sets": [[1, 2]]}, False, "share_sets"),
    # target fraction: (0, 1], strategies that choose sets from the data or at random
    "target fraction": Case({"target_fraction": 0.7}, True),
    "target fraction 0": Case({"target_fraction": 0.0}, False, "target_fraction"),
    "target fraction 1.2": Case({"target_fraction": 1.2}, False, "target_fraction"),
    "target fraction manual": Case(
        {"strategy": "manual", "share_sets": [[1, 2]], "target_fraction": 0.7}, False, "target_fraction"
    ),
    # rank expansion: true, false or a positive rank
    "rank expansion true": Case({"rank_expansion": True}, True),
    "rank expansion 12": Case({"rank_expansion": 12}, True),
    "rank expansion 0": Case({"rank_expansion": 0}, False, "rank"),
    # confidence (robust planning): (0, 1), greedy/optimal, a fixed ε
    "confidence": Case({"confidence": 0.9}, True),
    "confidence 1": Case({"confidence": 1.0}, False, "confidence"),
    "confidence random": Case({"strategy": "random", "confidence": 0.9}, False, "confidence"),
    "confidence with target fraction": Case(
        {"confidence": 0.9, "target_fraction": 0.7}, False, "target_fraction"
    ),
    # bootstrap resamples: 0 (off) or >= 10
    "resamples 50": Case({}, True, calibration={"bootstrap_resamples": 50}),
    "resamples 5": Case({}, False, "resamples", calibration={"bootstrap_resamples": 5}),
}


@pytest.fixture(scope="module")
def matrix_files(tmp_path_factory) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    """A CSV of the mean similarity and the per-sample calibration file it came from (12 samples)."""
    rng = np.random.default_rng(0)
    folder = tmp_path_factory.mktemp("rules")
    angular = np.zeros((12, NUM_LAYERS, NUM_LAYERS), dtype=np.float32)
    for layer_a in range(NUM_LAYERS):
        for layer_b in range(layer_a + 1, NUM_LAYERS):
            values = 0.03 * abs(layer_a - layer_b) + rng.uniform(0, 0.02, size=12)
            angular[:, layer_a, layer_b] = angular[:, layer_b, layer_a] = values
    cosine = np.cos(np.pi * angular).astype(np.float32)
    npz = save_per_sample(folder / "calibration.npz", angular, cosine)
    similarity = 1.0 - angular.mean(axis=0)
    csv = folder / "similarity.csv"
    np.savetxt(csv, similarity, delimiter=",")
    return csv, npz, similarity, 1.0 - angular


def _yaml(case: Case) -> str | None:
    """None when the ``sharelora:`` block validates, else the error text."""
    block = dict(case.settings)
    if case.calibration:
        block["calibration"] = dict(case.calibration)
    try:
        ShareLoRAConfig(**block)
    except ValidationError as err:
        return str(err)
    return None


def _library(case: Case, similarity: np.ndarray, samples: np.ndarray) -> str | None:
    options = dict(case.settings)
    options.setdefault("threshold", 0.85)
    resamples = case.calibration.get("bootstrap_resamples")
    try:
        if "confidence" in options or resamples is not None:
            plan_with_stability(
                samples,
                similarity,
                metric=options.pop("metric", "angular"),
                resamples=200 if resamples is None else resamples,
                **options,
            )
        else:
            make_plan(num_layers=NUM_LAYERS, similarity=similarity, **options)
    except PlanError as err:
        return str(err)
    return None


def _cli(case: Case, csv: Path, npz: Path, capsys) -> str | None:
    argv = ["plan", "--matrix", str(csv), "--json"]
    settings = case.settings
    flag_of = {
        "threshold": "--threshold",
        "strategy": "--strategy",
        "metric": "--metric",
        "target_fraction": "--target-fraction",
        "confidence": "--confidence",
    }
    for key, value in settings.items():
        if key in flag_of:
            argv += [flag_of[key], str(value)]
        elif key == "contiguous" and value:
            argv.append("--contiguous")
        elif key == "share_sets":
            argv += ["--share-sets", str(value)]
        elif key == "rank_expansion":
            argv += ["--rank-expansion"] if value is True else ["--rank", str(value)]
    if "confidence" in settings or case.calibration:
        argv += ["--stability", "--calibration", str(npz)]
    if "bootstrap_resamples" in case.calibration:
        argv += ["--resamples", str(case.calibration["bootstrap_resamples"])]
    capsys.readouterr()
    status = main(argv)
    captured = capsys.readouterr()
    return None if status == 0 else captured.err


@pytest.mark.parametrize("name", CASES)
def test_every_entry_point_gives_the_same_answer(name, matrix_files, capsys) -> None:
    case = CASES[name]
    csv, npz, similarity, samples = matrix_files
    answers = {
        "yaml": _yaml(case),
        "library": _library(case, similarity, samples),
        "cli": _cli(case, csv, npz, capsys),
    }
    if case.valid:
        assert answers == {"yaml": None, "library": None, "cli": None}, answers
        return
    for entry, message in answers.items():
        assert message is not None, f"{entry} accepted {case.settings} {case.calibration}"
        assert case.names in message, f"{entry}: {message}"
