"""How much to trust a share plan: a bootstrap over the calibration samples (beyond the paper).

The plan is decided on a mean similarity matrix, which is an estimate from N samples. Resampling the samples with
replacement B times and re-planning each resampled mean with the plan's own strategy and settings shows how often
the same decision comes back:

* ``plan_frequency``: fraction of resamples whose share sets equal the chosen ones exactly;
* ``set_frequency``: per chosen set, the fraction of resamples that form exactly that set;
* ``constraint_frequency``: per chosen set, the fraction of resamples in which every pair still clears ε;
* ``comembership``: L x L, the fraction of resamples in which layers i and j share a module (the diagonal: in which
  layer i shares with any other layer);
* ``margin`` (min pairwise similarity - ε on the full mean) with its ``margin_interval``, the 5th and 95th
  percentiles over resamples (a 90% bootstrap interval).

Strategies whose sets do not come from the matrix (manual, alternate, random) keep their sets; for them the report
describes the greedy plan at the same ε (``reference_strategy: greedy``): ``set_frequency`` is how often greedy forms
each of their sets and ``comembership`` is greedy's.

The robust option (``confidence``, e.g. 0.9) plans on the lower bootstrap bound of every pair's mean similarity
(its ``1 - confidence`` quantile over resamples): a pair counts as similar only when that bound clears ε. Its
report resamples with the bounds held fixed (re-estimating them per resample would need a bootstrap inside the
bootstrap), so it measures how stable the grouping is among the pairs whose evidence holds.

Resampling uses multinomial counts (``numpy.random.default_rng(seed)``), so a report is reproducible from the
per-sample file and the seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from sharelora_plugin.planning.plan import SharePlan
from sharelora_plugin.planning.planner import choose_share_sets, make_plan
from sharelora_plugin.planning.rules import (
    DATA_STRATEGIES,
    DEFAULT_MIN_SAMPLES,
    DEFAULT_OPTIMAL_TIME_LIMIT_S,
    DEFAULT_RESAMPLES,
    DEFAULT_STABILITY_TARGET,
    MARGIN_INTERVAL,
    PlanError,
    check_min_samples,
    check_planning_options,
    check_probability,
    check_resamples,
    check_stability_target,
    is_int,
)
from sharelora_plugin.planning.sets import set_min_similarity
from sharelora_plugin.planning.subspace import SubspaceSketches


def resampled_means(samples: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """``[B, L, L]`` means of ``samples`` (``[N, L, L]`` per-sample similarities) over B bootstrap resamples
    (N draws with replacement each, as multinomial counts); symmetric, diagonal exactly 1, float64."""
    samples = np.asarray(samples)
    if samples.ndim != 3 or samples.shape[1] != samples.shape[2]:
        raise PlanError(f"per-sample similarities must be [N, L, L]; got shape {samples.shape}")
    num_samples, num_layers = samples.shape[0], samples.shape[1]
    if num_samples < 2:
        raise PlanError(f"a bootstrap needs at least 2 calibration samples; got {num_samples}")
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(num_samples, np.full(num_samples, 1.0 / num_samples), size=resamples)
    flat = samples.reshape(num_samples, -1).astype(np.float64)
    means = (counts.astype(np.float64) @ flat / num_samples).reshape(resamples, num_layers, num_layers)
    means = np.clip((means + means.transpose(0, 2, 1)) / 2.0, -1.0, 1.0)
    index = np.arange(num_layers)
    means[:, index, index] = 1.0
    return means


def resampled_similarities(samples: Any, resamples: int, seed: int) -> np.ndarray:
    """``[B, L, L]`` bootstrap similarity matrices: means of resampled per-sample matrices (angular, cosine), or
    for ``gradient_subspace`` the overlap of resampled sketch blocks (:class:`SubspaceSketches`), whose overlap
    is not a mean of per-block overlaps."""
    if isinstance(samples, SubspaceSketches):
        return samples.resampled(resamples, seed)
    return resampled_means(samples, resamples, seed)


def lower_bound(means: np.ndarray, confidence: float) -> np.ndarray:
    """Per pair, the one-sided lower bootstrap bound at ``confidence``: the ``1 - confidence`` quantile of the
    resampled means."""
    confidence = check_probability(confidence, "confidence")
    bound = np.quantile(means, 1.0 - confidence, axis=0)
    np.fill_diagonal(bound, 1.0)
    return bound


def _canonical(sets: Sequence[Sequence[int]]) -> tuple[tuple[int, ...], ...]:
    return tuple(sorted(tuple(sorted(members)) for members in sets))


def stability_report(
    share_sets: Sequence[Sequence[int]],
    similarity: np.ndarray,
    means: np.ndarray,
    *,
    strategy: str,
    threshold: float,
    num_samples: int,
    seed: int,
    contiguous: bool = False,
    target_fraction: float | None = None,
    rank: int = 8,
    rank_expansion: bool | int = False,
    confidence: float | None = None,
    bound: np.ndarray | None = None,
    layer_kinds: Sequence[int] | None = None,
    time_limit: float = DEFAULT_OPTIMAL_TIME_LIMIT_S,
    num_blocks: int | None = None,
) -> dict[str, Any]:
    """The ``stability`` block of a plan whose sets are ``share_sets``, from resampled ``means`` (see
    :func:`resampled_means`) and the full-data mean ``similarity``. ``num_blocks`` is given when the resampled
    units were blocks of samples (gradient sketches, one block per calibration batch), not single samples."""
    own = strategy in DATA_STRATEGIES
    chosen = _canonical(share_sets)
    num_layers = similarity.shape[0]
    resamples = means.shape[0]
    set_hits = np.zeros(len(chosen))
    constraint_hits = np.zeros(len(chosen))
    same_plan = 0
    reference_plan = None
    comembership = np.zeros((num_layers, num_layers))
    resampled_margins = np.empty((resamples, len(chosen)))
    options: dict[str, Any] = {
        "strategy": strategy if own else "greedy",
        "threshold": threshold,
        "contiguous": contiguous if own else False,
        "target_fraction": target_fraction,
        "rank": rank,
        "rank_expansion": rank_expansion,
        "lower_bound": bound if own else None,
        "layer_kinds": layer_kinds,
        "time_limit": time_limit,
    }
    if not own:
        # what greedy gives on the full mean: the reference whose stability random plans inherit
        reference_plan = _canonical(choose_share_sets(similarity, **options)[0])
    for index in range(resamples):
        sets, _ = choose_share_sets(means[index], **options)
        found = _canonical(sets)
        same_plan += found == (chosen if own else reference_plan)
        present = set(found)
        for number, members in enumerate(chosen):
            set_hits[number] += members in present
            lowest = set_min_similarity(means[index], members)
            constraint_hits[number] += lowest >= threshold
            resampled_margins[index, number] = lowest - threshold
        for members in found:
            idx = np.asarray(members)
            comembership[np.ix_(idx, idx)] += 1.0
    tail = (1.0 - MARGIN_INTERVAL) / 2.0
    report: dict[str, Any] = {
        "resamples": int(resamples),
        "seed": int(seed),
        "num_samples": int(num_samples),
        "strategy": strategy,
        "reference_strategy": strategy if own else "greedy",
        "threshold": float(threshold),
        "plan_frequency": round(same_plan / resamples, 4) if own else None,
        "set_frequency": [round(float(v), 4) for v in set_hits / resamples],
        "constraint_frequency": [round(float(v), 4) for v in constraint_hits / resamples],
        "margin": [round(set_min_similarity(similarity, members) - threshold, 6) for members in chosen],
        "margin_interval": [
            [round(float(np.quantile(column, tail)), 6), round(float(np.quantile(column, 1.0 - tail)), 6)]
            for column in resampled_margins.T
        ],
        "interval": MARGIN_INTERVAL,
        "comembership": (comembership / resamples).round(4).tolist(),
        "confidence": confidence,
    }
    if num_blocks is not None:
        report["num_blocks"] = int(num_blocks)
    if not own:
        report["reference_plan_frequency"] = round(same_plan / resamples, 4)
    if bound is not None:
        report["lower_bound"] = bound.round(6).tolist()
    return report


def plan_with_stability(
    samples: np.ndarray,
    similarity: Any,
    *,
    metric: str,
    strategy: str = "greedy",
    threshold: float | None = None,
    share_sets: Any = None,
    contiguous: bool = False,
    seed: int = 0,
    rank: int = 8,
    rank_expansion: bool | int = False,
    target_fraction: float | None = None,
    confidence: float | None = None,
    resamples: int = DEFAULT_RESAMPLES,
    bootstrap_seed: int = 0,
    layer_kinds: Sequence[int] | None = None,
    layer_kind_descriptions: list[str] | None = None,
    time_limit: float = DEFAULT_OPTIMAL_TIME_LIMIT_S,
) -> SharePlan:
    """:func:`make_plan` on the mean ``similarity`` plus its bootstrap report over ``samples`` (``[N, L, L]``
    per-sample similarities of ``metric``, or for ``gradient_subspace`` the :class:`SubspaceSketches`, whose blocks
    are resampled).

    ``confidence`` turns on the robust option (a pair counts as similar only when its lower bootstrap bound clears
    ε). ``resamples=0`` makes a plain plan with no report (and refuses ``confidence``, which needs the bootstrap).
    """
    check_planning_options(
        strategy=strategy,
        contiguous=contiguous,
        share_sets=share_sets,
        target_fraction=target_fraction,
        confidence=confidence,
    )
    resamples = check_resamples(resamples)
    if confidence is not None and resamples == 0:
        raise PlanError("confidence needs the bootstrap; set bootstrap_resamples > 0 (default 200)")
    if not is_int(bootstrap_seed):
        raise PlanError(f"bootstrap seed must be an integer; got {bootstrap_seed!r}")
    if not isinstance(samples, SubspaceSketches):
        samples = np.asarray(samples)
    means = None
    bound = None
    if resamples:
        means = resampled_similarities(samples, resamples, bootstrap_seed)
        if confidence is not None:
            bound = lower_bound(means, confidence)
    # the settings the plan and every resample are made with
    shared = {
        "strategy": strategy,
        "contiguous": contiguous,
        "rank": rank,
        "rank_expansion": rank_expansion,
        "target_fraction": target_fraction,
        "time_limit": time_limit,
    }
    plan = make_plan(
        num_layers=samples.shape[1],
        similarity=similarity,
        threshold=threshold,
        metric=metric,
        share_sets=share_sets,
        seed=seed,
        lower_bound=bound,
        layer_kinds=layer_kinds,
        layer_kind_descriptions=layer_kind_descriptions,
        **shared,
    )
    if means is not None and plan.threshold is not None:
        plan.stability = stability_report(
            plan.share_sets,
            np.asarray(plan.similarity),
            means,
            # with target_fraction each resample chooses its own ε, as the plan did
            threshold=plan.threshold,
            seed=bootstrap_seed,
            confidence=confidence,
            bound=bound,
            layer_kinds=plan.layer_kinds,
            **shared,
            **_resampled_units(samples),
        )
    return plan


def _resampled_units(samples: Any) -> dict[str, int]:
    """``num_samples`` of the calibration behind ``samples``, and ``num_blocks`` when blocks were resampled."""
    if isinstance(samples, SubspaceSketches):
        return {"num_samples": samples.num_samples, "num_blocks": samples.num_blocks}
    return {"num_samples": int(np.asarray(samples).shape[0])}


def frequency_for_stopping(plan: SharePlan) -> float | None:
    """The number stop-when-stable compares with its target: the plan frequency, or for a random plan the
    frequency of the greedy plan whose saving it copies; ``None`` when the plan has no bootstrap report."""
    stability = plan.stability or {}
    value = stability.get("plan_frequency")
    if value is None:
        value = stability.get("reference_plan_frequency")
    return value


class StopWhenStable:
    """Decides, after each calibration batch, whether the plan made from the samples so far is stable.

    Called with the running mean similarity and the per-sample similarities so far (for ``gradient_subspace``: the
    overlap and the :class:`SubspaceSketches` of the blocks so far); from ``min_samples`` samples on (and, for
    sketches, two blocks: the bootstrap resamples blocks) it plans with :func:`plan_with_stability` and answers True
    once the plan frequency reaches ``target``. Every check is kept in :attr:`checks`; :attr:`stop_reason` is
    ``"stable"`` once it answered True. The caller enforces the sample cap (``num_samples``) and records
    ``"cap"`` / ``"exhausted"`` itself.
    """

    def __init__(
        self,
        *,
        plan_options: dict[str, Any],
        min_samples: int = DEFAULT_MIN_SAMPLES,
        target: float = DEFAULT_STABILITY_TARGET,
    ):
        if plan_options.get("strategy") in ("manual", "alternate"):
            raise PlanError(
                f"stop_when_stable has nothing to wait for with strategy {plan_options['strategy']!r}: its sets do "
                "not depend on calibration; set stop_when_stable: false"
            )
        check_min_samples(min_samples)
        if not plan_options.get("resamples"):
            raise PlanError("stop_when_stable needs the bootstrap; set bootstrap_resamples > 0 (default 200)")
        self.plan_options = dict(plan_options)
        self.min_samples = int(min_samples)
        self.target = check_stability_target(target)
        self.checks: list[dict[str, Any]] = []
        self.stop_reason: str | None = None

    def __call__(self, similarity: np.ndarray, samples: Any) -> bool:
        units = _resampled_units(samples)
        if units["num_samples"] < self.min_samples or units.get("num_blocks", 2) < 2:
            return False
        plan = plan_with_stability(samples, similarity, **self.plan_options)
        frequency = frequency_for_stopping(plan)
        self.checks.append({**units, "plan_frequency": frequency})
        if frequency is not None and frequency >= self.target:
            self.stop_reason = "stable"
            return True
        return False
