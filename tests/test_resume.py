"""Resume after an interruption re-ties from the checkpoint's plan (no recalibration) and continues with the
losses an uninterrupted run logs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import train_subprocess, write_config

pytestmark = pytest.mark.e2e


def _losses(checkpoint: Path) -> dict[int, float]:
    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    return {h["step"]: h["loss"] for h in history if "loss" in h}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, smollm2_dir, data_dir) -> Path:
    work = tmp_path_factory.mktemp("full")
    train_subprocess(
        write_config(work / "full.yml", smollm2_dir, data_dir, work / "full", max_steps=4, save_steps=2)
    )
    return work / "full"


@pytest.mark.parametrize("how", ["resume_from_checkpoint", "auto_resume_from_checkpoints"])
def test_resume_reties_from_checkpoint_plan_and_matches_uninterrupted_losses(
    how, uninterrupted, tmp_path, smollm2_dir, data_dir
):
    reference = _losses(uninterrupted / "checkpoint-4")
    assert sorted(reference) == [1, 2, 3, 4]

    # the "interrupted" run: only checkpoint-2 survived
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(uninterrupted / "checkpoint-2", resumed_dir / "checkpoint-2")
    overrides = {"max_steps": 4, "save_steps": 2}
    if how == "resume_from_checkpoint":
        overrides["resume_from_checkpoint"] = str(resumed_dir / "checkpoint-2")
    else:
        overrides["auto_resume_from_checkpoints"] = True
    resume = write_config(tmp_path / "resume.yml", smollm2_dir, data_dir, resumed_dir, **overrides)
    # calibration text that cannot be read: a recalibration would fail the run
    cfg = yaml.safe_load(resume.read_text())
    unreadable = tmp_path / "calib.jsonl"
    unreadable.write_text("not json at all\n")
    cfg["sharelora"]["calibration"]["path"] = str(unreadable)
    resume.write_text(yaml.safe_dump(cfg))

    log = train_subprocess(resume)
    assert "ShareLoRA: calibrating" not in log
    plan = json.loads((resumed_dir / "sharelora_plan.json").read_text())
    assert plan["metadata"]["plan_source"].endswith("checkpoint-2/sharelora_plan.json")
    got = _losses(resumed_dir / "checkpoint-4")
    for step in (3, 4):
        assert abs(got[step] - reference[step]) <= 1e-5, (step, got[step], reference[step])
