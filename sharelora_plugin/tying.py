"""Tie LoRA modules across the layers of each share set.

After PEFT has injected LoRA, every non-leader layer of a share set gets the *leader's* ``lora_A`` and
``lora_B`` module objects (per target module and adapter). The modules are then literally one object reached
from several layers, so autograd adds the per-layer gradients into one tensor and the optimizer holds one
state. DoRA magnitudes and LoRA dropout stay per layer: only the low-rank matrices are shared.

``save_pretrained`` clones aliased tensors, so the adapter written to disk is an ordinary LoRA where the
members of a set hold equal copies; :func:`tie_lora_modules` with ``require_equal=True`` re-ties such an
adapter after it was loaded and refuses one whose copies differ (it was not trained with this plan).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from sharelora_plugin.layers import find_decoder_layers

SHARED_ATTRS = ("lora_A", "lora_B")


class TyingError(ValueError):
    """The plan cannot be applied to this model (structure mismatch, or untied weights that differ)."""


@dataclass
class TieReport:
    """What tying did: the number of decoder layers, the target modules per layer, and parameter counts."""

    num_layers: int
    layers_path: str
    target_modules: list[str]
    adapters: list[str]
    lora_params_untied: int
    lora_params_tied: int
    tied_module_pairs: int
    details: dict = field(default_factory=dict)


def _lora_layers_by_name(layer: nn.Module) -> dict[str, LoraLayer]:
    return {name: mod for name, mod in layer.named_modules() if isinstance(mod, LoraLayer) and name}


def _lora_numel(module: LoraLayer, adapter: str) -> int:
    return sum(p.numel() for attr in SHARED_ATTRS for p in getattr(module, attr)[adapter].parameters())


def _same_values(a: nn.Module, b: nn.Module) -> bool:
    pa, pb = list(a.parameters()), list(b.parameters())
    return len(pa) == len(pb) and all(
        x.shape == y.shape and torch.equal(x, y) for x, y in zip(pa, pb, strict=True)
    )


def tie_lora_modules(
    model: nn.Module,
    share_sets: Sequence[Sequence[int]],
    *,
    layers_path: str | None = None,
    require_equal: bool = False,
) -> TieReport:
    """Make every layer of each share set use its leader's (smallest index) ``lora_A``/``lora_B`` modules.

    ``model`` is a ``PeftModel`` (or any module holding PEFT ``LoraLayer`` s inside its decoder layers).
    ``require_equal`` checks, before tying, that the members already hold the leader's values — the case after
    loading a saved ShareLoRA adapter — and raises :class:`TyingError` naming the first mismatch otherwise.
    Tying an already tied model is a no-op.
    """
    decoder = find_decoder_layers(model, layers_path)
    num_layers = len(decoder)
    per_layer = [_lora_layers_by_name(layer) for layer in decoder.layers]
    names = sorted(set().union(*[set(d) for d in per_layer]))
    if not names:
        raise TyingError(
            f"no LoRA modules found inside the decoder layers at {decoder.path!r}; "
            "check lora_target_modules / lora_target_linear"
        )
    adapters = sorted({a for d in per_layer for m in d.values() for a in m.lora_A.keys()})
    untied = sum(_lora_numel(m, a) for d in per_layer for m in d.values() for a in m.lora_A.keys())
    pairs = 0
    for share_set in share_sets:
        leader, *members = sorted(int(i) for i in share_set)
        for layer_idx in (leader, *members):
            if not 0 <= layer_idx < num_layers:
                raise TyingError(
                    f"share set {sorted(share_set)} names layer {layer_idx}, but the model has {num_layers} "
                    f"decoder layers (0..{num_layers - 1}); the plan was made for another model"
                )
        for member in members:
            if set(per_layer[member]) != set(per_layer[leader]):
                raise TyingError(
                    f"layers {leader} and {member} have different LoRA targets "
                    f"({sorted(per_layer[leader])} vs {sorted(per_layer[member])}); layers of a share set must "
                    "be adapted identically (check layers_to_transform / lora_target_modules)"
                )
            for name in names:
                if name not in per_layer[leader]:
                    continue
                lead_mod, mem_mod = per_layer[leader][name], per_layer[member][name]
                for adapter in lead_mod.lora_A.keys():
                    if adapter not in mem_mod.lora_A:
                        raise TyingError(
                            f"adapter {adapter!r} is on layer {leader} but not on layer {member}"
                        )
                    if lead_mod.r.get(adapter) != mem_mod.r.get(adapter):
                        raise TyingError(
                            f"{name}: rank {lead_mod.r.get(adapter)} on layer {leader} but "
                            f"{mem_mod.r.get(adapter)} on layer {member}; a share set needs one rank "
                            "(remove lora_rank_pattern entries that split a set)"
                        )
                    for attr in SHARED_ATTRS:
                        lead_sub, mem_sub = getattr(lead_mod, attr)[adapter], getattr(mem_mod, attr)[adapter]
                        if lead_sub is mem_sub:
                            continue
                        if require_equal and not _same_values(lead_sub, mem_sub):
                            raise TyingError(
                                f"{decoder.path}.{member}.{name}.{attr}[{adapter}] differs from layer {leader}'s: "
                                "the loaded adapter was not trained with this share plan"
                            )
                        if any(
                            p.shape != q.shape
                            for p, q in zip(lead_sub.parameters(), mem_sub.parameters(), strict=True)
                        ):
                            raise TyingError(
                                f"{name}.{attr}: shapes differ between layers {leader} and {member}; "
                                "only identically shaped modules can be shared"
                            )
                        getattr(mem_mod, attr)[adapter] = lead_sub
                        pairs += 1
    return TieReport(
        num_layers=num_layers,
        layers_path=decoder.path,
        target_modules=names,
        adapters=adapters,
        lora_params_untied=untied,
        lora_params_tied=unique_lora_parameters(model, layers_path=decoder.path),
        tied_module_pairs=pairs,
    )


def unique_lora_parameters(model: nn.Module, *, layers_path: str | None = None) -> int:
    """Number of distinct LoRA A/B parameters inside the decoder layers (shared tensors counted once)."""
    decoder = find_decoder_layers(model, layers_path)
    seen: dict[int, int] = {}
    for layer in decoder.layers:
        for mod in _lora_layers_by_name(layer).values():
            for attr in SHARED_ATTRS:
                for sub in getattr(mod, attr).values():
                    for p in sub.parameters():
                        seen[id(p)] = p.numel()
    return sum(seen.values())


def unique_trainable_parameters(model: nn.Module) -> int:
    """Trainable parameters of the whole model with shared tensors counted once (what the optimizer sees)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())


