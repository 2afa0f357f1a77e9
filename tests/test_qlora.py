"""`adapter: sharelora` + `load_in_4bit` on the embedded SmolLM2: Axolotl's QLoRA path (bitsandbytes NF4 base,
k-bit preparation), calibration on the quantized model, tying, and a backward pass through the 4-bit base.

Axolotl's fused LoRA kernels cannot dequantize NF4 on CPU (the same for `adapter: qlora`), so they are off here.
"""

from __future__ import annotations

import pytest
import torch
import yaml
from conftest import write_config

pytestmark = pytest.mark.e2e


def test_four_bit_base_calibrates_ties_and_backpropagates(tmp_path, smollm2_dir, data_dir):
    from axolotl.cli.config import load_cfg
    from axolotl.loaders import ModelLoader, load_tokenizer

    from sharelora_plugin.planning import SharePlan
    from sharelora_plugin.tying import verify_ties

    config = write_config(
        tmp_path / "cfg.yml", smollm2_dir, data_dir, tmp_path / "out",
        load_in_4bit=True, lora_qkv_kernel=False, lora_o_kernel=False, lora_mlp_kernel=False,
    )  # fmt: skip
    raw = yaml.safe_load(config.read_text())
    raw["sharelora"]["calibration"].update(num_samples=8, max_length=32)
    config.write_text(yaml.safe_dump(raw))
    cfg = load_cfg(str(config))
    assert cfg.adapter == "qlora"
    tokenizer = load_tokenizer(cfg)
    model, _ = ModelLoader(cfg, tokenizer).load()
    base_q = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert type(base_q).__name__ == "Linear4bit"
    plan = SharePlan.load(tmp_path / "out" / "sharelora_plan.json")
    assert plan.share_sets
    verify_ties(model, plan.share_sets)
    model.train()
    batch = tokenizer(["Four-bit base, shared adapters."], return_tensors="pt")
    model(**batch, labels=batch["input_ids"]).loss.backward()
    layers = model.base_model.model.model.layers
    # every LoRA parameter gets a gradient (a calibration pass must not break the 4-bit layers for training)
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing[:5]
    leader, member = plan.share_sets[0][:2]
    grad = layers[leader].self_attn.q_proj.lora_B["default"].weight.grad
    assert grad is layers[member].self_attn.q_proj.lora_B["default"].weight.grad
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
