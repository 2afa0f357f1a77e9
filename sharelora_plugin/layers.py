"""Find the decoder layer list of a model's language model.

ShareLoRA measures and shares *decoder* layers of the language model only. A vision-language model also has a
vision tower with its own layer list (``CLIPEncoderLayer`` …, counted by ``vision_config.num_hidden_layers``); that
one is never measured or shared.

Discovery does not depend on class names (GPT-NeoX calls its blocks ``GPTNeoXLayer``, Falcon keeps them at
``transformer.h``). The layer stack is the ``nn.ModuleList`` whose length is the text config's
``num_hidden_layers``, found outside every non-text tower. When several lists qualify, the ones inside the model's
own ``get_decoder()``, then the ones made of its ``_no_split_modules`` classes, then the ones made of
``*DecoderLayer`` classes are preferred; a tie that remains is an error that lists the candidates. Where no list
has that length (or there is no single transformers config, e.g. a container of two models), the fallback is the
list of ``*DecoderLayer``/``*DecoderBlock`` modules, then the list of ``_no_split_modules`` classes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel


class LayerDiscoveryError(ValueError):
    """The decoder layer list could not be found unambiguously."""


@dataclass(frozen=True)
class DecoderLayers:
    """The decoder layers of a model and where they live (``path`` is relative to the model passed in)."""

    path: str
    layers: nn.ModuleList

    def __len__(self) -> int:
        return len(self.layers)


_Candidate = tuple[str, nn.ModuleList]


def _is_decoder_block(module: nn.Module) -> bool:
    name = type(module).__name__
    return name.endswith("DecoderLayer") or name.endswith("DecoderBlock")


def _inside(name: str, prefix: str) -> bool:
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def _transformers_model(model: nn.Module) -> PreTrainedModel | None:
    """The transformers model whose config describes ``model``: ``model`` itself or the base model of a PEFT
    wrapper. A container of several transformers models has no single config; it gets none."""
    outermost: list[tuple[str, PreTrainedModel]] = []
    for name, module in model.named_modules():
        if isinstance(module, PreTrainedModel) and not any(_inside(name, p) for p, _ in outermost):
            outermost.append((name, module))
    return outermost[0][1] if len(outermost) == 1 else None


def _text_config(config: PreTrainedConfig) -> PreTrainedConfig:
    """The language model's config: ``text_config`` of a composite (VLM) config, the config itself otherwise."""
    try:
        return config.get_text_config(decoder=True)
    except ValueError:  # several text sub-configs: then the whole config has to do
        return config


def _other_tower_prefixes(
    model: nn.Module, hf_model: PreTrainedModel, text_config: PreTrainedConfig
) -> list[str]:
    """Paths of the sub-models built from a non-text sub-config (``vision_config``, ``audio_config`` …).

    Sub-models hold a copy of their sub-config, so they are recognised by the config's class, not its identity."""
    top = hf_model.config
    other = tuple(
        {
            type(sub)
            for key in getattr(top, "sub_configs", {})
            if isinstance(sub := getattr(top, key, None), PreTrainedConfig)
            and type(sub) is not type(text_config)
        }
    )
    if not other:
        return []
    prefixes: list[str] = []
    for name, module in model.named_modules():
        config = getattr(module, "config", None) if isinstance(module, PreTrainedModel) else None
        if isinstance(config, other) and not any(_inside(name, p) for p in prefixes):
            prefixes.append(name)
    return prefixes


def _decoder_prefix(model: nn.Module, hf_model: PreTrainedModel) -> str | None:
    """Path of ``hf_model.get_decoder()`` inside ``model`` (the language model of a VLM), if it names one."""
    try:
        decoder = hf_model.get_decoder()
    except Exception:  # noqa: BLE001  (get_decoder raises for the few models transformers has no rule for)
        return None
    return next((name for name, module in model.named_modules() if module is decoder), None)


def _outermost(lists: list[_Candidate]) -> list[_Candidate]:
    # an MoE layer's expert list can be as long as the layer stack; it sits inside it
    return [c for c in lists if not any(o[0] != c[0] and _inside(c[0], o[0]) for o in lists)]


