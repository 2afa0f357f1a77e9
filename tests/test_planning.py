"""Planning layer: similarity matrix -> SharePlan (no torch)."""

from __future__ import annotations

import importlib.util
import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sharelora_plugin.planning import (
    METRICS,
    STRATEGIES,
    PlanError,
    SharePlan,
    alternate_share_sets,
    distinct_modules,
    expanded_rank,
    greedy_share_sets,
    layers_covered,
    layers_saved,
    load_similarity,
    make_plan,
    optimal_share_sets,
    random_adjacent_share_sets,
    satisfies_threshold,
    synthetic_similarity,
    threshold_for_budget,
    threshold_for_params,
    validate_share_sets,
    validate_similarity,
)

REPO = Path(__file__).resolve().parents[1]

# Paper's share sets (DESIGN.md §1), 32-layer models.
LLAMA_7B = [[16, 17], [18, 19], [20, 21, 22], [23, 24, 25, 26, 27], [28, 29, 30]]
LLAMA2_7B = [[17, 18], [19, 20], [21, 22, 23], [24, 25, 26, 27], [28, 29]]
LLAMA3_8B = [[19, 20], [21, 22], [23, 24, 25], [26, 27, 28]]
LLAVA_15 = [[2, 3], [4, 5], [6, 7], [17, 18], [19, 20], [21, 22, 23], [24, 25, 26], [27, 28, 29]]
SHARELORA_STAR = [[2, 3], [4, 5, 6], [9, 10], [11, 12, 13], [14, 15], [19, 20], [22, 23], [29, 30]]
# LoRA params of one LLaMA-7B layer at rank 1 for targets q,k,v (4096->4096) and up,down (4096<->11008).
LLAMA_7B_PARAMS_PER_LAYER_R1 = 3 * (4096 + 4096) + 2 * (4096 + 11008)


def random_symmetric(rng: np.random.Generator, num_layers: int) -> np.ndarray:
    upper = np.triu(rng.uniform(0.0, 1.0, size=(num_layers, num_layers)), k=1)
    matrix = upper + upper.T
    np.fill_diagonal(matrix, 1.0)
    return matrix


def check_constraint(sim: np.ndarray, sets: list[list[int]], threshold: float) -> None:
    validate_share_sets(sets, sim.shape[0])
    for members in sets:
        for i, j in itertools.combinations(members, 2):
            assert sim[i, j] >= threshold, (members, i, j, sim[i, j])


def set_partitions(items: list[int]):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for partition in set_partitions(rest):
        yield [[first], *partition]
        for index in range(len(partition)):
            yield partition[:index] + [[first, *partition[index]]] + partition[index + 1 :]


def brute_force_best(sim: np.ndarray, threshold: float, contiguous: bool) -> tuple[int, int]:
    """(fewest distinct modules, most covered among those) over all valid partitions."""
    num_layers = sim.shape[0]
    if contiguous:
        partitions = []
        for cuts in itertools.product([False, True], repeat=num_layers - 1):
            blocks, current = [], [0]
            for layer, cut in zip(range(1, num_layers), cuts, strict=True):
                if cut:
                    blocks.append(current)
                    current = []
                current.append(layer)
            partitions.append([*blocks, current])
    else:
        partitions = set_partitions(list(range(num_layers)))
    best = None
    for partition in partitions:
        sets = [block for block in partition if len(block) >= 2]
        if all(sim[i, j] >= threshold for block in sets for i, j in itertools.combinations(block, 2)):
            key = (len(partition), -layers_covered(sets))
            best = key if best is None or key < best else best
    return best[0], -best[1]


# --------------------------------------------------------------------------------------------------------------
# Counting and the paper's numbers


def test_paper_llama_7b_counts_and_rank_expansion():
    assert layers_saved(LLAMA_7B) == 10
    assert layers_covered(LLAMA_7B) == 15
    assert distinct_modules(32, LLAMA_7B) == 22
    assert expanded_rank(32, LLAMA_7B, 8) == 11  # floor(32 / 22 * 8) = floor(11.636)


