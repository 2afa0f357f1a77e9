"""``sharelora.metric: gradient_subspace`` as a first-class metric: the YAML block and its refusals, calibration and
planning on the sketches (stability report, stop-when-stable), the sketches file beside the plan, re-planning with
``sharelora plan``, ``sharelora show`` and the heatmap. Tiny random Llamas; the tokenizer is the embedded SmolLM2's."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import tiny_llama

from sharelora_plugin import gradient_sketch, workflow
from sharelora_plugin.args import ShareLoRAArgs, ShareLoRAConfig
from sharelora_plugin.planning import PlanError, SharePlan, StopWhenStable
from sharelora_plugin.planning.subspace import SKETCH_FILENAME, SubspaceSketches, random_level

TARGETS = ["q_proj", "v_proj", "down_proj"]
CFG = {"base_model": "tiny", "lora_target_modules": TARGETS}
NUM_LAYERS = 5


@pytest.fixture(scope="module")
def texts_file(tmp_path_factory):
    rows = [
        {"text": f"note {k}: " + " ".join(["red", "green", "blue", "gold"][: 1 + k % 4] * (1 + k % 3))}
        for k in range(40)
    ]
    path = tmp_path_factory.mktemp("gradient") / "texts.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def _model():
    return tiny_llama(num_layers=NUM_LAYERS, hidden=32, vocab_size=49152)


def _settings(texts_file, **calibration) -> dict:
    block = {"path": str(texts_file), "num_samples": 24, "batch_size": 4, "bootstrap_resamples": 30}
    return ShareLoRAConfig(
        metric="gradient_subspace", target_fraction=0.8, calibration={**block, **calibration}
    ).model_dump()


@pytest.fixture(scope="module")
def calibrated(texts_file, tokenizer):
    """One gradient calibration and its plan, shared by the tests that only read them."""
    settings = _settings(texts_file)
    result = workflow.run_calibration(_model(), tokenizer, settings, CFG)
    return result, settings, workflow.plan_from_calibration(result, settings, 8)


# --------------------------------------------------------------------------------------------------------------------
# The YAML block


def _raw(**top) -> dict:
    """The README's YAML (as a dict) with ``top`` merged in; a ``None`` in the sharelora block removes that key."""
    raw = {
        "adapter": "sharelora",
        "lora_r": 8,
        "lora_target_modules": ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"],
        "sharelora": {
            "metric": "gradient_subspace",
            "target_fraction": 0.7,
            "calibration": {"num_samples": 64, "batch_size": 8},
        },
    }
    for key, value in top.items():
        if key == "sharelora":
            merged = {**raw["sharelora"], **value}
            raw["sharelora"] = {k: v for k, v in merged.items() if v is not None}
        else:
            raw[key] = value
    return raw


def test_the_yaml_block_validates_through_axolotl(smollm2_dir, data_dir, tmp_path):
    from axolotl.cli.config import prepare_plugins
    from axolotl.utils.config import validate_config
    from axolotl.utils.dict import DictDefault

    raw = _raw(
        base_model=str(smollm2_dir),
        plugins=["sharelora_plugin.ShareLoRAPlugin"],
        lora_alpha=16,
        datasets=[{"path": str(data_dir / "chatterbot_en.jsonl"), "type": "chat_template"}],
        micro_batch_size=1,
        num_epochs=1,
        learning_rate=1e-4,
        sequence_len=128,
        output_dir=str(tmp_path / "out"),
    )

    def validate(config: dict):
        cfg = DictDefault(json.loads(json.dumps(config)))
        prepare_plugins(cfg)
        return validate_config(cfg)

    settings = workflow.sharelora_settings(validate(raw))
    assert settings["metric"] == "gradient_subspace" and settings["target_fraction"] == 0.7
    assert settings["calibration"]["sketch_rank"] == 8 and settings["calibration"]["num_samples"] == 64
    with pytest.raises(Exception, match="load_in_4bit") as err:
        validate({**raw, "load_in_4bit": True})
    assert "metric angular" in str(err.value) and "sharelora.plan_file" in str(err.value)


REFUSALS = [
    # (top-level / sharelora overrides, texts the message must contain)
    ({"sharelora": {"target_fraction": None}}, ["sharelora.target_fraction", "sharelora.threshold", "0.85"]),
    (
        {"load_in_4bit": True},
        ["load_in_4bit", "metric angular", "sharelora plan --config", "sharelora.plan_file"],
    ),
    ({"load_in_8bit": True}, ["load_in_8bit", "metric angular", "sharelora.plan_file"]),
    ({"processor_type": "AutoProcessor"}, ["visual-text", "metric angular"]),
    (
        {"deepspeed": {"zero_optimization": {"stage": 3}}},
        ["sharelora.plan_file", "sharelora plan --config", "gradient_subspace", "backward"],
    ),
    (
        {
            "sharelora": {
                "calibration": {"num_samples": 8, "batch_size": 8, "stop_when_stable": True, "min_samples": 4}
            }
        },
        ["sharelora.calibration.stop_when_stable", "sharelora.calibration.batch_size", "2 sketch blocks"],
    ),
    ({"sharelora": {"calibration": {"sketch_rank": 0}}}, ["sharelora.calibration.sketch_rank"]),
]


