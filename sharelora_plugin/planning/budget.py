"""Parameter budgets: the threshold ε whose plan trains at most a given fraction (or number) of plain LoRA's
parameters. All decoder layers have the same LoRA shapes, so a plan's parameter fraction is
``distinct * r' / (L * r)``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from sharelora_plugin.planning.rules import (
    DEFAULT_OPTIMAL_TIME_LIMIT_S,
    PlanError,
    check_rank,
    check_rank_expansion,
    check_target_fraction,
    is_int,
    is_number,
)
from sharelora_plugin.planning.sets import distinct_modules
from sharelora_plugin.planning.similarity import validate_similarity
from sharelora_plugin.planning.strategies import _greedy_pass, _sorted_pairs, optimal_share_sets


def _fraction(num_layers: int, distinct: int, base_rank: int, rank_expansion: Any) -> float:
    if isinstance(rank_expansion, bool | np.bool_):
        final_rank = (num_layers * base_rank) // distinct if rank_expansion else base_rank
    else:
        final_rank = int(rank_expansion)
    return distinct * final_rank / (num_layers * base_rank)


def threshold_for_budget(
    similarity: Any,
    target_fraction: float,
    strategy: str = "greedy",
    contiguous: bool = False,
    rank_expansion: bool | int = False,
    rank: int = 8,
    time_limit: float = DEFAULT_OPTIMAL_TIME_LIMIT_S,
) -> float:
    """The threshold whose plan uses the largest parameter fraction that is ``<= target_fraction``.

    Parameter fraction = ``distinct * r' / (L * r)`` (all decoder layers have the same LoRA shapes). Candidate
    thresholds are the distinct off-diagonal similarities; among thresholds giving the chosen fraction the highest
    wins. Greedy is evaluated at every candidate (it is not monotone). Optimal relies on its distinct count being
    monotone in the threshold: bisection without rank expansion, a bisection-based sweep of all breakpoints with
    it. Raises :class:`PlanError` with the smallest reachable fraction when the target cannot be met.
    """
    sim = validate_similarity(similarity)
    num_layers = sim.shape[0]
    if target_fraction is None:
        raise PlanError("target_fraction must be a number in (0, 1]; got None")
    target_fraction = check_target_fraction(target_fraction)
    if strategy not in ("greedy", "optimal"):
        raise PlanError(f"threshold_for_budget strategy must be 'greedy' or 'optimal'; got {strategy!r}")
    if contiguous and strategy != "optimal":
        raise PlanError("contiguous=True is only supported with strategy 'optimal'")
    rank = check_rank(rank)
    rank_expansion = check_rank_expansion(rank_expansion)

    # A threshold must lie in (0, 1] (rules.check_threshold); lower similarities are never candidates.
    candidates = sorted(
        {float(v) for v in sim[np.triu_indices(num_layers, k=1)] if 0.0 < v <= 1.0}, reverse=True
    )
    if not candidates:
        raise PlanError(
            "the similarity matrix has no pair with similarity in (0, 1]; no threshold can share a layer"
        )
    if strategy == "greedy":
        # Greedy's distinct count is not monotone in the threshold (a lower one can change which sets form
        # first), so every candidate is evaluated.
        sim_rows, pairs = sim.tolist(), _sorted_pairs(sim)
        curve = [
            (threshold, distinct_modules(num_layers, _greedy_pass(sim_rows, pairs, threshold)))
            for threshold in candidates
        ]
    else:
        cache: dict[int, int] = {}

        def distinct_at(index: int) -> int:
            if index not in cache:
                sets = optimal_share_sets(
                    sim, candidates[index], contiguous=contiguous, time_limit=time_limit
                )
                cache[index] = distinct_modules(num_layers, sets)
            return cache[index]

        def fraction_at(index: int) -> float:
            return _fraction(num_layers, distinct_at(index), rank, rank_expansion)

        last = len(candidates) - 1
        if isinstance(rank_expansion, bool | np.bool_) and rank_expansion:
            # d * floor(L r / d) >= L r - d + 1, so plans with d < (1 - target) L r + 1 overshoot; their
            # (dense, slow) low thresholds are only solved to report the smallest reachable fraction.
            fewest = math.ceil((1.0 - target_fraction) * num_layers * rank + 1 - 1e-9)
            if distinct_at(0) < fewest:
                _sweep_breakpoints(distinct_at, 0, last)  # unreachable; sweep all for the error message
            else:
                # Largest index whose plan keeps >= fewest modules (distinct is non-increasing in the index).
                low, high = (last, last) if distinct_at(last) >= fewest else (0, last)
                while high - low > 1:
                    middle = (low + high) // 2
                    low, high = (middle, high) if distinct_at(middle) >= fewest else (low, middle)
                _sweep_breakpoints(distinct_at, 0, low)
                if all(
                    _fraction(num_layers, d, rank, rank_expansion) > target_fraction for d in cache.values()
                ):
                    _sweep_breakpoints(distinct_at, 0, last)
        else:
            # Fraction is non-increasing in the index: find the first index with fraction <= target.
            if fraction_at(last) <= target_fraction:
                low, high = 0, last
                while low < high:
                    middle = (low + high) // 2
                    if fraction_at(middle) <= target_fraction:
                        high = middle
                    else:
                        low = middle + 1
                fraction_at(low)
        curve = [(candidates[index], cache[index]) for index in sorted(cache)]

    best: tuple[float, float] | None = None  # (fraction, threshold)
    for threshold, distinct in curve:  # highest threshold first, so ties keep the highest
        fraction = _fraction(num_layers, distinct, rank, rank_expansion)
        if fraction <= target_fraction + 1e-12 and (best is None or fraction > best[0]):
            best = (fraction, threshold)
    if best is None:
        smallest = min(_fraction(num_layers, d, rank, rank_expansion) for _, d in curve)
        raise PlanError(
            f"target_fraction={target_fraction} is not reachable with strategy {strategy!r} on this "
            f"{num_layers}-layer matrix; the smallest parameter fraction reachable is {smallest:.4f}"
        )
    return best[1]


def _sweep_breakpoints(distinct_at: Any, low: int, high: int) -> None:
    """Evaluate ``distinct_at`` at every index where the (monotone) value changes, by recursive bisection."""
    if distinct_at(low) == distinct_at(high) or high - low <= 1:
        return
    middle = (low + high) // 2
    _sweep_breakpoints(distinct_at, low, middle)
    _sweep_breakpoints(distinct_at, middle, high)


def threshold_for_params(
    similarity: Any,
    target_params: int,
    params_per_layer_at_rank_1: int,
    rank: int = 8,
    **kwargs: Any,
) -> float:
    """:func:`threshold_for_budget` for an absolute LoRA parameter budget.

    ``params_per_layer_at_rank_1`` is the LoRA parameter count of one decoder layer's targets at rank 1 (for
    ``A: r x in`` and ``B: out x r`` it is ``sum(in + out)`` over the targets), so plain LoRA has
    ``L * rank * params_per_layer_at_rank_1`` parameters.
    """
    sim = validate_similarity(similarity)
    if not is_int(params_per_layer_at_rank_1) or params_per_layer_at_rank_1 < 1:
        raise PlanError(
            f"params_per_layer_at_rank_1 must be a positive integer; got {params_per_layer_at_rank_1!r}"
        )
    if not is_number(target_params) or target_params <= 0:
        raise PlanError(f"target_params must be a positive number; got {target_params!r}")
    full = sim.shape[0] * check_rank(rank) * params_per_layer_at_rank_1
    return threshold_for_budget(sim, min(target_params / full, 1.0), rank=rank, **kwargs)