def test_paper_other_models_rank_expansion():
    assert distinct_modules(32, SHARELORA_STAR) == 22  # the random baseline saves as much as LLaMA-7B's plan
    assert expanded_rank(32, SHARELORA_STAR, 8) == 11
    assert distinct_modules(32, LLAMA2_7B) == 24
    assert expanded_rank(32, LLAMA2_7B, 8) == 10
    assert distinct_modules(32, LLAMA3_8B) == 26
    assert expanded_rank(32, LLAMA3_8B, 8) == 9
    assert distinct_modules(32, LLAVA_15) == 21
    assert expanded_rank(32, LLAVA_15, 64) == 97  # floor(2048 / 21)


def test_expanded_rank_is_exact_integer_floor():
    # 30 * 7 / 21 is exactly 10; a float product can land on 9.999... and floor to 9.
    sets = [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]]
    assert distinct_modules(30, sets) == 21
    assert expanded_rank(30, sets, 7) == 10
    for num_layers, rank in itertools.product(range(2, 41), range(1, 70)):
        for saved in range(num_layers):
            sets = [list(range(saved + 1))] if saved else []
            distinct = num_layers - saved
            assert expanded_rank(num_layers, sets, rank) * distinct <= num_layers * rank
            assert (expanded_rank(num_layers, sets, rank) + 1) * distinct > num_layers * rank


def test_paper_param_counts_with_explicit_rank_9():
    full = 32 * 8 * LLAMA_7B_PARAMS_PER_LAYER_R1
    assert round(full / 1e6, 1) == 14.0
    plan_7b = make_plan(num_layers=32, strategy="manual", share_sets=LLAMA_7B, rank=8, rank_expansion=9)
    assert plan_7b.rank == 9 and plan_7b.base_rank == 8
    assert round(plan_7b.param_fraction * full / 1e6, 1) == 10.8
    plan_2 = make_plan(num_layers=32, strategy="manual", share_sets=LLAMA2_7B, rank=8, rank_expansion=9)
    assert round(plan_2.param_fraction * full / 1e6, 1) == 11.8
    expanded = make_plan(num_layers=32, strategy="manual", share_sets=LLAMA_7B, rank_expansion=True)
    assert expanded.rank == 11
    kept = make_plan(num_layers=32, strategy="manual", share_sets=LLAMA_7B, rank_expansion=False)
    assert kept.rank == 8 and kept.param_fraction == 22 / 32


# --------------------------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize(
    ("matrix", "message"),
    [
        ([[1.0, 0.5, 0.2], [0.5, 1.0, 0.3]], "square"),
        ([[1.0]], "at least 2"),
        ([[1.0, 0.5], [0.4, 1.0]], "symmetric"),
        ([[1.0, float("nan")], [float("nan"), 1.0]], "non-finite"),
        ([[1.0, 1.2], [1.2, 1.0]], "outside the valid range"),
        ([[1.0, -1.5], [-1.5, 1.0]], "outside the valid range"),
        ([[1.0, 0.5], [0.5]], "L x L"),
        ("not a matrix", "matrix of numbers"),
    ],
)
def test_validate_similarity_errors(matrix, message):
    with pytest.raises(PlanError, match=message):
        validate_similarity(matrix, name="my_matrix")


def test_validate_similarity_tolerates_rounding_and_ignores_diagonal():
    matrix = validate_similarity([[float("nan"), 1.0 + 5e-7, 0.2], [1.0, 7.0, 0.3 + 5e-7], [0.2, 0.3, 0.0]])
    assert matrix.dtype == np.float64
    assert matrix[0, 1] == 1.0 and np.array_equal(matrix, matrix.T)
    assert np.all(np.diag(matrix) == 1.0)


