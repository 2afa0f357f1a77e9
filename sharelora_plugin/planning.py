"""Similarity matrix -> :class:`SharePlan` (which decoder layers share one set of LoRA modules).

This is the pure planning layer of ShareLoRA (paper §3): it knows nothing of torch, PEFT or Axolotl, so every
algorithm here can be tested on plain matrices.

Terms (paper notation):

* ``L`` decoder layers, an ``L x L`` similarity matrix ``s`` (``"angular"``: ``s = 1 - arccos(cos) / pi``, eq. 4;
  or plain ``"cosine"``), and a threshold ``epsilon``.
* A *share set* is a set of at least two layers; every pair inside it must have ``s >= epsilon`` (eq. 3). Share sets
  are disjoint. The *leader* of a set is its smallest layer index; the other members use the leader's LoRA modules.
* Distinct LoRA modules per target module = ``L - sum|S_i| + |S|``; rank expansion
  ``r' = floor(L / (L - sum|S_i| + |S|) * r)`` keeps the parameter count close to plain LoRA's.

Strategies: ``greedy`` (Algorithm 1, with the constraint re-checked against every member), ``optimal`` (exact
minimum number of distinct modules via a MILP solved by HiGHS, or an exact dynamic programme over runs of adjacent
layers when ``contiguous=True``), ``manual`` (user-given sets), ``random`` (the paper's ShareLoRA* baseline: random
adjacent sets with the same saving) and ``alternate`` (the paper's naive share: odd layer mirrors the even one).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

LOG = logging.getLogger(__name__)

STRATEGIES = ("greedy", "optimal", "manual", "random", "alternate")
METRICS = ("angular", "cosine")
FORMAT_VERSION = 1

# Similarities come from float32 activations averaged over samples; anything this close to the valid range or to
# symmetry is rounding, not a wrong matrix.
_TOLERANCE = 1e-6
DEFAULT_OPTIMAL_TIME_LIMIT_S = 60.0


class PlanError(ValueError):
    """A user-facing problem with a similarity matrix, share sets, plan options or a plan file."""


# --------------------------------------------------------------------------------------------------------------------
# Validation


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(
        value, bool | np.bool_
    )


def validate_similarity(matrix: Any, name: str = "similarity") -> np.ndarray:
    """Return ``matrix`` as a float64 ``L x L`` array, or raise :class:`PlanError` saying what is wrong.

    Requirements: 2-D, square, ``L >= 2``, finite, values in ``[-1, 1]`` (values within 1e-6 outside are clipped)
    and symmetric within 1e-6 (the result is exactly symmetrised). The diagonal is ignored and set to 1.
    """
    try:
        array = np.array(matrix, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise PlanError(
            f"{name} must be an L x L matrix of numbers; could not read it as one ({err})"
        ) from None
    if array.ndim != 2 or array.shape[0] != array.shape[1]:
        raise PlanError(f"{name} must be a square L x L matrix; got shape {tuple(array.shape)}")
    num_layers = array.shape[0]
    if num_layers < 2:
        raise PlanError(f"{name} must cover at least 2 layers; got a {num_layers} x {num_layers} matrix")
    off_diagonal = ~np.eye(num_layers, dtype=bool)
    bad = off_diagonal & ~np.isfinite(array)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise PlanError(
            f"{name} has a non-finite value {array[i, j]} at [{i}][{j}]; all values must be finite"
        )
    outside = off_diagonal & ((array < -1 - _TOLERANCE) | (array > 1 + _TOLERANCE))
    if outside.any():
        i, j = np.argwhere(outside)[0]
        raise PlanError(f"{name}[{i}][{j}] = {array[i, j]!r} is outside the valid range [-1, 1]")
    asymmetric = off_diagonal & (np.abs(array - array.T) > _TOLERANCE)
    if asymmetric.any():
        i, j = np.argwhere(asymmetric)[0]
        raise PlanError(
            f"{name} must be symmetric; {name}[{i}][{j}] = {array[i, j]!r} but {name}[{j}][{i}] = {array[j, i]!r}"
        )
    array = np.clip((array + array.T) / 2.0, -1.0, 1.0)
    np.fill_diagonal(array, 1.0)
    return array


def validate_share_sets(share_sets: Any, num_layers: int, name: str = "share_sets") -> list[list[int]]:
    """Check user-given share sets and return them canonical: each set sorted, sets sorted by leader.

    Each set needs at least two distinct integer layer indices in ``[0, num_layers)``; sets must be disjoint.
    """
    if isinstance(share_sets, str | bytes) or not isinstance(share_sets, Sequence):
        raise PlanError(
            f"{name} must be a list of lists of layer indices, e.g. [[16, 17], [18, 19, 20]]; got {share_sets!r}"
        )
    seen: dict[int, int] = {}
    result: list[list[int]] = []
    for position, members in enumerate(share_sets):
        if isinstance(members, str | bytes) or not isinstance(members, Sequence):
            raise PlanError(f"{name}[{position}] must be a list of layer indices; got {members!r}")
        if len(members) < 2:
            raise PlanError(
                f"{name}[{position}] = {list(members)!r} has {len(members)} layer(s); a share set needs at least 2"
            )
        clean: list[int] = []
        for layer in members:
            if not _is_int(layer):
                raise PlanError(f"{name}[{position}] contains {layer!r}, which is not an integer layer index")
            layer = int(layer)
            if not 0 <= layer < num_layers:
                raise PlanError(
                    f"{name}[{position}] contains layer {layer}; valid layer indices are 0..{num_layers - 1}"
                )
            if layer in clean:
                raise PlanError(f"{name}[{position}] lists layer {layer} twice")
            if layer in seen:
                raise PlanError(
                    f"layer {layer} is in both {name}[{seen[layer]}] and {name}[{position}]; share sets must be disjoint"
                )
            seen[layer] = position
            clean.append(layer)
        result.append(sorted(clean))
    return sorted(result)


def _validate_num_layers(num_layers: Any, name: str = "num_layers") -> int:
    if not _is_int(num_layers) or num_layers < 2:
        raise PlanError(f"{name} must be an integer >= 2; got {num_layers!r}")
    return int(num_layers)


def _validate_rank(rank: Any, name: str = "rank") -> int:
    if not _is_int(rank) or rank < 1:
        raise PlanError(f"{name} must be a positive integer; got {rank!r}")
    return int(rank)


def _validate_threshold(threshold: Any, name: str = "threshold") -> float:
    if not _is_number(threshold) or not math.isfinite(threshold) or not -1.0 <= threshold <= 1.0:
        raise PlanError(f"{name} must be a number in [-1, 1]; got {threshold!r}")
    return float(threshold)


# --------------------------------------------------------------------------------------------------------------------
# Counting


def layers_covered(share_sets: Sequence[Sequence[int]]) -> int:
    """Number of layers inside some share set, ``sum |S_i|`` (the objective of eq. 2)."""
    return sum(len(members) for members in share_sets)


def layers_saved(share_sets: Sequence[Sequence[int]]) -> int:
    """Number of LoRA modules per target saved by sharing, ``sum (|S_i| - 1)``."""
    return sum(len(members) - 1 for members in share_sets)


def distinct_modules(num_layers: int, share_sets: Sequence[Sequence[int]]) -> int:
    """Distinct LoRA modules per target module after sharing, ``L - sum |S_i| + |S|``."""
    return num_layers - layers_saved(share_sets)


def expanded_rank(num_layers: int, share_sets: Sequence[Sequence[int]], rank: int) -> int:
    """Rank after expansion, ``r' = floor(L / (L - sum|S_i| + |S|) * r)``, computed exactly in integers."""
    rank = _validate_rank(rank)
    return (num_layers * rank) // distinct_modules(num_layers, share_sets)


