"""The LLaVA-1.5-7B recipes carry the paper's §4.2 settings, validate with Axolotl, target exactly the language
model's seven projections of LLaVA-1.5-7B's architecture, and differ from each other only in sharing."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from sharelora_plugin.args import incompatible_options

ROOT = Path(__file__).resolve().parents[1]
SHARELORA = ROOT / "recipes" / "llava15_7b_sharelora.yml"
LORA = ROOT / "recipes" / "llava15_7b_lora.yml"
ZERO2 = ROOT / "recipes" / "deepspeed" / "zero2.json"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize("path", [SHARELORA, LORA], ids=["sharelora", "lora"])
def test_paper_hyper_parameters(path: Path) -> None:
    cfg = _load(path)
    assert cfg["base_model"] == "llava-hf/llava-1.5-7b-hf"
    assert (cfg["lora_r"], cfg["lora_alpha"], cfg["lora_dropout"]) == (64, 128, 0.05)
    # YAML reads 2e-4 as a string; Axolotl's schema makes it a float
    assert float(cfg["learning_rate"]) == 2e-4
    assert (cfg["lr_scheduler"], cfg["warmup_ratio"], cfg["num_epochs"]) == ("cosine", 0.03, 1)
    assert cfg["optimizer"].startswith("adamw")
    assert cfg["micro_batch_size"] * cfg["gradient_accumulation_steps"] * 8 == 64  # batch 64 on 8 GPUs
    assert cfg["lora_modules_to_save"] == ["multi_modal_projector"]
    assert cfg["chat_template"] == "llava" and cfg["processor_type"] == "AutoProcessor"
    assert cfg["skip_prepare_dataset"] is True and cfg["remove_unused_columns"] is False
    assert cfg["sample_packing"] is False
    assert cfg["datasets"][0]["type"] == "chat_template"
    assert (ROOT / cfg["deepspeed"]).resolve() == ZERO2.resolve()
    assert incompatible_options({**cfg, "deepspeed": str(ZERO2)}) == []


def test_sharelora_block_and_twin_recipes() -> None:
    share, lora = _load(SHARELORA), _load(LORA)
    assert share["adapter"] == "sharelora" and share["plugins"] == ["sharelora_plugin.ShareLoRAPlugin"]
    assert share["sharelora"]["threshold"] == 0.9
    assert share["sharelora"]["calibration"]["num_samples"] == 128
    assert lora["adapter"] == "lora" and "plugins" not in lora and "sharelora" not in lora
    differing = {k for k in set(share) | set(lora) if share.get(k) != lora.get(k)}
    assert differing == {"adapter", "plugins", "sharelora", "output_dir"}


def test_zero2_config() -> None:
    ds = json.loads(ZERO2.read_text())
    assert ds["zero_optimization"]["stage"] == 2
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        assert ds[key] == "auto"
    assert ds["bf16"]["enabled"] == "auto"


def test_targets_are_the_language_model_projections_of_llava15_7b() -> None:
    """PEFT full-matches a string target against module names; on LLaVA-1.5-7B's architecture (built on the meta
    device from the default LlavaConfig, which is llava-1.5-7b) that must select 32 layers × 7 projections of the
    language model and nothing in the CLIP tower (whose layers also have q/k/v/out projections and MLPs)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    pattern = _load(SHARELORA)["lora_target_modules"]
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(LlavaConfig())
    names = [name for name, _ in model.named_modules()]
    matched = [n for n in names if re.fullmatch(pattern, n)]
    assert len(matched) == 32 * len(TARGETS)
    assert all(n.startswith("model.language_model.layers.") for n in matched)
    assert {n.rsplit(".", 1)[1] for n in matched} == set(TARGETS)
    assert any(n.startswith("model.multi_modal_projector") for n in names)


def test_recipes_validate_with_axolotl(tmp_path: Path) -> None:
    """Axolotl's own config validation accepts both recipes (checked against the tiny LLaVA's config, as the 7B
    weights are not here; without DeepSpeed and bf16, which need GPUs)."""
    from bench.embedded import model_dir

    if not (model_dir() / "config.json").is_file():
        pytest.skip("SmolLM2 is not prepared; run `make setup`")
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "llava_build_tiny_under_test", ROOT / "llava" / "build_tiny.py"
    )
    build_tiny = sys.modules.get(spec.name)
    if build_tiny is None:
        build_tiny = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = build_tiny
        spec.loader.exec_module(build_tiny)
    tiny = build_tiny.build()
    configs = []
    for path in (SHARELORA, LORA):
        cfg = _load(path)
        cfg.pop("deepspeed")
        cfg.update(
            base_model=str(tiny / "model"), bf16=False, tf32=False, output_dir=str(tmp_path / path.stem)
        )
        configs.append(tmp_path / path.name)
        configs[-1].write_text(yaml.safe_dump(cfg))
    script = textwrap.dedent(
        """
        import sys
        from axolotl.cli.config import load_cfg
        for path in sys.argv[1:]:
            cfg = load_cfg(path)
            print("VALID", cfg.adapter, cfg.lora_r, cfg.lora_alpha, list(cfg.lora_modules_to_save),
                  bool(cfg.sharelora and cfg.sharelora.get("enabled")), cfg.is_multimodal)
        """
    )
    env = {**os.environ, "AXOLOTL_DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run(
        [sys.executable, "-c", script, *map(str, configs)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("VALID")]
    assert lines == [
        "VALID lora 64 128 ['multi_modal_projector'] True True",
        "VALID lora 64 128 ['multi_modal_projector'] False True",
    ]
