"""Saved plans that do not fit are refused with a message naming the file and the mismatch."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import tiny_llama

from sharelora_plugin import workflow
from sharelora_plugin.planning import PlanError, SharePlan, make_plan


def _plan(num_layers: int = 6, rank: int = 8, rank_expansion=False) -> SharePlan:
    sim = np.full((num_layers, num_layers), 0.5)
    np.fill_diagonal(sim, 1.0)
    sim[1, 2] = sim[2, 1] = 0.95
    return make_plan(
        num_layers=num_layers, similarity=sim, threshold=0.9, rank=rank, rank_expansion=rank_expansion
    )


def _settings(plan_file: str) -> dict:
    return workflow.sharelora_settings({"sharelora": {"plan_file": plan_file}})


def test_plan_for_another_layer_count_is_refused(tmp_path):
    path = tmp_path / "plan.json"
    _plan(num_layers=8).save(path)
    with pytest.raises(PlanError, match=r"8 decoder layers but this model has 6"):
        workflow.check_plan_fits(
            SharePlan.load(path), tiny_llama(num_layers=6), _settings(str(path)), str(path), 8
        )


def test_plan_for_another_rank_is_refused(tmp_path):
    path = tmp_path / "plan.json"
    _plan(rank=16).save(path)
    with pytest.raises(PlanError, match=r"lora_r=16.*lora_r is 8"):
        workflow.check_plan_fits(
            SharePlan.load(path), tiny_llama(num_layers=6), _settings(str(path)), str(path), 8
        )


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"num_layers": 6, "share_sets": [[1, 2]', "plan.json"),  # truncated JSON
        ("[]", "plan.json"),
        ('{"num_layers": 6, "share_sets": [[1, 9]], "strategy": "manual"}', "9"),
        ('{"num_layers": 6, "share_sets": [[1, 2], [2, 3]], "strategy": "manual"}', "disjoint"),
    ],
    ids=["truncated", "not-an-object", "index-out-of-range", "overlapping"],
)
def test_corrupt_or_inconsistent_plan_files(tmp_path, content, expected):
    path = tmp_path / "plan.json"
    path.write_text(content)
    with pytest.raises(PlanError, match=expected):
        SharePlan.load(path)


def test_saved_plan_source_order(tmp_path):
    """plan_file wins; then the adapter being loaded; then the checkpoint being resumed; else calibrate."""
    plan = _plan()
    explicit, adapter, ckpt = (
        tmp_path / "explicit.json",
        tmp_path / "adapter",
        tmp_path / "out" / "checkpoint-7",
    )
    plan.save(explicit)
    for folder in (adapter, ckpt, tmp_path / "out" / "checkpoint-3"):
        folder.mkdir(parents=True)
        plan.save(folder / workflow.PLAN_FILENAME)
    base = {"output_dir": str(tmp_path / "out"), "sharelora": {}}
    assert workflow.saved_plan_source(base) is None
    assert (
        workflow.saved_plan_source({**base, "auto_resume_from_checkpoints": True})
        == ckpt / workflow.PLAN_FILENAME
    )
    assert (
        workflow.saved_plan_source({**base, "lora_model_dir": str(adapter)})
        == adapter / workflow.PLAN_FILENAME
    )
    both = {**base, "lora_model_dir": str(adapter), "sharelora": {"plan_file": str(explicit)}}
    assert workflow.saved_plan_source(both) == explicit


def test_plan_json_round_trip_keeps_metadata(tmp_path):
    plan = _plan(rank_expansion=True)
    plan.metadata["lora_params"] = 123
    path = tmp_path / "p.json"
    plan.save(path)
    again = SharePlan.load(path)
    assert (
        again.share_sets == plan.share_sets
        and again.rank == plan.rank
        and again.metadata["lora_params"] == 123
    )
    assert json.loads(path.read_text())["distinct_modules"] == plan.distinct_modules