def satisfies_threshold(similarity: Any, share_sets: Sequence[Sequence[int]], threshold: float) -> bool:
    """True when every pair of layers inside every share set has similarity >= ``threshold`` (eq. 3)."""
    sim = validate_similarity(similarity)
    return all(_set_min_similarity(sim, members) >= threshold for members in share_sets)


def _set_min_similarity(sim: np.ndarray, members: Sequence[int]) -> float:
    idx = np.asarray(members)
    block = sim[np.ix_(idx, idx)]
    return float(block[~np.eye(len(idx), dtype=bool)].min())


def _resolve_rank(
    num_layers: int, share_sets: Sequence[Sequence[int]], base_rank: int, rank_expansion: Any
) -> int:
    """``False`` keeps ``base_rank``, ``True`` applies :func:`expanded_rank`, an int is used as the final rank."""
    if isinstance(rank_expansion, bool | np.bool_):
        return expanded_rank(num_layers, share_sets, base_rank) if rank_expansion else base_rank
    if _is_int(rank_expansion) and rank_expansion >= 1:
        return int(rank_expansion)
    raise PlanError(f"rank_expansion must be true, false or a positive integer rank; got {rank_expansion!r}")


# --------------------------------------------------------------------------------------------------------------------
# Strategies


def _greedy_pass(
    sim_rows: list[list[float]], pairs: list[tuple[int, int, float]], threshold: float
) -> list[list[int]]:
    """Algorithm 1 over ``pairs`` (already sorted) with re-checked membership; see :func:`greedy_share_sets`."""
    set_of: dict[int, list[int]] = {}
    sets: list[list[int]] = []
    for i, j, value in pairs:
        if value < threshold:
            break
        in_i, in_j = set_of.get(i), set_of.get(j)
        if in_i is None and in_j is None:
            members = [i, j]
            sets.append(members)
            set_of[i] = set_of[j] = members
        elif in_i is None or in_j is None:
            members, newcomer = (in_i, j) if in_j is None else (in_j, i)
            # Algorithm 1 as printed adds the newcomer on one qualifying pair; eq. 3 needs it close to everyone.
            row = sim_rows[newcomer]
            if all(row[member] >= threshold for member in members):
                members.append(newcomer)
                set_of[newcomer] = members
        # Both already placed: Algorithm 1 never merges sets.
    return sorted(sorted(members) for members in sets)