@pytest.mark.parametrize(("overrides", "expected"), REFUSALS, ids=[e[0] for _, e in REFUSALS])
def test_refusals_name_the_key_and_the_fix(overrides, expected):
    with pytest.raises(ValueError) as err:
        ShareLoRAArgs.model_validate(_raw(**overrides))
    for text in expected:
        assert text in str(err.value), (text, str(err.value))


def test_what_the_metric_accepts(tmp_path):
    # an explicit ε on the overlap's own scale
    explicit = _raw(sharelora={"target_fraction": None, "threshold": 0.12})
    assert ShareLoRAArgs.model_validate(explicit).sharelora.threshold == 0.12
    # sets that do not come from the matrix need no ε
    ShareLoRAArgs.model_validate(
        _raw(sharelora={"target_fraction": None, "strategy": "manual", "share_sets": [[1, 2]]})
    )
    plan_file = tmp_path / "sharelora_plan.json"
    plan_file.write_text("{}")
    # a plan made elsewhere (unquantized, `sharelora plan`) is what a 4-bit or ZeRO-3 run should use
    with_plan = _raw(load_in_4bit=True, deepspeed={"zero_optimization": {"stage": 3}})
    with_plan["sharelora"]["plan_file"] = str(plan_file)
    ShareLoRAArgs.model_validate(with_plan)
    # angular is untouched: its default ε and 4-bit calibration stay allowed
    ShareLoRAArgs.model_validate({**_raw(load_in_4bit=True), "sharelora": {}})


def test_plan_config_plans_a_quantized_or_zero3_yaml_without_those_keys():
    from sharelora_plugin.plan_command import _planning_only_overrides

    raw = {"load_in_4bit": True, "load_in_8bit": False, "deepspeed": "zero3.json", "lora_r": 8}
    assert _planning_only_overrides(raw) == {"load_in_4bit": None, "deepspeed": None}


# --------------------------------------------------------------------------------------------------------------------
# Calibration and planning


def test_plan_is_made_on_the_sketch_overlap_with_a_stability_report(calibrated):
    result, settings, plan = calibrated
    sketches = result.sketches
    assert result.angular_distance is None and result.num_samples == 24 and sketches.num_blocks == 6
    assert plan.metric == "gradient_subspace" and plan.target_fraction == 0.8
    np.testing.assert_allclose(np.asarray(plan.similarity), sketches.overlap(), atol=1e-12)
    assert plan.param_fraction <= 0.8 and plan.layers_saved >= 1
    stability = plan.stability
    assert stability["num_blocks"] == 6 and stability["num_samples"] == 24 and stability["resamples"] == 30
    assert 0.0 <= stability["plan_frequency"] <= 1.0
    meta = plan.metadata["calibration"]
    # the sketches cover lora_target_modules of the config, nothing else
    assert sorted(name.split(".")[-1] for name in meta["sketch_targets"]) == sorted(TARGETS)
    dims = [(32, 32), (32, 16), (64, 32)]  # (d_in, d_out) of q_proj, v_proj (2 kv heads of 8), down_proj
    assert meta["sketch_rank"] == 8 and meta["sketch_blocks"] == 6
    assert meta["sketch_bytes"] == sketches.nbytes == gradient_sketch.sketch_bytes(dims, NUM_LAYERS, 8, 6)
    assert meta["random_level"] == pytest.approx(
        random_level([d for pair in dims for d in pair], 8), abs=1e-6
    )
    assert "angular_distance" not in plan.metadata and "cosine" not in plan.metadata


def test_sketched_modules_follow_the_lora_target_keys():
    model = _model()
    assert workflow.calibration_target_modules(CFG, model) == TARGETS
    assert workflow.calibration_target_modules({**CFG, "lora_target_linear": True}, model) == "all-linear"
    assert workflow.calibration_target_modules({}, model) == ["q_proj", "v_proj"]  # PEFT's default for llama


def test_sketch_rank_key_sets_k(texts_file, tokenizer):
    settings = _settings(texts_file, sketch_rank=3, num_samples=8)
    result = workflow.run_calibration(_model(), tokenizer, settings, CFG)
    assert {array.shape[-1] for array in result.sketches.blocks.values()} == {3}
    assert result.settings["sketch_rank"] == 3


