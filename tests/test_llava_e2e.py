"""End to end on the tiny LLaVA through ``axolotl.cli.train`` (in process, so the trained model can be compared
with what was saved): visual-text calibration, plan, ties, projector trained and saved, and the saved adapter
reloads with plain PEFT to the same logits."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import load_script

from sharelora_plugin.planning import SharePlan
from sharelora_plugin.tying import tie_lora_modules, verify_ties

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "tiny_llava_sharelora.yml"
PROJECTOR = "multi_modal_projector"

pytestmark = pytest.mark.e2e


build_tiny = load_script(ROOT / "llava" / "build_tiny.py", "llava_build_tiny_under_test")


@pytest.fixture(scope="module")
def trained(tiny_llava: Path, tmp_path_factory):
    """Run the tiny recipe (3 steps, 8 calibration samples) through axolotl.cli.train.do_cli in this process and
    keep what ``axolotl.train.train`` returned."""
    import axolotl.cli.train as cli_train
    from axolotl.train import train as axolotl_train

    work = tmp_path_factory.mktemp("tiny_llava_e2e")
    cfg = yaml.safe_load(RECIPE.read_text())
    cfg.update(
        base_model=str(tiny_llava / "model"),
        datasets=[{**cfg["datasets"][0], "path": str(tiny_llava / "data" / "train.jsonl")}],
        dataset_prepared_path=str(work / "prepared"),
        output_dir=str(work / "out"),
        max_steps=3,
        save_steps=100,
        logging_steps=1,
        learning_rate=1e-3,  # a visible projector change in 3 steps
    )
    cfg["sharelora"]["calibration"].update(num_samples=8, batch_size=4)
    config_path = work / "tiny_llava.yml"
    config_path.write_text(yaml.safe_dump(cfg))

    captured = {}

    def capture(*args, **kwargs):
        captured["model"], captured["tokenizer"], captured["trainer"] = axolotl_train(*args, **kwargs)
        return captured["model"], captured["tokenizer"], captured["trainer"]

    patch = pytest.MonkeyPatch()
    patch.setattr(cli_train, "train", capture, raising=False)
    patch.setattr(sys, "argv", ["axolotl.cli.train", str(config_path)])
    # Axolotl sets ACCELERATE_* variables for the run; later tests should not see them
    environ = dict(os.environ)
    try:
        cli_train.do_cli(config=str(config_path))
    finally:
        patch.undo()
        os.environ.clear()
        os.environ.update(environ)
    model = captured["model"].eval()
    return {"model": model, "out": Path(cfg["output_dir"]), "base": tiny_llava / "model", "data": tiny_llava}


def _adapter_state(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / "adapter_model.safetensors")


def _inputs(data: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoProcessor

    from sharelora_plugin.multimodal import visual_text_batches

    processor = AutoProcessor.from_pretrained(data / "model")
    processor.tokenizer.padding_side = "left"
    rows = [json.loads(line) for line in (data / "data" / "train.jsonl").read_text().splitlines()[:3]]
    return visual_text_batches(processor, rows, batch_size=3, max_length=128)[0]


def test_plan_is_calibrated_on_images_and_ties_hold(trained) -> None:
    out, model = trained["out"], trained["model"]
    plan = SharePlan.load(out / "sharelora_plan.json")
    meta = plan.metadata
    assert plan.num_layers == 30 and plan.share_sets
    assert meta["calibration"]["modality"] == "visual-text"
    assert meta["calibration"]["num_images"] == meta["calibration"]["num_samples"] == 8
    assert meta["calibration"]["layers_path"] == "model.language_model.layers"
    verify_ties(model, plan.share_sets, layers_path=meta["layers_path"])
    # the projector copy is trainable and counted once next to the shared LoRA parameters
    projector = sum(p.numel() for n, p in model.named_parameters() if PROJECTOR in n and p.requires_grad)
    assert projector > 0
    assert meta["trainable_params"] == meta["sharelora_params"] + projector
    assert meta["sharelora_params"] < meta["lora_params"]
    # on disk: a plain LoRA whose set members hold their leader's values; nothing for the vision tower
    state = _adapter_state(out)
    assert not [k for k in state if "vision_tower" in k]
    for share_set in plan.share_sets:
        leader, *members = sorted(share_set)
        for member in members:
            for key in [k for k in state if f".layers.{leader}." in k and ".lora_" in k]:
                other = key.replace(f".layers.{leader}.", f".layers.{member}.")
                assert torch.equal(state[key], state[other]), other


def test_projector_is_trained_and_saved(trained) -> None:
    from safetensors.torch import load_file

    out, model = trained["out"], trained["model"]
    state = _adapter_state(out)
    saved = {k.split(PROJECTOR + ".", 1)[1]: v for k, v in state.items() if PROJECTOR in k}
    assert set(saved) == {"linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"}
    base = load_file(trained["base"] / "model.safetensors")
    base_projector = {k.split(PROJECTOR + ".", 1)[1]: v for k, v in base.items() if PROJECTOR in k}
    for name, tensor in saved.items():
        assert not torch.equal(tensor, base_projector[name]), f"projector {name} did not change"
    in_memory = model.get_base_model().model.multi_modal_projector.modules_to_save["default"]
    for name, tensor in in_memory.state_dict().items():
        assert torch.equal(tensor, saved[name])


def test_saved_adapter_reloads_with_plain_peft_to_the_same_logits(trained) -> None:
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    inputs = _inputs(trained["data"])
    with torch.no_grad():
        expected = trained["model"](**inputs).logits
    base = LlavaForConditionalGeneration.from_pretrained(trained["base"], dtype=torch.float32).eval()
    with torch.no_grad():
        untrained = base(**inputs).logits
    reloaded = PeftModel.from_pretrained(base, trained["out"]).eval()
    with torch.no_grad():
        got = reloaded(**inputs).logits
    mask = inputs["attention_mask"].bool()
    assert (untrained[mask] - expected[mask]).abs().max().item() > 1e-3  # training changed the model
    assert (got[mask] - expected[mask]).abs().max().item() <= 1e-5
    # the plugin's re-tie of a loaded adapter accepts it (members equal their leaders)
    plan = SharePlan.load(trained["out"] / "sharelora_plan.json")
    report = tie_lora_modules(reloaded, plan.share_sets, require_equal=True)
    assert report.lora_params_tied == plan.metadata["sharelora_params"]