def greedy_share_sets(similarity: Any, threshold: float) -> list[list[int]]:
    """Share sets by the paper's Algorithm 1 (greedy, highest-similarity pair first).

    Pairs ``(i < j)`` with ``s >= threshold`` are visited by similarity, highest first (ties by ``(i, j)``
    ascending, so the result is deterministic). Neither layer placed -> new set ``{i, j}``. Exactly one placed ->
    the other joins that set only if its similarity to *every* member is ``>= threshold``. The pseudo-code in the
    paper checks just the visited pair, which can violate eq. 3; we re-check. Both placed -> skipped (sets are
    never merged, as in the paper).
    """
    sim = validate_similarity(similarity)
    threshold = _validate_threshold(threshold)
    return _greedy_pass(sim.tolist(), _sorted_pairs(sim), threshold)


def _sorted_pairs(sim: np.ndarray) -> list[tuple[int, int, float]]:
    """All pairs ``(i, j, s_ij)`` with i < j, by similarity descending, ties by (i, j) ascending."""
    rows, cols = np.triu_indices(sim.shape[0], k=1)
    values = sim[rows, cols]
    order = np.lexsort((cols, rows, -values))
    return list(zip(rows[order].tolist(), cols[order].tolist(), values[order].tolist(), strict=True))


def _contiguous_share_sets(sim: np.ndarray, threshold: float) -> list[list[int]]:
    """Exact DP over runs of adjacent layers: fewest distinct modules, then most layers covered."""
    num_layers = sim.shape[0]
    # best[b] = (distinct modules, -covered) for layers [0, b); ties keep the earliest split found.
    best: list[tuple[int, int]] = [(0, 0)] + [(num_layers + 1, 0)] * num_layers
    start_of: list[int] = [0] * (num_layers + 1)
    for end in range(1, num_layers + 1):
        last = end - 1
        # Scan runs [start, last] from the shortest; a run stays valid only while each new layer meets all others.
        start = last
        while start >= 0:
            if start < last and any(sim[start, k] < threshold for k in range(start + 1, last + 1)):
                break
            length = end - start
            candidate = (best[start][0] + 1, best[start][1] - (length if length >= 2 else 0))
            if candidate < best[end]:
                best[end] = candidate
                start_of[end] = start
            start -= 1
    sets: list[list[int]] = []
    end = num_layers
    while end > 0:
        start = start_of[end]
        if end - start >= 2:
            sets.append(list(range(start, end)))
        end = start
    return sorted(sets)


def _clique_partition_milp(
    sim: np.ndarray, nodes: list[int], threshold: float, time_limit: float
) -> list[list[int]]:
    """Minimum clique partition of ``nodes`` (edges ``s >= threshold``), most layers covered among optima.

    Representatives formulation: ``x[i, j] = 1`` when layer ``j`` is in the set led by ``i`` (``i <= j``,
    ``x[i, i] = 1`` when ``i`` leads a set or stays alone). Each layer has exactly one leader; members need an
    edge to the leader (no variable otherwise) and to each other (``x[i, j] + x[i, k] <= x[i, i]`` for a non-edge
    ``j, k``). ``z[i] <= x[i, i]``, ``z[i] <= sum_j x[i, j]`` marks a leader with company. Objective, lexicographic
    in integers: ``min (n + 1) * sum x[i, i] - sum z[i]``.
    """
    n = len(nodes)
    adjacent = sim[np.ix_(nodes, nodes)] >= threshold
    var: dict[tuple[int, int], int] = {}
    for i in range(n):
        for j in range(i, n):
            if i == j or adjacent[i, j]:
                var[(i, j)] = len(var)
    z_offset = len(var)
    num_vars = z_offset + n
    cost = np.zeros(num_vars)
    for i in range(n):
        cost[var[(i, i)]] = n + 1
        cost[z_offset + i] = -1

    rows: list[int] = []
    cols: list[int] = []
    coefs: list[float] = []
    lower: list[float] = []
    upper: list[float] = []

    def constraint(terms: list[tuple[int, float]], lo: float, hi: float) -> None:
        row = len(lower)
        for col, coef in terms:
            rows.append(row)
            cols.append(col)
            coefs.append(coef)
        lower.append(lo)
        upper.append(hi)

    for j in range(n):
        constraint([(var[(i, j)], 1.0) for i in range(j + 1) if (i, j) in var], 1.0, 1.0)
    for i in range(n):
        leader = var[(i, i)]
        followers = [j for j in range(i + 1, n) if (i, j) in var]
        for j in followers:
            constraint([(var[(i, j)], 1.0), (leader, -1.0)], -np.inf, 0.0)
        for a, j in enumerate(followers):
            for k in followers[a + 1 :]:
                if not adjacent[j, k]:
                    constraint([(var[(i, j)], 1.0), (var[(i, k)], 1.0), (leader, -1.0)], -np.inf, 0.0)
        constraint([(z_offset + i, 1.0), (leader, -1.0)], -np.inf, 0.0)
        constraint([(z_offset + i, 1.0)] + [(var[(i, j)], -1.0) for j in followers], -np.inf, 0.0)

    matrix = coo_matrix((coefs, (rows, cols)), shape=(len(lower), num_vars)).tocsr()
    result = milp(
        cost,
        constraints=LinearConstraint(matrix, lower, upper),
        integrality=np.ones(num_vars),
        bounds=Bounds(0, 1),
        options={"time_limit": max(time_limit, 0.1), "mip_rel_gap": 0.0},
    )
    if result.status != 0 or result.x is None:
        raise PlanError(
            f"strategy 'optimal' could not prove an optimal partition of {n} connected layers at threshold "
            f"{threshold} within time_limit={time_limit:.0f} s (HiGHS: {result.message}); use strategy 'greedy', "
            "contiguous=True, or a larger time limit"
        )
    groups: dict[int, list[int]] = {}
    for (i, j), col in var.items():
        if result.x[col] > 0.5:
            groups.setdefault(i, []).append(nodes[j])
    return [sorted(members) for members in groups.values() if len(members) >= 2]