def verify_ties(
    model: nn.Module, share_sets: Sequence[Sequence[int]], *, layers_path: str | None = None
) -> None:
    """Raise :class:`TyingError` unless every member of every set uses its leader's module objects."""
    decoder = find_decoder_layers(model, layers_path)
    for share_set in share_sets:
        leader, *members = sorted(int(i) for i in share_set)
        lead = _lora_layers_by_name(decoder.layers[leader])
        for member in members:
            mem = _lora_layers_by_name(decoder.layers[member])
            for name, lead_mod in lead.items():
                for attr in SHARED_ATTRS:
                    for adapter, sub in getattr(lead_mod, attr).items():
                        if getattr(mem[name], attr)[adapter] is not sub:
                            raise TyingError(
                                f"layer {member} {name}.{attr}[{adapter}] is not tied to layer {leader}"
                            )


def tie_layout_fingerprint(model: nn.Module, *, layers_path: str | None = None) -> str:
    """Hash of which decoder-layer LoRA modules are the same object — equal across processes that tied alike."""
    decoder = find_decoder_layers(model, layers_path)
    first_seen: dict[int, str] = {}
    rows = []
    for idx, layer in enumerate(decoder.layers):
        for name, mod in sorted(_lora_layers_by_name(layer).items()):
            for attr in SHARED_ATTRS:
                for adapter, sub in sorted(getattr(mod, attr).items()):
                    key = f"{idx}.{name}.{attr}.{adapter}"
                    owner = first_seen.setdefault(id(sub), key)
                    shapes = [tuple(p.shape) for p in sub.parameters()]
                    rows.append(f"{key}->{owner}:{shapes}")
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()


def trainable_checksum(model: nn.Module) -> str:
    """Hash of all trainable values (shared tensors once); equal on every process after synchronised steps.
    FSDP2-sharded parameters (DTensors) are gathered to full tensors first; gathering is a collective, so once the
    process group is closed (Axolotl's second ``post_train`` comes after it) the hash says so instead."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        if p.requires_grad:
            if isinstance(p, DTensor):
                if not dist.is_initialized():
                    return "n/a (process group closed)"
                p = p.full_tensor()
            digest.update(name.encode())
            digest.update(p.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]
