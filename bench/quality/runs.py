"""The runs: one calibration (angular, and the gradient sketches) on training prompts, a plan file per plan-making
arm, and one ``python -m axolotl.cli.train`` process per (arm, seed[, plan draw]), evaluated right after. Each
finished run keeps its YAML, plan and numbers in ``result.json`` and is skipped when the same run comes again."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.common import LORA_R, TARGET_MODULES
from bench.quality.data import Task
from bench.quality.evaluation import encode, evaluate_model
from bench.quality.settings import ARMS, Budget
from bench.reproduce_small.evaluation import count_adapter_parameters
from bench.reproduce_small.runs import choose_threshold, schedule_and_lora, train_run
from sharelora_plugin.planning.files import write_jsonl

RESAMPLES = 200  # bootstrap resamples of every plan's stability report


def write_training_data(tasks: Sequence[Task], tokenizer, folder: Path) -> Path:
    """The training rows of every task, pre-tokenized exactly as evaluation encodes them (prompt + answer + end
    token; every token is trained, as the primary metric scores every token), in one fixed order."""
    rows = []
    for task in tasks:
        for row in task.train:
            ids, _ = encode(tokenizer, row["prompt"], row["answer"])
            rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)})
    random.Random(0).shuffle(rows)
    path = folder / "train_tokenized.jsonl"
    write_jsonl(path, rows)
    return path


def write_calibration_texts(tasks: Sequence[Task], count: int, folder: Path) -> Path:
    """``count`` training prompts (with their answers), drawn evenly from the tasks, as ``{"text"}`` rows."""
    rng = random.Random(7)
    per_task = [rng.sample(t.train, min(len(t.train), -(-count // len(tasks)))) for t in tasks]
    texts = [r["prompt"] + r["answer"] for rows in zip(*per_task, strict=False) for r in rows][:count]
    path = folder / "calibration.jsonl"
    write_jsonl(path, [{"text": t} for t in texts])
    return path


def calibrate(model_path: Path, calibration_file: Path, budget: Budget, log: Callable[[str], None]) -> dict:
    """The plugin's calibration (angular) and the gradient sketches on the same texts."""
    import time

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sharelora_plugin.args import ShareLoRAConfig
    from sharelora_plugin.calibration import text_batches
    from sharelora_plugin.gradient_sketch import collect_sketches
    from sharelora_plugin.workflow import load_calibration_rows, rows_to_texts, run_calibration

    settings = ShareLoRAConfig(
        calibration={
            "path": str(calibration_file),
            "num_samples": budget.calibration_samples,
            "max_length": budget.sequence_len,
            "batch_size": 8,
            "bootstrap_resamples": RESAMPLES,
        }
    ).model_dump()
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    result = run_calibration(model, tokenizer, settings, {"base_model": str(model_path)})
    log(
        f"angular calibration: {result.num_samples} texts, {result.num_tokens} tokens, {result.seconds:.1f} s"
    )
    rows, _ = load_calibration_rows(settings, {})
    texts = rows_to_texts(rows, tokenizer, settings)  # the same texts in the same order
    start = time.perf_counter()
    sketches, info = collect_sketches(
        model,
        text_batches(tokenizer, texts, batch_size=8, max_length=budget.sequence_len),
        target_modules=TARGET_MODULES,
        k=budget.sketch_rank,
        progress=False,
    )
    log(
        f"gradient sketches: {info['sketch_blocks']} blocks of {sketches.num_samples} texts, "
        f"{info['sketch_bytes'] / 2**20:.1f} MiB, {time.perf_counter() - start:.1f} s"
    )
    return {"result": result, "settings": settings, "sketches": sketches, "sketch_info": info}


def make_plans(
    calibration: dict, budget: Budget, arms: Sequence[str], model_path: Path, folder: Path
) -> dict:
    """Plan files: {arm: {draw key: path}} (draw key = seed for ShareLoRA*, ``"all"`` otherwise) and the ε used."""
    from sharelora_plugin.planning import plan_with_stability
    from sharelora_plugin.workflow import plan_from_calibration

    result, settings = calibration["result"], calibration["settings"]
    similarity = result.similarity("angular")
    threshold = choose_threshold(similarity, result.num_layers)
    base = {**settings, "threshold": threshold, "metric": "angular"}
    files: dict[str, dict[str, Path]] = {}

    def save(plan, arm: str, key: str) -> None:
        plan.metadata["model"] = str(model_path)
        path = folder / "plans" / f"{arm}_{key}.json"
        plan.save(path)
        files.setdefault(arm, {})[key] = path

    greedy = plan_from_calibration(result, {**base, "strategy": "greedy"}, LORA_R)
    for arm in arms:
        kind = ARMS[arm].plan
        if kind == "greedy":
            save(greedy, arm, "all")
        elif kind == "greedy_rx":
            save(
                plan_from_calibration(result, {**base, "strategy": "greedy", "rank_expansion": True}, LORA_R),
                arm,
                "all",
            )
        elif kind == "alternate":
            save(plan_from_calibration(result, {**base, "strategy": "alternate"}, LORA_R), arm, "all")
        elif kind == "random":
            for seed in budget.seeds:
                for draw in range(budget.random_plans):
                    plan_seed = 1000 * (seed + 1) + draw
                    plan = plan_from_calibration(
                        # no bootstrap per draw: a random plan's report is its greedy reference's, recorded once
                        result,
                        {
                            **base,
                            "strategy": "random",
                            "seed": plan_seed,
                            "calibration": {**base["calibration"], "bootstrap_resamples": 0},
                        },
                        LORA_R,
                    )
                    save(plan, arm, f"seed{seed}_draw{draw}")
        elif kind == "gradient":
            sketches = calibration["sketches"]
            plan = plan_with_stability(
                sketches,
                sketches.overlap(),
                metric="gradient_subspace",
                strategy="greedy",
                target_fraction=greedy.param_fraction,
                rank=LORA_R,
                resamples=RESAMPLES,
                bootstrap_seed=0,
            )
            plan.metadata["calibration"] = {**result.settings, **calibration["sketch_info"]}
            save(plan, arm, "all")
    return {"files": files, "threshold": threshold, "greedy": greedy}


