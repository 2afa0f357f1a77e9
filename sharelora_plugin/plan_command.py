"""``sharelora plan``: a share plan from a similarity matrix (``--matrix``: numpy and scipy only, optionally with
a bootstrap over the per-sample calibration file) or from an Axolotl YAML (``--config``: loads the base model
and runs the plugin's own calibration and planning, :func:`sharelora_plugin.workflow.make_or_load_plan`, without
training)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from sharelora_plugin.params import (
    DEFAULT_TARGET_MODULES,
    PARAM_METADATA_KEYS,
    ParamCount,
    count_lora_parameters,
    load_model_config,
    parse_target_modules,
)
from sharelora_plugin.planning import (
    CALIBRATION_FILENAME,
    PlanError,
    SharePlan,
    load_per_sample,
    load_similarity,
    make_plan,
    plan_with_stability,
    similarity_from_distances,
)
from sharelora_plugin.planning.rules import DEFAULT_RANK as DEFAULT_LORA_R
from sharelora_plugin.planning.rules import (
    DEFAULT_RESAMPLES,
    DEFAULT_SEED,
    DEFAULT_THRESHOLD,
    GRADIENT_METRIC,
    check_gradient_threshold,
    check_planning_options,
    check_resamples,
)
from sharelora_plugin.planning.subspace import SKETCH_FILENAME, SubspaceSketches
from sharelora_plugin.reports import PROG, params_line, print_json, show_text, sweep_table


def _rank_expansion(args: argparse.Namespace) -> bool | int | None:
    if args.rank is not None:
        return args.rank
    return True if args.rank_expansion else None


def run_plan(args: argparse.Namespace) -> int:
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
    """What the bootstrap resamples for ``metric`` (per-sample similarities from the calibration .npz, or the
    gradient sketches from ``sharelora_sketches.npz`` for ``gradient_subspace``), and the bootstrap settings: the
    flags, else those stored in the plan file (so the same ε reproduces the stored report), else the defaults."""
    gradient = metric == GRADIENT_METRIC
    beside = SKETCH_FILENAME if gradient else CALIBRATION_FILENAME
    path = Path(args.calibration) if args.calibration else Path(args.matrix).parent / beside
    if not args.calibration and not source:
        kind = "gradient sketch file (sharelora_sketches.npz)" if gradient else "per-sample file"
        raise PlanError(f"{args.matrix} is not a sharelora_plan.json; pass the {kind} with --calibration")
    if gradient:
        samples: Any = SubspaceSketches.load(path)
        file_layers = samples.num_layers
    else:
        angular, cosine = load_per_sample(path)
        samples = similarity_from_distances(angular, cosine, metric)
        file_layers = angular.shape[1]
    if file_layers != num_layers:
        raise PlanError(
            f"{path} holds {file_layers}-layer {'sketches' if gradient else 'matrices'} but {args.matrix} is "
            f"{num_layers} x {num_layers}"
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
    return samples, {"resamples": resamples, "bootstrap_seed": int(seed)}


def _plan_from_matrix(args: argparse.Namespace) -> int:
    matrix, source = load_similarity(args.matrix)
    similarity, metric = _similarity_for_metric(args.matrix, matrix, source, args.metric)
    base_rank = args.lora_r or source.get("base_rank") or DEFAULT_LORA_R
    strategy = args.strategy or "greedy"
    check_gradient_threshold(
        metric,
        strategy,
        threshold_given=bool(args.threshold or source.get("threshold")),
        target_fraction=args.target_fraction,
        threshold_key="--threshold",
        fraction_key="--target-fraction",
    )
    thresholds = args.threshold or [source.get("threshold") or DEFAULT_THRESHOLD]
    _sweep_checks(args, thresholds)
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
        print_json([plan.to_dict() for plan in plans] if len(plans) > 1 else plans[0].to_dict())
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


def _planning_only_overrides(raw: dict) -> dict[str, Any]:
    """Keys of the YAML that concern training, not planning, switched off for ``plan --config``: it loads the base
    unquantized on one device (``_load_base_model``), so a 4-bit/8-bit or ZeRO-3 training YAML, whose validation
    asks for a plan file made this way, can be planned from as it is."""
    return {key: None for key in ("deepspeed", "load_in_4bit", "load_in_8bit") if raw.get(key)}


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

        cfg = load_cfg(str(path), **_planning_only_overrides(raw))
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
                    samples = (
                        per_sample
                        if isinstance(per_sample, SubspaceSketches)
                        else similarity_from_distances(*per_sample, plan.metric)
                    )
                    sweep.append(plan_with_stability(samples, plan.similarity, **options))
                else:
                    for key in ("resamples", "bootstrap_seed", "confidence"):
                        options.pop(key, None)
                    sweep.append(make_plan(num_layers=plan.num_layers, similarity=plan.similarity, **options))
        sweep_counts = [count(candidate) for candidate in sweep]

    if args.json:
        print_json([candidate.to_dict() for candidate in sweep] if sweep else plan.to_dict())
    else:
        print(show_text(plan))
        if sweep:
            print(f"\nsweep (the plan written uses ε={plan.threshold}):")
            print(sweep_table(sweep, sweep_counts))
    for written_path in written:
        print(f"wrote {written_path}", file=sys.stderr if args.json else sys.stdout)
    return 0
