"""The ``sharelora`` command: make a share plan, count parameters, show a saved plan.

::

    sharelora plan --config recipes/smollm2_sharelora.yml          # calibrate only (no training), write the plan
    sharelora plan --matrix outputs/smollm2_sharelora/sharelora_plan.json --threshold 0.8,0.85,0.9   # sweep
    sharelora plan --matrix similarity.csv --strategy optimal --contiguous --json
    sharelora plan --matrix outputs/smollm2_sharelora/sharelora_plan.json --threshold 0.85,0.9 --stability
    sharelora params --model-config configs/llama-7b.json --lora-r 8 \\
        --share-sets '[[16,17],[18,19],[20,21,22],[23,24,25,26,27],[28,29,30]]' --rank 9
    sharelora show outputs/smollm2_sharelora/sharelora_plan.json

Parameter counts come from the real PEFT model built on the ``meta`` device (no weights are allocated, so a
7B architecture takes seconds): LoRA is injected, the share sets are tied with the plugin's own
:func:`~sharelora_plugin.tying.tie_lora_modules`, and the distinct LoRA tensors inside the decoder layers are
counted, exactly what the plugin records in ``sharelora_plan.json``.

A problem with the user's input (a bad matrix, overlapping sets, a missing file, an invalid YAML value) is
printed as ``sharelora: error: <message>`` and the exit status is 2, like argparse's own usage errors.
Heavy libraries (torch, transformers, PEFT, Axolotl) are imported only by the commands that need them, so
``plan --matrix`` without ``--model-config``/``--output-dir`` runs on numpy and scipy alone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from sharelora_plugin.planning import (
    CALIBRATION_FILENAME,
    METRICS,
    STRATEGIES,
    PlanError,
    SharePlan,
    distinct_modules,
    expanded_rank,
    load_per_sample,
    load_similarity,
    make_plan,
    plan_with_stability,
    similarity_from_distances,
    validate_share_sets,
)
from sharelora_plugin.planning.rules import (
    DEFAULT_RANK as DEFAULT_LORA_R,
)
from sharelora_plugin.planning.rules import (
    DEFAULT_RESAMPLES,
    DEFAULT_SEED,
    DEFAULT_THRESHOLD,
    check_planning_options,
    check_resamples,
)

PROG = "sharelora"
EXIT_USAGE = 2
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


# --------------------------------------------------------------------------------------------------------------------
# Parameter counting on the meta device


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
    data = _read_json(path, "model config")
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


# --------------------------------------------------------------------------------------------------------------------
# Formatting


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
    if meta.get("plan_source"):
        lines.append(f"plan source: {meta['plan_source']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# Argument parsing


def _thresholds(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(
            f"expected a number or a comma list of numbers (e.g. 0.85 or 0.8,0.85,0.9); got {text!r}"
        )
    return values


def _share_sets(text: str) -> list:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(
            f"expected JSON like '[[16,17],[18,19,20]]'; got {text!r} ({err.msg})"
        ) from None
    if not isinstance(value, list):
        raise argparse.ArgumentTypeError(f"expected a JSON list of lists of layer indices; got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer; got {text!r}")
    return value


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number; got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number; got {text!r}")
    return value


def _add_rank_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--rank-expansion",
        action="store_true",
        help="ShareLoRA rank r' = floor(L / (L - sum|S_i| + |S|) * r) (paper's rank expansion)",
    )
    group.add_argument(
        "--rank", type=_positive_int, help="explicit ShareLoRA rank (the paper's runs used 9 with lora_r 8)"
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``sharelora`` argument parser (subcommands ``plan``, ``params``, ``show``)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="ShareLoRA: plan which decoder layers share LoRA modules, count parameters, show plans.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{plan,params,show}")

    plan = commands.add_parser(
        "plan",
        help="make a share plan from an Axolotl YAML (calibration only, no training) or a similarity matrix",
        description="Make a share plan. --config calibrates the YAML's base model (no training) and writes "
        "sharelora_plan.json and the heatmap to --output-dir or the YAML's output_dir; --matrix plans from an "
        "existing sharelora_plan.json or an L x L CSV without loading any model.",
    )
    source = plan.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="Axolotl YAML with a sharelora: block (loads the base model)")
    source.add_argument(
        "--matrix", help="sharelora_plan.json (its similarity) or an L x L CSV of similarities"
    )
    plan.add_argument(
        "--threshold",
        type=_thresholds,
        help="ε, or a comma list for a sweep table (default: the YAML's / the plan file's / 0.85)",
    )
    plan.add_argument("--strategy", choices=STRATEGIES, help="how share sets are chosen (default greedy)")
    plan.add_argument(
        "--contiguous", action="store_true", help="optimal only: sets are runs of adjacent layers"
    )
    plan.add_argument("--share-sets", type=_share_sets, help="strategy manual: JSON list of sets")
    plan.add_argument("--target-fraction", type=_number, help="choose ε so ShareLoRA keeps <= this fraction")
    plan.add_argument("--metric", choices=METRICS, help="similarity the threshold applies to")
    plan.add_argument("--seed", type=int, help=f"strategy random: seed (default {DEFAULT_SEED})")
    _add_rank_options(plan)
    plan.add_argument(
        "--lora-r", type=_positive_int, help="--matrix: base LoRA rank (default: the plan's or 8)"
    )
    plan.add_argument("--model-config", help="--matrix: architecture config for real parameter counts")
    plan.add_argument(
        "--target-modules",
        help=f"--matrix with --model-config: LoRA targets (default {DEFAULT_TARGET_MODULES})",
    )
    plan.add_argument(
        "--stability",
        action="store_true",
        help="--matrix: bootstrap each plan over the per-sample calibration file (sharelora_calibration.npz "
        "beside the plan file, or --calibration) and print how often each set comes back; no model is loaded",
    )
    plan.add_argument("--calibration", help="--matrix: the per-sample .npz (default: beside --matrix)")
    plan.add_argument(
        "--confidence",
        type=_number,
        help="robust planning: a pair is similar only when its lower bootstrap bound at this confidence clears ε",
    )
    plan.add_argument(
        "--resamples", type=int, help=f"bootstrap resamples (default {DEFAULT_RESAMPLES}, or the plan file's)"
    )
    plan.add_argument(
        "--bootstrap-seed",
        type=int,
        help="bootstrap seed (default: the plan file's, else the calibration seed)",
    )
    plan.add_argument("--output-dir", help="write sharelora_plan.json and the heatmap here")
    plan.add_argument("--json", action="store_true", help="print the plan (a list for a sweep) as JSON")
    plan.set_defaults(handler=_cmd_plan)

    params = commands.add_parser(
        "params",
        help="count LoRA vs ShareLoRA parameters of an architecture (meta device, no weights)",
        description="Count trainable LoRA parameters of plain LoRA and of ShareLoRA with the given share sets. "
        "The model is built on the meta device, so a 7B architecture takes seconds.",
    )
    params.add_argument("--model-config", required=True, help="config JSON (see configs/) or a model folder")
    params.add_argument("--lora-r", type=_positive_int, default=DEFAULT_LORA_R, help="LoRA rank (default 8)")
    params.add_argument(
        "--target-modules",
        default=DEFAULT_TARGET_MODULES,
        help="comma list, or all-linear (default %(default)s)",
    )
    params.add_argument("--share-sets", type=_share_sets, default=[], help="JSON list of share sets")
    params.add_argument("--layers-path", help="dotted path of the decoder layer list, if ambiguous")
    _add_rank_options(params)
    params.add_argument("--json", action="store_true", help="print the counts as JSON")
    params.set_defaults(handler=_cmd_params)

    show = commands.add_parser(
        "show", help="print a saved plan's summary", description="Summarise a plan file."
    )
    show.add_argument("plan_file", metavar="PLAN_JSON", help="a sharelora_plan.json")
    show.add_argument("--json", action="store_true", help="print the plan as JSON")
    show.set_defaults(handler=_cmd_show)
    return parser


# --------------------------------------------------------------------------------------------------------------------
# Commands


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, allow_nan=False))


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise PlanError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise PlanError(
            f"{path} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})"
        ) from None


def _cmd_params(args: argparse.Namespace) -> int:
    count = count_lora_parameters(
        load_model_config(args.model_config),
        parse_target_modules(args.target_modules),
        lora_r=args.lora_r,
        share_sets=args.share_sets,
        rank=args.rank,
        rank_expansion=args.rank_expansion,
        layers_path=args.layers_path,
    )
    if args.json:
        _print_json(count.to_dict())
        return 0
    sets = validate_share_sets(args.share_sets, count.num_layers)
    print(f"model config: {args.model_config} ({count.architecture}, {count.num_layers} decoder layers)")
    print(f"target modules: {', '.join(count.target_modules)}")
    print(f"share sets: {json.dumps(sets) if sets else 'none'}")
    print(params_line(count))
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    plan = SharePlan.load(args.plan_file)
    if args.json:
        _print_json(plan.to_dict())
    else:
        print(show_text(plan))
    return 0


def _rank_expansion(args: argparse.Namespace) -> bool | int | None:
    if args.rank is not None:
        return args.rank
    return True if args.rank_expansion else None


def _cmd_plan(args: argparse.Namespace) -> int:
    if args.config:
        misplaced = [
            flag
            for flag, value in (
                ("--lora-r", args.lora_r),
                ("--model-config", args.model_config),
                ("--target-modules", args.target_modules),
                ("--calibration", args.calibration),
                ("--resamples", args.resamples),
                ("--bootstrap-seed", args.bootstrap_seed),
            )
            if value is not None
        ]
        if misplaced:
            raise PlanError(
                f"{', '.join(misplaced)} only apply to --matrix; with --config they come from the YAML "
                "(lora_r, lora_target_modules, sharelora.calibration) and its base model; a plan made from a "
                "config always carries its bootstrap stability"
            )
        return _plan_from_config(args)
    return _plan_from_matrix(args)


def _sweep_checks(args: argparse.Namespace, thresholds: list[float]) -> None:
    if len(thresholds) > 1 and args.target_fraction is not None:
        raise PlanError("give either a --threshold sweep or --target-fraction, not both")
    if len(thresholds) > 1 and args.output_dir and not args.config:
        raise PlanError("--output-dir writes one plan; give a single --threshold (or none) to write it")


def _similarity_for_metric(path: str, matrix: Any, source: dict, metric: str | None) -> tuple[Any, str]:
    """The matrix for ``metric``: the stored one, or (for a plan file) the other metric from its metadata."""
    stored = source.get("metric", "angular") if source else None
    if metric is None or not source or metric == stored:
        return matrix, metric or stored or "angular"
    meta = source.get("metadata") or {}
    if metric == "cosine" and meta.get("cosine") is not None:
        return meta["cosine"], metric
    if metric == "angular" and meta.get("angular_distance") is not None:
        import numpy as np

        return (1.0 - np.asarray(meta["angular_distance"], dtype=float)).tolist(), metric
    raise PlanError(f"{path} holds a {stored} similarity and no {metric} matrix in its metadata")


def _bootstrap_inputs(
    args: argparse.Namespace, source: dict, metric: str, num_layers: int
) -> tuple[Any, dict[str, Any]]:
    """Per-sample similarities for ``metric`` from the calibration .npz, and the bootstrap settings: the flags,
    else those stored in the plan file (so the same ε reproduces the stored report), else the defaults."""
    path = Path(args.calibration) if args.calibration else Path(args.matrix).parent / CALIBRATION_FILENAME
    if not args.calibration and not source:
        raise PlanError(
            f"{args.matrix} is not a sharelora_plan.json; pass the per-sample file with --calibration"
        )
    angular, cosine = load_per_sample(path)
    if angular.shape[1] != num_layers:
        raise PlanError(
            f"{path} holds {angular.shape[1]}-layer matrices but {args.matrix} is {num_layers} x {num_layers}"
        )
    stored = source.get("stability") or {}
    calibration = (source.get("metadata") or {}).get("calibration") or {}
    seed = args.bootstrap_seed
    if seed is None:
        seed = stored.get("seed", calibration.get("seed", DEFAULT_SEED))
    resamples = check_resamples(
        args.resamples if args.resamples is not None else stored.get("resamples", DEFAULT_RESAMPLES),
        "--resamples",
    )
    if resamples == 0:
        raise PlanError(
            "--resamples 0 turns the bootstrap off; --stability and --confidence need at least 10"
        )
    samples = similarity_from_distances(angular, cosine, metric)
    return samples, {"resamples": resamples, "bootstrap_seed": int(seed)}


def _plan_from_matrix(args: argparse.Namespace) -> int:
    matrix, source = load_similarity(args.matrix)
    similarity, metric = _similarity_for_metric(args.matrix, matrix, source, args.metric)
    base_rank = args.lora_r or source.get("base_rank") or DEFAULT_LORA_R
    thresholds = args.threshold or [source.get("threshold") or DEFAULT_THRESHOLD]
    _sweep_checks(args, thresholds)
    strategy = args.strategy or "greedy"
    check_planning_options(
        strategy=strategy,
        contiguous=args.contiguous,
        share_sets=args.share_sets,
        target_fraction=args.target_fraction,
        confidence=args.confidence,
        prefix="--",
    )
    inherited = {
        key: value for key, value in (source.get("metadata") or {}).items() if key not in PARAM_METADATA_KEYS
    }
    options = {
        "strategy": strategy,
        "metric": metric,
        "share_sets": args.share_sets,
        "contiguous": args.contiguous,
        "seed": DEFAULT_SEED if args.seed is None else args.seed,
        "rank": base_rank,
        "rank_expansion": _rank_expansion(args) or False,
        "target_fraction": args.target_fraction,
        # a plan made for a model whose layer list mixes kinds keeps its sets within one kind
        "layer_kinds": source.get("layer_kinds"),
        "layer_kind_descriptions": source.get("layer_kind_descriptions"),
    }
    samples = None
    if args.stability or args.confidence is not None:
        samples, bootstrap = _bootstrap_inputs(args, source, metric, len(matrix))
        options.update(bootstrap, confidence=args.confidence)
    elif args.calibration or args.resamples is not None or args.bootstrap_seed is not None:
        raise PlanError("--calibration, --resamples and --bootstrap-seed need --stability (or --confidence)")
    plans = []
    for threshold in thresholds:
        if samples is None:
            plan = make_plan(num_layers=len(matrix), similarity=similarity, threshold=threshold, **options)
        else:
            plan = plan_with_stability(samples, similarity, threshold=threshold, **options)
        plan.metadata.update(inherited)
        plan.metadata["similarity_source"] = str(args.matrix)
        plans.append(plan)

    counts = None
    if args.model_config:
        model_config = load_model_config(args.model_config)
        targets = parse_target_modules(args.target_modules or DEFAULT_TARGET_MODULES)
        counts = []
        for plan in plans:
            count = count_lora_parameters(
                model_config,
                targets,
                lora_r=plan.base_rank,
                share_sets=plan.share_sets,
                rank=plan.rank,
            )
            if count.num_layers != plan.num_layers:
                raise PlanError(
                    f"{args.matrix} is {plan.num_layers} x {plan.num_layers} but {args.model_config} has "
                    f"{count.num_layers} decoder layers; use the matrix and config of one model"
                )
            plan.metadata.update(count.metadata())
            plan.metadata["model_config"] = str(args.model_config)
            counts.append(count)
    elif args.target_modules:
        raise PlanError("--target-modules needs --model-config (the architecture to count parameters on)")

    written = []
    if args.output_dir:
        from sharelora_plugin.workflow import save_plan_artifacts

        written = save_plan_artifacts(plans[0], args.output_dir)
    if args.json:
        _print_json([plan.to_dict() for plan in plans] if len(plans) > 1 else plans[0].to_dict())
    elif samples is not None:
        print(f"similarity: {args.matrix} ({metric}, {plans[0].num_layers} layers), strategy {strategy}")
        for plan in plans:
            print()
            print(plan.summary_table())
        if len(plans) > 1:
            print()
            print(sweep_table(plans, counts))
    elif len(plans) > 1:
        print(f"similarity: {args.matrix} ({metric}, {plans[0].num_layers} layers), strategy {strategy}")
        print(sweep_table(plans, counts))
    else:
        print(plans[0].summary_table())
        print(params_line(counts[0]) if counts else sweep_table(plans, None))
    for path in written:
        print(f"wrote {path}", file=sys.stderr if args.json else sys.stdout)
    return 0


def _setting_overrides(args: argparse.Namespace, single_threshold: float | None) -> dict[str, Any]:
    """``sharelora:`` keys set on the command line."""
    overrides: dict[str, Any] = {}
    if single_threshold is not None:
        overrides["threshold"] = single_threshold
    if args.strategy is not None:
        overrides["strategy"] = args.strategy
        if args.strategy != "manual":
            overrides["share_sets"] = None
        if args.strategy != "optimal":
            overrides["contiguous"] = False
    if args.contiguous:
        overrides["contiguous"] = True
    if args.share_sets is not None:
        overrides["share_sets"] = args.share_sets
    if args.target_fraction is not None:
        overrides["target_fraction"] = args.target_fraction
    if args.metric is not None:
        overrides["metric"] = args.metric
    if args.seed is not None:
        overrides["seed"] = args.seed
    if args.confidence is not None:
        overrides["confidence"] = args.confidence
    expansion = _rank_expansion(args)
    if expansion is not None:
        overrides["rank_expansion"] = expansion
    return overrides


@contextlib.contextmanager
def _axolotl_session() -> Iterator[None]:
    """Axolotl logs to stdout and tees stdout/stderr into output_dir/debug.log once a config is loaded. Inside
    this block its log handlers write to stderr (stdout is for the table or ``--json``); afterwards the handlers
    and, if this block installed it, the tee are put back as they were."""
    import axolotl.cli  # noqa: F401  (configures Axolotl's logging)
    from axolotl.utils import tee

    moved: list[tuple[logging.StreamHandler, Any]] = []
    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stdout, sys.__stdout__):
                moved.append((handler, handler.setStream(sys.stderr)))
    tee_was_open = tee._log_path is not None
    try:
        yield
    finally:
        if not tee_was_open:
            tee.close_debug_log()
        for handler, stream in moved:
            handler.setStream(stream)


def _load_base_model(cfg: Any):
    """The YAML's base model for calibration: bf16 when ``bf16: true`` else fp32, on CUDA when available; a
    config with a ``vision_config`` (LLaVA) loads as an image-text-to-text model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    trust = bool(cfg.trust_remote_code)
    config = AutoConfig.from_pretrained(cfg.base_model_config or cfg.base_model, trust_remote_code=trust)
    auto_class = (
        AutoModelForImageTextToText if getattr(config, "vision_config", None) else AutoModelForCausalLM
    )
    dtype = torch.bfloat16 if cfg.bf16 is True else torch.float32
    model = auto_class.from_pretrained(cfg.base_model, config=config, dtype=dtype, trust_remote_code=trust)
    if torch.cuda.is_available():
        model = model.to("cuda")
    return model.eval()


