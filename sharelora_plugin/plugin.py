"""Axolotl hooks for ShareLoRA — wiring only; the work lives in workflow/calibration/planning/tying.

Hook                     What ShareLoRA does there
-----------------------  ----------------------------------------------------------------------------------
register (raw YAML)      ``adapter: sharelora`` → Axolotl's ``lora`` (``qlora`` with ``load_in_4bit``) so every
                         code path keyed on those names (gradient checkpointing, BnB 8/4-bit loading, k-bit
                         prep, LoRA kernels, merge) treats it exactly like LoRA; ``sharelora.enabled`` marks it.
                         Gradient checkpointing defaults to non-reentrant (shared params + DDP need it).
get_input_args           the ``sharelora:`` block (``args.ShareLoRAArgs``), validated with the config
get_adapter_capabilities ``sharelora`` is a LoRA-like adapter (for configs validated without ``register``)
load_datasets            nothing but a CPU-only multi-process fix of Axolotl's device_map (datasets load as usual)
pre_lora_load            plan: saved plan (plan_file / lora_model_dir / resumed checkpoint) or calibrate (with
                         its bootstrap stability, stopping early when configured); the plan's rank becomes
                         ``lora_r`` before PEFT builds modules
post_lora_load           tie lora_A/lora_B of each share set to the leader's; verify; log; write the plan
                         (``fsdp_version: 2``: shard each tied module once, complete the final adapter)
add_callbacks_post_trainer  copy the plan (and the per-sample calibration file) into every checkpoint; gradient
                         sketches (metric gradient_subspace, up to 1 GiB) are written to output_dir only
post_train               check the ties survived training
"""

from __future__ import annotations

from typing import Any

from axolotl.integrations.base import AdapterCapabilities, BasePlugin
from transformers import TrainerCallback

from sharelora_plugin import distributed, fsdp, workflow
from sharelora_plugin.args import config_value
from sharelora_plugin.planning import SharePlan
from sharelora_plugin.planning.subspace import SubspaceSketches
from sharelora_plugin.tying import (
    tie_layout_fingerprint,
    tie_lora_modules,
    trainable_checksum,
    unique_trainable_parameters,
    verify_ties,
)

LOG = distributed.main_process_logger()
ADAPTER = "sharelora"


def _enabled(cfg: Any) -> bool:
    return bool(config_value(config_value(cfg, "sharelora"), "enabled"))


def alias_adapter(cfg: Any) -> None:
    """Rewrite ``adapter: sharelora`` in place to the built-in LoRA adapter it behaves as."""
    if cfg.get("adapter") != ADAPTER:
        return
    cfg["adapter"] = "qlora" if cfg.get("load_in_4bit") else "lora"
    block = cfg.get("sharelora")
    if block is None:
        block = {}
    elif not isinstance(block, dict):
        block = dict(block)
    block["enabled"] = True
    cfg["sharelora"] = block
    gc_kwargs = cfg.get("gradient_checkpointing_kwargs") or {}
    if cfg.get("gradient_checkpointing") and "use_reentrant" not in gc_kwargs:
        cfg["gradient_checkpointing_kwargs"] = {**dict(gc_kwargs), "use_reentrant": False}


class PlanCheckpointCallback(TrainerCallback):
    """Writes the plan into every ``checkpoint-N`` folder so resume and reload can re-tie from it."""

    def __init__(self, plan: SharePlan, heatmap: bool, per_sample=None):
        self.plan = plan
        self.heatmap = heatmap
        self.per_sample = per_sample

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = f"{args.output_dir}/checkpoint-{state.global_step}"
            workflow.save_plan_artifacts(self.plan, folder, heatmap=self.heatmap, per_sample=self.per_sample)
        return control


