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
(SmolLM2-135M, five targets, k 8: 0.2 MB per layer; a 7B Llama: 1.8 MB per layer, 56 MB per block). Past
:data:`MAX_SKETCH_BYTES` collection is refused before it starts. During a backward pass each target's input
activations are held (in the model's dtype) until its gradient arrives.

``collect_sketches(..., should_stop=...)`` asks a callback after every batch, with the sketches so far, whether to
stop (the plugin's stop-when-stable rule).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

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
            # kept in the model's dtype (q, k and v share one tensor) and widened only when the gradient arrives
            x_kept = inputs[0].detach()
            omega_out, omega_in = self.omega[(name, module.in_features, module.out_features)]

            def on_grad(grad: torch.Tensor) -> None:
                x = x_kept.reshape(-1, module.in_features).to(torch.float64)
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


class _BlockStore:
    """The float32 sketches of every (target, side), one row per block, grown as blocks arrive; what
    :class:`SubspaceSketches` views without copying."""

    def __init__(self, per_layer: list[dict[str, nn.Linear]], targets: Sequence[str], k: int, capacity: int):
        num_layers = len(per_layer)
        self.present = {target: np.array([target in layer for layer in per_layer]) for target in targets}
        self.arrays: dict[tuple[str, str], np.ndarray] = {}
        for target in targets:
            example = next(layer[target] for layer in per_layer if target in layer)
            for side, dim in (("in", example.in_features), ("out", example.out_features)):
                # np.zeros pages stay unmapped until a block is written, so a generous capacity costs nothing
                self.arrays[(target, side)] = np.zeros(
                    (max(1, capacity), num_layers, dim, k), dtype=np.float32
                )
        self.block_samples: list[int] = []

    @property
    def num_blocks(self) -> int:
        return len(self.block_samples)

    def append(self, block: dict[tuple[str, str, int], np.ndarray], samples: int) -> None:
        row = self.num_blocks
        for key, array in self.arrays.items():
            if row == array.shape[0]:
                array = np.concatenate([array, np.zeros_like(array)])
                self.arrays[key] = array
            target, side = key
            for layer_index in np.flatnonzero(self.present[target]):
                value = block.get((target, side, int(layer_index)))
                if value is not None and value.shape == array.shape[2:]:
                    array[row, layer_index] = value
        self.block_samples.append(samples)

    def sketches(self, copy: bool = False) -> SubspaceSketches:
        """The blocks so far (views of the store; ``copy`` releases unused capacity, if any)."""
        n = self.num_blocks
        return SubspaceSketches(
            blocks={
                key: array[:n].copy() if copy and array.shape[0] > n else array[:n]
                for key, array in self.arrays.items()
            },
            present=self.present,
            block_samples=list(self.block_samples),
        )


def _layer_dims(per_layer: list[dict[str, nn.Linear]]) -> list[tuple[int, int]]:
    """``(d_in, d_out)`` of every target name (its first occurrence): what one layer's sketches are stored as."""
    dims: dict[str, tuple[int, int]] = {}
    for layer in per_layer:
        for name, module in layer.items():
            dims.setdefault(name, (module.in_features, module.out_features))
    return [dims[name] for name in sorted(dims)]


def _memory_error(blocks: int, num_layers: int, k: int, needed: int) -> ValueError:
    return ValueError(
        f"sharelora.metric gradient_subspace: {blocks} sketch blocks (one per calibration batch: "
        f"sharelora.calibration.num_samples / batch_size) of {num_layers} layers at sketch_rank {k} need "
        f"{needed / 2**30:.2f} GiB, over the {MAX_SKETCH_BYTES / 2**30:.0f} GiB cap; raise "
        "sharelora.calibration.batch_size (fewer, larger blocks), lower num_samples or sketch_rank, or target fewer "
        "modules"
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
    expected_blocks: int | None = None,
    should_stop: Callable[[SubspaceSketches], bool] | None = None,
) -> tuple[SubspaceSketches, dict]:
    """Sketch the first-step weight gradient of every target module of every decoder layer, one block per batch.

    Returns the sketches and facts for the plan (samples, tokens, seconds, layers path, k, blocks, bytes, whether it
    stopped early). The model's weights get no ``.grad`` (they stay frozen; only activations carry gradients) and
    its train/eval mode is restored. ``expected_blocks`` (the most batches that will run; default ``total``) lets
    the memory cap be checked before any pass. ``should_stop`` is asked after every batch with the sketches so far
    (views: copy what you keep); when it answers True the remaining batches are not run.
    """
    decoder = find_decoder_layers(model, layers_path)
    per_layer = [target_linears(layer, target_modules) for layer in decoder.layers]
    if not any(per_layer):
        raise ValueError(
            f"sharelora.metric gradient_subspace found none of lora_target_modules={list(target_modules) if not isinstance(target_modules, str) else target_modules!r} "
            "as nn.Linear modules in the decoder layers; check lora_target_modules"
        )
    num_layers = len(per_layer)
    dims = _layer_dims(per_layer)
    expected_blocks = expected_blocks if expected_blocks is not None else total
    if expected_blocks is not None:
        needed = sketch_bytes(dims, num_layers, k, expected_blocks)
        if needed > MAX_SKETCH_BYTES:
            raise _memory_error(expected_blocks, num_layers, k, needed)
    device = _model_device(model)
    hooks = _SketchHooks(per_layer, k, seed, device)
    store = _BlockStore(per_layer, hooks.targets, k, expected_blocks or 16)
    embeddings = model.get_input_embeddings()
    # frozen weights: make the embeddings' output require grad so activations carry gradients
    grad_on = embeddings.register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))
    requires = [p.requires_grad for p in model.parameters()]
    for param in model.parameters():
        param.requires_grad_(False)
    was_training = model.training
    model.eval()
    num_tokens = 0
    stopped = False
    start = time.perf_counter()
    try:
        with torch.enable_grad(), _attention_projection_fallbacks(decoder.layers):
            for batch in tqdm(
                batches, total=total, desc="ShareLoRA gradient sketches", unit="batch", disable=not progress
            ):
                batch = {k_: (v.to(device) if isinstance(v, torch.Tensor) else v) for k_, v in batch.items()}
                _loss_sum(model, batch).backward()
                store.append(hooks.take_block(), int(batch["attention_mask"].shape[0]))
                num_tokens += int(batch["attention_mask"].sum())
                held = sketch_bytes(dims, num_layers, k, store.num_blocks)
                if held > MAX_SKETCH_BYTES:
                    raise _memory_error(store.num_blocks, num_layers, k, held)
                if should_stop is not None and should_stop(store.sketches()):
                    stopped = True
                    break
    finally:
        hooks.remove()
        grad_on.remove()
        for param, flag in zip(model.parameters(), requires, strict=True):
            param.requires_grad_(flag)
        model.train(was_training)
    if not store.num_blocks:
        raise ValueError(
            "gradient sketches received no samples; check sharelora.calibration (path, num_samples)"
        )
    sketches = store.sketches(copy=True)
    info = {
        "num_samples": sketches.num_samples,
        "num_tokens": num_tokens,
        "seconds": round(time.perf_counter() - start, 3),
        "layers_path": decoder.path,
        "sketch_rank": k,
        "sketch_blocks": sketches.num_blocks,
        "sketch_bytes": sketches.nbytes,
        "targets": hooks.targets,
        "stopped_early": stopped,
    }
    return sketches, info
