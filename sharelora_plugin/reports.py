"""Text reports of plans and parameter counts: the ``params`` line, the threshold-sweep table and ``show``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from sharelora_plugin.params import ParamCount
from sharelora_plugin.planning import SharePlan

PROG = "sharelora"


def print_json(value: Any) -> None:
    """Print ``value`` as indented JSON (strict: no NaN)."""
    print(json.dumps(value, indent=2, allow_nan=False))


def _millions(count: int) -> str:
    return f"{count / 1e6:.1f}M"


def params_line(count: ParamCount) -> str:
    """One line: LoRA vs ShareLoRA parameters and the fraction."""
    return (
        f"LoRA params (r={count.lora_r}): {count.lora_params:,} ({_millions(count.lora_params)}); "
        f"ShareLoRA params (r={count.rank}, {count.distinct_modules}/{count.num_layers} distinct modules): "
        f"{count.sharelora_params:,} ({_millions(count.sharelora_params)}); fraction {count.fraction:.4f}"
    )


def sweep_table(plans: Sequence[SharePlan], counts: Sequence[ParamCount] | None) -> str:
    """One row per plan: ε, sets, layers shared, distinct modules, rank, LoRA and ShareLoRA params, fraction.

    Without ``counts`` the parameters are in per-layer units: one decoder layer's LoRA at the base rank is one
    unit, so LoRA is ``L`` units and ShareLoRA ``distinct * rank / base_rank`` units.
    """
    if counts is None:
        header = "parameters in per-layer units (one decoder layer's LoRA at rank r = 1; pass --model-config for counts)"
    else:
        header = f"parameters of {counts[0].architecture} LoRA on {', '.join(counts[0].target_modules)}"
    lines = [
        header,
        f"{'ε':>7}  {'sets':>4}  {'shared':>6}  {'distinct':>8}  {'rank':>4}  {'LoRA params':>13}  "
        f"{'ShareLoRA params':>16}  {'fraction':>8}",
    ]
    for number, plan in enumerate(plans):
        threshold = "-" if plan.threshold is None else f"{plan.threshold:.4g}"
        if counts is None:
            lora = f"{plan.num_layers:.2f}"
            shared = f"{plan.distinct_modules * plan.rank / plan.base_rank:.2f}"
            fraction = plan.param_fraction
        else:
            count = counts[number]
            lora, shared, fraction = f"{count.lora_params:,}", f"{count.sharelora_params:,}", count.fraction
        lines.append(
            f"{threshold:>7}  {len(plan.share_sets):>4}  {plan.layers_covered:>6}  "
            f"{plan.distinct_modules:>4}/{plan.num_layers:<3}  {plan.rank:>4}  {lora:>13}  {shared:>16}  "
            f"{fraction:>8.4f}"
        )
    return "\n".join(lines)


def show_text(plan: SharePlan) -> str:
    """The plan's summary table plus what its metadata records: model, targets, params, calibration."""
    meta = plan.metadata
    lines = [plan.summary_table()]
    if meta.get("model"):
        lines.append(f"model: {meta['model']}")
    if meta.get("target_modules"):
        lines.append(
            f"target modules: {', '.join(meta['target_modules'])} (decoder layers at {meta.get('layers_path', '?')})"
        )
    lora, shared = meta.get("lora_params"), meta.get("sharelora_params")
    if isinstance(lora, int) and isinstance(shared, int) and lora > 0:
        lines.append(
            f"LoRA params (r={plan.base_rank}): {lora:,} ({_millions(lora)}); ShareLoRA params "
            f"(r={plan.rank}): {shared:,} ({_millions(shared)}); fraction {shared / lora:.4f}"
        )
    else:
        lines.append(
            f"parameters: not recorded; per-layer units LoRA {plan.num_layers} -> ShareLoRA "
            f"{plan.distinct_modules * plan.rank / plan.base_rank:.2f} (`sharelora params` counts them)"
        )
    if isinstance(meta.get("trainable_params"), int):
        lines.append(f"trainable params (whole model, shared counted once): {meta['trainable_params']:,}")
    calibration = meta.get("calibration")
    if isinstance(calibration, dict) and calibration:
        checks = calibration.get("stability_checks")
        lines.append(
            "calibration: "
            + ", ".join(f"{key}={value}" for key, value in calibration.items() if key != "stability_checks")
        )
        if isinstance(checks, list) and checks:
            trail = ", ".join(
                f"{check.get('num_samples')}: {'-' if check.get('plan_frequency') is None else check['plan_frequency']}"
                for check in checks
                if isinstance(check, dict)
            )
            lines.append(
                f"stop when stable: stopped after {calibration.get('num_samples')} of at most "
                f"{calibration.get('num_samples_cap')} samples ({calibration.get('stop_reason')}); "
                f"plan frequency by samples: {trail}"
            )
    if (
        plan.metric == "gradient_subspace"
        and isinstance(calibration, dict)
        and calibration.get("sketch_rank")
    ):
        level = calibration.get("random_level")
        lines.append(
            f"gradient-subspace overlap: k={calibration['sketch_rank']} sketch columns, "
            f"{calibration.get('sketch_blocks')} blocks ({calibration.get('sketch_bytes', 0) / 2**20:.1f} MiB, "
            "sharelora_sketches.npz); unrelated layers sit near the random level"
            + (f" {level:.4f}" if isinstance(level, int | float) else "")
            + ", identical ones at 1"
        )
    if meta.get("plan_source"):
        lines.append(f"plan source: {meta['plan_source']}")
    return "\n".join(lines)