def run_units(budget: Budget, arms: Sequence[str]) -> list[tuple[str, int, int]]:
    """Every (arm, seed, draw) to train, seed by seed (a cut-short run still has whole seeds)."""
    units = []
    for seed in budget.seeds:
        for arm in arms:
            if not ARMS[arm].trained:
                continue
            draws = budget.random_plans if ARMS[arm].plan == "random" else 1
            units.extend((arm, seed, draw) for draw in range(draws))
    return units


def plan_file_for(plans: dict, arm: str, seed: int, draw: int) -> Path | None:
    if ARMS[arm].plan is None:
        return None
    files = plans["files"][arm]
    return files[f"seed{seed}_draw{draw}"] if ARMS[arm].plan == "random" else files["all"]


def run_config(arm: str, seed: int, budget: Budget, paths: dict, plan_file: Path | None, out: Path) -> dict:
    """The Axolotl YAML of one run; only the adapter block differs between arms."""
    steps = budget.steps
    cfg: dict[str, Any] = {
        "base_model": str(paths["model"]),
        "model_type": "AutoModelForCausalLM",
        "tokenizer_type": "AutoTokenizer",
        "datasets": [{"path": str(paths["train"]), "ds_type": "json"}],
        "dataset_prepared_path": str(paths["prepared"]),
        "val_set_size": 0,
        "output_dir": str(out),
        "sequence_len": budget.sequence_len,
        "sample_packing": False,
        "pad_to_multiple_of": 8,
        # batches of similar length (the same batches for every arm at a seed): about half the padding otherwise
        "group_by_length": True,
        "micro_batch_size": budget.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "max_steps": steps,
        **schedule_and_lora(steps, budget.learning_rate, seed),
    }
    if plan_file is None:
        cfg["adapter"] = "lora"
    else:
        cfg["plugins"] = ["sharelora_plugin.ShareLoRAPlugin"]
        cfg["adapter"] = "sharelora"
        cfg["sharelora"] = {"plan_file": str(plan_file), "save_heatmap": False}
    return cfg


def plan_row(plan_file: Path | None) -> dict | None:
    """What the report shows of a run's plan (and what decides whether a stored run is the same run)."""
    if plan_file is None:
        return None
    from sharelora_plugin.planning import SharePlan

    plan = SharePlan.load(plan_file)
    stability = plan.stability or {}
    return {
        "share_sets": plan.share_sets,
        "rank": plan.rank,
        "layers_saved": plan.layers_saved,
        "param_fraction": round(plan.param_fraction, 4),
        "threshold": plan.threshold,
        "metric": plan.metric,
        "plan_frequency": stability.get("plan_frequency", stability.get("reference_plan_frequency")),
    }


def train_and_evaluate(
    unit: tuple[str, int, int],
    budget: Budget,
    tasks: Sequence[Task],
    lee_texts: Sequence[str],
    paths: dict,
    plans: dict,
    workdir: Path,
    log: Callable[[str], None],
) -> dict:
    """One (arm, seed, draw): its stored record when the same run finished before, else train + evaluate + store."""
    arm, seed, draw = unit
    plan_file = plan_file_for(plans, arm, seed, draw)
    name = f"{arm}_seed{seed}" + (f"_draw{draw}" if ARMS[arm].plan == "random" else "")
    out = workdir / "runs" / name
    plan = plan_row(plan_file)
    cfg = run_config(arm, seed, budget, paths, plan_file, out)
    saved = out / "result.json"
    if saved.is_file():
        previous = json.loads(saved.read_text(encoding="utf-8"))
        if previous["config"] == cfg and previous["plan"] == plan:
            log(f"reuse {arm} seed {seed} draw {draw} ({saved})")
            return previous["run"]
    log(f"train {arm} seed {seed} draw {draw} ({budget.steps} steps)")
    timing = train_run(cfg, out, log)
    counts = count_adapter_parameters(out)
    scores = evaluate_model(paths["model"], out, tasks, lee_texts, budget.eval_batch_size)
    run = {"arm": arm, "seed": seed, "draw": draw, "plan": plan, **timing, **counts, **scores}
    saved.write_text(json.dumps({"config": cfg, "plan": plan, "run": run}), encoding="utf-8")
    log(
        f"  {arm} seed {seed} draw {draw}: params {counts['trainable_params']:,}, wall {timing['wall_seconds']:.0f} s, "
        f"eval {scores['eval_seconds']:.0f} s, ppl {scores['ppl']:.4f}, "
        + ", ".join(f"{n} acc {t['summary']['accuracy']:.3f}" for n, t in scores["tasks"].items())
    )
    return run
