"""Heatmap PNG of a SharePlan."""

from __future__ import annotations

import numpy as np
import pytest

from sharelora_plugin.heatmap import SET_OUTLINE_GID, heatmap_figure, save_heatmap
from sharelora_plugin.planning import PlanError, make_plan, synthetic_similarity

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def outlines(figure) -> list[str]:
    axes = figure.axes[0]
    return [patch.get_gid() for patch in axes.patches if (patch.get_gid() or "").startswith(SET_OUTLINE_GID)]


def test_save_heatmap_writes_png(tmp_path):
    plan = make_plan(num_layers=30, similarity=synthetic_similarity(30, seed=0), threshold=0.85)
    path = tmp_path / "out" / "sharelora_heatmap.png"
    save_heatmap(plan, path)
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000
    figure = heatmap_figure(plan)
    blocks = [gid for gid in outlines(figure) if gid.endswith(":block")]
    assert len(blocks) == len(plan.share_sets) > 0
    title = figure.axes[0].get_title()
    assert "0.85" in title and "greedy" in title and f"{plan.distinct_modules}/30" in title
    assert figure.axes[0].images[0].get_array().shape == (30, 30)


def test_non_contiguous_sets_are_marked_cell_by_cell():
    sim = np.full((6, 6), 0.5)
    np.fill_diagonal(sim, 1.0)
    for i, j in [(0, 3), (0, 5), (3, 5), (1, 2)]:
        sim[i, j] = sim[j, i] = 0.95
    plan = make_plan(num_layers=6, similarity=sim, threshold=0.9)
    assert plan.share_sets == [[0, 3, 5], [1, 2]]
    gids = outlines(heatmap_figure(plan, title="custom"))
    assert gids.count(f"{SET_OUTLINE_GID}:0:block") == 1 and gids.count(f"{SET_OUTLINE_GID}:1:block") == 1
    assert gids.count(f"{SET_OUTLINE_GID}:0:cell") == 6  # 3 members -> 6 off-diagonal member cells
    assert f"{SET_OUTLINE_GID}:1:cell" not in gids  # a run of adjacent layers needs only its block


def test_heatmap_needs_similarity(tmp_path):
    plan = make_plan(num_layers=8, strategy="alternate")
    with pytest.raises(PlanError, match="no similarity"):
        save_heatmap(plan, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