def test_validate_similarity_error_names_the_argument():
    with pytest.raises(PlanError, match=r"my_matrix\[0\]\[1\]"):
        validate_similarity([[1.0, 2.0], [2.0, 1.0]], name="my_matrix")


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        ([[0, 1], [1, 2]], "disjoint"),
        ([[0, 4]], r"valid layer indices are 0\.\.3"),
        ([[-1, 2]], "valid layer indices"),
        ([[2]], "at least 2"),
        ([[0, 1.0]], "not an integer"),
        ([[0, "1"]], "not an integer"),
        ([[0, True]], "not an integer"),
        ([[1, 1]], "twice"),
        ("0,1", "list of lists"),
        ([3], "must be a list of layer indices"),
    ],
)
def test_validate_share_sets_errors(sets, message):
    with pytest.raises(PlanError, match=message):
        validate_share_sets(sets, 4)


def test_validate_share_sets_canonical_order():
    assert validate_share_sets([(5, 3), [np.int64(1), 0]], 6) == [[0, 1], [3, 5]]


# --------------------------------------------------------------------------------------------------------------
# Greedy (Algorithm 1)


def hand_traced_matrix() -> np.ndarray:
    sim = np.full((5, 5), 0.5)
    np.fill_diagonal(sim, 1.0)
    for (i, j), value in {
        (0, 1): 0.95,
        (1, 2): 0.93,
        (0, 2): 0.80,
        (3, 4): 0.92,
        (2, 3): 0.91,
        (2, 4): 0.86,
    }.items():
        sim[i, j] = sim[j, i] = value
    return sim


def test_greedy_hand_traced():
    # (0,1) .95 -> {0,1}; (1,2) .93: 2 would join but s(0,2)=.80 < .85, so it stays out (the paper's pseudo-code
    # would add it); (3,4) .92 -> {3,4}; (2,3) .91: 2 meets 3 (.91) and 4 (.86) -> {2,3,4}; (2,4): both placed.
    assert greedy_share_sets(hand_traced_matrix(), 0.85) == [[0, 1], [2, 3, 4]]
    # At 0.80 the re-check passes and 2 joins {0,1}; then {3,4} stays a pair.
    assert greedy_share_sets(hand_traced_matrix(), 0.80) == [[0, 1, 2], [3, 4]]
    assert greedy_share_sets(hand_traced_matrix(), 0.96) == []


def test_greedy_ties_break_by_index():
    sim = np.array([[1.0, 0.9, 0.5], [0.9, 1.0, 0.9], [0.5, 0.9, 1.0]])
    assert greedy_share_sets(sim, 0.85) == [[0, 1]]


def test_greedy_and_optimal_satisfy_constraint_on_random_matrices():
    rng = np.random.default_rng(0)
    for trial in range(40):
        num_layers = int(rng.integers(3, 14))
        sim = random_symmetric(rng, num_layers)
        threshold = float(rng.uniform(0.3, 0.8))
        check_constraint(sim, greedy_share_sets(sim, threshold), threshold)
        check_constraint(sim, optimal_share_sets(sim, threshold), threshold)
        contiguous = optimal_share_sets(sim, threshold, contiguous=True)
        check_constraint(sim, contiguous, threshold)
        assert all(members == list(range(members[0], members[-1] + 1)) for members in contiguous), trial
    for seed in range(5):
        sim = synthetic_similarity(30, seed=seed)
        for threshold in (0.8, 0.85, 0.9):
            assert satisfies_threshold(sim, greedy_share_sets(sim, threshold), threshold)
            assert satisfies_threshold(sim, optimal_share_sets(sim, threshold), threshold)


def test_strategies_are_deterministic():
    sim = synthetic_similarity(30, seed=3)
    assert greedy_share_sets(sim, 0.85) == greedy_share_sets(sim.copy(), 0.85)
    assert optimal_share_sets(sim, 0.85) == optimal_share_sets(sim.copy(), 0.85)
    assert random_adjacent_share_sets(30, 8, seed=4) == random_adjacent_share_sets(30, 8, seed=4)
    assert synthetic_similarity(30, seed=3).tolist() == sim.tolist()


