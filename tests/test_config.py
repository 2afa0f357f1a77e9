"""The `sharelora:` block and `adapter: sharelora` through Axolotl's own config validation."""

from __future__ import annotations

import json

import pytest

BAD_INPUTS = [
    # (overrides of the sharelora block or top level, text the error must contain)
    ({"sharelora": {"threshold": 0}}, "sharelora.threshold"),
    ({"sharelora": {"threshold": 1.5}}, "sharelora.threshold"),
    ({"sharelora": {"threshold": -0.2}}, "sharelora.threshold"),
    ({"sharelora": {"metric": "euclid"}}, "metric"),
    ({"sharelora": {"strategy": "clever"}}, "strategy"),
    ({"sharelora": {"calibration": {"num_samples": 0}}}, "sharelora.calibration.num_samples"),
    ({"sharelora": {"calibration": {"num_samples": -5}}}, "sharelora.calibration.num_samples"),
    ({"sharelora": {"calibration": {"batch_size": 0}}}, "sharelora.calibration.batch_size"),
    ({"sharelora": {"calibration": {"max_length": 0}}}, "sharelora.calibration.max_length"),
    ({"sharelora": {"calibration": {"path": "/nonexistent/calib.jsonl"}}}, "sharelora.calibration.path"),
    ({"sharelora": {"calibration": {"path": "./missing_dir/texts.jsonl"}}}, "does not exist"),
    ({"sharelora": {"treshold": 0.9}}, "treshold"),
    ({"sharelora": {"strategy": "manual"}}, "sharelora.share_sets"),
    ({"sharelora": {"strategy": "manual", "share_sets": [[1, 2], [2, 3]]}}, "disjoint"),
    ({"sharelora": {"strategy": "manual", "share_sets": [[4]]}}, "at least 2"),
    ({"sharelora": {"share_sets": [[1, 2]]}}, "only used with strategy: manual"),
    ({"sharelora": {"contiguous": True}}, "contiguous"),
    ({"sharelora": {"plan_file": "/nonexistent/sharelora_plan.json"}}, "sharelora.plan_file"),
    ({"sharelora": {"target_fraction": 1.5}}, "sharelora.target_fraction"),
    ({"sharelora": {"rank_expansion": -3}}, "sharelora.rank_expansion"),
    ({"sharelora": {"confidence": 1.5}}, "sharelora.confidence"),
    ({"sharelora": {"confidence": 0.9, "strategy": "alternate"}}, "sharelora.confidence applies to strategy"),
    ({"sharelora": {"confidence": 0.9, "target_fraction": 0.7}}, "cannot be combined"),
    ({"sharelora": {"confidence": 0.9, "calibration": {"bootstrap_resamples": 0}}}, "needs the bootstrap"),
    ({"sharelora": {"calibration": {"bootstrap_resamples": 5}}}, "sharelora.calibration.bootstrap_resamples"),
    ({"sharelora": {"calibration": {"stability": 0}}}, "sharelora.calibration.stability"),
    (
        {"sharelora": {"calibration": {"stop_when_stable": True, "min_samples": 300}}},
        "sharelora.calibration.min_samples",
    ),
    (
        {"sharelora": {"strategy": "alternate", "calibration": {"stop_when_stable": True}}},
        "nothing to wait for",
    ),
    ({"fsdp_version": 1, "fsdp_config": {"reshard_after_forward": True}}, "set fsdp_version: 2"),
    # no version: Axolotl runs FSDP1
    ({"fsdp_config": {"reshard_after_forward": True}}, "fsdp_version: 1 (FSDP1"),
    ({"peft_init_lora_weights": "pissa"}, "peft_init_lora_weights"),
    ({"peft_init_lora_weights": "olora"}, "peft_init_lora_weights"),
    ({"relora": True, "jagged_restart_steps": 10}, "relora"),
    ({"rl": "dpo"}, "rl: dpo"),
    ({"peft_layer_replication": [[0, 4], [2, 6]]}, "peft_layer_replication"),
    ({"lora_target_parameters": ["mlp.experts.gate_up_proj"]}, "lora_target_parameters"),
    (
        {"peft_layers_to_transform": [0, 1, 2], "sharelora": {"strategy": "manual", "share_sets": [[2, 3]]}},
        "peft_layers_to_transform",
    ),
]


