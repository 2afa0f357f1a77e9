"""The ShareLoRA steps as the plugin and the CLI run them: find or make the plan, apply it, write it out.

This is the one place that joins config (``args``), calibration, planning and tying; each of those stays
ignorant of the others.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from sharelora_plugin.args import config_value
from sharelora_plugin.calibration import CalibrationResult, calibrate, text_batches
from sharelora_plugin.distributed import LOG, distributed_state, process_index
from sharelora_plugin.gradient_sketch import collect_sketches
from sharelora_plugin.layer_kinds import layer_kinds
from sharelora_plugin.layers import find_decoder_layers
from sharelora_plugin.multimodal import (
    calibration_image_roots,
    is_multimodal,
    load_calibration_processor,
    training_chat_template,
    vision_dtype,
    visual_text_batches,
)
from sharelora_plugin.planning import (
    CALIBRATION_FILENAME,
    PlanError,
    SharePlan,
    StopWhenStable,
    load_per_sample,
    make_plan,
    plan_with_stability,
    save_per_sample,
    similarity_from_distances,
)
from sharelora_plugin.planning.rules import GRADIENT_METRIC, check_layer_kinds
from sharelora_plugin.planning.subspace import SKETCH_FILENAME, SubspaceSketches, random_level

PLAN_FILENAME = "sharelora_plan.json"
HEATMAP_FILENAME = "sharelora_similarity.png"


def sharelora_settings(cfg: Any) -> dict:
    """The ``sharelora:`` block as a plain dict with defaults filled in (works on a validated Axolotl cfg)."""
    from sharelora_plugin.args import ShareLoRAConfig

    block = config_value(cfg, "sharelora") or {}
    if hasattr(block, "to_dict"):
        block = block.to_dict()
    elif hasattr(block, "model_dump"):
        block = block.model_dump()
    return ShareLoRAConfig(**{k: v for k, v in dict(block).items() if v is not None}).model_dump()


def resume_checkpoint(cfg: Any) -> str | None:
    """The checkpoint this run will resume from (explicit or by auto-resume), known before the model loads."""
    explicit = config_value(cfg, "resume_from_checkpoint")
    if explicit:
        return str(explicit)
    output_dir = config_value(cfg, "output_dir")
    if config_value(cfg, "auto_resume_from_checkpoints") and output_dir:
        ckpts = [p for p in Path(output_dir).glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
        if ckpts:
            return str(max(ckpts, key=lambda p: int(p.name.split("-")[-1])))
    return None


def saved_plan_source(cfg: Any) -> Path | None:
    """Where an existing plan must come from, in order: ``sharelora.plan_file``, the adapter being loaded
    (``lora_model_dir``), the checkpoint being resumed. ``None`` means: calibrate."""
    settings = sharelora_settings(cfg)
    if settings["plan_file"]:
        return Path(settings["plan_file"])
    for folder in (config_value(cfg, "lora_model_dir"), resume_checkpoint(cfg)):
        if folder and (Path(folder) / PLAN_FILENAME).is_file():
            return Path(folder) / PLAN_FILENAME
    return None


def load_calibration_rows(settings: dict, cfg: Any) -> tuple[list[dict], str]:
    """Read ``num_samples`` rows (seeded choice) from ``sharelora.calibration.path`` or the first training
    dataset. Returns the rows and a description of the source."""
    from datasets import load_dataset

    cal = settings["calibration"]
    path = cal["path"]
    if not path:
        datasets = config_value(cfg, "datasets") or []
        if not datasets:
            raise PlanError(
                "sharelora.calibration.path is not set and the config has no datasets to calibrate on"
            )
        path = config_value(datasets[0], "path")
        LOG.info("ShareLoRA: calibrating on the first training dataset %s", path)
    p = Path(str(path)).expanduser()
    if p.is_file():
        suffix = p.suffix.lower()
        builder = {
            ".json": "json",
            ".jsonl": "json",
            ".txt": "text",
            ".parquet": "parquet",
            ".csv": "csv",
            ".arrow": "arrow",  # e.g. a data-*.arrow file written by Dataset.save_to_disk
        }.get(suffix)
        if builder is None:
            raise PlanError(f"sharelora.calibration.path={str(p)!r}: unsupported file type {suffix!r}")
        ds = load_dataset(builder, data_files=str(p), split="train")
    else:
        ds = load_dataset(str(path), cal["name"], split=cal["split"], data_files=cal["data_files"])
    n = min(cal["num_samples"], len(ds))
    if n < cal["num_samples"]:
        LOG.warning(
            "ShareLoRA: calibration source %s has %d rows < num_samples=%d; using all",
            path,
            n,
            cal["num_samples"],
        )
    ds = ds.shuffle(seed=cal["seed"]).select(range(n))
    return [dict(row) for row in ds], str(path)


def rows_to_texts(rows: list[dict], tokenizer, settings: dict) -> list[str]:
    """Raw text per row: the text column, else the chat messages rendered with the tokenizer's template,
    else alpaca-style instruction/input/output joined."""
    cal = settings["calibration"]
    texts = []
    for k, row in enumerate(rows):
        if isinstance(row.get(cal["text_field"]), str):
            texts.append(row[cal["text_field"]])
        elif isinstance(row.get(cal["messages_field"]), list):
            messages = [{"role": m["role"], "content": m["content"]} for m in row[cal["messages_field"]]]
            texts.append(tokenizer.apply_chat_template(messages, tokenize=False))
        elif "instruction" in row:
            parts = [row.get("instruction"), row.get("input"), row.get("output")]
            texts.append("\n".join(str(x) for x in parts if x))
        else:
            raise PlanError(
                f"calibration row {k} has no {cal['text_field']!r} text, no {cal['messages_field']!r} messages and "
                f"no instruction; columns are {sorted(row)} — set sharelora.calibration.text_field"
            )
    return [t for t in texts if t.strip()]


def plan_options(
    settings: dict,
    base_rank: int,
    layer_kinds: list[int] | None = None,
    layer_kind_descriptions: list[str] | None = None,
) -> dict[str, Any]:
    """Keyword arguments of :func:`~sharelora_plugin.planning.plan_with_stability` from the ``sharelora:`` block
    (and the model's layer kinds when its layer list mixes them): the plan itself and, after every stop-when-stable
    check, the plan so far are made with exactly these."""
    cal = settings["calibration"]
    return {
        "layer_kinds": layer_kinds,
        "layer_kind_descriptions": layer_kind_descriptions,
        "metric": settings["metric"],
        "strategy": settings["strategy"],
        "threshold": settings["threshold"],
        "share_sets": settings["share_sets"],
        "contiguous": settings["contiguous"],
        "seed": settings["seed"],
        "rank": base_rank,
        "rank_expansion": settings["rank_expansion"],
        "target_fraction": settings["target_fraction"],
        "confidence": settings["confidence"],
        "resamples": cal["bootstrap_resamples"],
        "bootstrap_seed": cal["seed"],
    }


def calibration_target_modules(cfg: Any, model) -> str | list[str]:
    """The modules LoRA will adapt, for the gradient sketches: ``all-linear`` for ``lora_target_linear`` (inside the
    decoder layers that is every Linear), else ``lora_target_modules``, else PEFT's default targets for the model
    type (what PEFT adapts when none are given), else every Linear."""
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    from sharelora_plugin.params import parse_target_modules

    if config_value(cfg, "lora_target_linear"):
        return "all-linear"
    targets = parse_target_modules(config_value(cfg, "lora_target_modules"))
    if targets:
        return targets
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return list(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type, [])) or "all-linear"


def _refuse_gradient_metric(model) -> None:
    """What ``gradient_subspace`` cannot calibrate on, checked on the model as loaded (the YAML checks the same
    keys at config time; this catches models handed in another way)."""
    if is_multimodal(model):
        raise PlanError(
            "sharelora.metric: gradient_subspace is not supported for a visual-text model (its loss would score "
            "the image placeholder tokens); use metric angular, or a sharelora.plan_file"
        )
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        raise PlanError(
            "sharelora.metric: gradient_subspace is not supported on a 4-bit or 8-bit base; use metric angular, or "
            "make the plan on the unquantized model with `sharelora plan --config …` and set sharelora.plan_file"
        )


def run_calibration(model, tokenizer, settings: dict, cfg: Any, base_rank: int = 8) -> CalibrationResult:
    """Calibrate ``model`` on the configured samples: texts for a language model; image + text conversations,
    prepared with the model's processor and run through the whole VLM, for a multimodal model (LLaVA). Either way
    only the language model's decoder layers are measured.

    With ``metric: gradient_subspace`` (text models only) each batch gets one forward and backward pass instead,
    sketching every target module's weight gradient (:func:`~sharelora_plugin.gradient_sketch.collect_sketches`,
    ``calibration.sketch_rank`` columns, one block per batch); the result carries the sketches and no angular or
    cosine matrices.

    With ``calibration.stop_when_stable`` the samples run in their random order (not sorted by length, so every
    prefix is a random sample) and calibration stops after the first batch at which the plan made so far comes
    back in at least ``calibration.stability`` of the bootstrap resamples (never before ``min_samples``; for
    gradient sketches, whose bootstrap resamples blocks, never before two batches); ``num_samples`` is the cap."""
    gradient = settings["metric"] == GRADIENT_METRIC
    if gradient:
        _refuse_gradient_metric(model)
    rows, source = load_calibration_rows(settings, cfg)
    cal = settings["calibration"]
    stop_when_stable = bool(cal["stop_when_stable"])
    kinds = layer_kinds(find_decoder_layers(model, settings["layers_path"]).layers)
    if not kinds.uniform:
        LOG.info(
            "ShareLoRA: the decoder layers are of %d kinds; sets form within one kind",
            len(kinds.descriptions),
        )
    modality = "text"
    if is_multimodal(model):
        modality = "visual-text"
        processor = load_calibration_processor(cfg, tokenizer)
        batches = visual_text_batches(
            processor,
            rows,
            batch_size=cal["batch_size"],
            max_length=cal["max_length"],
            chat_template=training_chat_template(cfg, tokenizer, processor),
            messages_field=cal["messages_field"],
            image_roots=calibration_image_roots(source, cal),
            pixel_dtype=vision_dtype(model),
            sort_by_length=not stop_when_stable,
        )
    else:
        texts = rows_to_texts(rows, tokenizer, settings)
        batches = text_batches(
            tokenizer,
            texts,
            batch_size=cal["batch_size"],
            max_length=cal["max_length"],
            sort_by_length=not stop_when_stable,
        )
    available = sum(int(batch["attention_mask"].shape[0]) for batch in batches)
    stopper = None
    should_stop = None
    if stop_when_stable:
        stopper = StopWhenStable(
            plan_options=plan_options(
                settings,
                base_rank,
                None if kinds.uniform else kinds.kinds,
                None if kinds.uniform else kinds.descriptions,
            ),
            min_samples=cal["min_samples"],
            target=cal["stability"],
        )
        metric = settings["metric"]

        def log_check() -> None:
            if stopper.checks:
                check = stopper.checks[-1]
                LOG.info(
                    "ShareLoRA: %d samples, bootstrap plan frequency %s (stop at %.2f)",
                    check["num_samples"],
                    "-" if check["plan_frequency"] is None else f"{check['plan_frequency']:.2f}",
                    stopper.target,
                )

        if gradient:

            def should_stop(sketches: SubspaceSketches) -> bool:
                done = stopper(sketches.overlap(), sketches)
                log_check()
                return done

        else:

            def should_stop(progress) -> bool:
                done = stopper(
                    similarity_from_distances(progress.angular_distance, progress.cosine, metric),
                    similarity_from_distances(
                        progress.per_sample_angular, progress.per_sample_cosine, metric
                    ),
                )
                log_check()
                return done

    if gradient:
        result = _gradient_calibration(model, batches, settings, cfg, should_stop)
    else:
        result = calibrate(
            model,
            batches,
            layers_path=settings["layers_path"],
            total=len(batches),
            expected_samples=available,
            should_stop=should_stop,
        )
    if not kinds.uniform:
        result.layer_kinds, result.layer_kind_descriptions = kinds.kinds, kinds.descriptions
    result.settings = {
        "source": source,
        "modality": modality,
        "num_samples": result.num_samples,
        "num_tokens": result.num_tokens,
        "max_length": cal["max_length"],
        "batch_size": cal["batch_size"],
        "seed": cal["seed"],
        "seconds": round(result.seconds, 3),
        "layers_path": result.layers_path,
        **result.settings,
    }
    if stopper is not None:
        if result.stopped_early:
            reason = "stable"
        elif available < cal["num_samples"]:
            reason = "exhausted"  # the source had fewer samples than the cap
        else:
            reason = "cap"
        result.settings.update(
            {
                "stop_when_stable": True,
                "stop_reason": reason,
                "num_samples_cap": cal["num_samples"],
                "min_samples": cal["min_samples"],
                "stability_target": cal["stability"],
                "stability_checks": stopper.checks,
            }
        )
        LOG.info(
            "ShareLoRA: calibration stopped after %d of at most %d samples (%s)",
            result.num_samples,
            cal["num_samples"],
            {"stable": "the plan is stable", "cap": "num_samples reached", "exhausted": "no more samples"}[
                reason
            ],
        )
    if modality == "visual-text":
        images, seen = 0, 0
        for batch, count in zip(batches, batches.images_per_batch, strict=True):  # only the batches that ran
            if seen >= result.num_samples:
                break
            seen += int(batch["attention_mask"].shape[0])
            images += count
        result.settings["num_images"] = images
    return result


def _gradient_calibration(model, batches: list, settings: dict, cfg: Any, should_stop) -> CalibrationResult:
    """The gradient sketches of ``batches`` as a :class:`CalibrationResult` whose ``settings`` hold the sketch
    facts the plan records (k, blocks, bytes, targets, the overlap's random level)."""
    cal = settings["calibration"]
    k = cal["sketch_rank"]
    sketches, info = collect_sketches(
        model,
        batches,
        target_modules=calibration_target_modules(cfg, model),
        k=k,
        seed=cal["seed"],
        layers_path=settings["layers_path"],
        total=len(batches),
        should_stop=should_stop,
    )
    dims = [array.shape[2] for array in sketches.blocks.values()]
    return CalibrationResult(
        angular_distance=None,
        cosine=None,
        num_samples=info["num_samples"],
        num_tokens=info["num_tokens"],
        seconds=info["seconds"],
        layers_path=info["layers_path"],
        stopped_early=info["stopped_early"],
        sketches=sketches,
        settings={
            "sketch_rank": k,
            "sketch_seed": cal["seed"],
            "sketch_blocks": info["sketch_blocks"],
            "sketch_bytes": info["sketch_bytes"],
            "sketch_targets": info["targets"],
            "random_level": round(random_level(dims, k), 6),
        },
    )


def plan_from_calibration(result: CalibrationResult, settings: dict, base_rank: int) -> SharePlan:
    """Turn a calibration result into a plan with the configured strategy, with its bootstrap stability report
    when the result carries per-sample matrices or at least two gradient sketch blocks (and
    ``bootstrap_resamples`` is not 0)."""
    options = plan_options(settings, base_rank, result.layer_kinds, result.layer_kind_descriptions)
    similarity = result.similarity(settings["metric"])
    samples = resampling_data(result, settings["metric"])
    if samples is not None:
        start = time.perf_counter()
        plan = plan_with_stability(samples, similarity, **options)
        if options["resamples"]:
            # each resample is planned like the plan itself: an optimal plan that takes seconds costs B times that
            LOG.info(
                "ShareLoRA: plan and bootstrap of %d resamples took %.1f s "
                "(sharelora.calibration.bootstrap_resamples: 0 turns the report off)",
                options["resamples"],
                time.perf_counter() - start,
            )
    else:
        if options["confidence"] is not None:
            unit = (
                "gradient sketch blocks (calibration batches)" if result.sketches is not None else "samples"
            )
            raise PlanError(f"sharelora.confidence needs at least 2 calibration {unit} for its bootstrap")
        for key in ("resamples", "bootstrap_seed", "confidence"):
            options.pop(key)
        plan = make_plan(num_layers=result.num_layers, similarity=similarity, **options)
    plan.metadata["calibration"] = dict(result.settings)
    if result.angular_distance is not None:
        plan.metadata["angular_distance"] = result.angular_distance.round(6).tolist()
        plan.metadata["cosine"] = result.cosine.round(6).tolist()
    return plan


def resampling_data(result: CalibrationResult, metric: str):
    """What the bootstrap resamples for ``metric``: the per-sample similarities (angular, cosine) or the gradient
    sketches (``gradient_subspace``); ``None`` when there are fewer than two samples or blocks."""
    if metric == GRADIENT_METRIC:
        sketches = result.sketches
        return sketches if sketches is not None and sketches.num_blocks >= 2 else None
    if result.per_sample_angular is not None and result.num_samples >= 2:
        return similarity_from_distances(result.per_sample_angular, result.per_sample_cosine, metric)
    return None


def check_plan_fits(
    plan: SharePlan, model, settings: dict, source: str, base_rank: int | None = None
) -> None:
    """Refuse a saved plan made for another model or another LoRA rank, or one whose sets join layers of two
    kinds in this model (dense and MoE layers, cross- and self-attention layers)."""
    decoder = find_decoder_layers(model, settings["layers_path"])
    num_layers = len(decoder)
    if plan.num_layers != num_layers:
        raise PlanError(
            f"{source}: the plan is for {plan.num_layers} decoder layers but this model has {num_layers}; "
            "make a plan for this model (`sharelora plan --config …`) or remove sharelora.plan_file"
        )
    kinds = layer_kinds(decoder.layers)
    if not kinds.uniform:
        try:
            check_layer_kinds(kinds.kinds, num_layers, plan.share_sets, name="this model's layer kinds")
        except PlanError as err:
            raise PlanError(f"{source}: {err}") from None
    if base_rank is not None and plan.base_rank != base_rank:
        raise PlanError(
            f"{source}: the plan was made for lora_r={plan.base_rank} (rank {plan.rank} after expansion) but "
            f"lora_r is {base_rank}; set lora_r: {plan.base_rank} or make a new plan"
        )


# What the bootstrap resamples, saved beside the plan: (angular_distance, cosine), each [N, L, L] float32
# (sharelora_calibration.npz), or for metric gradient_subspace the SubspaceSketches (sharelora_sketches.npz).
PerSample = tuple | SubspaceSketches


def make_or_load_plan(cfg: Any, model, tokenizer_loader) -> tuple[SharePlan, str, PerSample | None]:
    """The plan for this run: loaded from a saved plan when one applies, else calibrated (main process only,
    then broadcast so every process builds the same modules). Returns the plan, where it came from, and what its
    bootstrap resamples (``sharelora_calibration.npz`` or, for gradient_subspace, ``sharelora_sketches.npz``
    contents) when this process has it: after calibration on the main process, or found beside a saved plan (so it
    travels with the plan into output_dir)."""
    settings = sharelora_settings(cfg)
    base_rank = int(config_value(cfg, "lora_r", 8))
    source = saved_plan_source(cfg)
    if source is not None:
        plan = SharePlan.load(source)
        check_plan_fits(
            plan, model, settings, str(source), None if config_value(cfg, "lora_model_dir") else base_rank
        )
        return plan, str(source), per_sample_beside(source, plan.metric)
    state = distributed_state()
    plan_dict = None
    per_sample = None
    if state is None or state.is_main_process:
        LOG.info("ShareLoRA: calibrating on process %d (no saved plan applies)", process_index())
        result = run_calibration(model, tokenizer_loader(), settings, cfg, base_rank)
        plan = plan_from_calibration(result, settings, base_rank)
        plan.metadata["model"] = str(config_value(cfg, "base_model", ""))
        plan_dict = plan.to_dict()
        per_sample = (
            result.sketches
            if result.sketches is not None
            else (result.per_sample_angular, result.per_sample_cosine)
        )
    if state is not None and state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        box = [plan_dict]
        broadcast_object_list(box, from_process=0)
        plan_dict = box[0]
    return SharePlan.from_dict(plan_dict), "calibration", per_sample


def per_sample_beside(plan_path: str | Path, metric: str = "angular") -> PerSample | None:
    """The bootstrap data of ``metric`` saved next to a plan file, if there is any: the per-sample matrices, or the
    gradient sketches for ``gradient_subspace`` (plans written before they existed, or by
    `sharelora plan --matrix`, have none)."""
    gradient = metric == GRADIENT_METRIC
    path = Path(plan_path).parent / (SKETCH_FILENAME if gradient else CALIBRATION_FILENAME)
    if not path.is_file():
        return None
    try:
        return SubspaceSketches.load(path) if gradient else load_per_sample(path)
    except PlanError as err:
        LOG.warning("ShareLoRA: ignoring %s (%s)", path, err)
        return None


def save_plan_artifacts(
    plan: SharePlan, folder: str | Path, *, heatmap: bool = True, per_sample: PerSample | None = None
) -> list[Path]:
    """Write ``sharelora_plan.json``, the bootstrap data when given (per-sample ``sharelora_calibration.npz``, or
    the gradient sketches as ``sharelora_sketches.npz``), and the heatmap when the plan has a matrix, into
    ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = [folder / PLAN_FILENAME]
    plan.save(written[0])
    if isinstance(per_sample, SubspaceSketches):
        written.append(per_sample.save(folder / SKETCH_FILENAME))
    elif per_sample is not None:
        written.append(save_per_sample(folder / CALIBRATION_FILENAME, *per_sample))
    if heatmap and plan.similarity is not None:
        from sharelora_plugin.heatmap import save_heatmap

        save_heatmap(plan, folder / HEATMAP_FILENAME)
        written.append(folder / HEATMAP_FILENAME)
    return written
