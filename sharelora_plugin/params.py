"""LoRA vs ShareLoRA parameter counts of an architecture, built on the ``meta`` device (no weights are allocated,
so a 7B architecture takes seconds): LoRA is injected with PEFT, the share sets are tied with the plugin's own
:func:`~sharelora_plugin.tying.tie_lora_modules`, and the distinct LoRA tensors inside the decoder layers are
counted — what ``sharelora params`` prints and what a plan's metadata records."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sharelora_plugin.planning import PlanError, distinct_modules, expanded_rank, validate_share_sets
from sharelora_plugin.planning.files import read_json

DEFAULT_TARGET_MODULES = "q_proj,k_proj,v_proj,up_proj,down_proj"  # the paper's commonsense setup
# Keys of plan.metadata that describe parameter counts; dropped when a plan is re-made from another's matrix.
PARAM_METADATA_KEYS = (
    "lora_params",
    "lora_params_at_final_rank",
    "sharelora_params",
    "trainable_params",
    "target_modules",
    "layers_path",
)


@dataclass(frozen=True)
class ParamCount:
    """LoRA vs ShareLoRA parameters (``lora_A``/``lora_B`` inside the decoder layers) for one architecture.

    ``lora_params`` is plain LoRA at ``lora_r``; ``sharelora_params`` is the tied model at ``rank`` (the final
    rank, after any expansion), shared tensors counted once.
    """

    num_layers: int
    lora_r: int
    rank: int
    lora_params: int
    lora_params_at_final_rank: int
    sharelora_params: int
    distinct_modules: int
    target_modules: list[str]
    layers_path: str
    architecture: str

    @property
    def fraction(self) -> float:
        """ShareLoRA parameters as a fraction of plain LoRA's at ``lora_r``."""
        return self.sharelora_params / self.lora_params

    def to_dict(self) -> dict[str, Any]:
        """The ``params --json`` object."""
        return {
            "lora_params": self.lora_params,
            "sharelora_params": self.sharelora_params,
            "fraction": self.fraction,
            "distinct_modules": self.distinct_modules,
            "rank": self.rank,
            "lora_r": self.lora_r,
            "num_layers": self.num_layers,
            "lora_params_at_final_rank": self.lora_params_at_final_rank,
            "target_modules": list(self.target_modules),
            "layers_path": self.layers_path,
            "architecture": self.architecture,
        }

    def metadata(self) -> dict[str, Any]:
        """The counts under the keys the plugin writes into ``plan.metadata``."""
        return {
            "adapter": "sharelora",
            "layers_path": self.layers_path,
            "target_modules": list(self.target_modules),
            "lora_params": self.lora_params,
            "lora_params_at_final_rank": self.lora_params_at_final_rank,
            "sharelora_params": self.sharelora_params,
        }


def load_model_config(path: str | Path):
    """A transformers config from a ``config.json``-style file (needs ``model_type``) or a model folder."""
    from transformers import AutoConfig

    path = Path(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise PlanError(f"model config folder {path} has no config.json")
        return AutoConfig.from_pretrained(str(path))
    data = read_json(path, "model config")
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        raise PlanError(
            f"{path} must be a JSON object with a 'model_type' (e.g. \"llama\") and the architecture's "
            "hyper-parameters, like the files in configs/"
        )
    data = dict(data)
    return AutoConfig.for_model(data.pop("model_type"), **data)


def parse_target_modules(value: Any) -> str | list[str] | None:
    """``"q_proj,k_proj"`` -> list (PEFT suffix match); ``"all-linear"`` stays a string; lists pass through."""
    if value is None or isinstance(value, list):
        return value
    text = str(value).strip()
    if text == "all-linear":
        return text
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise PlanError("--target-modules needs at least one module name, e.g. q_proj,v_proj")
    return names


def _peft_layers_path(layers_path: str | None) -> str | None:
    # Paths are given relative to the transformers model; PeftModel puts it under base_model.model.
    if layers_path is None or layers_path.startswith("base_model."):
        return layers_path
    return f"base_model.model.{layers_path}"


def count_lora_parameters(
    model_config: Any,
    target_modules: str | list[str] | None,
    *,
    lora_r: int,
    share_sets: Sequence[Sequence[int]] = (),
    rank: int | None = None,
    rank_expansion: bool = False,
    layers_path: str | None = None,
) -> ParamCount:
    """Count LoRA and ShareLoRA parameters by building the model on the meta device, injecting LoRA with PEFT
    and tying ``share_sets`` exactly as the plugin does; no weights are allocated.

    ShareLoRA is built at ``rank`` (default ``lora_r``; ``rank_expansion=True`` uses the paper's
    ``r' = floor(L / (L - sum|S_i| + |S|) * r)``). Plain LoRA at ``lora_r`` is the untied count rescaled: every
    ``lora_A`` is ``r x in`` and every ``lora_B`` is ``out x r``, so the count is exactly linear in the rank.
    Share sets are validated against the model's layer count (:class:`PlanError` for an index ``>= L``).
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from sharelora_plugin.layers import find_decoder_layers
    from sharelora_plugin.tying import tie_lora_modules

    for name, value in (("lora_r", lora_r), ("rank", rank)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise PlanError(f"{name} must be a positive integer; got {value!r}")
    multimodal = getattr(model_config, "vision_config", None) is not None
    auto_class = AutoModelForImageTextToText if multimodal else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto_class.from_config(model_config)
    num_layers = len(find_decoder_layers(model, layers_path))
    sets = validate_share_sets(list(share_sets), num_layers)
    if rank_expansion:
        rank = expanded_rank(num_layers, sets, lora_r)
    rank = lora_r if rank is None else rank
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=target_modules))
    report = tie_lora_modules(peft_model, sets, layers_path=_peft_layers_path(layers_path))
    return ParamCount(
        num_layers=num_layers,
        lora_r=lora_r,
        rank=rank,
        lora_params=report.lora_params_untied // rank * lora_r,
        lora_params_at_final_rank=report.lora_params_untied,
        sharelora_params=report.lora_params_tied,
        distinct_modules=distinct_modules(num_layers, sets),
        target_modules=report.target_modules,
        layers_path=report.layers_path,
        architecture=type(model).__name__,
    )