def test_stop_when_stable_checks_the_sketches_so_far(texts_file, tokenizer):
    """Online, the rule sees the blocks so far; replayed over prefixes of the kept sketches it makes the same
    checks and stops at the same batch."""
    settings = _settings(
        texts_file,
        num_samples=40,
        stop_when_stable=True,
        min_samples=8,
        stability=0.6,
        bootstrap_resamples=20,
    )
    result = workflow.run_calibration(_model(), tokenizer, settings, CFG)
    info = result.settings
    assert info["stop_when_stable"] and info["num_samples_cap"] == 40
    assert info["stability_checks"], "stop-when-stable made no check"
    assert info["stability_checks"][0]["num_samples"] == 8 and info["stability_checks"][0]["num_blocks"] == 2
    replay = StopWhenStable(plan_options=workflow.plan_options(settings, 8), min_samples=8, target=0.6)
    stopped_at = None
    for blocks in range(1, 11):
        prefix = result.sketches.prefix(blocks)
        if blocks > result.sketches.num_blocks:
            break
        if replay(prefix.overlap(), prefix):
            stopped_at = blocks
            break
    assert info["stability_checks"] == replay.checks
    if info["stop_reason"] == "stable":
        assert result.stopped_early and stopped_at == result.sketches.num_blocks < 10
    else:
        assert info["stop_reason"] == "cap" and result.num_samples == 40 and stopped_at is None
    plan = workflow.plan_from_calibration(result, settings, 8)
    assert plan.stability["num_samples"] == result.num_samples
    assert plan.metadata["calibration"]["stop_reason"] == info["stop_reason"]


def test_memory_cap_refuses_before_any_pass(texts_file, tokenizer, monkeypatch):
    monkeypatch.setattr(gradient_sketch, "MAX_SKETCH_BYTES", 10_000)
    model = _model()
    model.model.embed_tokens.register_forward_hook(lambda *_: pytest.fail("a forward pass ran"))
    with pytest.raises(ValueError) as err:
        workflow.run_calibration(model, tokenizer, _settings(texts_file), CFG)
    message = str(err.value)
    assert "sharelora.calibration.num_samples" in message and "batch_size" in message and "cap" in message


def test_visual_text_and_quantized_models_are_refused_at_calibration(texts_file, tokenizer):
    vlm = _model()
    vlm.config.vision_config = {"model_type": "clip_vision_model"}
    with pytest.raises(PlanError, match="visual-text"):
        workflow.run_calibration(vlm, tokenizer, _settings(texts_file), CFG)
    quantized = _model()
    quantized.is_loaded_in_4bit = True
    with pytest.raises(PlanError, match="metric angular"):
        workflow.run_calibration(quantized, tokenizer, _settings(texts_file), CFG)


# --------------------------------------------------------------------------------------------------------------------
# Beside the plan: the sketches file, `sharelora plan`, `sharelora show`, the heatmap


