"""Two processes on CPU (gloo) through `accelerate launch`: one calibration, one plan, identical ties,
synchronised shared gradients — with non-reentrant gradient checkpointing on."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, write_config

pytestmark = pytest.mark.e2e


def test_two_process_ddp_calibrates_once_and_ties_identically(tmp_path, smollm2_dir, data_dir):
    config = write_config(
        tmp_path / "cfg.yml",
        smollm2_dir,
        data_dir,
        tmp_path / "out",
        max_steps=2,
        save_steps=2,
        gradient_checkpointing=True,
    )
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [
        str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "axolotl.cli.train", str(config),
    ]  # fmt: skip
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=1200)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert log.count("ShareLoRA: calibrating on process") == 1, "only rank 0 calibrates"
    built = dict(re.findall(r"ShareLoRA rank (\d): plan (\w+), tie layout (\w+)", log) and [
        (m.group(1), (m.group(2), m.group(3)))
        for m in re.finditer(r"ShareLoRA rank (\d): plan (\w+), tie layout (\w+)", log)
    ])  # fmt: skip
    assert set(built) == {"0", "1"}
    assert built["0"] == built["1"], "both ranks must hold the same plan and tie the same modules"
    sums = {m.group(1): m.group(2) for m in re.finditer(r"ShareLoRA rank (\d): ties hold after training; "
                                                         r"trainable checksum (\w+)", log)}  # fmt: skip
    assert set(sums) == {"0", "1"}
    assert sums["0"] == sums["1"], "DDP must synchronise the shared LoRA gradients (ranks see different data)"
    assert (tmp_path / "out" / "sharelora_plan.json").is_file()
