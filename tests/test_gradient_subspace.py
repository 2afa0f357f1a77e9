"""The gradient_subspace metric: sketches equal dWᵀΩ and dW·Ω' of the autograd weight gradient, identical layers
overlap fully, and the bootstrap and the planner work on sketches."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import tiny_llama

from sharelora_plugin.gradient_sketch import _SketchHooks, collect_sketches, target_linears
from sharelora_plugin.planning import plan_with_stability
from sharelora_plugin.planning.subspace import SubspaceSketches, overlap_matrix, random_level

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


def _batches(vocab: int, seed: int = 0, count: int = 3, batch: int = 2, length: int = 7):
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(3, vocab, (batch, length), generator=generator)
        mask = torch.ones_like(ids)
        mask[0, -2:] = 0  # right padding on one row
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _autograd_weight_gradients(model, batches) -> dict[tuple[int, str], torch.Tensor]:
    """Full dW of every target of every layer, summed over the batches, by plain autograd."""
    model = copy.deepcopy(model).to(torch.float64)
    for param in model.parameters():
        param.requires_grad_(True)
        param.grad = None
    for batch in batches:
        mask = batch["attention_mask"]
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        logits = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions).logits[
            :, :-1
        ]
        labels = batch["input_ids"][:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
        ).backward()
    grads = {}
    for index, layer in enumerate(model.model.layers):
        for name, module in target_linears(layer, TARGETS).items():
            grads[(index, name)] = module.weight.grad.detach().clone()
    return grads


def test_sketches_equal_sketched_autograd_gradient():
    model = tiny_llama(num_layers=3, hidden=32).to(torch.float64)
    batches = _batches(model.config.vocab_size)
    sketches, info = collect_sketches(model, batches, target_modules=TARGETS, k=4, seed=3, progress=False)
    assert info["sketch_blocks"] == 3 and sketches.num_samples == 6
    assert all(p.grad is None for p in model.parameters()), "the frozen weights must get no gradient"
    grads = _autograd_weight_gradients(model, batches)
    hooks = _SketchHooks(
        [target_linears(layer, TARGETS) for layer in model.model.layers], 4, 3, torch.device("cpu")
    )
    hooks.remove()
    summed = sketches.summed()
    for (index, name), dw in grads.items():
        omega_out, omega_in = hooks.omega[(name, dw.shape[1], dw.shape[0])]
        np.testing.assert_allclose(
            summed[(name, "in")][index], (dw.T @ omega_out).numpy(), rtol=1e-4, atol=1e-6
        )
        np.testing.assert_allclose(
            summed[(name, "out")][index], (dw @ omega_in).numpy(), rtol=1e-4, atol=1e-6
        )


def test_identical_layers_overlap_one_and_matrix_is_valid():
    """Layer 1 of a second, identical model on the same inputs stands in as layer 2: same weights, same inputs,
    same test matrices, so the pair's overlap is 1; the other pairs stay below it."""
    model = tiny_llama(num_layers=4, hidden=32)
    twin = copy.deepcopy(model)
    batches = _batches(model.config.vocab_size)
    sketches, _ = collect_sketches(model, batches, target_modules=["q_proj", "up_proj"], k=4, progress=False)
    twin_sketches, _ = collect_sketches(
        twin, batches, target_modules=["q_proj", "up_proj"], k=4, progress=False
    )
    for key, array in sketches.blocks.items():
        array[:, 2] = twin_sketches.blocks[key][:, 1]
    overlap = sketches.overlap()
    assert overlap[1, 2] == pytest.approx(1.0, abs=1e-6)
    assert overlap[0, 1] < 0.99 and overlap[2, 3] < 0.99
    assert np.allclose(overlap, overlap.T) and np.all(np.diag(overlap) == 1.0)
    assert 0.0 <= overlap.min() and overlap.max() <= 1.0


def test_unrelated_subspaces_sit_at_the_random_level():
    rng = np.random.default_rng(0)
    layers, dim, k = 12, 256, 8
    summed = {("t", "in"): rng.normal(size=(layers, dim, k))}
    overlap = overlap_matrix(summed, {"t": np.ones(layers, dtype=bool)})
    off = overlap[~np.eye(layers, dtype=bool)]
    assert abs(off.mean() - random_level([dim], k)) < 0.01


def test_bootstrap_and_plan_on_sketches(tmp_path):
    model = tiny_llama(num_layers=6, hidden=32)
    sketches, _ = collect_sketches(
        model, _batches(model.config.vocab_size, count=4), target_modules=TARGETS, k=4, progress=False
    )
    resampled = sketches.resampled(20, seed=1)
    assert resampled.shape == (20, 6, 6)
    again = sketches.resampled(20, seed=1)
    np.testing.assert_array_equal(resampled, again)
    overlap = sketches.overlap()
    plan = plan_with_stability(
        sketches, overlap, metric="gradient_subspace", strategy="greedy", target_fraction=0.8, resamples=20
    )
    assert plan.metric == "gradient_subspace"
    assert plan.layers_saved >= 1 and plan.param_fraction <= 0.8
    assert plan.stability is not None and 0.0 <= plan.stability["plan_frequency"] <= 1.0
    # sketches survive a save / load round trip exactly
    path = sketches.save(tmp_path / "sketches.npz")
    loaded = SubspaceSketches.load(path)
    np.testing.assert_array_equal(loaded.overlap(), overlap)
    assert loaded.block_samples == sketches.block_samples
