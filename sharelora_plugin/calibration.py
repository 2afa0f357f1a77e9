"""Calibration: run samples through the frozen model and measure how alike the decoder layers' outputs are.

For every sample and every decoder layer l we take x_l, the layer's output hidden state at the sample's final
real (non-pad) token, and accumulate the pairwise angular distance of the ShareLoRA paper's eq. 4,
``d(x_i, x_j) = arccos(cos(x_i, x_j)) / π``, averaged over samples (plain cosine is accumulated too).

Layer outputs are captured with forward hooks on the decoder layers, not with ``output_hidden_states``:
the last entry of ``hidden_states`` is taken *after* the final norm, not the last layer's output.
Only a ``[batch, hidden]`` slice per layer is kept per batch, and per sample only its two ``L x L`` matrices
(float32, for the bootstrap stability of the plan), so memory grows with the number of samples by ``8 L^2`` bytes
each and never with their length. Past :data:`MAX_PER_SAMPLE_BYTES` calibration is refused before it starts.
Batches run through the model without its LM head.

``calibrate(..., should_stop=...)`` asks a callback after every batch whether to stop (the plugin's
stop-when-stable rule); the callback receives the running mean and the per-sample matrices so far.
"""

from __future__ import annotations

import math
import time
import types
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from sharelora_plugin.layers import backbone_without_head, find_decoder_layers
from sharelora_plugin.multimodal import computes_own_positions

if TYPE_CHECKING:
    from sharelora_plugin.planning.subspace import SubspaceSketches

# Per-sample angular distances and cosines are kept as float32: N * L * L * 4 bytes each, 8 * N * L^2 together.
# 1 GiB is ~130,000 samples of a 32-layer model or ~21,000 of an 80-layer one; far beyond any calibration set.
MAX_PER_SAMPLE_BYTES = 1 << 30


def per_sample_bytes(num_samples: int, num_layers: int) -> int:
    """Memory the per-sample angular and cosine matrices of ``num_samples`` samples take (float32, both)."""
    return 8 * num_samples * num_layers * num_layers


@dataclass
class CalibrationResult:
    """Mean pairwise angular distance and cosine between decoder layer outputs (L×L each), and the same per
    sample (``[N, L, L]`` float32) for the bootstrap; or, for ``metric: gradient_subspace``, the gradient
    ``sketches`` (one block per batch) and no angular or cosine matrices."""

    angular_distance: np.ndarray | None
    cosine: np.ndarray | None
    num_samples: int
    num_tokens: int
    seconds: float
    layers_path: str
    settings: dict = field(default_factory=dict)
    per_sample_angular: np.ndarray | None = None
    per_sample_cosine: np.ndarray | None = None
    stopped_early: bool = False
    layer_kinds: list[int] | None = None  # set by the caller when the layer list mixes kinds
    layer_kind_descriptions: list[str] | None = None
    sketches: SubspaceSketches | None = None  # metric gradient_subspace

    @property
    def num_layers(self) -> int:
        if self.angular_distance is None and self.sketches is not None:
            return self.sketches.num_layers
        return int(self.angular_distance.shape[0])

    def similarity(self, metric: str = "angular") -> np.ndarray:
        """Similarity compared against ε: ``1 − d`` for ``angular`` (default), mean cosine for ``cosine``, the
        overlap of the summed sketches for ``gradient_subspace``."""
        if metric == "gradient_subspace":
            if self.sketches is None:
                raise ValueError("this calibration measured layer outputs, not gradient sketches")
            return self.sketches.overlap()
        if self.angular_distance is None:
            raise ValueError(
                f"this calibration measured gradient sketches only; metric {metric!r} needs a calibration with it"
            )
        if metric == "angular":
            sim = 1.0 - self.angular_distance
        elif metric == "cosine":
            sim = self.cosine.copy()
        else:
            raise ValueError(
                f"sharelora.metric must be 'angular', 'cosine' or 'gradient_subspace', got {metric!r}"
            )
        np.fill_diagonal(sim, 1.0)
        return sim


@dataclass
class CalibrationProgress:
    """What a ``should_stop`` callback sees after each batch: samples so far, their running means (float64, as in
    the final result) and the per-sample matrices (``[n, L, L]`` float32)."""

    num_samples: int
    angular_distance: np.ndarray
    cosine: np.ndarray
    per_sample_angular: np.ndarray
    per_sample_cosine: np.ndarray


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row, for left or right padding (never from token ids:
    pad and eos are the same token in many chat models)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.to(torch.long) * (positions + 1)).argmax(dim=1)