def _config_target_modules(cfg: Any) -> str | list[str] | None:
    # Axolotl adds every linear layer for lora_target_linear; inside decoder layers that is PEFT's all-linear.
    if cfg.lora_target_linear:
        return "all-linear"
    return parse_target_modules(cfg.lora_target_modules)


def _plan_from_config(args: argparse.Namespace) -> int:
    from sharelora_plugin.args import ShareLoRAConfig

    path = Path(args.config)
    if not path.is_file():
        raise PlanError(f"config not found: {path}")
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(raw, dict):
        raise PlanError(f"{path} must be an Axolotl YAML mapping")
    thresholds = args.threshold or []
    _sweep_checks(args, thresholds or [0.0])
    overrides = _setting_overrides(args, thresholds[0] if len(thresholds) == 1 else None)
    block = raw.get("sharelora") or {}
    if not isinstance(block, dict):
        raise PlanError(f"{path}: sharelora must be a mapping of settings")
    ShareLoRAConfig(**{**block, **overrides})  # fail before seconds of imports and model loading
    if raw.get("adapter") != "sharelora":
        print(
            f"{PROG}: warning: {path} does not set adapter: sharelora; planning with its sharelora: block",
            file=sys.stderr,
        )

    with _axolotl_session():
        from axolotl.cli.config import load_cfg
        from axolotl.loaders import load_tokenizer

        from sharelora_plugin import workflow

        cfg = load_cfg(str(path))
        settings = workflow.sharelora_settings(cfg)
        settings.update(overrides)
        cfg["sharelora"] = ShareLoRAConfig(**settings).model_dump()
        output_dir = args.output_dir or cfg.output_dir
        if not output_dir:
            raise PlanError(f"{path} has no output_dir; pass --output-dir")
        model = _load_base_model(cfg)
        tokenizer = load_tokenizer(cfg)
        plan, source, per_sample = workflow.make_or_load_plan(cfg, model, lambda: tokenizer)
        model_config = model.config
        del model
        base_rank = int(cfg.lora_r or DEFAULT_LORA_R)
        targets = _config_target_modules(cfg)
        layers_path = cfg["sharelora"]["layers_path"]

        def count(candidate: SharePlan) -> ParamCount:
            return count_lora_parameters(
                model_config,
                targets,
                lora_r=base_rank,
                share_sets=candidate.share_sets,
                rank=candidate.rank,
                layers_path=layers_path,
            )

        plan_count = count(plan)
        plan.metadata.update(plan_count.metadata())
        plan.metadata.setdefault("model", str(cfg.base_model))
        plan.metadata["plan_source"] = source
        written = workflow.save_plan_artifacts(
            plan, output_dir, heatmap=cfg["sharelora"]["save_heatmap"], per_sample=per_sample
        )
        sweep: list[SharePlan] = []
        if len(thresholds) > 1 and plan.similarity is not None:
            options = workflow.plan_options(
                cfg["sharelora"], base_rank, plan.layer_kinds, plan.layer_kind_descriptions
            )
            options["target_fraction"] = None
            for threshold in thresholds:
                options["threshold"] = threshold
                if per_sample is not None:
                    samples = similarity_from_distances(*per_sample, plan.metric)
                    sweep.append(plan_with_stability(samples, plan.similarity, **options))
                else:
                    for key in ("resamples", "bootstrap_seed", "confidence"):
                        options.pop(key, None)
                    sweep.append(make_plan(num_layers=plan.num_layers, similarity=plan.similarity, **options))
        sweep_counts = [count(candidate) for candidate in sweep]

    if args.json:
        _print_json([candidate.to_dict() for candidate in sweep] if sweep else plan.to_dict())
    else:
        print(show_text(plan))
        if sweep:
            print(f"\nsweep (the plan written uses ε={plan.threshold}):")
            print(sweep_table(sweep, sweep_counts))
    for written_path in written:
        print(f"wrote {written_path}", file=sys.stderr if args.json else sys.stdout)
    return 0


# --------------------------------------------------------------------------------------------------------------------
# Entry point


def _error_message(err: BaseException) -> str:
    if isinstance(err, ValidationError):
        parts = []
        for problem in err.errors():
            where = ".".join(str(item) for item in problem.get("loc", ()))
            message = str(problem.get("msg", "")).removeprefix("Value error, ")
            parts.append(f"{where}: {message}" if where else message)
        return "; ".join(parts)
    if isinstance(err, FileNotFoundError) and err.filename:
        return f"file not found: {err.filename}"
    return str(err)


USER_ERRORS = (PlanError, ValidationError, ValueError, FileNotFoundError, OSError, yaml.YAMLError)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``sharelora`` command; returns the exit status (0, or 2 for a usage or input error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse: --help (0) or a usage error (2), already printed
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    try:
        return args.handler(args)
    except USER_ERRORS as err:
        print(f"{PROG}: error: {_error_message(err)}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
