"""Making a plan: the pairs that count as similar (ε, or the bootstrap lower bound when robust), the share sets of
each strategy, and the :class:`~sharelora_plugin.planning.plan.SharePlan` that records them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from sharelora_plugin.planning.budget import threshold_for_budget
from sharelora_plugin.planning.plan import SharePlan
from sharelora_plugin.planning.rules import (
    DATA_STRATEGIES,
    DEFAULT_OPTIMAL_TIME_LIMIT_S,
    DEFAULT_THRESHOLD,
    PlanError,
    check_layer_kinds,
    check_metric,
    check_num_layers,
    check_planning_options,
    check_rank,
    check_robust,
    check_threshold,
)
from sharelora_plugin.planning.sets import (
    layers_saved,
    resolve_rank,
    satisfies_threshold,
    validate_share_sets,
)
from sharelora_plugin.planning.similarity import validate_similarity
from sharelora_plugin.planning.strategies import (
    alternate_share_sets,
    greedy_share_sets,
    optimal_share_sets,
    random_adjacent_share_sets,
    separate_kinds,
)


def evidence_similarity(similarity: np.ndarray, lower_bound: np.ndarray, threshold: float) -> np.ndarray:
    """The matrix the robust option plans on: a pair keeps its mean similarity when its lower bootstrap bound
    clears ``threshold`` and otherwise gets ``min(mean, lower bound)``, which is below ``threshold``. Sets are then
    formed only from pairs whose evidence holds, in the order of their mean similarity."""
    return np.where(lower_bound >= threshold, similarity, np.minimum(similarity, lower_bound))


def choose_share_sets(
    similarity: np.ndarray,
    *,
    strategy: str,
    threshold: float | None,
    contiguous: bool = False,
    target_fraction: float | None = None,
    rank: int = 8,
    rank_expansion: bool | int = False,
    lower_bound: np.ndarray | None = None,
    layer_kinds: Sequence[int] | None = None,
    time_limit: float = DEFAULT_OPTIMAL_TIME_LIMIT_S,
) -> tuple[list[list[int]], float]:
    """Share sets of a data strategy (greedy or optimal) on a validated matrix, and the threshold used.

    ``target_fraction`` picks the threshold with :func:`threshold_for_budget` (and overrides ``threshold``);
    ``lower_bound`` applies the robust option (:func:`evidence_similarity`); ``layer_kinds`` keeps every set within
    one kind. This is the one function both :func:`make_plan` and the bootstrap call, so a resample is planned
    exactly like the plan itself.
    """
    similarity = separate_kinds(similarity, layer_kinds)
    if target_fraction is not None:
        threshold = threshold_for_budget(
            similarity,
            target_fraction,
            strategy=strategy,
            contiguous=contiguous,
            rank_expansion=rank_expansion,
            rank=rank,
            time_limit=time_limit,
        )
    if threshold is None:
        raise PlanError(f"strategy {strategy!r} needs a threshold (or target_fraction)")
    planned_on = (
        similarity if lower_bound is None else evidence_similarity(similarity, lower_bound, threshold)
    )
    if strategy == "greedy":
        return greedy_share_sets(planned_on, threshold), threshold
    return optimal_share_sets(planned_on, threshold, contiguous=contiguous, time_limit=time_limit), threshold


def make_plan(
    *,
    num_layers: int,
    strategy: str = "greedy",
    similarity: Any = None,
    threshold: float | None = DEFAULT_THRESHOLD,
    metric: str = "angular",
    share_sets: Any = None,
    contiguous: bool = False,
    seed: int = 0,
    random_like: SharePlan | None = None,
    rank: int = 8,
    rank_expansion: bool | int = False,
    target_fraction: float | None = None,
    lower_bound: Any = None,
    layer_kinds: Any = None,
    layer_kind_descriptions: list[str] | None = None,
    time_limit: float = DEFAULT_OPTIMAL_TIME_LIMIT_S,
) -> SharePlan:
    """Build a :class:`SharePlan` with one of :data:`STRATEGIES`.

    * ``greedy`` / ``optimal``: need ``similarity`` and ``threshold`` (or ``target_fraction``, which picks the
      threshold via :func:`threshold_for_budget` and overrides ``threshold``). ``contiguous`` applies to optimal.
      ``lower_bound`` (an L x L matrix of lower bootstrap bounds, see :mod:`.stability`) makes a pair count as
      similar only when its bound clears ε.
    * ``manual``: ``share_sets`` as given (validated).
    * ``random``: ShareLoRA* — random adjacent sets with the saving and set count of ``random_like``, or else of the
      greedy plan at ``threshold`` (or ``target_fraction``) on ``similarity``; ``seed`` makes it reproducible.
    * ``alternate``: ``[[0, 1], [2, 3], ...]``.

    ``layer_kinds`` (one kind id per layer, see :mod:`sharelora_plugin.layer_kinds`) keeps every set of every
    strategy within one kind: greedy/optimal never pair layers of different kinds, random draws again until its
    sets fit, alternate leaves out pairs of two kinds, and manual sets across kinds are refused.

    ``rank_expansion``: ``False`` keeps ``rank``, ``True`` applies :func:`expanded_rank`, an int is the final rank.
    Only greedy/optimal enforce eq. 3; for the others ``constraint_satisfied`` records whether the sets happen to
    meet it when a similarity and threshold are known.
    """
    num_layers = check_num_layers(num_layers)
    check_metric(metric)
    check_planning_options(
        strategy=strategy,
        contiguous=contiguous,
        share_sets=share_sets,
        target_fraction=target_fraction,
    )
    if lower_bound is not None:
        check_robust(strategy, target_fraction)
    base_rank = check_rank(rank)
    kinds = check_layer_kinds(layer_kinds, num_layers)
    if kinds is not None and len(set(kinds)) == 1:
        kinds = None  # one kind: nothing to separate
        layer_kind_descriptions = None
    sim = None
    if similarity is not None:
        sim = validate_similarity(similarity)
        if sim.shape[0] != num_layers:
            raise PlanError(f"similarity is {sim.shape[0]} x {sim.shape[0]} but num_layers is {num_layers}")
    bound = None
    if lower_bound is not None:
        bound = np.asarray(lower_bound, dtype=np.float64)
        if sim is None or bound.shape != sim.shape:
            raise PlanError(
                "lower_bound must be an L x L matrix beside a similarity matrix of the same shape"
            )
    if target_fraction is not None and sim is None:
        raise PlanError("target_fraction needs a similarity matrix to choose the threshold from")
    if threshold is not None and target_fraction is None:
        threshold = check_threshold(threshold)

    plan_seed: int | None = None
    # how sets are chosen from the matrix (the plan's own strategy, or greedy as random's reference)
    choice = {
        "threshold": threshold,
        "target_fraction": target_fraction,
        "rank": base_rank,
        "rank_expansion": rank_expansion,
        "layer_kinds": kinds,
        "time_limit": time_limit,
    }
    if strategy in DATA_STRATEGIES:
        if sim is None or (threshold is None and target_fraction is None):
            raise PlanError(f"strategy {strategy!r} needs a similarity matrix and a threshold")
        sets, threshold = choose_share_sets(
            sim, strategy=strategy, contiguous=contiguous, lower_bound=bound, **choice
        )
    elif strategy == "manual":
        if share_sets is None:
            raise PlanError("strategy 'manual' needs share_sets, e.g. [[16, 17], [18, 19, 20]]")
        sets = validate_share_sets(share_sets, num_layers)
        check_layer_kinds(kinds, num_layers, sets, name="share_sets vs layer kinds")
    elif strategy == "random":
        if random_like is not None:
            if random_like.num_layers != num_layers:
                raise PlanError(
                    f"random_like has {random_like.num_layers} layers but num_layers is {num_layers}"
                )
            reference = random_like.share_sets
            if target_fraction is not None:
                threshold = threshold_for_budget(
                    sim, target_fraction, rank=base_rank, rank_expansion=rank_expansion, time_limit=time_limit
                )
        elif sim is not None and (threshold is not None or target_fraction is not None):
            reference, threshold = choose_share_sets(sim, strategy="greedy", **choice)
        else:
            raise PlanError(
                "strategy 'random' needs random_like (a plan to match) or a similarity matrix and threshold"
            )
        sets = random_adjacent_share_sets(
            num_layers, layers_saved(reference), seed, num_sets=len(reference) or None, layer_kinds=kinds
        )
        plan_seed = int(seed)
    else:
        sets = alternate_share_sets(num_layers, kinds)

    enforced = strategy in DATA_STRATEGIES
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
        rank=resolve_rank(num_layers, sets, base_rank, rank_expansion),
        contiguous=bool(contiguous),
        seed=plan_seed,
        target_fraction=None if target_fraction is None else float(target_fraction),
        constraint_enforced=enforced,
        constraint_satisfied=satisfied,
        layer_kinds=kinds,
        layer_kind_descriptions=None if kinds is None else layer_kind_descriptions,
    )
