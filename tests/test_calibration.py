"""Calibration on tiny random Llamas: hooks vs a manual computation, padding side, batch size."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import pad_batches, tiny_llama

from sharelora_plugin.calibration import calibrate, last_token_index, pairwise_angular_and_cosine
from sharelora_plugin.layers import LayerDiscoveryError, find_decoder_layers


def _samples(num: int, seed: int = 1, vocab: int = 128) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 20, (num,), generator=gen)
    return [torch.randint(1, vocab, (int(n),), generator=gen) for n in lengths]


def _manual_matrix(model, samples: list[torch.Tensor]) -> np.ndarray:
    """Each sample alone (no padding), layer outputs from output_hidden_states with the final norm removed,
    so the last entry is the last layer's output; eq. 4 computed with Python floats."""
    num_layers = model.config.num_hidden_layers
    norm = model.model.norm
    model.model.norm = torch.nn.Identity()
    total = np.zeros((num_layers, num_layers))
    try:
        with torch.no_grad():
            for s in samples:
                out = model(input_ids=s[None], output_hidden_states=True)
                vecs = [h[0, -1].double().numpy() for h in out.hidden_states[1:]]
                for i in range(num_layers):
                    for j in range(num_layers):
                        cos = float(vecs[i] @ vecs[j] / (np.linalg.norm(vecs[i]) * np.linalg.norm(vecs[j])))
                        total[i, j] += math.acos(max(-1.0, min(1.0, cos))) / math.pi
    finally:
        model.model.norm = norm
    np.fill_diagonal(total, 0.0)
    return total / len(samples)


def test_hooks_match_manual_per_layer_computation():
    model = tiny_llama(num_layers=5)
    samples = _samples(10)
    result = calibrate(model, pad_batches(samples, "right", 4), progress=False)
    expected = _manual_matrix(model, samples)
    assert result.num_layers == 5
    assert result.num_samples == 10
    np.testing.assert_allclose(result.angular_distance, expected, atol=1e-5)
    # the last layer's output is pre-norm: output_hidden_states[-1] (post-norm) would not match
    assert result.angular_distance[0, 4] > 0


def test_left_and_right_padding_give_the_same_matrix():
    model = tiny_llama(num_layers=6)
    samples = _samples(12, seed=3)
    right = calibrate(model, pad_batches(samples, "right", 5), progress=False)
    left = calibrate(model, pad_batches(samples, "left", 5), progress=False)
    np.testing.assert_allclose(left.angular_distance, right.angular_distance, atol=1e-5)
    np.testing.assert_allclose(left.cosine, right.cosine, atol=1e-5)


def test_batch_size_does_not_change_the_matrix():
    model = tiny_llama(num_layers=4)
    samples = _samples(9, seed=4)
    one = calibrate(model, pad_batches(samples, "right", 1), progress=False)
    many = calibrate(model, pad_batches(samples, "right", 9), progress=False)
    np.testing.assert_allclose(one.angular_distance, many.angular_distance, atol=1e-6)


def test_similarity_metrics_and_symmetry():
    model = tiny_llama(num_layers=4)
    result = calibrate(model, pad_batches(_samples(6), "right", 3), progress=False)
    ang = result.similarity("angular")
    cos = result.similarity("cosine")
    np.testing.assert_allclose(ang, ang.T, atol=1e-12)
    assert np.allclose(np.diag(ang), 1.0) and np.allclose(np.diag(cos), 1.0)
    # s = 1 - arccos(c)/pi is monotone in the cosine: the same pairs order the same way
    off = ~np.eye(4, dtype=bool)
    assert np.all(np.argsort(ang[off]) == np.argsort(cos[off]))
    with pytest.raises(ValueError, match="angular"):
        result.similarity("euclid")


def test_model_state_is_restored_and_hooks_removed():
    model = tiny_llama(num_layers=3)
    model.train()
    calibrate(model, pad_batches(_samples(2), "right", 2), progress=False)
    assert model.training
    assert all(not layer._forward_hooks for layer in model.model.layers)


def test_last_token_index_and_pairwise_formula():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert last_token_index(mask).tolist() == [2, 4, 4]
    states = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]], [[-1.0, 0.0]]])  # L=3, B=1, H=2
    angular, cosine = pairwise_angular_and_cosine(states)
    assert angular[0, 0, 1].item() == pytest.approx(0.5)
    assert angular[0, 0, 2].item() == pytest.approx(1.0)
    assert cosine[0, 1, 2].item() == pytest.approx(0.0)


def test_decoder_layers_found_through_peft_and_errors_when_missing():
    from peft import LoraConfig, get_peft_model

    model = tiny_llama(num_layers=3)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    found = find_decoder_layers(peft_model)
    assert len(found) == 3 and found.path.endswith("model.layers")
    with pytest.raises(LayerDiscoveryError, match="layers_path"):
        find_decoder_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with pytest.raises(LayerDiscoveryError, match="not a non-empty"):
        find_decoder_layers(model, "model.norm")