def _base(smollm2_dir, data_dir, tmp_path) -> dict:
    return {
        "base_model": str(smollm2_dir),
        "plugins": ["sharelora_plugin.ShareLoRAPlugin"],
        "adapter": "sharelora",
        "lora_r": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.05,
        "lora_target_modules": ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"],
        "sharelora": {"threshold": 0.9, "calibration": {"path": str(data_dir / "lee_background.jsonl")}},
        "datasets": [{"path": str(data_dir / "chatterbot_en.jsonl"), "type": "chat_template"}],
        "micro_batch_size": 1,
        "num_epochs": 1,
        "learning_rate": 1e-4,
        "sequence_len": 128,
        "output_dir": str(tmp_path / "out"),
    }


def _validate(raw: dict):
    from axolotl.cli.config import prepare_plugins
    from axolotl.utils.config import validate_config
    from axolotl.utils.dict import DictDefault

    cfg = DictDefault(json.loads(json.dumps(raw)))
    prepare_plugins(cfg)
    return validate_config(cfg)


def _merge(base: dict, overrides: dict) -> dict:
    out = json.loads(json.dumps(base))
    for key, value in overrides.items():
        if key == "sharelora":
            block = out["sharelora"]
            for k, v in value.items():
                if k == "calibration":
                    block["calibration"] = {**block["calibration"], **v}
                else:
                    block[k] = v
        else:
            out[key] = value
    return out


@pytest.mark.parametrize(("overrides", "expected"), BAD_INPUTS, ids=[e for _, e in BAD_INPUTS])
def test_bad_input_fails_at_config_time_naming_the_key(overrides, expected, smollm2_dir, data_dir, tmp_path):
    raw = _merge(_base(smollm2_dir, data_dir, tmp_path), overrides)
    with pytest.raises(Exception) as err:  # pydantic.ValidationError or ValueError, as Axolotl raises them
        _validate(raw)
    assert expected in str(err.value)


def test_zero3_needs_a_plan_file(smollm2_dir, data_dir, tmp_path):
    ds = tmp_path / "zero3.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto"}))
    raw = _merge(_base(smollm2_dir, data_dir, tmp_path), {"deepspeed": str(ds)})
    with pytest.raises(Exception, match="sharelora.plan_file"):
        _validate(raw)


def test_reentrant_checkpointing_refused_under_deepspeed(smollm2_dir, data_dir, tmp_path):
    ds = tmp_path / "zero2.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    raw = _merge(
        _base(smollm2_dir, data_dir, tmp_path),
        {
            "deepspeed": str(ds),
            "gradient_checkpointing": True,
            "gradient_checkpointing_kwargs": {"use_reentrant": True},
        },
    )
    with pytest.raises(Exception, match="use_reentrant"):
        _validate(raw)


def test_sharelora_validates_exactly_like_lora(smollm2_dir, data_dir, tmp_path):
    """Every Axolotl key derived at validation time (LoRA kernels, checkpointing …) matches adapter: lora."""
    raw = _base(smollm2_dir, data_dir, tmp_path)
    shared = _validate(raw)
    plain = dict(raw, adapter="lora")
    plain.pop("sharelora")
    lora = _validate(plain)
    assert shared.adapter == "lora"
    assert shared.sharelora["enabled"] is True
    assert shared.sharelora["threshold"] == 0.9
    drop = {"sharelora"}
    assert {k: v for k, v in shared.items() if k not in drop} == {
        k: v for k, v in lora.items() if k not in drop
    }
    # on this CPU Axolotl auto-enables its LoRA kernels for lora, so it must for sharelora too
    assert shared.lora_qkv_kernel == lora.lora_qkv_kernel


def test_four_bit_base_becomes_qlora_and_checkpointing_is_non_reentrant(smollm2_dir, data_dir, tmp_path):
    raw = _merge(
        _base(smollm2_dir, data_dir, tmp_path), {"load_in_4bit": True, "gradient_checkpointing": True}
    )
    cfg = _validate(raw)
    assert cfg.adapter == "qlora"
    assert cfg.gradient_checkpointing_kwargs == {"use_reentrant": False}
    explicit = _merge(raw, {"gradient_checkpointing_kwargs": {"use_reentrant": True}})
    assert _validate(explicit).gradient_checkpointing_kwargs == {
        "use_reentrant": True
    }  # single process: allowed


