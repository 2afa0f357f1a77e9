"""Collect the gradient sketches of ``sharelora.metric: gradient_subspace`` (see
:mod:`sharelora_plugin.planning.subspace` for what they measure).

One backward pass per batch through the frozen model on the causal-LM loss of the calibration texts (summed over
real tokens, so blocks add up). No weight gradient is ever formed: for a target ``nn.Linear`` with input rows ``X``
(``[tokens, d_in]``) and output-gradient rows ``G`` (``[tokens, d_out]``) the weight gradient is ``dW = GᵀX``, so

* ``dWᵀΩ  = Xᵀ(GΩ)``   (``d_in x k``, Ω: ``d_out x k``)
* ``dW·Ω' = Gᵀ(XΩ')``  (``d_out x k``, Ω': ``d_in x k``)

are accumulated from a forward hook (keeps ``X``) and a tensor hook on the output (receives ``G``). Ω and Ω' are
Gaussian, drawn once per (target, shape) from ``seed`` and shared by every layer, so identical layers give
identical sketches. Pad positions get no gradient (the loss ignores them and causal attention keeps them out of
the real tokens' past), so they add nothing.

Memory: one sketch per block of ``block_size`` samples, ``4 · k · Σ(d_in + d_out)`` bytes per layer and block
(SmolLM2-135M, five targets, k 8: 0.2 MB per layer; a 7B Llama: 1.8 MB per layer, 56 MB per block).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from sharelora_plugin.calibration import _attention_projection_fallbacks, _model_device
from sharelora_plugin.layers import find_decoder_layers
from sharelora_plugin.planning.subspace import SubspaceSketches

# Past this the sketches of every block would not fit comfortably in host memory; same cap as the per-sample
# matrices of the angular metric.
MAX_SKETCH_BYTES = 1 << 30


def sketch_bytes(layer_dims: Sequence[tuple[int, int]], num_layers: int, k: int, num_blocks: int) -> int:
    """Bytes the float32 sketches take: ``layer_dims`` = ``(d_in, d_out)`` of each target of one layer."""
    return 4 * k * num_blocks * num_layers * sum(d_in + d_out for d_in, d_out in layer_dims)


def target_linears(layer: nn.Module, target_modules: Sequence[str] | str) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules of one decoder layer that LoRA would adapt, by their name relative to the layer
    (``self_attn.q_proj``): names ending in one of ``target_modules``, or every Linear for ``all-linear``."""
    found: dict[str, nn.Linear] = {}
    everything = isinstance(target_modules, str) and target_modules == "all-linear"
    names = [target_modules] if isinstance(target_modules, str) and not everything else list(target_modules)
    for name, module in layer.named_modules():
        if not name or not isinstance(module, nn.Linear):
            continue
        if everything or any(name == t or name.endswith(f".{t}") for t in names):
            found[name] = module
    return found


