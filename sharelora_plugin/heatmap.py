"""Heatmap of a :class:`~sharelora_plugin.planning.SharePlan`: the L x L similarity with the share sets outlined,
and, when the plan carries a bootstrap report, a second panel with the co-membership matrix (how often two layers
share a module over the resamples) with the same sets outlined.

Uses matplotlib's object API with the Agg canvas directly, so it never touches pyplot's global state or the
process-wide backend (safe inside a training process and on headless machines).
"""

from __future__ import annotations

import os

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from .planning import PlanError, SharePlan

SET_OUTLINE_GID = "share_set"  # gid prefix of every patch drawn for a share set (tests and tools count them)


def _tick_step(num_layers: int) -> int:
    if num_layers <= 16:
        return 1
    if num_layers <= 40:
        return 2
    return 5


def heatmap_figure(plan: SharePlan, title: str | None = None) -> Figure:
    """Build the heatmap Figure for ``plan``.

    Each share set gets a rectangle over its ``[min..max]`` block (solid when the set is a run of adjacent layers,
    dashed otherwise); a non-contiguous set also gets an outline on every member-pair cell, so which layers
    actually share is visible. With ``plan.stability`` a second panel shows the bootstrap co-membership matrix.
    Raises :class:`PlanError` when the plan carries no similarity matrix.
    """
    if plan.similarity is None:
        raise PlanError(
            "the plan has no similarity matrix to draw (strategy manual/alternate without calibration)"
        )
    sim = np.asarray(plan.similarity, dtype=np.float64)
    num_layers = plan.num_layers
    off_diagonal = sim[~np.eye(num_layers, dtype=bool)]
    label, floor = similarity_label(plan)
    # the colour range is the data's own (angular lives near 0.5–1, gradient overlap near k/d–0.2); for the overlap
    # it starts no higher than the random level, so "unrelated" is the bottom colour
    vmin = float(off_diagonal.min()) if floor is None else min(floor, float(off_diagonal.min()))

    comembership = (plan.stability or {}).get("comembership")
    panels = 2 if comembership is not None else 1
    figure = Figure(figsize=(7.5 * panels, 6.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, panels, 1)
    image = axes.imshow(
        sim,
        cmap="viridis",
        vmin=vmin,
        vmax=max(float(off_diagonal.max()), vmin + 1e-9),
        interpolation="nearest",
    )
    colorbar = figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    colorbar.set_label(label)

    _outline_sets(axes, plan.share_sets)
    ticks = list(range(0, num_layers, _tick_step(num_layers)))
    axes.set_xticks(ticks)
    axes.set_yticks(ticks)
    axes.set_xlabel("layer")
    axes.set_ylabel("layer")
    if title is None:
        threshold = "-" if plan.threshold is None else f"{plan.threshold:g}"
        title = (
            f"{label}, \u03b5={threshold}, strategy={plan.strategy}\n"
            f"{len(plan.share_sets)} share sets, {plan.distinct_modules}/{num_layers} distinct LoRA modules, "
            f"rank {plan.base_rank}\u2192{plan.rank}"
        )
    axes.set_title(title, fontsize=10)
    if comembership is not None:
        _comembership_panel(figure.add_subplot(1, 2, 2), figure, plan, np.asarray(comembership, dtype=float))
    figure.tight_layout()
    return figure


def similarity_label(plan: SharePlan) -> tuple[str, float | None]:
    """What the plan's matrix is called on the figure, and the bottom of its scale when it has a known one: the
    random level ``k/d`` of a gradient-subspace overlap (recorded in the plan's calibration metadata)."""
    if plan.metric != "gradient_subspace":
        return f"{plan.metric} similarity", None
    calibration = plan.metadata.get("calibration") or {}
    level, k = calibration.get("random_level"), calibration.get("sketch_rank")
    if isinstance(level, int | float) and not isinstance(level, bool):
        return f"gradient-subspace overlap (k={k}, random level {level:.3f})", float(level)
    return "gradient-subspace overlap", None


def _comembership_panel(axes, figure: Figure, plan: SharePlan, comembership: np.ndarray) -> None:
    stability = plan.stability or {}
    image = axes.imshow(comembership, cmap="magma", vmin=0.0, vmax=1.0, interpolation="nearest")
    colorbar = figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    colorbar.set_label("fraction of resamples sharing a module")
    # outlines only for the sets themselves; their gids are kept for the similarity panel
    _outline_sets(
        axes, plan.share_sets, gid_prefix="comembership", palette=("#00e5ff",)
    )  # seen on black and white
    ticks = list(range(0, plan.num_layers, _tick_step(plan.num_layers)))
    axes.set_xticks(ticks)
    axes.set_yticks(ticks)
    axes.set_xlabel("layer")
    axes.set_ylabel("layer")
    frequency = stability.get("plan_frequency")
    reference = stability.get("reference_strategy", plan.strategy)
    summary = (
        f"plan frequency {frequency:.2f}"
        if frequency is not None
        else f"{reference} at the same \u03b5 (sets fixed by {plan.strategy})"
    )
    units = f"{stability.get('num_samples')} samples"
    if stability.get("num_blocks") is not None:
        units = f"{stability['num_blocks']} blocks ({units})"
    axes.set_title(
        f"bootstrap co-membership, {stability.get('resamples')} resamples of {units}"
        f"\n{summary}; diagonal: layer shares with any other",
        fontsize=10,
    )


_SET_COLORS = ("#e41a1c", "#ff7f00", "#f781bf", "#ffffff", "#a65628", "#984ea3", "#e6ab02", "#000000")


def _outline_sets(
    axes,
    share_sets: list[list[int]],
    gid_prefix: str = SET_OUTLINE_GID,
    palette: tuple[str, ...] = _SET_COLORS,
) -> None:
    for number, members in enumerate(share_sets):
        color = palette[number % len(palette)]
        low, high = members[0], members[-1]
        contiguous = members == list(range(low, high + 1))
        axes.add_patch(
            Rectangle(
                (low - 0.5, low - 0.5),
                high - low + 1,
                high - low + 1,
                fill=False,
                edgecolor=color,
                linewidth=2.0,
                linestyle="-" if contiguous else "--",
                gid=f"{gid_prefix}:{number}:block",
            )
        )
        if not contiguous:
            for row in members:
                for col in members:
                    if row != col:
                        axes.add_patch(
                            Rectangle(
                                (col - 0.5, row - 0.5),
                                1,
                                1,
                                fill=False,
                                edgecolor=color,
                                linewidth=1.0,
                                gid=f"{gid_prefix}:{number}:cell",
                            )
                        )
        axes.annotate(
            f"L{low}",
            xy=(high + 0.5, low - 0.5),
            xytext=(2, 2),
            textcoords="offset points",
            color=color if color != "#ffffff" else "#444444",
            fontsize=7,
        )


def save_heatmap(plan: SharePlan, path: str | os.PathLike, title: str | None = None) -> None:
    """Write the heatmap of ``plan`` (see :func:`heatmap_figure`) as a PNG to ``path``."""
    figure = heatmap_figure(plan, title=title)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, format="png")
