"""Every rule and default of a share plan, in one place.

The YAML schema (``sharelora_plugin.args``), the planner (``make_plan``, ``SharePlan``) and the ``sharelora``
command all call these checks, so a value is accepted or refused the same way whichever door it comes in by.
Each check raises :class:`PlanError` (a ``ValueError``, so pydantic reports it with the key path) naming the key
(``name``), the bad value and what would be valid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

STRATEGIES = ("greedy", "optimal", "manual", "random", "alternate")
# Strategies that read the similarity matrix and enforce eq. 3; the others take their sets from elsewhere.
DATA_STRATEGIES = ("greedy", "optimal")
METRICS = ("angular", "cosine", "gradient_subspace")
# The metric whose scale is not angular's: it runs from the random level k/d (about 0.015 on SmolLM2-135M at k 8)
# to 1, so the angular default ε means nothing on it (see planning.subspace).
GRADIENT_METRIC = "gradient_subspace"
# Strategies that need a threshold (or target_fraction) from the matrix: greedy/optimal, and random's reference.
THRESHOLD_STRATEGIES = ("greedy", "optimal", "random")

DEFAULT_THRESHOLD = 0.85  # the paper's best ε for LLaMA-7B / LLaMA2-7B
DEFAULT_STRATEGY = "greedy"
DEFAULT_METRIC = "angular"
DEFAULT_SEED = 42  # seed of strategy random and of the calibration sample choice
DEFAULT_RANK = 8
DEFAULT_OPTIMAL_TIME_LIMIT_S = 60.0

# Bootstrap stability (beyond the paper): resamples of the calibration samples, the interval reported for each
# set's margin, and the stop-when-stable defaults.
DEFAULT_RESAMPLES = 200
MARGIN_INTERVAL = 0.90
DEFAULT_MIN_SAMPLES = 32
DEFAULT_STABILITY_TARGET = 0.95


class PlanError(ValueError):
    """A user-facing problem with a similarity matrix, share sets, plan options or a plan file."""


def is_int(value: Any) -> bool:
    """An integer that is not a bool (JSON and YAML give ``true`` where a number was meant)."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def is_number(value: Any) -> bool:
    """An int or float that is not a bool."""
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(
        value, bool | np.bool_
    )


def check_threshold(value: Any, name: str = "threshold") -> float:
    """ε must be a number in (0, 1]. Angular similarity lies in [0, 1]; a threshold <= 0 would let every pair
    share, which is never what a plan means (the paper uses 0.75–0.90)."""
    if not is_number(value) or not math.isfinite(value) or not 0.0 < value <= 1.0:
        raise PlanError(f"{name} must be a number in (0, 1] (paper: 0.80–0.90); got {value!r}")
    return float(value)


def check_strategy(value: Any, name: str = "strategy") -> str:
    """One of :data:`STRATEGIES`."""
    if value not in STRATEGIES:
        raise PlanError(f"{name} must be one of {', '.join(STRATEGIES)}; got {value!r}")
    return str(value)


def check_metric(value: Any, name: str = "metric") -> str:
    """One of :data:`METRICS`."""
    if value not in METRICS:
        raise PlanError(f"{name} must be one of {', '.join(METRICS)}; got {value!r}")
    return str(value)


def check_gradient_threshold(
    metric: str,
    strategy: str,
    *,
    threshold_given: bool,
    target_fraction: Any,
    threshold_key: str = "threshold",
    fraction_key: str = "target_fraction",
) -> None:
    """``gradient_subspace`` has no default ε: its overlap runs from the random level ``k / d`` to 1 (adjacent
    SmolLM2-135M layers ≈ 0.12), so the angular default 0.85 would share no layer. A strategy that reads the matrix
    needs ``target_fraction`` (recommended) or an explicit threshold."""
    if metric != GRADIENT_METRIC or strategy not in THRESHOLD_STRATEGIES:
        return
    if not threshold_given and target_fraction is None:
        raise PlanError(
            f"metric gradient_subspace has no default threshold: its overlap runs from the random level k/d "
            f"(about 0.015 on SmolLM2-135M at k 8) to 1, so the angular default {DEFAULT_THRESHOLD} would share "
            f"no layer; set {fraction_key} (recommended, e.g. 0.7: ShareLoRA keeps at most 70% of LoRA's "
            f"parameters and ε is chosen from the overlap) or an explicit {threshold_key} on this scale"
        )


def check_contiguous(strategy: str, contiguous: Any, name: str = "contiguous") -> bool:
    """``contiguous`` restricts the exact optimum to runs of adjacent layers; it means nothing elsewhere
    (manual sets are taken as given, greedy and random have their own rules)."""
    if not isinstance(contiguous, bool | np.bool_):
        raise PlanError(f"{name} must be true or false; got {contiguous!r}")
    if contiguous and strategy != "optimal":
        raise PlanError(f"{name}: true only applies to strategy optimal; got strategy {strategy!r}")
    return bool(contiguous)


def check_num_layers(value: Any, name: str = "num_layers") -> int:
    """At least two decoder layers."""
    if not is_int(value) or value < 2:
        raise PlanError(f"{name} must be an integer >= 2; got {value!r}")
    return int(value)


def check_rank(value: Any, name: str = "rank") -> int:
    """A positive integer LoRA rank."""
    if not is_int(value) or value < 1:
        raise PlanError(f"{name} must be a positive integer; got {value!r}")
    return int(value)


def check_rank_expansion(value: Any, name: str = "rank_expansion") -> bool | int:
    """``false`` keeps ``lora_r``, ``true`` applies the paper's formula, a positive integer is the final rank."""
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if is_int(value) and value >= 1:
        return int(value)
    raise PlanError(f"{name} must be true, false or a positive integer rank; got {value!r}")


