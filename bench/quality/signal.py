"""How the gradient_subspace overlap relates to angular similarity and to the plans: rank correlation over layer
pairs, and the within-set overlap of a plan against random adjacent plans of the same shape."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def upper_triangle(matrix: np.ndarray) -> np.ndarray:
    index = np.triu_indices(matrix.shape[0], k=1)
    return np.asarray(matrix)[index]


def within_set_mean(matrix: np.ndarray, share_sets: Sequence[Sequence[int]]) -> float:
    """Mean of ``matrix`` over every pair of layers inside one set (nan for a plan without sets)."""
    values = [matrix[i, j] for members in share_sets for a, i in enumerate(members) for j in members[a + 1 :]]
    return float(np.mean(values)) if values else float("nan")


def random_same_shape(num_layers: int, sizes: Sequence[int], rng: np.random.Generator) -> list[list[int]]:
    """Disjoint sets of adjacent layers with exactly the given ``sizes`` (shuffled), placed uniformly at random:
    the free layers are spread into the gaps by a uniform composition."""
    sizes = list(sizes)
    rng.shuffle(sizes)
    free = num_layers - sum(sizes)
    gaps = np.bincount(rng.integers(0, len(sizes) + 1, free), minlength=len(sizes) + 1)
    sets, cursor = [], 0
    for size, gap in zip(sizes, gaps, strict=False):
        cursor += int(gap)
        sets.append(list(range(cursor, cursor + size)))
        cursor += size
    return sets


def permutation_test(
    overlap: np.ndarray, share_sets: Sequence[Sequence[int]], draws: int = 10_000, seed: int = 0
) -> dict:
    """Within-set overlap of ``share_sets`` against ``draws`` random adjacent plans of the same set sizes; p is the
    share of random plans at least as high (one-sided, with the +1 correction)."""
    observed = within_set_mean(overlap, share_sets)
    rng = np.random.default_rng(seed)
    sizes = [len(s) for s in share_sets]
    null = np.array(
        [within_set_mean(overlap, random_same_shape(overlap.shape[0], sizes, rng)) for _ in range(draws)]
    )
    return {
        "observed": observed,
        "random_mean": float(null.mean()),
        "random_std": float(null.std(ddof=1)),
        "p_value": float((1 + (null >= observed).sum()) / (draws + 1)),
        "draws": draws,
    }


def signal_report(
    angular: np.ndarray,
    overlap: np.ndarray,
    plans: dict[str, Sequence[Sequence[int]]],
    k: int,
    dims: Sequence[int],
) -> dict:
    """Spearman correlation over layer pairs, adjacent and all-pair means, the random level, and each plan's
    within-set overlap (the angular greedy plan with its permutation test)."""
    from scipy import stats

    from sharelora_plugin.planning.subspace import random_level

    adjacent = np.diag(overlap, k=1)
    rho = stats.spearmanr(upper_triangle(angular), upper_triangle(overlap)).statistic
    report = {
        "spearman_vs_angular": float(rho),
        "adjacent_mean": float(adjacent.mean()),
        "all_pairs_mean": float(upper_triangle(overlap).mean()),
        "random_level": random_level(dims, k),
        "within_set": {name: within_set_mean(overlap, sets) for name, sets in plans.items()},
    }
    if plans.get("greedy"):
        report["greedy_vs_random_plans"] = permutation_test(overlap, plans["greedy"])
    return report