class ShareLoRAPlugin(BasePlugin):
    """``plugins: [sharelora_plugin.ShareLoRAPlugin]`` + ``adapter: sharelora``."""

    def __init__(self):
        super().__init__()
        self.plan: SharePlan | None = None
        self.plan_source: str | None = None
        self.per_sample = None  # per-sample calibration matrices, on the process that has them
        self._aliased_from: dict[int, Any] = {}

    def register(self, cfg: dict):
        self._aliased_from[id(cfg)] = cfg.get("adapter")
        alias_adapter(cfg)
        if _enabled(cfg):
            distributed.init_cpu_process_group()
            fsdp.use_fsdp2_on_cpu(cfg)

    def on_config_validation_error(self, cfg: dict):
        original = self._aliased_from.pop(id(cfg), None)
        if original == ADAPTER:
            cfg["adapter"] = ADAPTER

    def get_input_args(self) -> str:
        return "sharelora_plugin.args.ShareLoRAArgs"

    def get_adapter_capabilities(self) -> list[AdapterCapabilities]:
        return [AdapterCapabilities(name=ADAPTER, lora_like=True)]

    def load_datasets(self, cfg, preprocess: bool = False):
        # The first hook after Axolotl's normalize_config, which maps each rank to accelerator index
        # LOCAL_RANK even on a CPU-only machine; there, multi-process (gloo) ranks load onto the CPU.
        # Returns None: Axolotl loads the datasets as usual.
        if _enabled(cfg) and distributed.cpu_only_multiprocess():
            cfg.device_map = {"": "cpu"}
        return None

    def pre_model_load(self, cfg):
        if cfg.adapter == ADAPTER:  # validated without register(): alias now so model loading matches LoRA
            alias_adapter(cfg)
        if not _enabled(cfg):
            return
        LOG.info("ShareLoRA enabled (LoRA path: adapter=%s)", cfg.adapter)

    def pre_lora_load(self, cfg, model):
        if not _enabled(cfg):
            return
        from axolotl.loaders import load_tokenizer

        self.plan, self.plan_source, self.per_sample = workflow.make_or_load_plan(
            cfg, model, lambda: load_tokenizer(cfg)
        )
        if cfg.lora_model_dir is None and cfg.lora_r != self.plan.rank:
            LOG.info("ShareLoRA: lora_r %s -> %s (rank expansion)", cfg.lora_r, self.plan.rank)
            cfg.lora_r = self.plan.rank

    def post_lora_load(self, cfg, model):
        if not _enabled(cfg) or self.plan is None:
            return
        settings = workflow.sharelora_settings(cfg)
        loaded_weights = bool(cfg.lora_model_dir)
        report = tie_lora_modules(
            model, self.plan.share_sets, layers_path=settings["layers_path"], require_equal=loaded_weights
        )
        verify_ties(model, self.plan.share_sets, layers_path=report.layers_path)
        fsdp.prepare_fsdp2(cfg, self.plan.share_sets, report.layers_path)  # no-op unless fsdp_version: 2
        self.plan.metadata.update(
            {
                "adapter": ADAPTER,
                "layers_path": report.layers_path,
                "target_modules": report.target_modules,
                "lora_params": report.lora_params_untied * self.plan.base_rank // self.plan.rank,
                "lora_params_at_final_rank": report.lora_params_untied,
                "sharelora_params": report.lora_params_tied,
                "trainable_params": unique_trainable_parameters(model),
                "plan_source": self.plan_source,
            }
        )
        LOG.info(
            "ShareLoRA plan (%s):\n%s\nLoRA params %s -> ShareLoRA params %s (%.1f%%); trainable total %s",
            self.plan_source,
            self.plan.summary_table(),
            f"{self.plan.metadata['lora_params']:,}",
            f"{report.lora_params_tied:,}",
            100.0 * report.lora_params_tied / max(1, self.plan.metadata["lora_params"]),
            f"{self.plan.metadata['trainable_params']:,}",
        )
        # every process logs what it built: a multi-process run must show one plan and one layout
        distributed.log_all_ranks(
            "ShareLoRA rank %d: plan %s, tie layout %s",
            distributed.process_index(),
            self.plan.fingerprint(),
            tie_layout_fingerprint(model, layers_path=report.layers_path),
        )
        if cfg.output_dir and distributed.is_main_process():
            written = workflow.save_plan_artifacts(
                self.plan, cfg.output_dir, heatmap=settings["save_heatmap"], per_sample=self.per_sample
            )
            LOG.info("ShareLoRA: wrote %s", ", ".join(str(p) for p in written))
        if isinstance(self.per_sample, SubspaceSketches):
            # written once above; too large (up to 1 GiB) to hold through training or copy into every checkpoint
            self.per_sample = None

    def add_callbacks_post_trainer(self, cfg, trainer):
        if not _enabled(cfg) or self.plan is None:
            return []
        heatmap = workflow.sharelora_settings(cfg)["save_heatmap"]
        return [PlanCheckpointCallback(self.plan, heatmap, self.per_sample)]

    def post_train(self, cfg, model):
        if _enabled(cfg) and self.plan is not None:
            verify_ties(model, self.plan.share_sets, layers_path=self.plan.metadata.get("layers_path"))
            distributed.log_all_ranks(
                "ShareLoRA rank %d: ties hold after training; trainable checksum %s",
                distributed.process_index(),
                trainable_checksum(model),
            )
