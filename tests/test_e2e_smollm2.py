"""End to end through Axolotl's training entry on the embedded SmolLM2: calibrate, plan, tie, train, save,
reload with plain PEFT and with the plugin."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import train_subprocess, write_config

from sharelora_plugin.planning import load_per_sample

pytestmark = pytest.mark.e2e


def train_in_process(config: Path):
    from axolotl.cli.args import TrainerCliArgs
    from axolotl.cli.config import load_cfg
    from axolotl.common.datasets import load_datasets
    from axolotl.train import train

    cfg = load_cfg(str(config))
    dataset_meta = load_datasets(cfg=cfg, cli_args=TrainerCliArgs())
    model, tokenizer, trainer = train(cfg=cfg, dataset_meta=dataset_meta)
    return cfg, model, tokenizer


@pytest.fixture(scope="module")
def trained(tmp_path_factory, smollm2_dir, data_dir):
    work = tmp_path_factory.mktemp("e2e")
    config = write_config(work / "cfg.yml", smollm2_dir, data_dir, work / "out")
    cfg, model, tokenizer = train_in_process(config)
    return {
        "cfg": cfg,
        "model": model,
        "tokenizer": tokenizer,
        "out": work / "out",
        "work": work,
        "config": config,
    }


def _logits(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(
        ["The river flooded the town after", "Share the LoRA"], return_tensors="pt", padding=True
    )
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def test_plan_written_with_params_and_heatmap(trained):
    out = trained["out"]
    plan = json.loads((out / "sharelora_plan.json").read_text())
    assert plan["num_layers"] == 30
    assert plan["share_sets"], "ε=0.90 on SmolLM2 shares layers"
    sim = plan["similarity"]
    for share_set in plan["share_sets"]:
        assert all(sim[i][j] >= 0.9 for i in share_set for j in share_set)
    meta = plan["metadata"]
    per_layer = 8 * ((576 + 576) + 2 * (576 + 192) + 2 * (576 + 1536))
    assert meta["lora_params"] == 30 * per_layer
    assert meta["sharelora_params"] == plan["distinct_modules"] * per_layer
    assert meta["trainable_params"] == meta["sharelora_params"]
    # the recipe stops calibration once the plan is stable: after 8 or all 16 samples here
    calibration = meta["calibration"]
    assert calibration["stop_when_stable"] and calibration["num_samples_cap"] == 16
    assert calibration["num_samples"] in (8, 16) and calibration["stop_reason"] in ("stable", "cap")
    stability = plan["stability"]
    assert stability["num_samples"] == calibration["num_samples"] and stability["resamples"] == 200
    assert len(stability["set_frequency"]) == len(plan["share_sets"])
    assert (out / "sharelora_similarity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    angular, cosine = load_per_sample(out / "sharelora_calibration.npz")
    assert angular.shape == cosine.shape == (calibration["num_samples"], 30, 30)
    for ckpt in ("checkpoint-2", "checkpoint-3"):
        assert (
            json.loads((out / ckpt / "sharelora_plan.json").read_text())["share_sets"] == plan["share_sets"]
        )
        assert np.array_equal(load_per_sample(out / ckpt / "sharelora_calibration.npz")[0], angular)


def test_ties_hold_after_training_and_weights_moved(trained):
    from sharelora_plugin.planning import SharePlan
    from sharelora_plugin.tying import verify_ties

    plan = SharePlan.load(trained["out"] / "sharelora_plan.json")
    model = trained["model"]
    verify_ties(model, plan.share_sets)
    layers = model.base_model.model.model.layers
    leader, member = plan.share_sets[0][:2]
    b_lead = layers[leader].self_attn.q_proj.lora_B["default"].weight
    assert b_lead is layers[member].self_attn.q_proj.lora_B["default"].weight
    assert b_lead.abs().sum() > 0, "lora_B starts at zero; training must have moved it"
    from safetensors.torch import load_file

    saved = load_file(trained["out"] / "adapter_model.safetensors")
    key = "base_model.model.model.layers.{}.self_attn.q_proj.lora_B.weight"
    torch.testing.assert_close(saved[key.format(leader)], saved[key.format(member)], atol=0, rtol=0)


PLAIN_PEFT_RELOAD = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
base_dir, adapter_dir, out = sys.argv[1:4]
tok = AutoTokenizer.from_pretrained(base_dir)
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), adapter_dir)
model.eval()
batch = tok(["The river flooded the town after", "Share the LoRA"], return_tensors="pt", padding=True)
with torch.no_grad():
    torch.save(model(**batch).logits, out)
assert not any(name.startswith("sharelora") for name in sys.modules), "plain PEFT must not need our package"
"""


def test_saved_adapter_reloads_with_plain_peft_and_same_logits(trained, smollm2_dir, tmp_path):
    """A fresh process with only transformers + PEFT (no plugin, no Axolotl patches) reproduces the logits."""
    expected = _logits(trained["model"], trained["tokenizer"])
    out = tmp_path / "logits.pt"
    proc = subprocess.run(
        [sys.executable, "-c", PLAIN_PEFT_RELOAD, str(smollm2_dir), str(trained["out"]), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(out)
    assert (got - expected).abs().max().item() <= 1e-5


def test_plugin_reload_reties_from_saved_plan(trained, monkeypatch):
    """lora_model_dir through Axolotl's loader: the plan comes from the adapter folder, no calibration."""
    from axolotl.cli.config import load_cfg
    from axolotl.loaders import ModelLoader, load_tokenizer

    from sharelora_plugin import workflow
    from sharelora_plugin.planning import SharePlan
    from sharelora_plugin.tying import verify_ties

    def no_calibration(*args, **kwargs):
        raise AssertionError("reload must use the saved plan, not recalibrate")

    monkeypatch.setattr(workflow, "run_calibration", no_calibration)
    cfg = load_cfg(str(trained["config"]), lora_model_dir=str(trained["out"]))
    model, _ = ModelLoader(cfg, load_tokenizer(cfg)).load()
    plan = SharePlan.load(trained["out"] / "sharelora_plan.json")
    verify_ties(model, plan.share_sets)
    expected = _logits(trained["model"], trained["tokenizer"])
    assert (_logits(model, trained["tokenizer"]) - expected).abs().max().item() <= 1e-5


def test_cli_train_subprocess_runs_the_recipe_shape(tmp_path, smollm2_dir, data_dir):
    """`python -m axolotl.cli.train` (what the README and `make demo` run) on a one-step config."""
    config = write_config(
        tmp_path / "cfg.yml", smollm2_dir, data_dir, tmp_path / "out", max_steps=1, save_steps=1
    )
    log = train_subprocess(config)
    assert "ShareLoRA plan" in log
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "out" / "sharelora_plan.json").is_file()