def test_sketches_are_saved_beside_the_plan_and_replanned_by_the_cli(calibrated, tmp_path, capsys):
    from sharelora_plugin.cli import main

    result, _settings_, plan = calibrated
    written = workflow.save_plan_artifacts(plan, tmp_path, per_sample=result.sketches)
    assert tmp_path / SKETCH_FILENAME in written and tmp_path / "sharelora_similarity.png" in written
    loaded = workflow.per_sample_beside(tmp_path / workflow.PLAN_FILENAME, "gradient_subspace")
    assert isinstance(loaded, SubspaceSketches)
    np.testing.assert_array_equal(loaded.overlap(), result.sketches.overlap())

    matrix = ["plan", "--matrix", str(tmp_path / workflow.PLAN_FILENAME)]
    assert main([*matrix, "--target-fraction", "0.8", "--stability", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["metric"] == "gradient_subspace" and again["share_sets"] == plan.share_sets
    assert again["threshold"] == plan.threshold and again["stability"] == plan.stability

    # another strategy and a fixed ε, still bootstrapped over the sketch blocks
    assert (
        main([*matrix, "--strategy", "optimal", "--threshold", f"{plan.threshold}", "--stability", "--json"])
        == 0
    )
    optimal = json.loads(capsys.readouterr().out)
    assert optimal["strategy"] == "optimal" and optimal["stability"]["num_blocks"] == 6
    assert optimal["layers_saved"] >= plan.layers_saved

    (tmp_path / SKETCH_FILENAME).unlink()
    assert main([*matrix, "--stability"]) == 2
    assert "gradient sketch file not found" in capsys.readouterr().err


def test_the_run_keeps_its_sketches_and_a_saved_plan_brings_them_back(texts_file, tokenizer, tmp_path):
    """What the plugin does: calibrate (make_or_load_plan), write the artifacts; a later run given the plan file
    finds the sketches beside it (by the plan's metric, not a stale angular file) without calibrating."""
    block = {
        "metric": "gradient_subspace",
        "threshold": 0.3,
        "calibration": {
            "path": str(texts_file),
            "num_samples": 12,
            "batch_size": 4,
            "bootstrap_resamples": 10,
        },
    }
    model = _model()
    plan, source, sketches = workflow.make_or_load_plan({**CFG, "sharelora": block}, model, lambda: tokenizer)
    assert source == "calibration" and isinstance(sketches, SubspaceSketches) and sketches.num_blocks == 3
    assert plan.threshold == 0.3 and plan.stability["num_blocks"] == 3
    workflow.save_plan_artifacts(plan, tmp_path, per_sample=sketches)
    (tmp_path / "sharelora_calibration.npz").write_bytes(b"stale angular file")
    plan_file = str(tmp_path / workflow.PLAN_FILENAME)
    model.model.embed_tokens.register_forward_hook(lambda *_: pytest.fail("calibrated again"))
    again, source, found = workflow.make_or_load_plan(
        {**CFG, "lora_r": 8, "sharelora": {**block, "plan_file": plan_file}}, model, lambda: tokenizer
    )
    assert source == plan_file and again.share_sets == plan.share_sets
    np.testing.assert_array_equal(found.overlap(), sketches.overlap())


def test_cli_refuses_the_angular_default_on_an_overlap_matrix(tmp_path, capsys):
    from sharelora_plugin.cli import main

    overlap = np.full((4, 4), 0.05)
    np.fill_diagonal(overlap, 1.0)
    np.savetxt(tmp_path / "overlap.csv", overlap, delimiter=",")
    assert main(["plan", "--matrix", str(tmp_path / "overlap.csv"), "--metric", "gradient_subspace"]) == 2
    assert "--target-fraction" in capsys.readouterr().err


def test_show_and_heatmap_of_a_gradient_plan(calibrated, tmp_path, capsys):
    from sharelora_plugin.cli import main
    from sharelora_plugin.heatmap import heatmap_figure, save_heatmap

    _result, _settings_, plan = calibrated
    plan.save(tmp_path / "plan.json")
    assert main(["show", str(tmp_path / "plan.json")]) == 0
    out = capsys.readouterr().out
    assert "metric=gradient_subspace" in out and "resamples of 6 blocks of 24 samples" in out
    assert "gradient-subspace overlap: k=8" in out

    figure = heatmap_figure(SharePlan.from_dict(plan.to_dict()))
    main_axes, colorbar = figure.axes[0], figure.axes[1]
    assert (
        "gradient-subspace overlap" in colorbar.get_ylabel()
        and "gradient-subspace overlap" in main_axes.get_title()
    )
    image = main_axes.images[0]
    level = plan.metadata["calibration"]["random_level"]
    off = np.asarray(plan.similarity)[~np.eye(NUM_LAYERS, dtype=bool)]
    assert image.norm.vmin <= level and image.norm.vmax == pytest.approx(off.max())
    assert "blocks" in figure.axes[2].get_title()
    save_heatmap(plan, tmp_path / "heatmap.png")
    assert (tmp_path / "heatmap.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.e2e
def test_gradient_metric_trains_through_axolotl(tmp_path, smollm2_dir, data_dir):
    """`metric: gradient_subspace` as a user writes it: `python -m axolotl.cli.train` calibrates with gradient
    sketches, plans at the target fraction, ties, trains and saves the plan, the sketches and a plain PEFT adapter
    whose tied copies are equal."""
    import torch
    import yaml
    from conftest import train_subprocess, write_config
    from safetensors.torch import load_file

    out = tmp_path / "out"
    config = write_config(tmp_path / "cfg.yml", smollm2_dir, data_dir, out, max_steps=2, save_steps=10)
    cfg = yaml.safe_load(config.read_text())
    cfg["sharelora"].pop("threshold", None)
    cfg["sharelora"].update(metric="gradient_subspace", target_fraction=0.8, strategy="greedy")
    cfg["sharelora"]["calibration"].update(batch_size=4, stop_when_stable=False)
    config.write_text(yaml.safe_dump(cfg))
    train_subprocess(config)
    plan = json.loads((out / "sharelora_plan.json").read_text())
    assert plan["metric"] == "gradient_subspace" and plan["share_sets"]
    assert plan["param_fraction"] <= 0.8 and plan["stability"]["plan_frequency"] is not None
    sketches = SubspaceSketches.load(out / SKETCH_FILENAME)
    assert sketches.num_blocks == 4 and sketches.num_samples == 16
    np.testing.assert_allclose(np.asarray(plan["similarity"]), sketches.overlap(), atol=1e-6)
    tensors = load_file(str(out / "adapter_model.safetensors"))
    leader, member = plan["share_sets"][0][0], plan["share_sets"][0][1]
    for key, tensor in tensors.items():
        if f".layers.{member}." in key:
            assert torch.equal(tensor, tensors[key.replace(f".layers.{member}.", f".layers.{leader}.")])
