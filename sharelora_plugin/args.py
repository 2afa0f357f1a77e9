"""The ``sharelora:`` YAML block, validated when Axolotl validates the config.

Every problem is raised at config time with the key, the bad value and what would be valid; pydantic adds the
key path (``sharelora.calibration.num_samples`` …) to the message.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sharelora_plugin.planning import rules
from sharelora_plugin.planning.rules import METRICS, STRATEGIES

# PEFT initialisations that rewrite the base weights with each layer's own A/B (W ← W − B·A): a shared A/B
# cannot be subtracted from several different base weights, so they contradict sharing.
WEIGHT_REWRITING_INITS = ("pissa", "olora", "loftq", "eva", "corda")
LOCAL_FILE_SUFFIXES = (".json", ".jsonl", ".txt", ".parquet", ".csv", ".arrow")
# k of the gradient sketches: the value every measurement in the README was made with
DEFAULT_SKETCH_RANK = 8


# keys checked by the planning rules (the same functions the planner and the CLI call)
CALIBRATION_RULES = {
    "bootstrap_resamples": rules.check_resamples,
    "min_samples": rules.check_min_samples,
    "stability": rules.check_stability_target,
}
SHARELORA_RULES = {
    "threshold": rules.check_threshold,
    "target_fraction": rules.check_target_fraction,
    "rank_expansion": rules.check_rank_expansion,
}


def _must_exist(value: str | None, exists: bool, message: str) -> str | None:
    """``value`` when it is empty or ``exists``; else a validation error with ``message``."""
    if value and not exists:
        raise ValueError(message)
    return value


def looks_like_local_path(path: str) -> bool:
    """A dataset reference is a local path when it exists, starts like a path, or ends like a data file;
    anything else (``allenai/c4``) is a Hub dataset id and is resolved when calibration runs."""
    p = Path(path).expanduser()
    return p.exists() or path.startswith((".", "/", "~")) or p.suffix.lower() in LOCAL_FILE_SUFFIXES


class CalibrationConfig(BaseModel):
    """Where the calibration samples come from and how many are run (paper: 256 C4 texts / 128 LLaVA samples)."""

    model_config = ConfigDict(extra="forbid")

    path: str | None = Field(
        default=None,
        description="Local JSON/JSONL/text file or folder, or a Hub dataset id. Default: the first training dataset.",
    )
    name: str | None = Field(default=None, description="Dataset config name (Hub datasets).")
    split: str = Field(default="train", description="Dataset split.")
    data_files: str | list[str] | None = Field(default=None, description="data_files passed to load_dataset.")
    text_field: str = Field(default="text", description="Column holding raw text.")
    messages_field: str = Field(
        default="messages", description="Column holding chat messages (used when there is no text column)."
    )
    image_root: str | None = Field(
        default=None,
        description="Visual-text calibration: folder that relative image paths are looked up in first (then the "
        "calibration file's folder, then the working directory).",
    )
    num_samples: int = Field(default=256, description="Number of samples (paper: 256; LLaVA: 128).")
    max_length: int = Field(default=512, description="Tokens per sample after truncation.")
    batch_size: int = Field(default=8, description="Samples per forward pass.")
    seed: int = Field(
        default=rules.DEFAULT_SEED, description="Seed for choosing the samples and the bootstrap."
    )
    bootstrap_resamples: int = Field(
        default=rules.DEFAULT_RESAMPLES,
        description="Bootstrap resamples of the samples for the plan's stability report (0: no report).",
    )
    stop_when_stable: bool = Field(
        default=False,
        description="Calibrate batch by batch and stop once the plan's bootstrap frequency reaches `stability`; "
        "num_samples becomes the cap.",
    )
    min_samples: int = Field(
        default=rules.DEFAULT_MIN_SAMPLES,
        description="stop_when_stable: never stop before this many samples.",
    )
    stability: float = Field(
        default=rules.DEFAULT_STABILITY_TARGET,
        description="stop_when_stable: the plan frequency (fraction of resamples giving the same sets) to reach.",
    )
    sketch_rank: int = Field(
        default=DEFAULT_SKETCH_RANK,
        description="metric gradient_subspace: columns k of each gradient sketch (the overlap's random level is "
        "about k/d). Fixed rather than tied to lora_r, so a threshold means the same at any rank.",
    )

    @field_validator("num_samples", "max_length", "batch_size", "sketch_rank")
    @classmethod
    def _positive(cls, value: int, info) -> int:
        if value <= 0:
            raise ValueError(
                f"sharelora.calibration.{info.field_name} must be a positive integer, got {value}"
            )
        return value

    @field_validator(*CALIBRATION_RULES)
    @classmethod
    def _rule(cls, value: Any, info) -> Any:
        return CALIBRATION_RULES[info.field_name](value, f"sharelora.calibration.{info.field_name}")

    @model_validator(mode="after")
    def _stopping(self) -> CalibrationConfig:
        if self.stop_when_stable and self.bootstrap_resamples == 0:
            raise ValueError(
                "sharelora.calibration.stop_when_stable needs the bootstrap; set "
                f"sharelora.calibration.bootstrap_resamples > 0 (default {rules.DEFAULT_RESAMPLES})"
            )
        if self.stop_when_stable and self.min_samples > self.num_samples:
            raise ValueError(
                f"sharelora.calibration.min_samples={self.min_samples} is above num_samples={self.num_samples} "
                "(the cap when stop_when_stable is on); lower min_samples or raise num_samples"
            )
        return self

    @field_validator("image_root")
    @classmethod
    def _image_root_exists(cls, value: str | None) -> str | None:
        return _must_exist(
            value,
            value is not None and Path(value).expanduser().is_dir(),
            f"sharelora.calibration.image_root={value!r} is not a folder; give the folder that the calibration "
            "rows' relative image paths are relative to (e.g. the COCO train2017 folder)",
        )

    @field_validator("path")
    @classmethod
    def _path_exists(cls, value: str | None) -> str | None:
        return _must_exist(
            value,
            value is not None and (not looks_like_local_path(value) or Path(value).expanduser().exists()),
            f"sharelora.calibration.path={value!r} does not exist; give an existing JSON/JSONL/text file "
            "or folder (make setup writes .cache/data/lee_background.jsonl), or a Hub dataset id",
        )


class ShareLoRAConfig(BaseModel):
    """Settings of the ``sharelora:`` block. See README.md for a walkthrough."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool | None = Field(
        default=None,
        description="Tie LoRA modules by the share plan. Set automatically by `adapter: sharelora`.",
    )
    threshold: float = Field(
        default=rules.DEFAULT_THRESHOLD, description="ε: every pair of layers in a set needs similarity ≥ ε."
    )
    metric: Literal[METRICS] = Field(  # type: ignore[valid-type]
        default=rules.DEFAULT_METRIC,
        description="Similarity: 1 − d (eq. 4), cosine, or gradient_subspace (overlap of the layers' first-step "
        "weight-gradient subspaces; needs target_fraction or an explicit threshold).",
    )
    strategy: Literal[STRATEGIES] = Field(  # type: ignore[valid-type]
        default=rules.DEFAULT_STRATEGY, description="How share sets are chosen."
    )
    contiguous: bool = Field(default=False, description="optimal only: sets must be runs of adjacent layers.")
    share_sets: list[list[int]] | None = Field(default=None, description="strategy: manual — the sets.")
    seed: int = Field(
        default=rules.DEFAULT_SEED, description="strategy: random — seed of the random adjacent sets."
    )
    confidence: float | None = Field(
        default=None,
        description="Robust planning: a pair counts as similar only when its lower bootstrap bound at this "
        "confidence (e.g. 0.9) clears ε. Default off (the paper's rule on the mean).",
    )
    rank_expansion: bool | int = Field(
        default=False,
        description="false: keep lora_r; true: ⌊L/(L−Σ|S|+|S|)·r⌋; an integer: that rank.",
    )
    target_fraction: float | None = Field(
        default=None, description="Choose ε so ShareLoRA trains at most this fraction of LoRA's parameters."
    )
    plan_file: str | None = Field(
        default=None,
        description="A sharelora_plan.json to use instead of calibrating (required under ZeRO-3).",
    )
    layers_path: str | None = Field(
        default=None, description="Dotted path of the decoder layer list, if ambiguous."
    )
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    save_heatmap: bool = Field(default=True, description="Write sharelora_similarity.png beside the plan.")

    @field_validator(*SHARELORA_RULES)
    @classmethod
    def _rule(cls, value: Any, info) -> Any:
        return SHARELORA_RULES[info.field_name](value, f"sharelora.{info.field_name}")

    @field_validator("plan_file")
    @classmethod
    def _plan_exists(cls, value: str | None) -> str | None:
        if value and not Path(value).expanduser().is_file():
            raise ValueError(
                f"sharelora.plan_file={value!r} is not a file; create one with `sharelora plan --config …`"
            )
        return value

    @field_validator("share_sets")
    @classmethod
    def _sets_shape(cls, value: list[list[int]] | None) -> list[list[int]] | None:
        if value is None:
            return None
        return rules.check_share_sets(value, None, "sharelora.share_sets")

    @model_validator(mode="after")
    def _strategy_inputs(self) -> ShareLoRAConfig:
        if self.strategy == "manual" and not self.share_sets and not self.plan_file:
            raise ValueError(
                "sharelora.strategy: manual needs sharelora.share_sets, e.g. [[16, 17], [18, 19]]"
            )
        rules.check_planning_options(
            strategy=self.strategy,
            contiguous=self.contiguous,
            share_sets=self.share_sets,
            target_fraction=self.target_fraction,
            confidence=self.confidence,
            prefix="sharelora.",
        )
        if self.confidence is not None and self.calibration.bootstrap_resamples == 0:
            raise ValueError(
                "sharelora.confidence needs the bootstrap; set sharelora.calibration.bootstrap_resamples > 0"
            )
        if self.calibration.stop_when_stable and self.strategy in ("manual", "alternate"):
            raise ValueError(
                f"sharelora.calibration.stop_when_stable has nothing to wait for with strategy {self.strategy!r} "
                "(its sets do not depend on calibration); set it to false"
            )
        if self.metric == rules.GRADIENT_METRIC and not self.plan_file:
            self._check_gradient_metric()
        return self

    def _check_gradient_metric(self) -> None:
        # "threshold" is in model_fields_set only when the YAML gave it (the 0.85 default is angular's)
        rules.check_gradient_threshold(
            self.metric,
            self.strategy,
            threshold_given="threshold" in self.model_fields_set,
            target_fraction=self.target_fraction,
            threshold_key="sharelora.threshold",
            fraction_key="sharelora.target_fraction",
        )
        cal = self.calibration
        blocks = -(-cal.num_samples // cal.batch_size)
        needs = [
            key
            for key, on in (
                ("sharelora.calibration.stop_when_stable", cal.stop_when_stable),
                ("sharelora.confidence", self.confidence is not None),
            )
            if on
        ]
        if needs and blocks < 2:
            raise ValueError(
                f"{needs[0]} with metric gradient_subspace needs a bootstrap over at least 2 sketch blocks (one per "
                f"calibration batch), but num_samples={cal.num_samples} in batches of {cal.batch_size} gives "
                f"{blocks}; lower sharelora.calibration.batch_size or raise num_samples"
            )


def _deepspeed_stage(deepspeed: Any) -> int | None:
    if not deepspeed:
        return None
    if isinstance(deepspeed, dict):
        conf = deepspeed
    else:
        try:
            conf = json.loads(Path(str(deepspeed)).read_text())
        except (OSError, ValueError):
            return None
    stage = (conf.get("zero_optimization") or {}).get("stage")
    return int(stage) if isinstance(stage, int | str) and str(stage).isdigit() else None


def config_value(config: Any, key: str, default: Any = None) -> Any:
    """``key`` of a config: the raw YAML dict, Axolotl's ``DictDefault`` or an attribute object (pydantic); ``default``
    when the config is ``None`` or the value is missing or ``None``."""
    if config is None:
        return default
    value = config.get(key, default) if isinstance(config, Mapping) else getattr(config, key, default)
    return default if value is None else value


def fsdp_version(config: Any) -> int | None:
    """The FSDP version a config runs (``None`` without FSDP), resolved as Axolotl 0.19 does: FSDP is on with
    ``fsdp_config`` (or the deprecated ``fsdp`` list); the version is the top-level ``fsdp_version``, else
    ``fsdp_config.fsdp_version`` / ``fsdp_config.version``, else 1 (Axolotl pins a versionless ``fsdp_config`` to
    FSDP1). Works on the raw YAML dict and on a validated config."""
    fsdp_config = config_value(config, "fsdp_config")
    if not (config_value(config, "fsdp") or fsdp_config):
        return None
    version = (
        config_value(config, "fsdp_version")
        or config_value(fsdp_config, "fsdp_version")
        or config_value(fsdp_config, "version")
    )
    return int(version) if str(version).isdigit() else 1


def incompatible_options(data: dict) -> list[str]:
    """Problems with the rest of the Axolotl config when ShareLoRA is on (empty when all is well)."""
    problems = []
    sl = data.get("sharelora") or {}
    if not isinstance(sl, dict):
        sl = sl.model_dump() if hasattr(sl, "model_dump") else {}
    version = fsdp_version(data)
    if version is not None and version != 2:
        problems.append(
            f"fsdp_version: {version} (FSDP1; Axolotl's default when fsdp_config has no version) is not supported "
            "with adapter: sharelora: FSDP1 flattens each wrapped unit's parameters into one shard, so a LoRA module "
            "shared by layers in different units cannot be sharded; set fsdp_version: 2 (FSDP2 gives each shared "
            "module its own group), or use DeepSpeed ZeRO-2 (recipes/deepspeed/zero2.json)"
        )
    init = data.get("peft_init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(WEIGHT_REWRITING_INITS):
        problems.append(
            f"peft_init_lora_weights={init!r} rewrites each layer's base weight with that layer's own A/B, which "
            "shared A/B cannot do; use the default initialisation (remove the key, or true/'gaussian')"
        )
    peft = data.get("peft") or {}
    if isinstance(peft, dict) and peft.get("loftq_config"):
        problems.append(
            "peft.loftq_config (LoftQ) rewrites per-layer base weights; remove it for adapter: sharelora"
        )
    if data.get("relora"):
        problems.append(
            "relora merges and re-initialises LoRA per layer every cycle; remove relora for sharelora"
        )
    if data.get("peft_layer_replication"):
        problems.append(
            "peft_layer_replication changes the layer list after planning; remove it for sharelora"
        )
    if data.get("lora_target_parameters"):
        problems.append(
            "lora_target_parameters (ParamWrapper on raw parameters) has no lora_A/lora_B modules to share; "
            "use lora_target_modules"
        )
    layers = data.get("peft_layers_to_transform")
    sets = sl.get("share_sets")
    if layers is not None and sets:
        allowed = set(layers)
        for share_set in sets:
            if any(i not in allowed for i in share_set):
                problems.append(
                    f"peft_layers_to_transform={layers} excludes a layer of share set {share_set}; every layer of "
                    "a set must carry LoRA"
                )
    rl = str(data.get("rl") or "").lower().split(".")[-1]
    if rl in ("dpo", "ipo", "kto"):
        problems.append(
            f"rl: {data.get('rl')} hands only a LoRA config to TRL, which builds the adapter after the plugin's "
            "hooks, so the layers would not be tied; train ShareLoRA with supervised fine-tuning (no rl key)"
        )
    stage = _deepspeed_stage(data.get("deepspeed"))
    gradient = sl.get("metric") == rules.GRADIENT_METRIC
    if stage == 3 and not sl.get("plan_file"):
        problems.append(
            "DeepSpeed ZeRO-3 partitions the weights before the plugin can calibrate; run "
            "`sharelora plan --config <this yaml>` first and set sharelora.plan_file to the written sharelora_plan.json"
            + (
                " (with sharelora.metric: gradient_subspace that command runs one forward and backward pass per "
                "calibration batch on one device, without DeepSpeed, so that device must hold the whole base model "
                "and a batch's activations; lower sharelora.calibration.batch_size or max_length if it does not fit, "
                "or use metric angular, which needs only forward passes)"
                if gradient
                else ""
            )
        )
    if gradient and not sl.get("plan_file"):
        problems.extend(_gradient_metric_problems(data))
    gc_kwargs = data.get("gradient_checkpointing_kwargs") or {}
    distributed = (
        bool(data.get("deepspeed")) or int(os.environ.get("WORLD_SIZE", "1")) > 1 or bool(data.get("ddp"))
    )
    if data.get("gradient_checkpointing") and gc_kwargs.get("use_reentrant") is True and distributed:
        problems.append(
            "gradient_checkpointing_kwargs.use_reentrant: true with shared LoRA modules under DDP/DeepSpeed makes "
            "a shared parameter 'ready' twice per step; set use_reentrant: false (the default with sharelora)"
        )
    return problems


def _gradient_metric_problems(data: dict) -> list[str]:
    """What ``sharelora.metric: gradient_subspace`` cannot calibrate on (a ``plan_file`` avoids calibrating)."""
    problems = []
    for key in ("load_in_4bit", "load_in_8bit"):
        if data.get(key):
            problems.append(
                f"sharelora.metric: gradient_subspace is not supported with {key}: true (its backward passes would "
                "run through the quantized bitsandbytes layers); use metric angular, or make the plan on the "
                "unquantized model with "
                "`sharelora plan --config <this yaml>` (it loads the base in bf16/fp32) and set sharelora.plan_file "
                "to the written sharelora_plan.json"
            )
    if data.get("processor_type"):
        problems.append(
            "sharelora.metric: gradient_subspace is not supported for a visual-text model (processor_type is "
            f"{data.get('processor_type')!r}): its causal-LM loss would also score the image placeholder tokens "
            "and the model's own position handling is not applied, so the sketches would not be the training "
            "gradient's; use metric angular (calibrates on image+text samples), or a sharelora.plan_file"
        )
    return problems


class ShareLoRAArgs(BaseModel):
    """Plugin input args: adds the ``sharelora:`` block to Axolotl's config schema."""

    sharelora: ShareLoRAConfig | None = Field(
        default=None,
        description="ShareLoRA: share LoRA modules among similar decoder layers. Use with adapter: sharelora.",
    )

    @model_validator(mode="before")
    @classmethod
    def _check_combination(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        sl = data.get("sharelora")
        enabled = isinstance(sl, dict) and sl.get("enabled") or getattr(sl, "enabled", False)
        if enabled or data.get("adapter") == "sharelora":
            problems = incompatible_options(data)
            if problems:
                raise ValueError(
                    "adapter: sharelora cannot be used with this config:\n- " + "\n- ".join(problems)
                )
        return data
