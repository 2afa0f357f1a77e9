"""Tying on tiny random Llamas with real PEFT: identity, gradient sums, optimizer steps, counts, save/load."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_llama
from peft import LoraConfig, PeftModel, get_peft_model

from sharelora_plugin.planning import distinct_modules
from sharelora_plugin.tying import (
    TyingError,
    tie_layout_fingerprint,
    tie_lora_modules,
    unique_lora_parameters,
    unique_trainable_parameters,
    verify_ties,
)

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
SETS = [[1, 2], [3, 4, 5]]


def _lora(model, r: int = 4, **kw):
    torch.manual_seed(123)
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=8, target_modules=TARGETS, **kw))


def _randomize_b(peft_model, seed: int = 7):
    # lora_B starts at zero; make it non-zero so every layer's LoRA path contributes to the output
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def _per_layer_lora_numel(hidden: int, inter: int, kv: int, r: int) -> int:
    return r * ((hidden + hidden) + (hidden + kv) * 2 + (hidden + inter) * 2)


def test_shared_modules_are_the_same_objects():
    model = _lora(tiny_llama(num_layers=6))
    report = tie_lora_modules(model, SETS)
    layers = model.base_model.model.model.layers
    for leader, *members in SETS:
        for m in members:
            for proj in ("q_proj", "k_proj", "v_proj"):
                lead, mem = getattr(layers[leader].self_attn, proj), getattr(layers[m].self_attn, proj)
                assert mem.lora_A["default"] is lead.lora_A["default"]
                assert mem.lora_B["default"] is lead.lora_B["default"]
                assert mem.lora_dropout["default"] is not lead.lora_dropout["default"]
    # layer 0 is not shared and keeps its own modules
    assert layers[0].self_attn.q_proj.lora_A["default"] is not layers[1].self_attn.q_proj.lora_A["default"]
    verify_ties(model, SETS)
    assert report.tied_module_pairs == 3 * len(TARGETS) * 2  # (1 + 2 members) x targets x (A, B)


def test_trainable_parameters_equal_the_formula():
    model = _lora(tiny_llama(num_layers=6), r=4)
    per_layer = _per_layer_lora_numel(hidden=32, inter=64, kv=16, r=4)
    assert unique_trainable_parameters(model) == 6 * per_layer
    report = tie_lora_modules(model, SETS)
    distinct = distinct_modules(6, SETS)
    assert distinct == 3
    assert report.lora_params_untied == 6 * per_layer
    assert report.lora_params_tied == distinct * per_layer
    assert unique_trainable_parameters(model) == distinct * per_layer
    assert model.num_parameters(only_trainable=True) == distinct * per_layer


def test_shared_gradient_is_the_sum_of_untied_per_layer_gradients():
    torch.manual_seed(0)
    base = tiny_llama(num_layers=6)
    untied = _lora(copy.deepcopy(base))
    _randomize_b(untied)
    layers_u = untied.base_model.model.model.layers
    # give every member the leader's values, so untied and tied compute the same function
    with torch.no_grad():
        for leader, *members in SETS:
            for m in members:
                for name, mod in layers_u[m].named_modules():
                    if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
                        lead = layers_u[leader].get_submodule(name)
                        mod.lora_A["default"].weight.copy_(lead.lora_A["default"].weight)
                        mod.lora_B["default"].weight.copy_(lead.lora_B["default"].weight)
    tied = copy.deepcopy(untied)
    tie_lora_modules(tied, SETS, require_equal=True)
    ids = torch.randint(1, 128, (3, 11), generator=torch.Generator().manual_seed(5))
    out_u = untied(input_ids=ids, labels=ids)
    out_t = tied(input_ids=ids, labels=ids)
    torch.testing.assert_close(out_t.logits, out_u.logits, atol=1e-6, rtol=0)
    out_u.loss.backward()
    out_t.loss.backward()
    layers_t = tied.base_model.model.model.layers
    for leader, *members in SETS:
        for proj in ("self_attn.q_proj", "mlp.down_proj"):
            for attr in ("lora_A", "lora_B"):
                expected = sum(
                    getattr(layers_u[i].get_submodule(proj), attr)["default"].weight.grad
                    for i in (leader, *members)
                )
                got = getattr(layers_t[leader].get_submodule(proj), attr)["default"].weight.grad
                torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
                assert got.abs().sum() > 0


def test_optimizer_step_keeps_tied_weights_identical():
    model = _lora(tiny_llama(num_layers=6))
    tie_lora_modules(model, SETS)
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == len({id(p) for p in params})  # the optimizer sees each shared tensor once
    opt = torch.optim.AdamW(params, lr=1e-2)
    layers = model.base_model.model.model.layers
    before = layers[3].mlp.up_proj.lora_B["default"].weight.detach().clone()
    ids = torch.randint(1, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    for m in (4, 5):
        torch.testing.assert_close(
            layers[m].mlp.up_proj.lora_B["default"].weight, layers[3].mlp.up_proj.lora_B["default"].weight
        )
    assert not torch.equal(layers[3].mlp.up_proj.lora_B["default"].weight, before)
    verify_ties(model, SETS)


def test_dora_magnitudes_stay_per_layer():
    model = _lora(tiny_llama(num_layers=6), use_dora=True)
    tie_lora_modules(model, SETS)
    layers = model.base_model.model.model.layers
    q1, q2 = layers[1].self_attn.q_proj, layers[2].self_attn.q_proj
    assert q1.lora_A["default"] is q2.lora_A["default"]
    assert q1.lora_magnitude_vector["default"] is not q2.lora_magnitude_vector["default"]


def test_save_is_plain_lora_and_reload_retie_gives_same_logits(tmp_path):
    base = tiny_llama(num_layers=6)
    model = _lora(copy.deepcopy(base))
    tie_lora_modules(model, SETS)
    _randomize_b(model)
    ids = torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, atol=1e-5, rtol=0)
    # untied after a plain load: equal values, separate tensors — re-tie and check
    layers = loaded.base_model.model.model.layers
    assert layers[2].self_attn.q_proj.lora_A["default"] is not layers[1].self_attn.q_proj.lora_A["default"]
    tie_lora_modules(loaded, SETS, require_equal=True)
    verify_ties(loaded, SETS)
    assert unique_lora_parameters(loaded) == unique_lora_parameters(model)
    assert tie_layout_fingerprint(loaded) == tie_layout_fingerprint(model)


def test_retie_refuses_an_adapter_trained_with_another_plan():
    model = _lora(tiny_llama(num_layers=6))
    _randomize_b(model)
    with pytest.raises(TyingError, match="not trained with this share plan"):
        tie_lora_modules(model, SETS, require_equal=True)


def test_structure_errors_are_clear():
    model = _lora(tiny_llama(num_layers=4))
    with pytest.raises(TyingError, match="4 decoder layers"):
        tie_lora_modules(model, [[2, 7]])
    partial = get_peft_model(
        tiny_llama(num_layers=4), LoraConfig(r=2, target_modules=["q_proj"], layers_to_transform=[0, 1])
    )
    with pytest.raises(TyingError, match="different LoRA targets"):
        tie_lora_modules(partial, [[1, 2]])
    with pytest.raises(TyingError, match="no LoRA modules"):
        tie_lora_modules(tiny_llama(num_layers=3), [[0, 1]])
    ranked = get_peft_model(
        tiny_llama(num_layers=4),
        LoraConfig(r=2, target_modules=["q_proj"], rank_pattern={"model.layers.1.self_attn.q_proj": 4}),
    )
    with pytest.raises(TyingError, match="rank"):
        tie_lora_modules(ranked, [[0, 1]])


def test_fingerprint_differs_when_ties_differ():
    a = _lora(tiny_llama(num_layers=6))
    b = _lora(tiny_llama(num_layers=6))
    tie_lora_modules(a, SETS)
    tie_lora_modules(b, [[1, 2]])
    assert tie_layout_fingerprint(a) != tie_layout_fingerprint(b)