def check_target_fraction(value: Any, name: str = "target_fraction") -> float | None:
    """``None`` or a fraction of plain LoRA's parameters in (0, 1]."""
    if value is None:
        return None
    if not is_number(value) or not 0.0 < value <= 1.0:
        raise PlanError(f"{name} must be a number in (0, 1]; got {value!r}")
    return float(value)


def check_probability(value: Any, name: str) -> float:
    """A number in the open interval (0, 1): a bootstrap confidence or a stability target."""
    if not is_number(value) or not 0.0 < value < 1.0:
        raise PlanError(f"{name} must be a number strictly between 0 and 1; got {value!r}")
    return float(value)


def check_stability_target(value: Any, name: str = "stability") -> float:
    """The plan frequency at which calibration stops, in (0, 1]; 1.0 means every resample must agree."""
    if not is_number(value) or not 0.0 < value <= 1.0:
        raise PlanError(f"{name} must be a number in (0, 1] (e.g. 0.95); got {value!r}")
    return float(value)


def check_min_samples(value: Any, name: str = "min_samples") -> int:
    """The fewest calibration samples before stop-when-stable may stop: an integer >= 2 (a bootstrap needs two)."""
    if not is_int(value) or value < 2:
        raise PlanError(f"{name} must be an integer >= 2; got {value!r}")
    return int(value)


def check_resamples(value: Any, name: str = "bootstrap_resamples") -> int:
    """Bootstrap resamples: 0 turns the stability report off; otherwise at least 10 for a meaningful fraction."""
    if not is_int(value) or (value != 0 and value < 10):
        raise PlanError(
            f"{name} must be 0 (off) or an integer >= 10 (default {DEFAULT_RESAMPLES}); got {value!r}"
        )
    return int(value)


def check_planning_options(
    *,
    strategy: str,
    contiguous: bool = False,
    share_sets: Any = None,
    target_fraction: Any = None,
    confidence: Any = None,
    prefix: str = "",
) -> None:
    """Rules that tie several keys together; ``prefix`` is prepended to key names (``"sharelora."`` for YAML)."""
    check_strategy(strategy, f"{prefix}strategy")
    check_contiguous(strategy, contiguous, f"{prefix}contiguous")
    check_target_fraction(target_fraction, f"{prefix}target_fraction")
    if share_sets is not None and strategy != "manual":
        raise PlanError(
            f"{prefix}share_sets is only used with strategy: manual (strategy is {strategy!r}); remove it or set "
            f"{prefix}strategy: manual"
        )
    if target_fraction is not None and strategy not in ("greedy", "optimal", "random"):
        raise PlanError(
            f"{prefix}target_fraction works with strategy greedy, optimal or random; got {strategy!r}"
        )
    if confidence is not None:
        check_probability(confidence, f"{prefix}confidence")
        check_robust(strategy, target_fraction, prefix)


def check_robust(strategy: str, target_fraction: Any, prefix: str = "") -> None:
    """The robust option (``confidence``) changes which pairs count as similar at a fixed ε, so it needs a
    strategy that reads the matrix and a threshold that is not itself chosen from the matrix."""
    if strategy not in DATA_STRATEGIES:
        raise PlanError(
            f"{prefix}confidence applies to strategy greedy or optimal (it changes which pairs count as "
            f"similar); got strategy {strategy!r}"
        )
    if target_fraction is not None:
        raise PlanError(
            f"{prefix}confidence and {prefix}target_fraction cannot be combined: the evidence test needs a "
            "fixed ε; give a threshold instead"
        )


def check_share_sets(
    share_sets: Any, num_layers: int | None = None, name: str = "share_sets"
) -> list[list[int]]:
    """Check share sets and return them canonical: each set sorted, sets sorted by leader.

    Each set needs at least two distinct non-negative integer layer indices (``< num_layers`` when it is known);
    sets must be disjoint.
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
            if not is_int(layer):
                raise PlanError(f"{name}[{position}] contains {layer!r}, which is not an integer layer index")
            layer = int(layer)
            if layer < 0 or (num_layers is not None and layer >= num_layers):
                valid = "non-negative" if num_layers is None else f"0..{num_layers - 1}"
                raise PlanError(f"{name}[{position}] contains layer {layer}; valid layer indices are {valid}")
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


def check_layer_kinds(
    layer_kinds: Any, num_layers: int, share_sets: Any = (), name: str = "layer_kinds"
) -> list[int] | None:
    """``None`` (every layer alike) or one non-negative integer kind per layer; every share set must lie within one
    kind (layers of different kinds have different LoRA targets or shapes and cannot share modules)."""
    if layer_kinds is None:
        return None
    if isinstance(layer_kinds, str | bytes) or not isinstance(layer_kinds, Sequence):
        raise PlanError(f"{name} must be a list with one kind id per layer; got {layer_kinds!r}")
    kinds = list(layer_kinds)
    if len(kinds) != num_layers or not all(is_int(kind) and kind >= 0 for kind in kinds):
        raise PlanError(f"{name} must hold {num_layers} non-negative integers (one per layer); got {kinds!r}")
    kinds = [int(kind) for kind in kinds]
    for members in share_sets or ():
        found = sorted({kinds[layer] for layer in members})
        if len(found) > 1:
            by_kind = ", ".join(f"layer {layer} is kind {kinds[layer]}" for layer in members)
            raise PlanError(
                f"share set {list(members)} mixes layer kinds ({by_kind}); layers of different kinds have different "
                "LoRA targets or shapes and cannot share modules: keep each set within one kind"
            )
    return kinds