def pairwise_angular_and_cosine(states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For ``states`` of shape [L, B, H], return per-sample [B, L, L] angular distance (eq. 4) and cosine."""
    unit = torch.nn.functional.normalize(states.to(torch.float64), dim=-1)
    cos = torch.einsum("lbh,mbh->blm", unit, unit).clamp_(-1.0, 1.0)
    return torch.arccos(cos) / math.pi, cos


class _LastTokenCapture:
    """Forward hooks that keep only the last-real-token slice of every decoder layer's output."""

    def __init__(self, layers: nn.ModuleList):
        self.layers = layers
        self.index: torch.Tensor | None = None
        self.captured: list[torch.Tensor | None] = [None] * len(layers)
        self.handles = [layer.register_forward_hook(self._hook(i)) for i, layer in enumerate(layers)]

    def _hook(self, i: int):
        def hook(_module, _inputs, output):
            hidden = output[0] if isinstance(output, tuple | list) else output
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            self.captured[i] = hidden[rows, self.index.to(hidden.device)].detach().float().cpu()

        return hook

    def take(self) -> torch.Tensor:
        """The captured outputs, [L, B, H]. A layer the model skipped passed its input on unchanged (Llama 3.2
        Vision skips its cross-attention layers for a batch without images), so its output is the previous
        layer's; a model that skips its first layer is an error."""
        for i, captured in enumerate(self.captured):
            if captured is None:
                if i == 0:
                    raise RuntimeError("the first decoder layer did not run during calibration")
                self.captured[i] = self.captured[i - 1]
        stacked = torch.stack(self.captured)  # [L, B, H]
        self.captured = [None] * len(self.layers)
        return stacked

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _plain_qkv(self, hidden_states):
    return self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)


def _plain_o(self, hidden_states):
    return self.o_proj(hidden_states)


