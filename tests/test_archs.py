"""Architecture matrix: every supported text architecture, as a tiny random model, through each ShareLoRA step.

For each ``model_type`` in :data:`ARCHS` (hidden 64, 4 layers, vocab 128, random weights from
``AutoConfig.for_model`` + ``AutoModelForCausalLM.from_config``; no Hub):

* ``discovery``    the decoder layer list is found at the expected path, bare and inside a PEFT model;
* ``calibration``  right and left padding give the same L x L matrix, and a manual plan is made from it;
* ``tying``        PEFT LoRA with ``target_modules="all-linear"`` (PEFT 0.20 turns it into ``target_parameters`` for
  the fused 3-D MoE expert weights and router of transformers 5) lands on exactly the expected targets, all inside
  the decoder layers; it is tied, verified, and the shared gradient equals the sum of the members' gradients in an
  untied copy holding the same values;
* ``reload``       ``save_pretrained`` of the tied model loads with plain PEFT (no plugin) and gives equal logits.

An architecture that cannot pass a step is marked ``xfail(strict=True)`` with the exact reason, so a fix turns it
red. The README's "Supported architectures" table is rendered from :data:`ARCHS` and a test keeps them equal:
``python tests/test_archs.py`` prints the table.
"""

from __future__ import annotations

import copy
import functools
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import pad_batches
from torch import nn

pytestmark = pytest.mark.archs

ROOT = Path(__file__).resolve().parents[1]
NUM_LAYERS = 4
VOCAB = 128
SHARE_SETS = [[1, 2, 3]]  # layer 0 stays alone: DeepSeek-V3's first layer is dense (another layer kind)
STEPS = ("discovery", "calibration", "tying", "reload")
COMMON = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": NUM_LAYERS,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
NEOX = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
FUSED_MOE = ("experts.gate_up_proj", "experts.down_proj", "gate.weight")  # ParamWrapper: module.parameter
MOE = {"num_experts_per_tok": 2}


@dataclass(frozen=True)
class Arch:
    """One row of the matrix: the config overrides, where the layers are, which LoRA targets land in them."""

    model_type: str
    config: dict = field(default_factory=dict)
    layers_path: str = "model.layers"
    targets: tuple[str, ...] = ATTN + MLP
    unadapted: tuple[str, ...] = ()  # nn.Linear modules of the layers that all-linear leaves without LoRA
    # added to all-linear where PEFT does not map the fused experts to target_parameters itself
    target_parameters: tuple[str, ...] = ()
    note: str = ""  # what differs from plain all-linear (shown in the README)
    xfail: dict[str, str] = field(default_factory=dict)  # step -> exact reason


