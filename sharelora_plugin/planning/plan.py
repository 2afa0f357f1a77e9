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

from sharelora_plugin.planning.files import read_json, write_atomic
from sharelora_plugin.planning.rules import (
    PlanError,
    check_contiguous,
    check_layer_kinds,
    check_metric,
    check_num_layers,
    check_rank,
    check_strategy,
    check_target_fraction,
    check_threshold,
    is_int,
)
from sharelora_plugin.planning.sets import (
    distinct_modules,
    layers_covered,
    layers_saved,
    set_min_similarity,
    validate_share_sets,
)
from sharelora_plugin.planning.similarity import validate_similarity

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
    samples = f"{stability.get('num_samples')} samples"
    if stability.get("num_blocks") is not None:  # gradient sketches: whole calibration batches are resampled
        samples = f"{stability['num_blocks']} blocks of {samples}"
    if frequency is None:
        head = (
            f"bootstrap ({resamples} resamples of {samples}): sets are fixed by strategy "
            f"{stability.get('strategy')}; set frequency = how often {stability.get('reference_strategy')} at the "
            "same ε forms that exact set"
        )
    else:
        head = (
            f"bootstrap ({resamples} resamples of {samples}): plan frequency {frequency:.2f} "
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