# --------------------------------------------------------------------------------------------------------------
# Optimal


def test_optimal_never_worse_than_greedy():
    rng = np.random.default_rng(1)
    for trial in range(60):
        num_layers = int(rng.integers(4, 16))
        sim = random_symmetric(rng, num_layers)
        threshold = float(rng.uniform(0.3, 0.8))
        greedy = distinct_modules(num_layers, greedy_share_sets(sim, threshold))
        optimal = distinct_modules(num_layers, optimal_share_sets(sim, threshold))
        assert optimal <= greedy, (trial, optimal, greedy)


def test_optimal_beats_greedy_on_a_chain():
    # Adjacent layers similar, (1,2) the most: greedy pairs {1,2} first, which blocks {0,1} and {2,3}.
    sim = np.full((4, 4), 0.6)
    np.fill_diagonal(sim, 1.0)
    for (i, j), value in {(0, 1): 0.90, (1, 2): 0.95, (2, 3): 0.90}.items():
        sim[i, j] = sim[j, i] = value
    assert greedy_share_sets(sim, 0.85) == [[1, 2]]
    assert optimal_share_sets(sim, 0.85) == [[0, 1], [2, 3]]
    assert optimal_share_sets(sim, 0.85, contiguous=True) == [[0, 1], [2, 3]]


def test_optimal_matches_brute_force_on_small_matrices():
    rng = np.random.default_rng(2)
    for _ in range(25):
        num_layers = int(rng.integers(3, 8))
        sim = random_symmetric(rng, num_layers)
        threshold = float(rng.uniform(0.3, 0.7))
        sets = optimal_share_sets(sim, threshold)
        assert (distinct_modules(num_layers, sets), layers_covered(sets)) == brute_force_best(
            sim, threshold, False
        )


def test_optimal_prefers_more_covered_layers_among_optima():
    # {0,1,2},{3} and {0,1},{2,3} both use 2 modules; the latter covers all 4 layers (eq. 2).
    sim = np.full((4, 4), 0.5)
    np.fill_diagonal(sim, 1.0)
    for i, j in [(0, 1), (0, 2), (1, 2), (2, 3)]:
        sim[i, j] = sim[j, i] = 0.9
    sets = optimal_share_sets(sim, 0.85)
    assert distinct_modules(4, sets) == 2 and layers_covered(sets) == 4


def test_contiguous_dp_matches_brute_force():
    rng = np.random.default_rng(3)
    for _ in range(30):
        num_layers = int(rng.integers(2, 10))
        sim = random_symmetric(rng, num_layers)
        threshold = float(rng.uniform(0.2, 0.7))
        sets = optimal_share_sets(sim, threshold, contiguous=True)
        assert (distinct_modules(num_layers, sets), layers_covered(sets)) == brute_force_best(
            sim, threshold, True
        )


def test_optimal_on_80_layer_realistic_matrix():
    sim = synthetic_similarity(80, seed=0)
    for threshold in (0.80, 0.85):
        sets = optimal_share_sets(sim, threshold)
        check_constraint(sim, sets, threshold)
        assert distinct_modules(80, sets) <= distinct_modules(80, greedy_share_sets(sim, threshold))


def test_optimal_time_limit_is_an_error_not_a_heuristic():
    sim = random_symmetric(np.random.default_rng(5), 60)
    with pytest.raises(PlanError, match="time_limit"):
        optimal_share_sets(sim, 0.5, time_limit=0.0)


# --------------------------------------------------------------------------------------------------------------
# Baselines


def test_alternate_share_sets():
    assert alternate_share_sets(6) == [[0, 1], [2, 3], [4, 5]]
    assert alternate_share_sets(5) == [[0, 1], [2, 3]]
    assert distinct_modules(32, alternate_share_sets(32)) == 16
    with pytest.raises(PlanError, match="num_layers"):
        alternate_share_sets(1)


