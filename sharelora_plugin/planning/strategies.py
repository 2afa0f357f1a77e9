"""Strategies that choose share sets: ``greedy`` (the paper's Algorithm 1, with the constraint re-checked against
every member), ``optimal`` (exact minimum number of distinct modules via a MILP solved by HiGHS, or an exact dynamic
programme over runs of adjacent layers when ``contiguous=True``), ``random`` (the paper's ShareLoRA* baseline:
random adjacent sets with a given saving) and ``alternate`` (the paper's naive share: odd layer mirrors the even one).
``manual`` sets need no strategy: they are validated by :func:`sets.validate_share_sets`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from sharelora_plugin.planning.rules import (
    DEFAULT_OPTIMAL_TIME_LIMIT_S,
    PlanError,
    check_num_layers,
    check_threshold,
    is_int,
)
from sharelora_plugin.planning.sets import distinct_modules
from sharelora_plugin.planning.similarity import validate_similarity

LOG = logging.getLogger(__name__)


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
    threshold = check_threshold(threshold)
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
    threshold = check_threshold(threshold)
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
    num_layers: int,
    layers_saved: int,
    seed: int,
    num_sets: int | None = None,
    layer_kinds: Sequence[int] | None = None,
) -> list[list[int]]:
    """Random disjoint sets of adjacent layers saving exactly ``layers_saved`` modules (the paper's ShareLoRA*).

    ``num_sets`` fixes how many sets (else drawn uniformly from what is feasible). Set sizes are a uniform random
    composition of the saving, placed in random order with random gaps (sets may touch). Deterministic per seed.
    With ``layer_kinds`` (one kind id per layer) draws are repeated from the same generator until every set lies
    within one kind (the first draw is the one without kinds, so uniform models get the same sets).
    """
    num_layers = check_num_layers(num_layers)
    if not is_int(layers_saved) or not 0 <= layers_saved <= num_layers - 1:
        raise PlanError(
            f"layers_saved must be an integer in 0..{num_layers - 1} for {num_layers} layers; got {layers_saved!r}"
        )
    if not is_int(seed):
        raise PlanError(f"seed must be an integer; got {seed!r}")
    saved = int(layers_saved)
    if saved == 0:
        if num_sets not in (None, 0):
            raise PlanError(
                f"num_sets={num_sets!r} is impossible with layers_saved=0 (that means no share sets)"
            )
        return []
    most_sets = min(saved, num_layers - saved)  # every set saves >= 1 and covers saving + 1 layers
    if num_sets is not None and (not is_int(num_sets) or not 1 <= num_sets <= most_sets):
        raise PlanError(
            f"num_sets={num_sets!r} is impossible for layers_saved={saved} on {num_layers} layers; "
            f"valid: 1..{most_sets}"
        )
    rng = np.random.default_rng(seed)
    for _ in range(_RANDOM_ATTEMPTS):
        sets = _draw_adjacent_sets(rng, num_layers, saved, most_sets, num_sets)
        if layer_kinds is None or all(
            len({layer_kinds[layer] for layer in members}) == 1 for members in sets
        ):
            return sets
    raise PlanError(
        f"no random adjacent sets saving {saved} layers fit within one layer kind after {_RANDOM_ATTEMPTS} draws "
        "(runs of same-kind layers are too short); save fewer layers or give share_sets (strategy manual)"
    )


_RANDOM_ATTEMPTS = 10_000


def _draw_adjacent_sets(
    rng: np.random.Generator, num_layers: int, saved: int, most_sets: int, num_sets: int | None
) -> list[list[int]]:
    count = int(rng.integers(1, most_sets + 1)) if num_sets is None else int(num_sets)
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


def separate_kinds(sim: np.ndarray, layer_kinds: Sequence[int] | None) -> np.ndarray:
    """``sim`` with every pair of layers of different kinds set to -1, so no threshold in (0, 1] shares them."""
    if layer_kinds is None:
        return sim
    kinds = np.asarray(layer_kinds)
    return np.where(kinds[:, None] == kinds[None, :], sim, -1.0)


def alternate_share_sets(num_layers: int, layer_kinds: Sequence[int] | None = None) -> list[list[int]]:
    """The paper's naive share: each odd layer uses the modules of the even layer below it, ``[[0, 1], [2, 3], ...]``;
    with ``layer_kinds``, a pair of two different kinds is left out."""
    num_layers = check_num_layers(num_layers)
    pairs = [[layer, layer + 1] for layer in range(0, num_layers - 1, 2)]
    if layer_kinds is None:
        return pairs
    return [pair for pair in pairs if layer_kinds[pair[0]] == layer_kinds[pair[1]]]