ARCHS = [
    Arch("llama"),
    Arch("mistral"),
    Arch("mixtral", {"num_local_experts": 4, **MOE}, targets=ATTN + FUSED_MOE),
    Arch("qwen2"),
    Arch("qwen3", {"head_dim": 16}),
    Arch(
        "qwen3_moe",
        {"head_dim": 16, "num_experts": 4, "moe_intermediate_size": 32, **MOE},
        targets=ATTN + FUSED_MOE,
    ),
    Arch("gemma2", {"head_dim": 16}),
    Arch("gemma3_text", {"head_dim": 16}),
    Arch("phi3", targets=("qkv_proj", "o_proj", "gate_up_proj", "down_proj")),
    Arch("phi", targets=("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2")),
    Arch("olmo2"),
    Arch("granite"),
    Arch("cohere"),
    Arch("gpt_neox", layers_path="gpt_neox.layers", targets=NEOX),
    Arch("falcon", layers_path="transformer.h", targets=NEOX),
    Arch("smollm3"),
    Arch("glm4", {"head_dim": 16}, targets=(*ATTN, "gate_up_proj", "down_proj")),
    Arch(
        "gpt_oss",
        {"head_dim": 16, "num_local_experts": 4, **MOE},
        targets=(*ATTN, "experts.gate_up_proj", "experts.down_proj"),
        target_parameters=("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
        note="all-linear adapts attention only here; the fused experts are named in `target_parameters`",
    ),
    Arch(
        "deepseek_v3",
        {
            "num_key_value_heads": 4,  # MLA has no GQA; 2 breaks its padded-batch attention mask in transformers
            "n_routed_experts": 4,
            "moe_intermediate_size": 32,
            "first_k_dense_replace": 1,
            "q_lora_rank": 32,
            "kv_lora_rank": 16,
            "qk_rope_head_dim": 8,
            "qk_nope_head_dim": 8,
            "v_head_dim": 16,
            "n_group": 1,
            "topk_group": 1,
            **MOE,
        },
        targets=("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", *FUSED_MOE),
        unadapted=MLP,
        note=(
            "PEFT 0.20 rewrites the names `gate_proj`/`up_proj`/`down_proj` (in all-linear, a list or a regex) into "
            "`target_parameters` of the fused experts, so layer 0's dense MLP and the shared experts get no LoRA"
        ),
    ),
]


def _params(step: str) -> list:
    return [
        pytest.param(
            arch,
            id=arch.model_type,
            marks=[pytest.mark.xfail(strict=True, reason=arch.xfail[step])] if step in arch.xfail else [],
        )
        for arch in ARCHS
    ]


@functools.cache
def _base(model_type: str) -> nn.Module:
    """The tiny random model of ``model_type`` (built once; tests take deep copies)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = next(a for a in ARCHS if a.model_type == model_type)
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **{**COMMON, **arch.config})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def _ids(seed: int, batch: int = 3, length: int = 11) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------------------
# discovery


@pytest.mark.parametrize("arch", _params("discovery"))
def test_discovery(arch: Arch) -> None:
    from peft import LoraConfig, get_peft_model

    from sharelora_plugin.layers import find_decoder_layers

    model = copy.deepcopy(_base(arch.model_type))
    found = find_decoder_layers(model)
    assert (found.path, len(found)) == (arch.layers_path, NUM_LAYERS)
    assert found.layers is model.get_submodule(arch.layers_path)
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules="all-linear"))
    assert find_decoder_layers(wrapped).path == f"base_model.model.{arch.layers_path}"


def _tiny_llava(vision_layers: int):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = LlamaConfig(**COMMON)
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=vision_layers,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    return LlavaForConditionalGeneration(LlavaConfig(text_config=text, vision_config=vision))


def test_vlm_picks_the_language_model_even_when_the_vision_tower_is_as_deep() -> None:
    from sharelora_plugin.layers import find_decoder_layers

    model = _tiny_llava(vision_layers=NUM_LAYERS)
    vision_lists = [m for m in model.model.vision_tower.modules() if isinstance(m, nn.ModuleList)]
    # as long as the text stack: the length alone cannot tell them apart
    assert [len(m) for m in vision_lists] == [NUM_LAYERS]
    found = find_decoder_layers(model)
    assert found.path == "model.language_model.layers"
    assert found.layers is model.model.language_model.layers
    # without get_decoder()'s hint the CLIP tower is still excluded, because it is built from vision_config
    model.get_decoder = lambda: (_ for _ in ()).throw(NotImplementedError())
    assert find_decoder_layers(model).path == "model.language_model.layers"


def test_ambiguity_lists_the_candidates_and_names_layers_path() -> None:
    from sharelora_plugin.layers import LayerDiscoveryError, find_decoder_layers

    class TwoModels(nn.Module):
        def __init__(self):
            super().__init__()
            self.first = copy.deepcopy(_base("llama"))
            self.second = copy.deepcopy(_base("llama"))

    with pytest.raises(LayerDiscoveryError, match="sharelora.layers_path") as error:
        find_decoder_layers(TwoModels())
    assert "first.model.layers (4 x LlamaDecoderLayer)" in str(error.value)
    assert "second.model.layers (4 x LlamaDecoderLayer)" in str(error.value)
    found = find_decoder_layers(TwoModels(), "second.model.layers")
    assert found.path == "second.model.layers" and len(found) == NUM_LAYERS


# ----------------------------------------------------------------------------------------------------------------
# calibration and plan


# Both paddings run the same real tokens (calibrate derives position_ids from the mask; RoPE only sees offsets) and
# masked keys get exactly zero weight, so in float32 only the shapes of the reductions can differ. Measured: the
# matrices are bit-identical for the 15 dense models and differ by at most 6e-9 for the MoE ones. Float32
# rounding of a reordered reduction is ~1e-7 relative, and the angular distance's slope 1 / (π sin θ) is below 1.6
# here (every per-sample pair of layers is over 12 degrees apart), so 1e-6 is several times the worst rounding. A
# real padding bug is far larger: attending to the pads moves the matrix by 0.02-0.09.
PADDING_ATOL = 1e-6


@pytest.mark.parametrize("arch", _params("calibration"))
def test_calibration_is_padding_independent_and_plans(arch: Arch) -> None:
    from sharelora_plugin.calibration import calibrate
    from sharelora_plugin.layer_kinds import layer_kinds
    from sharelora_plugin.layers import find_decoder_layers
    from sharelora_plugin.planning import make_plan

    model = _base(arch.model_type)
    gen = torch.Generator().manual_seed(3)
    samples = [
        torch.randint(3, VOCAB, (int(n),), generator=gen) for n in torch.randint(3, 17, (8,), generator=gen)
    ]
    right = calibrate(model, pad_batches(samples, "right", 4), progress=False)
    left = calibrate(model, pad_batches(samples, "left", 4), progress=False)
    assert right.layers_path == arch.layers_path and right.num_samples == len(samples)
    assert right.angular_distance.shape == (NUM_LAYERS, NUM_LAYERS)
    off_diagonal = ~np.eye(NUM_LAYERS, dtype=bool)
    assert np.all(right.angular_distance[off_diagonal] > 1e-3)  # the layers differ: the check has teeth
    np.testing.assert_allclose(left.angular_distance, right.angular_distance, atol=PADDING_ATOL, rtol=0)
    np.testing.assert_allclose(left.cosine, right.cosine, atol=PADDING_ATOL, rtol=0)
    kinds = layer_kinds(find_decoder_layers(model).layers)
    plan = make_plan(
        num_layers=right.num_layers,
        strategy="manual",
        share_sets=SHARE_SETS,
        similarity=right.similarity("angular"),
        threshold=0.5,
        layer_kinds=kinds.kinds,
        layer_kind_descriptions=kinds.descriptions,
    )
    assert plan.share_sets == SHARE_SETS and plan.num_layers == NUM_LAYERS


# ----------------------------------------------------------------------------------------------------------------
# LoRA, tying, gradients, reload


def _lora(model: nn.Module, arch: Arch):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(123)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", target_parameters=list(arch.target_parameters) or None
    )
    return get_peft_model(model, config)


def _randomize_b(model: nn.Module, seed: int = 7) -> None:
    # lora_B starts at zero; non-zero values make every layer's LoRA path reach the loss (and lora_A get gradients)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def _lora_modules(layer: nn.Module) -> dict[str, nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in layer.named_modules() if name and isinstance(m, LoraLayer)}


def _target_label(name: str, module: nn.Module) -> str:
    # ParamWrappers of one module nest as ``base_layer``; label them by the module and the wrapped parameter
    leaf = name.replace(".base_layer", "").rsplit(".", 1)[-1]
    parameter = getattr(module, "parameter_name", None)
    return f"{leaf}.{parameter}" if parameter else leaf


def _linear_names(layer: nn.Module) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, m in layer.named_modules() if isinstance(m, nn.Linear)}


def _lora_params(module: nn.Module) -> list[nn.Parameter]:
    return [p for attr in ("lora_A", "lora_B") for p in getattr(module, attr)["default"].parameters()]


@pytest.mark.parametrize("arch", _params("tying"))
def test_tied_gradient_is_the_sum_over_members(arch: Arch) -> None:
    from sharelora_plugin.layers import find_decoder_layers
    from sharelora_plugin.tying import tie_lora_modules, verify_ties

    base = _base(arch.model_type)
    untied = _lora(copy.deepcopy(base), arch)
    _randomize_b(untied)
    layers_u = find_decoder_layers(untied).layers
    # every LoRA module of the model sits inside the decoder layers, on exactly the expected targets
    inside = {id(m) for layer in layers_u for m in _lora_modules(layer).values()}
    assert inside == {id(m) for m in _lora_modules(untied).values()}
    labels = {_target_label(n, m) for n, m in _lora_modules(layers_u[SHARE_SETS[0][0]]).items()}
    assert labels == set(arch.targets)
    adapted = {_target_label(n, m) for layer in layers_u for n, m in _lora_modules(layer).items()}
    linear = {n for layer in find_decoder_layers(base).layers for n in _linear_names(layer)}
    assert linear - adapted == set(arch.unadapted)
    # members start from the leader's values, so untied and tied compute the same function
    with torch.no_grad():
        for leader, *members in SHARE_SETS:
            lead = _lora_modules(layers_u[leader])
            for member in members:
                for name, module in _lora_modules(layers_u[member]).items():
                    for p, q in zip(_lora_params(module), _lora_params(lead[name]), strict=True):
                        p.copy_(q)
    tied = copy.deepcopy(untied)
    report = tie_lora_modules(tied, SHARE_SETS, require_equal=True)
    verify_ties(tied, SHARE_SETS)
    assert report.lora_params_tied < report.lora_params_untied
    ids = _ids(seed=5)
    out_u, out_t = untied(input_ids=ids, labels=ids), tied(input_ids=ids, labels=ids)
    torch.testing.assert_close(out_t.logits, out_u.logits, atol=1e-5, rtol=0)
    out_u.loss.backward()
    out_t.loss.backward()
    layers_t = find_decoder_layers(tied).layers
    for leader, *members in SHARE_SETS:
        for name, module in _lora_modules(layers_t[leader]).items():
            per_member = [_lora_params(_lora_modules(layers_u[i])[name]) for i in (leader, *members)]
            for k, got in enumerate(_lora_params(module)):
                expected = sum(params[k].grad for params in per_member)
                torch.testing.assert_close(got.grad, expected, atol=1e-6, rtol=1e-5, msg=f"{name} #{k}")
                assert got.grad.abs().sum() > 0, f"{name} #{k} got no gradient"


@pytest.mark.parametrize("arch", _params("reload"))
def test_saved_adapter_reloads_with_plain_peft(arch: Arch, tmp_path: Path) -> None:
    from peft import PeftModel

    from sharelora_plugin.tying import tie_lora_modules

    base = _base(arch.model_type)
    model = _lora(copy.deepcopy(base), arch)
    tie_lora_modules(model, SHARE_SETS)
    _randomize_b(model)  # after tying: one value per shared tensor
    ids = _ids(seed=2)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        without_lora = base(input_ids=ids).logits
    # the adapter changes the output, so equal logits after reload mean the adapter came back
    assert (expected - without_lora).abs().max() > 1e-3
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# README table


def readme_table() -> str:
    """The README's "Supported architectures" table, rendered from :data:`ARCHS`."""
    rows = [
        "| Architecture (`model_type`) | Decoder layers | LoRA targets inside the layers | Tested | Result |",
        "|---|---|---|---|---|",
    ]
    for arch in ARCHS:
        targets = ", ".join(f"`{t}`" for t in arch.targets)
        result = "; ".join(f"xfail ({step}): {reason}" for step, reason in arch.xfail.items()) or "pass"
        if arch.note:
            result += f" (note: {arch.note})"
        rows.append(
            f"| `{arch.model_type}` | `{arch.layers_path}` | {targets} | {', '.join(STEPS)} | {result} |"
        )
    return "\n".join(rows)


def test_readme_table_matches_the_matrix() -> None:
    text = (ROOT / "README.md").read_text()
    section = re.search(r"^## Supported architectures\n(.*?)^## ", text, re.S | re.M)
    assert section, "README.md needs a '## Supported architectures' section followed by another '## ' section"
    table = "\n".join(line for line in section.group(1).splitlines() if line.startswith("|"))
    assert table == readme_table(), "README table is stale: paste the output of `python tests/test_archs.py`"
    assert all(step in STEPS for arch in ARCHS for step in arch.xfail)


if __name__ == "__main__":
    print(readme_table())