def optimal_share_sets(
    similarity: Any,
    threshold: float,
    contiguous: bool = False,
    time_limit: float = DEFAULT_OPTIMAL_TIME_LIMIT_S,
) -> list[list[int]]:
    """Share sets with the fewest distinct LoRA modules (= most layers saved) subject to eq. 3; exact.

    This is a minimum clique partition of the graph whose edges are pairs with ``s >= threshold``; among
    optimal partitions the one covering the most layers (eq. 2) is preferred. Connected components are solved
    independently with a MILP (scipy's HiGHS). If HiGHS cannot prove optimality within ``time_limit`` seconds a
    :class:`PlanError` is raised rather than returning a heuristic. ``contiguous=True`` restricts sets to runs of
    adjacent layers and is solved by an exact dynamic programme instead.
    """
    sim = validate_similarity(similarity)
    threshold = _validate_threshold(threshold)
    if contiguous:
        return _contiguous_share_sets(sim, threshold)
    adjacency = sim >= threshold
    np.fill_diagonal(adjacency, False)
    _, labels = connected_components(adjacency, directed=False)
    deadline = time.monotonic() + time_limit
    sets: list[list[int]] = []
    for label in np.unique(labels):
        nodes = [int(v) for v in np.flatnonzero(labels == label)]
        if len(nodes) < 2:
            continue
        block = adjacency[np.ix_(nodes, nodes)]
        if block.sum() == len(nodes) * (len(nodes) - 1):  # a clique: one set, nothing to optimise
            sets.append(nodes)
            continue
        sets.extend(_clique_partition_milp(sim, nodes, threshold, deadline - time.monotonic()))
    LOG.debug(
        "optimal share sets at threshold %s: %d distinct modules in %.3f s",
        threshold,
        distinct_modules(sim.shape[0], sets),
        time.monotonic() - deadline + time_limit,
    )
    return sorted(sets)


def random_adjacent_share_sets(
    num_layers: int, layers_saved: int, seed: int, num_sets: int | None = None
) -> list[list[int]]:
    """Random disjoint sets of adjacent layers saving exactly ``layers_saved`` modules (the paper's ShareLoRA*).

    ``num_sets`` fixes how many sets (else drawn uniformly from what is feasible). Set sizes are a uniform random
    composition of the saving, placed in random order with random gaps (sets may touch). Deterministic per seed.
    """
    num_layers = _validate_num_layers(num_layers)
    if not _is_int(layers_saved) or not 0 <= layers_saved <= num_layers - 1:
        raise PlanError(
            f"layers_saved must be an integer in 0..{num_layers - 1} for {num_layers} layers; got {layers_saved!r}"
        )
    if not _is_int(seed):
        raise PlanError(f"seed must be an integer; got {seed!r}")
    saved = int(layers_saved)
    if saved == 0:
        if num_sets not in (None, 0):
            raise PlanError(
                f"num_sets={num_sets!r} is impossible with layers_saved=0 (that means no share sets)"
            )
        return []
    most_sets = min(saved, num_layers - saved)  # every set saves >= 1 and covers saving + 1 layers
    rng = np.random.default_rng(seed)
    if num_sets is None:
        count = int(rng.integers(1, most_sets + 1))
    elif not _is_int(num_sets) or not 1 <= num_sets <= most_sets:
        raise PlanError(
            f"num_sets={num_sets!r} is impossible for layers_saved={saved} on {num_layers} layers; "
            f"valid: 1..{most_sets}"
        )
    else:
        count = int(num_sets)
    # Sizes - 1 form a composition of `saved` into `count` positive parts.
    cuts = (
        np.sort(rng.choice(np.arange(1, saved), size=count - 1, replace=False)) if count > 1 else np.array([])
    )
    savings = np.diff(np.concatenate([[0], cuts, [saved]])).astype(int)
    sizes = [int(s) + 1 for s in rng.permutation(savings)]
    # Free layers go into count + 1 gaps (zeros allowed): stars and bars.
    free = num_layers - sum(sizes)
    bars = np.sort(rng.choice(np.arange(free + count), size=count, replace=False))
    gaps = np.diff(np.concatenate([[-1], bars])) - 1
    sets: list[list[int]] = []
    position = 0
    for gap, size in zip(gaps, sizes, strict=True):
        position += int(gap)
        sets.append(list(range(position, position + size)))
        position += size
    return sets