@contextmanager
def _attention_projection_fallbacks(layers: nn.ModuleList):
    """Axolotl's LoRA-kernel patch rewrites the attention class's ``forward`` to call ``self.apply_qkv`` /
    ``self.apply_o`` at model-load time but only binds those methods per instance after LoRA is applied.
    Calibration runs in between, so bind plain projections for the pass and remove them afterwards."""
    added = []
    for module in layers.modules():
        if all(hasattr(module, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
            for attr, fn in (("apply_qkv", _plain_qkv), ("apply_o", _plain_o)):
                if not hasattr(module, attr):
                    setattr(module, attr, types.MethodType(fn, module))
                    added.append((module, attr))
    try:
        yield
    finally:
        for module, attr in added:
            delattr(module, attr)


@contextmanager
def _eval_mode_keeping_4bit_trainable(model: nn.Module):
    """Eval mode for the pass (no dropout), except bitsandbytes ``Linear4bit`` modules: on CPU, an eval-mode
    forward repacks their weights into an inference-only layout after which LoRA layers built on top of them
    receive no gradient. Keeping them in training mode skips the repacking; their output is the same."""
    was_training = model.training
    model.eval()
    four_bit = [m for m in model.modules() if type(m).__name__ in ("Linear4bit", "LinearNF4", "LinearFP4")]
    for module in four_bit:
        module.training = True
    try:
        yield
    finally:
        for module in four_bit:
            module.training = False
        model.train(was_training)


def _model_device(model: nn.Module) -> torch.device:
    for param in model.parameters():
        if param.device.type != "meta":
            return param.device
    return torch.device("cpu")


@torch.no_grad()
def calibrate(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    layers_path: str | None = None,
    total: int | None = None,
    progress: bool = True,
    expected_samples: int | None = None,
    should_stop: Callable[[CalibrationProgress], bool] | None = None,
) -> CalibrationResult:
    """Run ``batches`` (dicts with ``input_ids``/``attention_mask`` and, for a VLM, ``pixel_values`` …)
    through the frozen ``model`` and return the averaged L×L layer-output distances.

    The model is put in eval mode for the pass and restored afterwards; no gradients are recorded.
    ``expected_samples`` (the number of samples the batches hold at most) lets the per-sample memory cap be checked
    before any forward pass. ``should_stop`` is asked after every batch; when it answers True the remaining
    batches are not run and the result says ``stopped_early``.
    """
    decoder = find_decoder_layers(model, layers_path)
    runner = backbone_without_head(model)
    device = _model_device(model)
    num_layers = len(decoder)
    if expected_samples is not None and per_sample_bytes(expected_samples, num_layers) > MAX_PER_SAMPLE_BYTES:
        raise ValueError(
            f"sharelora.calibration.num_samples={expected_samples} on {num_layers} layers needs "
            f"{per_sample_bytes(expected_samples, num_layers) / 2**30:.1f} GiB for the per-sample matrices, over the "
            f"{MAX_PER_SAMPLE_BYTES / 2**30:.0f} GiB cap; lower num_samples"
        )
    capture = _LastTokenCapture(decoder.layers)
    sum_angular = torch.zeros(num_layers, num_layers, dtype=torch.float64)
    sum_cosine = torch.zeros(num_layers, num_layers, dtype=torch.float64)
    per_angular: list[np.ndarray] = []
    per_cosine: list[np.ndarray] = []
    num_samples = 0
    num_tokens = 0
    stopped = False
    start = time.perf_counter()
    try:
        with _eval_mode_keeping_4bit_trainable(model), _attention_projection_fallbacks(decoder.layers):
            for batch in tqdm(
                batches, total=total, desc="ShareLoRA calibration", unit="batch", disable=not progress
            ):
                mask = batch["attention_mask"]
                capture.index = last_token_index(mask)
                inputs = dict(batch)
                if computes_own_positions(model, inputs):
                    inputs.pop("position_ids", None)
                elif "position_ids" not in inputs:
                    # real tokens keep positions 0..n-1 under left padding too, as in generation
                    inputs["position_ids"] = (mask.to(torch.long).cumsum(dim=1) - 1).clamp_(min=0)
                inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
                runner(**inputs, use_cache=False)
                angular, cosine = pairwise_angular_and_cosine(capture.take())
                sum_angular += angular.sum(dim=0)
                sum_cosine += cosine.sum(dim=0)
                per_angular.append(angular.to(torch.float32).numpy())
                per_cosine.append(cosine.to(torch.float32).numpy())
                num_samples += int(mask.shape[0])
                num_tokens += int(mask.sum())
                if per_sample_bytes(num_samples, num_layers) > MAX_PER_SAMPLE_BYTES:
                    raise ValueError(
                        f"calibration passed {num_samples} samples, over the per-sample memory cap of "
                        f"{MAX_PER_SAMPLE_BYTES / 2**30:.0f} GiB; lower sharelora.calibration.num_samples"
                    )
                if should_stop is not None and should_stop(
                    CalibrationProgress(
                        num_samples=num_samples,
                        angular_distance=_mean_matrix(sum_angular, num_samples, 0.0),
                        cosine=_mean_matrix(sum_cosine, num_samples, 1.0),
                        per_sample_angular=np.concatenate(per_angular),
                        per_sample_cosine=np.concatenate(per_cosine),
                    )
                ):
                    stopped = True
                    break
    finally:
        capture.remove()
    if num_samples == 0:
        raise ValueError(
            "calibration received no samples; check sharelora.calibration (path, split, num_samples)"
        )
    return CalibrationResult(
        angular_distance=_mean_matrix(sum_angular, num_samples, 0.0),
        cosine=_mean_matrix(sum_cosine, num_samples, 1.0),
        num_samples=num_samples,
        num_tokens=num_tokens,
        seconds=time.perf_counter() - start,
        layers_path=decoder.path,
        per_sample_angular=np.concatenate(per_angular),
        per_sample_cosine=np.concatenate(per_cosine),
        stopped_early=stopped,
    )


def _mean_matrix(total: torch.Tensor, num_samples: int, diagonal: float) -> np.ndarray:
    mean = (total / num_samples).numpy()
    # arccos of a float64 cosine of identical vectors can be ~1e-8 off zero; the diagonal is exact by definition
    np.fill_diagonal(mean, diagonal)
    return mean


def text_batches(
    tokenizer,
    texts: list[str],
    *,
    batch_size: int,
    max_length: int,
    sort_by_length: bool = True,
) -> list[dict[str, torch.Tensor]]:
    """Tokenize texts into padded batches (the tokenizer's own padding side is respected).

    Texts are sorted by length so batches carry little padding; the mean does not depend on the order because
    every sample contributes independently. ``sort_by_length=False`` keeps the given (random) order, so that any
    prefix of the batches is a random sample: calibration that may stop early needs that.
    """
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    lengths = [len(t) for t in texts]
    order = list(range(len(texts)))
    if sort_by_length:
        order.sort(key=lambda i: lengths[i])
    batches = []
    for start in range(0, len(order), batch_size):
        chunk = [texts[i] for i in order[start : start + batch_size]]
        enc = tokenizer(chunk, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
        batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return batches