def test_random_adjacent_share_sets_shapes():
    seen = set()
    for seed in range(30):
        sets = random_adjacent_share_sets(32, 10, seed=seed, num_sets=8 if seed % 2 else None)
        validate_share_sets(sets, 32)
        assert layers_saved(sets) == 10
        if seed % 2:
            assert len(sets) == 8
        assert all(members == list(range(members[0], members[-1] + 1)) for members in sets)
        seen.add(json.dumps(sets))
    assert len(seen) > 20  # different seeds, different plans
    assert random_adjacent_share_sets(32, 0, seed=1) == []
    assert random_adjacent_share_sets(4, 3, seed=1) == [[0, 1, 2, 3]]


@pytest.mark.parametrize(
    ("num_layers", "saved", "num_sets", "message"),
    [
        (10, 10, None, "layers_saved"),
        (10, -1, None, "layers_saved"),
        (10, 3, 4, "num_sets"),  # each set saves at least one
        (10, 6, 5, "num_sets"),  # 6 saved + 5 sets = 11 layers > 10
        (10, 0, 2, "num_sets"),
    ],
)
def test_random_adjacent_share_sets_impossible(num_layers, saved, num_sets, message):
    with pytest.raises(PlanError, match=message):
        random_adjacent_share_sets(num_layers, saved, seed=0, num_sets=num_sets)


# --------------------------------------------------------------------------------------------------------------
# Budgets


def fraction_by_threshold(sim, strategy, contiguous, rank_expansion, rank=8):
    """(threshold, plan fraction) for every candidate threshold, highest first."""
    num_layers = sim.shape[0]
    candidates = sorted({float(v) for v in sim[np.triu_indices(num_layers, 1)]}, reverse=True)
    options = {"contiguous": contiguous, "rank": rank, "rank_expansion": rank_expansion}
    return [
        (
            threshold,
            make_plan(
                num_layers=num_layers, strategy=strategy, similarity=sim, threshold=threshold, **options
            ).param_fraction,
        )
        for threshold in candidates
    ]


def best_threshold(curve, target):
    best = None
    for threshold, fraction in curve:
        if fraction <= target and (best is None or fraction > best[0]):
            best = (fraction, threshold)
    return None if best is None else best[1]


@pytest.mark.parametrize(
    ("strategy", "contiguous", "rank_expansion"),
    [
        ("greedy", False, False),
        ("greedy", False, True),
        ("optimal", False, False),
        ("optimal", False, True),
        ("optimal", True, True),
        ("optimal", False, 9),
    ],
)
def test_threshold_for_budget_matches_scan(strategy, contiguous, rank_expansion):
    sim = synthetic_similarity(12, seed=7)
    options = {"strategy": strategy, "contiguous": contiguous, "rank_expansion": rank_expansion}
    curve = fraction_by_threshold(sim, **options)
    reached = 0
    for target in (0.5, 0.7, 0.9, 0.95, 0.97, 0.99, 1.0):
        expected = best_threshold(curve, target)
        if expected is None:
            with pytest.raises(PlanError, match="not reachable"):
                threshold_for_budget(sim, target, **options)
            continue
        reached += 1
        threshold = threshold_for_budget(sim, target, **options)
        assert threshold == expected, target
        plan = make_plan(num_layers=12, similarity=sim, target_fraction=target, **options)
        assert plan.param_fraction <= target
        assert plan.threshold == threshold and plan.target_fraction == target
    assert reached >= 2


def test_threshold_for_budget_unreachable():
    sim = synthetic_similarity(12, seed=7)
    smallest = min(distinct_modules(12, greedy_share_sets(sim, float(v))) for v in np.unique(sim)) / 12
    with pytest.raises(PlanError, match=f"smallest parameter fraction reachable is {smallest:.4f}"):
        threshold_for_budget(sim, smallest - 0.01)
    with pytest.raises(PlanError, match="target_fraction"):
        threshold_for_budget(sim, 1.5)