def _prefer(candidates: list[_Candidate], rules: Iterable[Callable[[_Candidate], bool]]) -> list[_Candidate]:
    """Narrow ``candidates`` rule by rule, skipping any rule that would leave none."""
    for rule in rules:
        if len(candidates) <= 1:
            break
        kept = [c for c in candidates if rule(c)]
        if kept:
            candidates = kept
    return candidates


def _describe(candidates: list[_Candidate]) -> str:
    return ", ".join(f"{name} ({len(module)} x {type(module[0]).__name__})" for name, module in candidates)


def find_decoder_layers(model: nn.Module, path: str | None = None) -> DecoderLayers:
    """Return the language model's decoder layer list.

    ``path`` (dotted, relative to ``model``) selects the list explicitly (``sharelora.layers_path``). Otherwise the
    list is the ``nn.ModuleList`` of ``config.get_text_config().num_hidden_layers`` modules outside any vision or
    other non-text tower (see the module docstring for how ties are broken). This finds ``model.layers``
    (Llama family, Mixtral, Gemma …), ``gpt_neox.layers``, Falcon's ``transformer.h`` and LLaVA's
    ``model.language_model.layers``, also inside a PEFT model; paths are relative to the model passed in.
    """
    if path:
        module = model.get_submodule(path)
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            raise LayerDiscoveryError(
                f"sharelora.layers_path={path!r} is not a non-empty nn.ModuleList "
                f"(got {type(module).__name__})"
            )
        return DecoderLayers(path=path, layers=module)

    hf_model = _transformers_model(model)
    num_layers = None
    towers: list[str] = []
    decoder_prefix = None
    no_split: set[str] = set()
    if hf_model is not None:
        text_config = _text_config(hf_model.config)
        num_layers = getattr(text_config, "num_hidden_layers", None)
        towers = _other_tower_prefixes(model, hf_model, text_config)
        decoder_prefix = _decoder_prefix(model, hf_model)
        no_split = set(getattr(hf_model, "_no_split_modules", None) or ())
    lists = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0 and not any(_inside(name, t) for t in towers)
    ]

    def in_decoder(c: _Candidate) -> bool:
        return decoder_prefix is not None and _inside(c[0], decoder_prefix)

    def no_split_blocks(c: _Candidate) -> bool:
        return bool(no_split) and all(type(m).__name__ in no_split for m in c[1])

    def named_decoder_blocks(c: _Candidate) -> bool:
        return all(_is_decoder_block(m) for m in c[1])

    candidates = _outermost([c for c in lists if len(c[1]) == num_layers])
    if candidates:
        candidates = _prefer(candidates, (in_decoder, no_split_blocks, named_decoder_blocks))
    else:
        # no list of num_hidden_layers modules (or no transformers config): a list of decoder blocks by class
        candidates = _outermost([c for c in lists if named_decoder_blocks(c)]) or _outermost(
            [c for c in lists if no_split_blocks(c)]
        )
    if not candidates:
        expected = (
            f"{num_layers} modules (the text config's num_hidden_layers)" if num_layers else "decoder blocks"
        )
        seen = _describe(_outermost(lists)) or "none"
        raise LayerDiscoveryError(
            f"no decoder layer list found in {type(model).__name__}: no nn.ModuleList of {expected} "
            f"(module lists seen: {seen}); set sharelora.layers_path to the dotted path of the decoder layer "
            "ModuleList"
        )
    if len(candidates) > 1:
        raise LayerDiscoveryError(
            f"several decoder layer lists found ({_describe(candidates)}); set sharelora.layers_path to the one "
            "to share"
        )
    name, module = candidates[0]
    return DecoderLayers(path=name, layers=module)


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a ``PeftModel`` (the model itself when it is not wrapped)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def backbone_without_head(model: nn.Module) -> nn.Module:
    """The model minus its LM head, so calibration does not pay for the vocabulary projection.

    ``LlamaForCausalLM.model`` is ``LlamaModel``; ``LlavaForConditionalGeneration.model`` is ``LlavaModel``
    (vision tower + projector + language model). Both take the same inputs as the full model.
    """
    model = unwrap_peft(model)
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module) and hasattr(model, "lm_head"):
        return inner
    return model