def alternate_share_sets(num_layers: int) -> list[list[int]]:
    """The paper's naive share: each odd layer uses the modules of the even layer below it, ``[[0, 1], [2, 3], ...]``."""
    num_layers = _validate_num_layers(num_layers)
    return [[layer, layer + 1] for layer in range(0, num_layers - 1, 2)]


# --------------------------------------------------------------------------------------------------------------------
# Budgets


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
    if not _is_number(target_fraction) or not 0.0 < target_fraction <= 1.0:
        raise PlanError(f"target_fraction must be a number in (0, 1]; got {target_fraction!r}")
    if strategy not in ("greedy", "optimal"):
        raise PlanError(f"threshold_for_budget strategy must be 'greedy' or 'optimal'; got {strategy!r}")
    if contiguous and strategy != "optimal":
        raise PlanError("contiguous=True is only supported with strategy 'optimal'")
    rank = _validate_rank(rank)
    _resolve_rank(num_layers, [], rank, rank_expansion)  # validates rank_expansion

    candidates = sorted({float(v) for v in sim[np.triu_indices(num_layers, k=1)]}, reverse=True)
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
    if not _is_int(params_per_layer_at_rank_1) or params_per_layer_at_rank_1 < 1:
        raise PlanError(
            f"params_per_layer_at_rank_1 must be a positive integer; got {params_per_layer_at_rank_1!r}"
        )
    if not _is_number(target_params) or target_params <= 0:
        raise PlanError(f"target_params must be a positive number; got {target_params!r}")
    full = sim.shape[0] * _validate_rank(rank) * params_per_layer_at_rank_1
    return threshold_for_budget(sim, min(target_params / full, 1.0), rank=rank, **kwargs)


# --------------------------------------------------------------------------------------------------------------------
# The plan


