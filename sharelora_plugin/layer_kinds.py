"""Which decoder layers could share LoRA modules at all: layers of one *kind* have the same linear sub-modules
(names, classes, weight shapes), so a LoRA module of one fits the other.

Most models have one kind. Some mix them in one layer list: DeepSeek-V3 / Kimi / GLM-4.5 keep their first
``first_k_dense_replace`` layers dense and make the rest mixture-of-experts, Llama 4 interleaves dense and MoE layers,
Llama 3.2 Vision (mllama) puts cross-attention layers among self-attention layers. A share set across kinds would be
refused by tying ("different LoRA targets"); the planner instead only forms sets within one kind, for every strategy.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class LayerKinds:
    """``kinds[l]`` is layer l's kind (0 = the most common); ``descriptions[k]`` says what kind k is."""

    kinds: list[int]
    descriptions: list[str]

    @property
    def uniform(self) -> bool:
        return len(self.descriptions) <= 1


def _signature(layer: nn.Module) -> tuple:
    linear = []
    for name, module in layer.named_modules():
        weight = getattr(module, "weight", None)
        if name and isinstance(weight, nn.Parameter) and weight.dim() == 2:
            linear.append((name, type(module).__name__, tuple(weight.shape)))
    return (type(layer).__name__, tuple(sorted(linear)))


def layer_kinds(layers: nn.ModuleList) -> LayerKinds:
    """Group ``layers`` by their linear sub-modules (name, class, weight shape); the most common group is kind 0.
    Each description names the layer class and, for the other kinds, the linear modules that differ from kind 0."""
    signatures = [_signature(layer) for layer in layers]
    counts = Counter(signatures)
    first_seen = {signature: index for index, signature in reversed(list(enumerate(signatures)))}
    order = sorted(counts, key=lambda signature: (-counts[signature], first_seen[signature]))
    kind_of = {signature: kind for kind, signature in enumerate(order)}
    common = {entry[0] for entry in order[0][1]}
    descriptions = []
    for kind, (class_name, linear) in enumerate(order):
        names = {entry[0] for entry in linear}
        if kind == 0:
            descriptions.append(f"{class_name} ({len(linear)} linear modules)")
            continue
        extra, missing = sorted(names - common), sorted(common - names)
        parts = []
        if extra:
            parts.append("has " + ", ".join(_abbreviate(extra)))
        if missing:
            parts.append("lacks " + ", ".join(_abbreviate(missing)))
        if not parts:
            parts.append("same module names with other shapes")
        descriptions.append(f"{class_name} ({'; '.join(parts)})")
    return LayerKinds(kinds=[kind_of[signature] for signature in signatures], descriptions=descriptions)


def _abbreviate(names: list[str], keep: int = 3) -> list[str]:
    return names if len(names) <= keep else [*names[:keep], f"… {len(names) - keep} more"]