def test_threshold_for_params():
    sim = synthetic_similarity(12, seed=7)
    per_layer = 1000
    threshold = threshold_for_params(sim, 0.7 * 12 * 8 * per_layer, per_layer, rank=8)
    assert threshold == threshold_for_budget(sim, 0.7)


# --------------------------------------------------------------------------------------------------------------
# make_plan


def test_make_plan_greedy_records_everything():
    sim = synthetic_similarity(30, seed=0)
    plan = make_plan(num_layers=30, similarity=sim, threshold=0.85, rank=8, rank_expansion=True)
    assert plan.strategy == "greedy" and plan.metric == "angular" and plan.threshold == 0.85
    assert plan.share_sets == greedy_share_sets(sim, 0.85)
    assert plan.rank == expanded_rank(30, plan.share_sets, 8) and plan.base_rank == 8
    assert plan.constraint_enforced is True and plan.constraint_satisfied is None
    assert np.array_equal(np.array(plan.similarity), validate_similarity(sim))
    assert plan.leaders == [members[0] for members in plan.share_sets]


def test_make_plan_random_matches_reference_saving():
    sim = synthetic_similarity(30, seed=0)
    greedy = make_plan(num_layers=30, similarity=sim, threshold=0.85)
    like = make_plan(num_layers=30, strategy="random", random_like=greedy, seed=3)
    assert like.layers_saved == greedy.layers_saved and len(like.share_sets) == len(greedy.share_sets)
    assert like.seed == 3 and like.constraint_enforced is False and like.constraint_satisfied is None
    from_matrix = make_plan(num_layers=30, strategy="random", similarity=sim, threshold=0.85, seed=3)
    assert from_matrix.share_sets == like.share_sets
    assert from_matrix.constraint_satisfied == satisfies_threshold(sim, from_matrix.share_sets, 0.85)
    with pytest.raises(PlanError, match="random_like"):
        make_plan(num_layers=30, strategy="random")


def test_make_plan_manual_and_alternate_record_constraint():
    sim = hand_traced_matrix()
    ok = make_plan(num_layers=5, strategy="manual", share_sets=[[3, 4]], similarity=sim, threshold=0.85)
    bad = make_plan(num_layers=5, strategy="manual", share_sets=[[0, 1, 2]], similarity=sim, threshold=0.85)
    assert ok.constraint_satisfied is True and bad.constraint_satisfied is False
    assert bad.constraint_enforced is False
    alternate = make_plan(num_layers=5, strategy="alternate", threshold=None)
    assert alternate.share_sets == [[0, 1], [2, 3]] and alternate.constraint_satisfied is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"strategy": "greedy"}, "needs a similarity"),
        ({"strategy": "optimal", "similarity": np.eye(5), "threshold": None}, "threshold"),
        ({"strategy": "manual"}, "needs share_sets"),
        (
            {"strategy": "greedy", "share_sets": [[0, 1]], "similarity": np.eye(5)},
            "only used with strategy: manual",
        ),
        ({"strategy": "fancy"}, "strategy must be one of"),
        ({"strategy": "alternate", "metric": "euclid"}, "metric must be one of"),
        ({"strategy": "alternate", "rank": 0}, "rank must be a positive integer"),
        ({"strategy": "alternate", "rank_expansion": -3}, "rank_expansion"),
        ({"strategy": "greedy", "similarity": np.eye(4)}, "num_layers is 5"),
        ({"strategy": "manual", "share_sets": [[0, 5]]}, "valid layer indices"),
        ({"strategy": "alternate", "target_fraction": 0.5}, "target_fraction"),
        ({"strategy": "greedy", "similarity": np.eye(5), "contiguous": True}, "contiguous"),
    ],
)
def test_make_plan_errors(kwargs, message):
    with pytest.raises(PlanError, match=message):
        make_plan(num_layers=5, **kwargs)


