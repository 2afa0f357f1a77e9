"""Find the decoder layer list of a supported model.

ShareLoRA measures and shares *decoder* layers of the language model only. A LLaVA model also has a vision
tower with its own layer list (``CLIPEncoderLayer``); that one is never measured or shared.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


class LayerDiscoveryError(ValueError):
    """The decoder layer list could not be found unambiguously."""


@dataclass(frozen=True)
class DecoderLayers:
    """The decoder layers of a model and where they live (``path`` is relative to the model passed in)."""

    path: str
    layers: nn.ModuleList

    def __len__(self) -> int:
        return len(self.layers)


def _is_decoder_block(module: nn.Module) -> bool:
    name = type(module).__name__
    return name.endswith("DecoderLayer") or name.endswith("DecoderBlock")


def find_decoder_layers(model: nn.Module, path: str | None = None) -> DecoderLayers:
    """Return the language model's decoder layer list.

    ``path`` (dotted, relative to ``model``) selects the list explicitly; otherwise the unique ``ModuleList``
    whose children are ``*DecoderLayer`` modules is used. This covers Llama-family causal LMs
    (``model.layers``), LLaVA (``model.language_model.layers``) and either of them wrapped in a PEFT model.
    """
    if path:
        module = model.get_submodule(path)
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            raise LayerDiscoveryError(
                f"sharelora.layers_path={path!r} is not a non-empty nn.ModuleList "
                f"(got {type(module).__name__})"
            )
        return DecoderLayers(path=path, layers=module)
    found = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0 and all(_is_decoder_block(m) for m in module)
    ]
    if not found:
        raise LayerDiscoveryError(
            f"no list of *DecoderLayer modules found in {type(model).__name__}; "
            "set sharelora.layers_path to the dotted path of the decoder layer ModuleList"
        )
    if len(found) > 1:
        names = ", ".join(f"{name} ({len(module)} layers)" for name, module in found)
        raise LayerDiscoveryError(
            f"several decoder layer lists found ({names}); set sharelora.layers_path to the one to share"
        )
    name, module = found[0]
    return DecoderLayers(path=name, layers=module)


def backbone_without_head(model: nn.Module) -> nn.Module:
    """The model minus its LM head, so calibration does not pay for the vocabulary projection.

    ``LlamaForCausalLM.model`` is ``LlamaModel``; ``LlavaForConditionalGeneration.model`` is ``LlavaModel``
    (vision tower + projector + language model). Both take the same inputs as the full model.
    """
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module) and hasattr(model, "lm_head"):
        return inner
    return model
