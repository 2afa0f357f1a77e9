"""One training step through ``axolotl.cli.train`` for Qwen2-VL and Gemma 3 (tiny random models from
tests/tiny_vlms.py, saved with their processors) with Axolotl's own multimodal settings and chat templates:
visual-text calibration on the training rows, a plan over the language model's layers, ties, one step, and an
adapter that plain PEFT loads with equal weights in the members of each set."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tiny_vlms
import torch
import yaml

pytestmark = [pytest.mark.e2e, pytest.mark.archs]

ROOT = Path(__file__).resolve().parents[1]
CHAT_TEMPLATE = {"qwen2_vl": "qwen2_vl", "gemma3": "gemma3"}  # Axolotl's template (and processing strategy)


def _config(model: Path, data: Path, work: Path, name: str) -> dict:
    return {
        "base_model": str(model),
        "processor_type": "AutoProcessor",
        # Qwen2-VL's saved processor loads without its video processor through its remote-code class
        "trust_remote_code": name == "qwen2_vl",
        "skip_prepare_dataset": True,
        "remove_unused_columns": False,
        "sample_packing": False,
        "chat_template": CHAT_TEMPLATE[name],
        "plugins": ["sharelora_plugin.ShareLoRAPlugin"],
        "adapter": "sharelora",
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_target_modules": r"model.language_model.layers.[\d]+.(mlp|self_attn).(up|down|gate|q|k|v|o)_proj",
        "lora_mlp_kernel": False,
        "lora_qkv_kernel": False,
        "lora_o_kernel": False,
        "sharelora": {
            "threshold": 0.5,
            "strategy": "greedy",
            "calibration": {"num_samples": 4, "max_length": 256, "batch_size": 2},
        },
        "datasets": [{"path": str(data), "type": "chat_template", "field_messages": "messages"}],
        "dataset_prepared_path": str(work / "prepared"),
        "val_set_size": 0,
        "output_dir": str(work / "out"),
        "sequence_len": 256,
        "micro_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "max_steps": 1,
        "num_epochs": 1,
        "optimizer": "adamw_torch",
        "learning_rate": 1e-3,
        "save_steps": 100,
        "logging_steps": 1,
        "dataloader_num_workers": 0,
        "bf16": False,
        "fp16": False,
        "tf32": False,
        "flash_attention": False,
        "sdp_attention": False,
        "gradient_checkpointing": False,
    }


@pytest.mark.parametrize("name", sorted(CHAT_TEMPLATE))
def test_one_step_through_axolotl(name, smollm2_dir, tiny_llava, tmp_path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    model_dir = tiny_vlms.save(name, smollm2_dir, tmp_path / "model")
    config = tmp_path / "train.yml"
    config.write_text(yaml.safe_dump(_config(model_dir, tiny_llava / "data" / "train.jsonl", tmp_path, name)))
    run = subprocess.run(
        [sys.executable, "-m", "axolotl.cli.train", str(config)],
        cwd=ROOT,
        env={**os.environ, "ACCELERATE_USE_CPU": "true"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    assert "ties hold after training" in run.stdout + run.stderr

    out = tmp_path / "out"
    plan = json.loads((out / "sharelora_plan.json").read_text())
    calibration = plan["metadata"]["calibration"]
    assert calibration["modality"] == "visual-text"
    assert calibration["layers_path"] == "model.language_model.layers"
    assert calibration["num_samples"] == 4 and calibration["num_images"] >= 4
    assert plan["num_layers"] == tiny_vlms.NUM_LAYERS
    assert plan["share_sets"], "the threshold 0.5 should share layers of a random model"

    base = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    state = PeftModel.from_pretrained(base, out).state_dict()
    for share_set in plan["share_sets"]:
        for module in plan["metadata"]["target_modules"]:
            for part in ("lora_A", "lora_B"):
                copies = [
                    state[key]
                    for layer in share_set
                    for key in state
                    if f".layers.{layer}.{module}.{part}." in key and "language_model" in key
                ]
                assert len(copies) == len(share_set), (module, part, share_set)
                assert all(torch.equal(copies[0], c) for c in copies[1:]), (module, part, share_set)