def test_constants():
    assert STRATEGIES == ("greedy", "optimal", "manual", "random", "alternate")
    assert METRICS == ("angular", "cosine", "gradient_subspace")


# --------------------------------------------------------------------------------------------------------------
# SharePlan


def sample_plan() -> SharePlan:
    plan = make_plan(
        num_layers=30, similarity=synthetic_similarity(30, seed=1), threshold=0.85, rank_expansion=True
    )
    plan.metadata = {"model": "SmolLM2-135M", "calibration": {"num_samples": 256}}
    return plan


def test_plan_dict_round_trip():
    plan = sample_plan()
    data = plan.to_dict()
    assert data["format_version"] == 1
    assert data["distinct_modules"] == plan.distinct_modules
    assert data["leaders"] == plan.leaders and data["param_fraction"] == plan.param_fraction
    restored = SharePlan.from_dict(json.loads(json.dumps(data)))
    assert restored == plan
    data["leaders"] = [99]  # derived fields are recomputed, not trusted
    assert SharePlan.from_dict(data).leaders == plan.leaders


def test_plan_save_load(tmp_path):
    plan = sample_plan()
    path = tmp_path / "run" / "sharelora_plan.json"
    plan.save(path)
    assert SharePlan.load(path) == plan
    text = path.read_text()
    assert json.loads(text)["share_sets"] == plan.share_sets
    assert text.count("\n") < 100  # matrix rows on one line each
    assert [p.name for p in path.parent.iterdir()] == ["sharelora_plan.json"]  # no temporary left behind


def test_plan_load_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(PlanError, match="nope.json"):
        SharePlan.load(missing)
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"num_layers": 4, ')
    with pytest.raises(PlanError, match=r"corrupt\.json.*not valid JSON"):
        SharePlan.load(corrupt)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"num_layers": 4, "strategy": "manual"}))
    with pytest.raises(PlanError, match=r"wrong\.json.*share_sets"):
        SharePlan.load(wrong)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_layers": 29}, "num_layers is 29"),
        ({"share_sets": [[0, 40]]}, "valid layer indices"),
        ({"strategy": "best"}, "strategy"),
        ({"rank": "8"}, "rank"),
        ({"threshold": "high"}, "threshold"),
        ({"contiguous": "yes"}, "contiguous"),
        ({"metadata": []}, "metadata"),
        ({"format_version": 2}, "format_version"),
        ({"share_set": [[0, 1]]}, "unknown key"),
        ({"threshold": 0.999}, "constraint_enforced"),  # the sets no longer satisfy eq. 3
    ],
)
def test_plan_from_dict_rejects_bad_data(change, message):
    data = sample_plan().to_dict()
    data.update(change)
    with pytest.raises(PlanError, match=message):
        SharePlan.from_dict(data)


def test_plan_from_dict_missing_key():
    data = sample_plan().to_dict()
    del data["num_layers"]
    with pytest.raises(PlanError, match="missing required key.*num_layers"):
        SharePlan.from_dict(data)


def test_leader_of_and_summary():
    plan = make_plan(num_layers=32, strategy="manual", share_sets=LLAMA_7B, rank_expansion=True)
    assert plan.leader_of(27) == 23 and plan.leader_of(23) == 23 and plan.leader_of(5) == 5
    with pytest.raises(PlanError, match="0..31"):
        plan.leader_of(32)
    table = plan.summary_table()
    assert "23-27" in table and "22/32" in table and "8 -> 11" in table
    assert "min sim" in table and "-" in table.splitlines()[2]  # no matrix: min similarity shown as "-"
    with_matrix = sample_plan()
    sim = np.array(with_matrix.similarity)
    for members in with_matrix.share_sets:
        lowest = min(sim[i, j] for i, j in itertools.combinations(members, 2))
        assert f"{lowest:.4f}" in with_matrix.summary_table()