def test_model_loader_quantization_paths_match_lora(smollm2_dir, data_dir, tmp_path):
    """The BnB config Axolotl builds for the base model keys on adapter names; sharelora must get LoRA's."""
    from axolotl.loaders import ModelLoader, load_tokenizer
    from axolotl.utils.config import normalize_config

    def loader_kwargs(overrides: dict) -> dict:
        cfg = _validate(_merge(_base(smollm2_dir, data_dir, tmp_path), overrides))
        normalize_config(cfg)
        loader = ModelLoader(cfg, load_tokenizer(cfg))
        loader._set_quantization_config()
        return loader.model_kwargs

    q8 = loader_kwargs({"load_in_8bit": True})["quantization_config"]
    assert q8.load_in_8bit
    q4 = loader_kwargs({"load_in_4bit": True})["quantization_config"]
    assert q4.load_in_4bit and q4.bnb_4bit_quant_type == "nf4"


def test_plain_lora_with_a_sharelora_block_is_not_tied(smollm2_dir, data_dir, tmp_path):
    from sharelora_plugin.plugin import _enabled

    raw = dict(_base(smollm2_dir, data_dir, tmp_path), adapter="lora")
    cfg = _validate(raw)
    assert not _enabled(cfg)
    assert _enabled(_validate(_base(smollm2_dir, data_dir, tmp_path)))


def test_shipped_deepspeed_configs(smollm2_dir, data_dir, tmp_path):
    """ZeRO-2 validates with calibration; the shipped ZeRO-3 JSON needs a plan file and works with one."""
    from conftest import ROOT

    from sharelora_plugin.planning import make_plan

    zero2 = str(ROOT / "recipes" / "deepspeed" / "zero2.json")
    zero3 = str(ROOT / "recipes" / "deepspeed" / "zero3.json")
    base = _base(smollm2_dir, data_dir, tmp_path)
    assert _validate(_merge(base, {"deepspeed": zero2})).sharelora["enabled"] is True
    with pytest.raises(Exception, match="ZeRO-3"):
        _validate(_merge(base, {"deepspeed": zero3}))
    plan = tmp_path / "plan.json"
    make_plan(num_layers=30, strategy="alternate").save(plan)
    cfg = _validate(_merge(base, {"deepspeed": zero3, "sharelora": {"plan_file": str(plan)}}))
    assert cfg.sharelora["plan_file"] == str(plan)


def test_image_root_and_arrow_calibration_files(smollm2_dir, data_dir, tmp_path):
    """`image_root` is a real key (a folder that must exist); an `.arrow` calibration file loads."""
    from datasets import Dataset

    from sharelora_plugin.args import ShareLoRAConfig
    from sharelora_plugin.workflow import load_calibration_rows

    raw = _merge(
        _base(smollm2_dir, data_dir, tmp_path), {"sharelora": {"calibration": {"image_root": str(tmp_path)}}}
    )
    _validate(raw)
    missing = _merge(raw, {"sharelora": {"calibration": {"image_root": str(tmp_path / "nowhere")}}})
    with pytest.raises(Exception, match="sharelora.calibration.image_root"):
        _validate(missing)

    Dataset.from_list([{"text": f"row {k}"} for k in range(5)]).save_to_disk(str(tmp_path / "saved"))
    (arrow,) = (tmp_path / "saved").glob("*.arrow")
    settings = ShareLoRAConfig(calibration={"path": str(arrow), "num_samples": 3}).model_dump()
    rows, source = load_calibration_rows(settings, {})
    assert source == str(arrow) and len(rows) == 3 and all(row["text"].startswith("row ") for row in rows)


@pytest.mark.parametrize("state_dict_type", ["FULL_STATE_DICT", "SHARDED_STATE_DICT"])
def test_fsdp2_validates(state_dict_type, smollm2_dir, data_dir, tmp_path):
    """FSDP2 gives each tied module its own group (sharelora_plugin/fsdp.py), so fsdp_version: 2 is accepted,
    written at the top level or inside fsdp_config."""
    fsdp_config = {
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "transformer_layer_cls_to_wrap": "LlamaDecoderLayer",
        "state_dict_type": state_dict_type,
        "reshard_after_forward": True,
    }
    base = _base(smollm2_dir, data_dir, tmp_path)
    top = _validate(_merge(base, {"fsdp_version": 2, "fsdp_config": fsdp_config}))
    assert top.sharelora["enabled"] is True and str(top.fsdp_version) == "2"
    inside = _validate(_merge(base, {"fsdp_config": {**fsdp_config, "fsdp_version": 2}}))
    assert inside.sharelora["enabled"] is True and str(inside.fsdp_version) == "2"