class _SketchHooks:
    """Hooks on every target Linear that add ``Xᵀ(GΩ)`` and ``Gᵀ(XΩ')`` into the current block's sketches."""

    def __init__(self, per_layer: list[dict[str, nn.Linear]], k: int, seed: int, device: torch.device):
        self.k = k
        self.per_layer = per_layer
        self.targets = sorted({name for layer in per_layer for name in layer})
        self.omega: dict[tuple[str, int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        generator = torch.Generator().manual_seed(seed)
        for target in self.targets:
            shapes = sorted(
                {
                    (m.in_features, m.out_features)
                    for layer in per_layer
                    for n, m in layer.items()
                    if n == target
                }
            )
            for d_in, d_out in shapes:
                omega_out = torch.randn(d_out, k, generator=generator, dtype=torch.float64) / math.sqrt(k)
                omega_in = torch.randn(d_in, k, generator=generator, dtype=torch.float64) / math.sqrt(k)
                self.omega[(target, d_in, d_out)] = (omega_out.to(device), omega_in.to(device))
        self.current: dict[tuple[str, str, int], torch.Tensor] = {}
        self.handles = []
        for index, layer in enumerate(per_layer):
            for name, module in layer.items():
                self.handles.append(module.register_forward_hook(self._forward_hook(index, name)))

    def _forward_hook(self, index: int, name: str):
        def hook(module: nn.Linear, inputs, output):
            if not output.requires_grad:
                return
            x = inputs[0].detach().reshape(-1, module.in_features).to(torch.float64)
            omega_out, omega_in = self.omega[(name, module.in_features, module.out_features)]

            def on_grad(grad: torch.Tensor) -> None:
                g = grad.detach().reshape(-1, module.out_features).to(torch.float64)
                self._add((name, "in", index), x.T @ (g @ omega_out))
                self._add((name, "out", index), g.T @ (x @ omega_in))

            output.register_hook(on_grad)

        return hook

    def _add(self, key: tuple[str, str, int], value: torch.Tensor) -> None:
        if key in self.current:
            self.current[key] += value
        else:
            self.current[key] = value

    def take_block(self) -> dict[tuple[str, str, int], np.ndarray]:
        block = {key: value.cpu().numpy().astype(np.float32) for key, value in self.current.items()}
        self.current = {}
        return block

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _loss_sum(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Causal-LM loss summed over the real tokens of ``batch`` (pad labels ignored)."""
    mask = batch["attention_mask"]
    inputs = dict(batch)
    if "position_ids" not in inputs:
        inputs["position_ids"] = (mask.to(torch.long).cumsum(dim=1) - 1).clamp_(min=0)
    logits = model(**inputs, use_cache=False).logits[:, :-1].float()
    labels = batch["input_ids"][:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
    )


def collect_sketches(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    target_modules: Sequence[str] | str,
    k: int = 8,
    seed: int = 0,
    layers_path: str | None = None,
    total: int | None = None,
    progress: bool = True,
) -> tuple[SubspaceSketches, dict]:
    """Sketch the first-step weight gradient of every target module of every decoder layer, one block per batch.

    Returns the sketches and facts for the plan (samples, tokens, seconds, layers path, k). The model's weights
    get no ``.grad`` (they stay frozen; only activations carry gradients) and its train/eval mode is restored.
    """
    decoder = find_decoder_layers(model, layers_path)
    per_layer = [target_linears(layer, target_modules) for layer in decoder.layers]
    if not any(per_layer):
        raise ValueError(
            f"sharelora.metric gradient_subspace found none of lora_target_modules={list(target_modules) if not isinstance(target_modules, str) else target_modules!r} "
            "as nn.Linear modules in the decoder layers; check lora_target_modules"
        )
    device = _model_device(model)
    hooks = _SketchHooks(per_layer, k, seed, device)
    embeddings = model.get_input_embeddings()
    # frozen weights: make the embeddings' output require grad so activations carry gradients
    grad_on = embeddings.register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))
    requires = [p.requires_grad for p in model.parameters()]
    for param in model.parameters():
        param.requires_grad_(False)
    was_training = model.training
    model.eval()
    blocks: list[dict[tuple[str, str, int], np.ndarray]] = []
    block_samples: list[int] = []
    num_tokens = 0
    start = time.perf_counter()
    try:
        with torch.enable_grad(), _attention_projection_fallbacks(decoder.layers):
            for batch in tqdm(
                batches, total=total, desc="ShareLoRA gradient sketches", unit="batch", disable=not progress
            ):
                batch = {k_: (v.to(device) if isinstance(v, torch.Tensor) else v) for k_, v in batch.items()}
                _loss_sum(model, batch).backward()
                blocks.append(hooks.take_block())
                block_samples.append(int(batch["attention_mask"].shape[0]))
                num_tokens += int(batch["attention_mask"].sum())
    finally:
        hooks.remove()
        grad_on.remove()
        for param, flag in zip(model.parameters(), requires, strict=True):
            param.requires_grad_(flag)
        model.train(was_training)
    if not blocks:
        raise ValueError(
            "gradient sketches received no samples; check sharelora.calibration (path, num_samples)"
        )
    num_layers = len(per_layer)
    arrays: dict[tuple[str, str], np.ndarray] = {}
    present: dict[str, np.ndarray] = {}
    for target in hooks.targets:
        mask = np.array([target in layer for layer in per_layer])
        present[target] = mask
        example = next(layer[target] for layer in per_layer if target in layer)
        for side, dim in (("in", example.in_features), ("out", example.out_features)):
            array = np.zeros((len(blocks), num_layers, dim, k), dtype=np.float32)
            for b, block in enumerate(blocks):
                for layer_index in np.flatnonzero(mask):
                    value = block.get((target, side, int(layer_index)))
                    if value is not None and value.shape == array.shape[2:]:
                        array[b, layer_index] = value
            arrays[(target, side)] = array
    sketches = SubspaceSketches(blocks=arrays, present=present, block_samples=block_samples)
    info = {
        "num_samples": sketches.num_samples,
        "num_tokens": num_tokens,
        "seconds": round(time.perf_counter() - start, 3),
        "layers_path": decoder.path,
        "sketch_rank": k,
        "sketch_blocks": sketches.num_blocks,
        "sketch_bytes": sketches.nbytes,
        "targets": hooks.targets,
    }
    return sketches, info