def test_fingerprint():
    plan = sample_plan()
    same = SharePlan.from_dict(plan.to_dict())
    same.metadata = {"other": True}
    assert plan.fingerprint() == same.fingerprint()
    assert len(plan.fingerprint()) == 64
    other_rank = SharePlan.from_dict({**plan.to_dict(), "rank": plan.rank + 1})
    assert other_rank.fingerprint() != plan.fingerprint()
    other_sets = make_plan(num_layers=30, strategy="alternate")
    assert other_sets.fingerprint() != make_plan(num_layers=30, strategy="alternate", rank=4).fingerprint()


# --------------------------------------------------------------------------------------------------------------
# Files and purity


def test_load_similarity(tmp_path):
    plan = sample_plan()
    plan.save(tmp_path / "plan.json")
    matrix, data = load_similarity(tmp_path / "plan.json")
    assert np.array_equal(matrix, np.array(plan.similarity)) and data["num_layers"] == 30

    sim = synthetic_similarity(6, seed=0)
    np.savetxt(tmp_path / "sim.csv", sim, delimiter=",")
    matrix, data = load_similarity(tmp_path / "sim.csv")
    assert np.allclose(matrix, sim) and data == {}
    (tmp_path / "header.csv").write_text(
        ",".join(f"l{i}" for i in range(6)) + "\n" + (tmp_path / "sim.csv").read_text()
    )
    assert np.allclose(load_similarity(tmp_path / "header.csv")[0], sim)

    (tmp_path / "ragged.csv").write_text("1,0.5\n0.5\n")
    with pytest.raises(PlanError, match="ragged.csv"):
        load_similarity(tmp_path / "ragged.csv")
    no_matrix = make_plan(num_layers=4, strategy="alternate")
    no_matrix.save(tmp_path / "bare.json")
    with pytest.raises(PlanError, match="no 'similarity'"):
        load_similarity(tmp_path / "bare.json")
    with pytest.raises(PlanError, match="not found"):
        load_similarity(tmp_path / "absent.csv")


def test_planning_imports_no_torch():
    # Import the planning package under a bare parent package, so the real sharelora_plugin/__init__ (which wires
    # Axolotl) does not count; every planning module must load on numpy and scipy alone.
    code = (
        "import sys, types\n"
        "parent = types.ModuleType('sharelora_plugin')\n"
        f"parent.__path__ = [{str(REPO / 'sharelora_plugin')!r}]\n"
        "sys.modules['sharelora_plugin'] = parent\n"
        "import sharelora_plugin.planning as planning\n"
        "import pkgutil, importlib\n"
        "names = [m.name for m in pkgutil.iter_modules(planning.__path__)]\n"
        "assert {'rules', 'similarity', 'sets', 'strategies', 'budget', 'plan', 'stability'} <= set(names), names\n"
        "for name in names: importlib.import_module('sharelora_plugin.planning.' + name)\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'peft', 'axolotl') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert importlib.util.find_spec("scipy.optimize") is not None


def test_optimal_never_worse_than_greedy_on_the_real_smollm2_matrix():
    """The matrix the SmolLM2 demo calibrated (256 Lee texts), committed as a fixture."""
    from pathlib import Path

    from sharelora_plugin.planning import (
        distinct_modules,
        greedy_share_sets,
        load_similarity,
        optimal_share_sets,
    )

    sim, _ = load_similarity(Path(__file__).parent / "fixtures" / "smollm2_similarity.csv")
    assert sim.shape == (30, 30)
    strictly_better = 0
    for eps in [0.80 + 0.01 * k for k in range(16)]:
        greedy = distinct_modules(30, greedy_share_sets(sim, eps))
        optimal_sets = optimal_share_sets(sim, eps)
        assert all(sim[i, j] >= eps for s in optimal_sets for i in s for j in s)
        optimal = distinct_modules(30, optimal_sets)
        assert optimal <= greedy
        strictly_better += optimal < greedy
    assert strictly_better >= 5  # measured: optimal wins at 10 of the 16 thresholds