@dataclass
class SharePlan:
    """Which decoder layers share LoRA modules, and everything needed to rebuild and audit that decision.

    Written beside every adapter as ``sharelora_plan.json``. ``rank`` is the final LoRA rank (after expansion),
    ``base_rank`` the configured one. ``metadata`` is free-form (model id, calibration settings, param counts, ...).
    """

    num_layers: int
    share_sets: list[list[int]]
    strategy: str
    metric: str = "angular"
    threshold: float | None = None
    similarity: list[list[float]] | None = None
    base_rank: int = 8
    rank: int = 8
    contiguous: bool = False
    seed: int | None = None
    target_fraction: float | None = None
    constraint_enforced: bool = True
    constraint_satisfied: bool | None = None
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.num_layers = _validate_num_layers(self.num_layers)
        self.share_sets = validate_share_sets(self.share_sets, self.num_layers)
        if self.strategy not in STRATEGIES:
            raise PlanError(f"strategy must be one of {', '.join(STRATEGIES)}; got {self.strategy!r}")
        if self.metric not in METRICS:
            raise PlanError(f"metric must be one of {', '.join(METRICS)}; got {self.metric!r}")
        if self.threshold is not None:
            self.threshold = _validate_threshold(self.threshold)
        if self.similarity is not None:
            sim = validate_similarity(self.similarity)
            if sim.shape[0] != self.num_layers:
                raise PlanError(
                    f"similarity is {sim.shape[0]} x {sim.shape[0]} but num_layers is {self.num_layers}; they must match"
                )
            self.similarity = sim.tolist()
        self.base_rank = _validate_rank(self.base_rank, "base_rank")
        self.rank = _validate_rank(self.rank, "rank")
        for name in ("contiguous", "constraint_enforced"):
            if not isinstance(getattr(self, name), bool):
                raise PlanError(f"{name} must be true or false; got {getattr(self, name)!r}")
        if self.constraint_satisfied is not None and not isinstance(self.constraint_satisfied, bool):
            raise PlanError(
                f"constraint_satisfied must be true, false or null; got {self.constraint_satisfied!r}"
            )
        if self.seed is not None and not _is_int(self.seed):
            raise PlanError(f"seed must be an integer or null; got {self.seed!r}")
        if self.target_fraction is not None and (
            not _is_number(self.target_fraction) or not 0.0 < self.target_fraction <= 1.0
        ):
            raise PlanError(
                f"target_fraction must be a number in (0, 1] or null; got {self.target_fraction!r}"
            )
        if not isinstance(self.metadata, dict):
            raise PlanError(f"metadata must be a mapping; got {type(self.metadata).__name__}")
        if self.contiguous:
            for members in self.share_sets:
                if members != list(range(members[0], members[-1] + 1)):
                    raise PlanError(
                        f"contiguous=True but share set {members} is not a run of adjacent layers"
                    )
        if self.constraint_enforced and self.similarity is not None and self.threshold is not None:
            for members in self.share_sets:
                lowest = _set_min_similarity(np.asarray(self.similarity), members)
                if lowest < self.threshold:
                    raise PlanError(
                        f"share set {members} has a pair with similarity {lowest:.4f} < threshold {self.threshold}, "
                        "but constraint_enforced is true; fix the sets or set constraint_enforced to false"
                    )

    @property
    def leaders(self) -> list[int]:
        """The leader (smallest layer) of each share set, in set order."""
        return [members[0] for members in self.share_sets]

    @property
    def distinct_modules(self) -> int:
        return distinct_modules(self.num_layers, self.share_sets)

    @property
    def layers_saved(self) -> int:
        return layers_saved(self.share_sets)

    @property
    def layers_covered(self) -> int:
        return layers_covered(self.share_sets)

    @property
    def param_fraction(self) -> float:
        """LoRA parameters relative to plain LoRA at ``base_rank``: ``distinct * rank / (L * base_rank)``."""
        return self.distinct_modules * self.rank / (self.num_layers * self.base_rank)

    def leader_of(self, layer: int) -> int:
        """The layer whose LoRA modules ``layer`` uses (itself when it is in no share set)."""
        if not _is_int(layer) or not 0 <= layer < self.num_layers:
            raise PlanError(f"layer must be an integer in 0..{self.num_layers - 1}; got {layer!r}")
        for members in self.share_sets:
            if layer in members:
                return members[0]
        return int(layer)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict with the stored fields, the derived ones and ``format_version``."""
        data: dict[str, Any] = {"format_version": FORMAT_VERSION}
        for item in fields(self):
            data[item.name] = getattr(self, item.name)
        data["share_sets"] = [list(members) for members in self.share_sets]
        data["leaders"] = self.leaders
        data["distinct_modules"] = self.distinct_modules
        data["layers_saved"] = self.layers_saved
        data["layers_covered"] = self.layers_covered
        data["param_fraction"] = self.param_fraction
        return data

    @classmethod
    def from_dict(cls, data: Any) -> SharePlan:
        """Rebuild a plan from :meth:`to_dict` output, validating it; derived fields are ignored."""
        if not isinstance(data, dict):
            raise PlanError(f"a ShareLoRA plan must be a JSON object; got {type(data).__name__}")
        version = data.get("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise PlanError(
                f"format_version {version!r} is not supported; this version reads {FORMAT_VERSION}"
            )
        stored = {item.name for item in fields(cls)}
        derived = {"format_version", *_DERIVED_KEYS}
        unknown = sorted(set(data) - stored - derived)
        if unknown:
            raise PlanError(
                f"unknown key(s) {', '.join(unknown)} in ShareLoRA plan; valid keys: {', '.join(sorted(stored))} "
                "(put extra information under 'metadata')"
            )
        missing = [key for key in ("num_layers", "share_sets", "strategy") if key not in data]
        if missing:
            raise PlanError(f"ShareLoRA plan is missing required key(s): {', '.join(missing)}")
        return cls(**{key: value for key, value in data.items() if key in stored})

    def save(self, path: str | os.PathLike) -> None:
        """Write the plan as pretty JSON (matrix rows on one line), atomically (temporary file + ``os.replace``)."""
        path = Path(path)
        try:
            text = _pretty_json(self.to_dict()) + "\n"
        except TypeError as err:
            raise PlanError(f"plan metadata must be JSON-serialisable: {err}") from None
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as out:
                out.write(text)
            os.replace(tmp_name, path)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike) -> SharePlan:
        """Read a plan saved by :meth:`save`; :class:`PlanError` names the path on any problem."""
        try:
            return cls.from_dict(_read_json(path))
        except PlanError as err:
            if str(path) in str(err):
                raise
            raise PlanError(f"{path}: {err}") from None

    def summary_table(self) -> str:
        """A human-readable table of the plan for logs."""
        threshold = "-" if self.threshold is None else f"{self.threshold:g}"
        lines = [
            f"ShareLoRA plan: strategy={self.strategy} metric={self.metric} threshold={threshold} "
            f"layers={self.num_layers}" + (" contiguous" if self.contiguous else ""),
            f"{'set':>4}  {'leader':>6}  {'size':>4}  {'min sim':>7}  layers",
        ]
        sim = None if self.similarity is None else np.asarray(self.similarity)
        for number, members in enumerate(self.share_sets):
            lowest = "-" if sim is None else f"{_set_min_similarity(sim, members):.4f}"
            lines.append(
                f"{number:>4}  {members[0]:>6}  {len(members):>4}  {lowest:>7}  {_format_layers(members)}"
            )
        if not self.share_sets:
            lines.append("   (no share sets: every layer keeps its own LoRA modules)")
        lines.append(
            f"distinct modules per target: {self.distinct_modules}/{self.num_layers} "
            f"(saved {self.layers_saved}, covered {self.layers_covered}); rank {self.base_rank} -> {self.rank}; "
            f"LoRA parameter fraction {self.param_fraction:.4f}"
        )
        return "\n".join(lines)

    def fingerprint(self) -> str:
        """sha256 of what decides module structure (``num_layers``, ``share_sets``, ``rank``), for cross-process checks."""
        canonical = json.dumps(
            {"num_layers": self.num_layers, "rank": self.rank, "share_sets": self.share_sets},
            sort_keys=True,
            separators=(",", ":"),
        )
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


_DERIVED_KEYS = ("leaders", "distinct_modules", "layers_saved", "layers_covered", "param_fraction")


def _format_layers(members: Sequence[int]) -> str:
    if list(members) == list(range(members[0], members[-1] + 1)):
        return f"{members[0]}-{members[-1]}"
    return ",".join(str(layer) for layer in members)


def _pretty_json(value: Any, indent: int = 0) -> str:
    """``json.dumps(indent=2)`` except that lists of scalars stay on one line (readable matrices)."""
    pad = "  " * (indent + 1)
    if isinstance(value, dict):
        if not value:
            return "{}"
        items = [
            f"{pad}{json.dumps(str(key))}: {_pretty_json(item, indent + 1)}" for key, item in value.items()
        ]
        return "{\n" + ",\n".join(items) + "\n" + "  " * indent + "}"
    if isinstance(value, list | tuple):
        if all(not isinstance(item, dict | list | tuple) for item in value):
            return json.dumps(list(value), allow_nan=False)
        return (
            "[\n"
            + ",\n".join(pad + _pretty_json(item, indent + 1) for item in value)
            + "\n"
            + "  " * indent
            + "]"
        )
    if isinstance(value, np.generic):
        value = value.item()
    return json.dumps(value, allow_nan=False)


def _read_json(path: str | os.PathLike) -> Any:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PlanError(f"plan file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise PlanError(f"cannot read {path}: {err}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise PlanError(
            f"{path} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})"
        ) from None


def load_similarity(path: str | os.PathLike) -> tuple[np.ndarray, dict]:
    """Read a similarity matrix from a ``sharelora_plan.json`` (or a JSON list of rows) or an ``L x L`` CSV.

    Returns the validated matrix and, for a plan file, the plan dict (else an empty dict). A CSV may have one
    non-numeric header row, which is skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise PlanError(f"similarity file not found: {path}")
    head = path.read_bytes()[:64].lstrip()
    if path.suffix.lower() == ".json" or head[:1] in (b"{", b"["):
        data = _read_json(path)
        if isinstance(data, list):
            return validate_similarity(data, name=str(path)), {}
        if not isinstance(data, dict) or data.get("similarity") is None:
            raise PlanError(
                f"{path} has no 'similarity' matrix; pass a sharelora_plan.json written after calibration"
            )
        return validate_similarity(data["similarity"], name=f"{path}: similarity"), data
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            rows = [row for row in csv.reader(handle) if row and any(cell.strip() for cell in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise PlanError(f"cannot read {path} as CSV: {err}") from None
    if rows:
        try:
            [float(cell) for cell in rows[0]]
        except ValueError:
            rows = rows[1:]  # header
    try:
        matrix = [[float(cell) for cell in row] for row in rows]
    except ValueError as err:
        raise PlanError(f"{path} must be an L x L CSV of numbers: {err}") from None
    if any(len(row) != len(matrix) for row in matrix):
        raise PlanError(
            f"{path} must be an L x L CSV; row lengths {sorted({len(r) for r in matrix})} for {len(matrix)} rows"
        )
    return validate_similarity(matrix, name=str(path)), {}


# --------------------------------------------------------------------------------------------------------------------
# Entry point


def make_plan(
    *,
    num_layers: int,
    strategy: str = "greedy",
    similarity: Any = None,
    threshold: float | None = 0.85,
    metric: str = "angular",
    share_sets: Any = None,
    contiguous: bool = False,
    seed: int = 0,
    random_like: SharePlan | None = None,
    rank: int = 8,
    rank_expansion: bool | int = False,
    target_fraction: float | None = None,
    time_limit: float = DEFAULT_OPTIMAL_TIME_LIMIT_S,
) -> SharePlan:
    """Build a :class:`SharePlan` with one of :data:`STRATEGIES`.

    * ``greedy`` / ``optimal``: need ``similarity`` and ``threshold`` (or ``target_fraction``, which picks the
      threshold via :func:`threshold_for_budget` and overrides ``threshold``). ``contiguous`` applies to optimal.
    * ``manual``: ``share_sets`` as given (validated).
    * ``random``: ShareLoRA* — random adjacent sets with the saving and set count of ``random_like``, or else of the
      greedy plan at ``threshold`` (or ``target_fraction``) on ``similarity``; ``seed`` makes it reproducible.
    * ``alternate``: ``[[0, 1], [2, 3], ...]``.

    ``rank_expansion``: ``False`` keeps ``rank``, ``True`` applies :func:`expanded_rank`, an int is the final rank.
    Only greedy/optimal enforce eq. 3; for the others ``constraint_satisfied`` records whether the sets happen to
    meet it when a similarity and threshold are known.
    """
    num_layers = _validate_num_layers(num_layers)
    if strategy not in STRATEGIES:
        raise PlanError(f"strategy must be one of {', '.join(STRATEGIES)}; got {strategy!r}")
    if metric not in METRICS:
        raise PlanError(f"metric must be one of {', '.join(METRICS)}; got {metric!r}")
    base_rank = _validate_rank(rank)
    sim = None
    if similarity is not None:
        sim = validate_similarity(similarity)
        if sim.shape[0] != num_layers:
            raise PlanError(f"similarity is {sim.shape[0]} x {sim.shape[0]} but num_layers is {num_layers}")
    if share_sets is not None and strategy != "manual":
        raise PlanError(f"share_sets is only used with strategy 'manual'; got strategy {strategy!r}")
    if contiguous and strategy in ("greedy",):
        raise PlanError(
            "contiguous=True is supported with strategy 'optimal' (or 'manual' with adjacent sets)"
        )
    if target_fraction is not None:
        if strategy not in ("greedy", "optimal", "random"):
            raise PlanError(
                f"target_fraction works with strategy greedy, optimal or random; got {strategy!r}"
            )
        if sim is None:
            raise PlanError("target_fraction needs a similarity matrix to choose the threshold from")
        threshold = threshold_for_budget(
            sim,
            target_fraction,
            strategy="optimal" if strategy == "optimal" else "greedy",
            contiguous=contiguous,
            rank_expansion=rank_expansion,
            rank=base_rank,
            time_limit=time_limit,
        )
    if threshold is not None:
        threshold = _validate_threshold(threshold)

    plan_seed: int | None = None
    if strategy in ("greedy", "optimal"):
        if sim is None or threshold is None:
            raise PlanError(f"strategy {strategy!r} needs a similarity matrix and a threshold")
        if strategy == "greedy":
            sets = greedy_share_sets(sim, threshold)
        else:
            sets = optimal_share_sets(sim, threshold, contiguous=contiguous, time_limit=time_limit)
    elif strategy == "manual":
        if share_sets is None:
            raise PlanError("strategy 'manual' needs share_sets, e.g. [[16, 17], [18, 19, 20]]")
        sets = validate_share_sets(share_sets, num_layers)
    elif strategy == "random":
        if random_like is not None:
            if random_like.num_layers != num_layers:
                raise PlanError(
                    f"random_like has {random_like.num_layers} layers but num_layers is {num_layers}"
                )
            reference = random_like.share_sets
        elif sim is not None and threshold is not None:
            reference = greedy_share_sets(sim, threshold)
        else:
            raise PlanError(
                "strategy 'random' needs random_like (a plan to match) or a similarity matrix and threshold"
            )
        sets = random_adjacent_share_sets(
            num_layers, layers_saved(reference), seed, num_sets=len(reference) or None
        )
        plan_seed = int(seed)
    else:
        sets = alternate_share_sets(num_layers)

    enforced = strategy in ("greedy", "optimal")
    satisfied = None
    if not enforced and sim is not None and threshold is not None:
        satisfied = satisfies_threshold(sim, sets, threshold)
    return SharePlan(
        num_layers=num_layers,
        share_sets=sets,
        strategy=strategy,
        metric=metric,
        threshold=threshold,
        similarity=None if sim is None else sim.tolist(),
        base_rank=base_rank,
        rank=_resolve_rank(num_layers, sets, base_rank, rank_expansion),
        contiguous=bool(contiguous),
        seed=plan_seed,
        target_fraction=None if target_fraction is None else float(target_fraction),
        constraint_enforced=enforced,
        constraint_satisfied=satisfied,
    )


def synthetic_similarity(num_layers: int = 30, seed: int = 0, dim: int = 64) -> np.ndarray:
    """A realistic angular-similarity matrix for tests, benchmarks and demos (no model needed).

    Layer states follow a random walk on the sphere with larger steps at the first and last layers and at a few
    random block boundaries, like real LLM residual streams: similarity is high near the diagonal (adjacent
    median ~0.9), decays with distance, and forms blocks.
    """
    num_layers = _validate_num_layers(num_layers)
    rng = np.random.default_rng(seed)
    steps = rng.lognormal(mean=np.log(0.28), sigma=0.35, size=num_layers)
    steps[[1, num_layers - 1]] *= 2.5
    boundaries = rng.choice(np.arange(2, num_layers - 1), size=max(1, num_layers // 8), replace=False)
    steps[boundaries] *= 1.8
    drift = rng.normal(size=dim)
    drift /= np.linalg.norm(drift)
    state = rng.normal(size=dim)
    state /= np.linalg.norm(state)
    states = []
    for layer in range(num_layers):
        noise = rng.normal(size=dim) / math.sqrt(dim) + 0.3 * drift
        state = state + steps[layer] * noise / np.linalg.norm(noise)
        state /= np.linalg.norm(state)
        states.append(state)
    states_array = np.array(states)
    cosine = np.clip(states_array @ states_array.T, -1.0, 1.0)
    similarity = 1.0 - np.arccos(cosine) / math.pi
    np.fill_diagonal(similarity, 1.0)
    return (similarity + similarity.T) / 2.0
