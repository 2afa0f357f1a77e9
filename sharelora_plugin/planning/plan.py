"""The share plan: :class:`SharePlan` (what ``sharelora_plan.json`` holds) and :func:`make_plan`, which builds one
with any strategy."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from sharelora_plugin.planning.atomic_file import write_atomic
from sharelora_plugin.planning.budget import threshold_for_budget
from sharelora_plugin.planning.rules import (
    DATA_STRATEGIES,
    DEFAULT_OPTIMAL_TIME_LIMIT_S,
    DEFAULT_THRESHOLD,
    PlanError,
    check_contiguous,
    check_layer_kinds,
    check_metric,
    check_num_layers,
    check_planning_options,
    check_rank,
    check_robust,
    check_strategy,
    check_target_fraction,
    check_threshold,
    is_int,
)
from sharelora_plugin.planning.sets import (
    distinct_modules,
    layers_covered,
    layers_saved,
    resolve_rank,
    satisfies_threshold,
    set_min_similarity,
    validate_share_sets,
)
from sharelora_plugin.planning.similarity import read_json, validate_similarity
from sharelora_plugin.planning.strategies import (
    alternate_share_sets,
    greedy_share_sets,
    optimal_share_sets,
    random_adjacent_share_sets,
    separate_kinds,
)

FORMAT_VERSION = 1


def kinds_line(layer_kinds: Sequence[int], descriptions: Sequence[str] | None) -> str:
    """One line naming the layer kinds of a model whose layer list mixes them (sets form within one kind)."""
    parts = []
    for kind in sorted(set(layer_kinds)):
        members = [layer for layer, value in enumerate(layer_kinds) if value == kind]
        label = descriptions[kind] if descriptions and kind < len(descriptions) else f"kind {kind}"
        parts.append(f"{label}: layers {_format_runs(members)}")
    return "layer kinds (sets only within one kind; layers of a kind alone cannot share): " + "; ".join(parts)


def _format_runs(layers: Sequence[int]) -> str:
    runs: list[list[int]] = []
    for layer in layers:
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    return ",".join(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]) for run in runs)


def stability_line(stability: dict) -> str:
    """One line summarising a bootstrap report (see :mod:`sharelora_plugin.planning.stability`)."""
    frequency = stability.get("plan_frequency")
    resamples = stability.get("resamples")
    samples = stability.get("num_samples")
    if frequency is None:
        head = (
            f"bootstrap ({resamples} resamples of {samples} samples): sets are fixed by strategy "
            f"{stability.get('strategy')}; set frequency = how often {stability.get('reference_strategy')} at the "
            "same ε forms that exact set"
        )
    else:
        head = (
            f"bootstrap ({resamples} resamples of {samples} samples): plan frequency {frequency:.2f} "
            "(fraction of resamples that give exactly these sets)"
        )
    if stability.get("confidence") is not None:
        head += f"; robust: pairs shared only where the {stability['confidence']:.0%} lower bound clears ε"
    return head


@dataclass
class SharePlan:
    """Which decoder layers share LoRA modules, and everything needed to rebuild and audit that decision.

    Written beside every adapter as ``sharelora_plan.json``. ``rank`` is the final LoRA rank (after expansion),
    ``base_rank`` the configured one. ``stability`` is the bootstrap report of :mod:`.stability` (``None`` when
    the plan was not made from per-sample calibration data). ``metadata`` is free-form (model id, calibration
    settings, param counts, ...).
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
    layer_kinds: list[int] | None = None
    layer_kind_descriptions: list[str] | None = None
    stability: dict | None = None
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.num_layers = check_num_layers(self.num_layers)
        self.share_sets = validate_share_sets(self.share_sets, self.num_layers)
        self.strategy = check_strategy(self.strategy)
        self.metric = check_metric(self.metric)
        if self.threshold is not None:
            self.threshold = check_threshold(self.threshold)
        if self.similarity is not None:
            sim = validate_similarity(self.similarity)
            if sim.shape[0] != self.num_layers:
                raise PlanError(
                    f"similarity is {sim.shape[0]} x {sim.shape[0]} but num_layers is {self.num_layers}; they must match"
                )
            self.similarity = sim.tolist()
        self.base_rank = check_rank(self.base_rank, "base_rank")
        self.rank = check_rank(self.rank, "rank")
        for name in ("contiguous", "constraint_enforced"):
            if not isinstance(getattr(self, name), bool):
                raise PlanError(f"{name} must be true or false; got {getattr(self, name)!r}")
        if self.constraint_satisfied is not None and not isinstance(self.constraint_satisfied, bool):
            raise PlanError(
                f"constraint_satisfied must be true, false or null; got {self.constraint_satisfied!r}"
            )
        if self.seed is not None and not is_int(self.seed):
            raise PlanError(f"seed must be an integer or null; got {self.seed!r}")
        self.target_fraction = check_target_fraction(self.target_fraction)
        check_contiguous(self.strategy, self.contiguous)
        self.layer_kinds = check_layer_kinds(self.layer_kinds, self.num_layers, self.share_sets)
        if self.layer_kind_descriptions is not None and (
            self.layer_kinds is None
            or not isinstance(self.layer_kind_descriptions, list)
            or len(self.layer_kind_descriptions) != max(self.layer_kinds) + 1
        ):
            raise PlanError("layer_kind_descriptions must hold one text per layer kind, beside layer_kinds")
        if self.stability is not None and not isinstance(self.stability, dict):
            raise PlanError(f"stability must be a mapping or null; got {type(self.stability).__name__}")
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
                lowest = set_min_similarity(np.asarray(self.similarity), members)
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
        if not is_int(layer) or not 0 <= layer < self.num_layers:
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
        try:
            text = _pretty_json(self.to_dict()) + "\n"
        except TypeError as err:
            raise PlanError(f"plan metadata must be JSON-serialisable: {err}") from None
        write_atomic(path, text.encode("utf-8"))

    @classmethod
    def load(cls, path: str | os.PathLike) -> SharePlan:
        """Read a plan saved by :meth:`save`; :class:`PlanError` names the path on any problem."""
        try:
            return cls.from_dict(read_json(path))
        except PlanError as err:
            if str(path) in str(err):
                raise
            raise PlanError(f"{path}: {err}") from None

    def summary_table(self) -> str:
        """A human-readable table of the plan for logs and ``sharelora show``; with a bootstrap report, each set's
        frequency over resamples and its margin (min similarity − ε) with the 90% interval."""
        threshold = "-" if self.threshold is None else f"{self.threshold:g}"
        stability = self.stability or {}
        frequencies = stability.get("set_frequency") or []
        margins = stability.get("margin") or []
        intervals = stability.get("margin_interval") or []
        lines = [
            f"ShareLoRA plan: strategy={self.strategy} metric={self.metric} threshold={threshold} "
            f"layers={self.num_layers}" + (" contiguous" if self.contiguous else ""),
            f"{'set':>4}  {'leader':>6}  {'size':>4}  {'min sim':>7}"
            + (f"  {'freq':>5}  {'margin [90% interval]':>26}" if frequencies else "")
            + "  layers",
        ]
        sim = None if self.similarity is None else np.asarray(self.similarity)
        for number, members in enumerate(self.share_sets):
            lowest = "-" if sim is None else f"{set_min_similarity(sim, members):.4f}"
            extra = ""
            if number < len(frequencies):
                margin = "-" if number >= len(margins) else f"{margins[number]:+.4f}"
                if number < len(intervals):
                    low, high = intervals[number]
                    margin += f" [{low:+.4f}, {high:+.4f}]"
                extra = f"  {frequencies[number]:>5.2f}  {margin:>26}"
            lines.append(
                f"{number:>4}  {members[0]:>6}  {len(members):>4}  {lowest:>7}{extra}  {_format_layers(members)}"
            )
        if not self.share_sets:
            lines.append("   (no share sets: every layer keeps its own LoRA modules)")
        lines.append(
            f"distinct modules per target: {self.distinct_modules}/{self.num_layers} "
            f"(saved {self.layers_saved}, covered {self.layers_covered}); rank {self.base_rank} -> {self.rank}; "
            f"LoRA parameter fraction {self.param_fraction:.4f}"
        )
        if self.layer_kinds is not None:
            lines.append(kinds_line(self.layer_kinds, self.layer_kind_descriptions))
        if stability:
            lines.append(stability_line(stability))
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


# --------------------------------------------------------------------------------------------------------------------
# Entry point


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
    if strategy in DATA_STRATEGIES:
        if sim is None or (threshold is None and target_fraction is None):
            raise PlanError(f"strategy {strategy!r} needs a similarity matrix and a threshold")
        sets, threshold = choose_share_sets(
            sim,
            strategy=strategy,
            threshold=threshold,
            contiguous=contiguous,
            target_fraction=target_fraction,
            rank=base_rank,
            rank_expansion=rank_expansion,
            lower_bound=bound,
            layer_kinds=kinds,
            time_limit=time_limit,
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
            reference, threshold = choose_share_sets(
                sim,
                strategy="greedy",
                threshold=threshold,
                target_fraction=target_fraction,
                rank=base_rank,
                rank_expansion=rank_expansion,
                layer_kinds=kinds,
                time_limit=time_limit,
            )
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
