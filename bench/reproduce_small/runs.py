"""The runs of the reproduction: one calibration, a plan file per ShareLoRA method (and seed) from it, and one
``python -m axolotl.cli.train`` process per method and seed, trained and then evaluated, or reused when a finished
run's YAML and plan are unchanged."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.common import (
    LORA_ALPHA,
    LORA_DROPOUT,
    LORA_R,
    OFFLINE_ENV,
    REPO,
    TARGET_MODULES,
    calibrate_on_lee,
)
from bench.embedded import data_dir, model_dir
from bench.reproduce_small.evaluation import count_adapter_parameters, evaluate_model
from bench.reproduce_small.settings import METHODS, Budget, Method
from bench.reproduce_small.tasks import TaskData

IM_END = "<|im_end|>"
# Axolotl keys that are off on CPU: no bf16/fp16/tf32, eager attention, no gradient checkpointing.
CPU_OFF = ("bf16", "fp16", "tf32", "flash_attention", "sdp_attention", "gradient_checkpointing")


def choose_threshold(similarity, num_layers: int) -> float:
    """ε on a 0.001 grid whose greedy plan saves the number of layers closest to L/3 (the paper: "about one
    third of the layers share"; LLaMA-7B saves 10 of 32); ties go to the highest ε."""
    from sharelora_plugin.planning import greedy_share_sets, layers_saved

    target = num_layers / 3
    best: tuple[float, float] | None = None  # (distance, -threshold)
    for step in range(500, 1000):
        threshold = step / 1000
        saved = layers_saved(greedy_share_sets(similarity, threshold))
        key = (abs(saved - target), -threshold)
        if best is None or key < best:
            best = key
    return -best[1]


def count_decoder_layers() -> int:
    """Decoder layers of the embedded SmolLM2 (from its config, without loading it)."""
    config = json.loads((model_dir() / "config.json").read_text(encoding="utf-8"))
    return int(config["num_hidden_layers"])


def calibrate_once(samples: int, log: Callable[[str], None]):
    """Run the plugin's calibration (``workflow.run_calibration``) on ``samples`` Lee background texts."""
    result, settings, seconds = calibrate_on_lee(samples, max_length=256, batch_size=16)
    log(f"calibration: {result.num_samples} texts, {result.num_tokens} tokens, {seconds:.1f} s")
    return result, settings


def make_plans(result, settings: dict, seeds: Sequence[int], methods: Sequence[str], workdir: Path) -> dict:
    """Plan files per (method, seed) from one calibration; returns {method: {seed: path}} and the ε used."""
    from sharelora_plugin.planning import PlanError
    from sharelora_plugin.workflow import plan_from_calibration

    similarity = result.similarity(settings["metric"])
    threshold = choose_threshold(similarity, result.num_layers)
    plans: dict[str, dict[int, Path]] = {}
    for name in methods:
        method = METHODS[name]
        if method.strategy is None:
            continue
        plans[name] = {}
        # Only ShareLoRA* depends on the seed; the others are one plan reused for every seed.
        for seed in seeds if method.strategy == "random" else seeds[:1]:
            plan_settings = {
                **settings,
                "strategy": method.strategy,
                "threshold": threshold,
                "rank_expansion": method.rank_expansion,
                "seed": seed,
            }
            try:
                plan = plan_from_calibration(result, plan_settings, LORA_R)
            except PlanError as err:
                raise RuntimeError(f"{name}: could not make a plan at ε={threshold}: {err}") from None
            plan.metadata["model"] = str(model_dir())
            path = workdir / "plans" / f"{name}_seed{seed}.json"
            plan.save(path)
            plans[name][seed] = path
        if method.strategy != "random":
            plans[name] = {seed: plans[name][seeds[0]] for seed in seeds}
    return {"files": plans, "threshold": threshold}


# ====================================================================================================================
# Training (one axolotl.cli.train process per method and seed)


def schedule_and_lora(steps: int, learning_rate: float, seed: int) -> dict[str, Any]:
    """The Axolotl keys every arm of a bench comparison shares: one epoch capped at ``steps``, AdamW with a linear
    schedule and 10% warmup, no checkpoints, the paper's LoRA settings, CPU precision and attention off, and
    ``<|im_end|>`` as eos and pad."""
    return {
        "num_epochs": 1,
        "optimizer": "adamw_torch",
        "lr_scheduler": "linear",
        "learning_rate": learning_rate,
        "warmup_steps": max(1, steps // 10),
        "weight_decay": 0.0,
        "logging_steps": max(1, steps // 10),
        "save_strategy": "no",
        "seed": seed,
        "lora_r": LORA_R,
        "lora_alpha": LORA_ALPHA,
        "lora_dropout": LORA_DROPOUT,
        "lora_target_modules": TARGET_MODULES,
        **dict.fromkeys(CPU_OFF, False),
        "special_tokens": {"eos_token": IM_END, "pad_token": IM_END},
    }


def run_config(
    method: Method, seed: int, budget: Budget, paths: dict, plan_file: Path | None, out: Path
) -> dict:
    """The Axolotl YAML of one run. Everything except the adapter block is identical across methods."""
    cfg: dict[str, Any] = {
        "base_model": str(model_dir()),
        "model_type": "AutoModelForCausalLM",
        "tokenizer_type": "AutoTokenizer",
        "datasets": [
            {"path": str(paths["train"]), "type": "alpaca"},
            {"path": str(data_dir() / "lee_background.jsonl"), "type": "completion", "field": "text"},
        ],
        "dataset_prepared_path": str(paths["prepared"]),
        "val_set_size": 0,
        "train_on_inputs": True,
        "output_dir": str(out),
        "sequence_len": budget.sequence_len,
        "sample_packing": False,
        "micro_batch_size": budget.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "max_steps": budget.steps,
        **schedule_and_lora(budget.steps, budget.learning_rate, seed),
    }
    if method.strategy is None:
        cfg["adapter"] = "lora"
    else:
        cfg["plugins"] = ["sharelora_plugin.ShareLoRAPlugin"]
        cfg["adapter"] = "sharelora"
        # The plan (sets, rank) comes from plan_file; strategy only documents how it was made.
        cfg["sharelora"] = {"strategy": method.strategy, "plan_file": str(plan_file), "save_heatmap": False}
    return cfg


def _last_float(pattern: str, text: str) -> float | None:
    found = re.findall(pattern, text)
    return float(found[-1]) if found else None


def train_run(cfg: dict, out: Path, log: Callable[[str], None]) -> dict:
    """Run ``python -m axolotl.cli.train`` on ``cfg``; wall time, the trainer's train_runtime and train loss."""
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "run.yml"
    config_path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    log_path = out / "train.log"
    env = {**os.environ, **OFFLINE_ENV}
    start = time.perf_counter()
    with log_path.open("w", encoding="utf-8") as handle:
        proc = subprocess.run(
            [sys.executable, "-m", "axolotl.cli.train", str(config_path)],
            cwd=REPO,
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            check=False,
        )
    wall = time.perf_counter() - start
    text = log_path.read_text(encoding="utf-8", errors="replace")
    if proc.returncode != 0 or not (out / "adapter_config.json").is_file():
        tail = "\n".join(text.splitlines()[-40:])
        raise RuntimeError(f"training failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    return {
        "wall_seconds": round(wall, 2),
        "train_seconds": _last_float(r"'train_runtime': '?([0-9.]+)", text),
        "train_loss": _last_float(r"'train_loss': '?([0-9.]+)", text),
    }


# ====================================================================================================================
# One (method, seed): plan → train → evaluate, or the saved result of an identical earlier run


def plan_structure(plan_file: Path | None) -> tuple[int, dict | None, dict | None]:
    """(LoRA rank, the plan's structure that decides reuse, the plan's row in the report) of a run's plan file;
    plain LoRA (no plan) trains at r = ``LORA_R``."""
    if plan_file is None:
        return LORA_R, None, None
    from sharelora_plugin.planning import SharePlan

    plan = SharePlan.load(plan_file)
    structure = {"share_sets": plan.share_sets, "rank": plan.rank}
    info = {
        **structure,
        "layers_saved": plan.layers_saved,
        "param_fraction": round(plan.param_fraction, 4),
        "constraint": "enforced" if plan.constraint_enforced else str(plan.constraint_satisfied),
    }
    return plan.rank, structure, info


def previous_run(saved: Path, cfg: dict, structure: dict | None) -> dict | None:
    """The run stored in ``saved`` if it was trained from the same YAML and plan, else ``None``."""
    if not saved.is_file():
        return None
    previous = json.loads(saved.read_text(encoding="utf-8"))
    if previous["config"] == cfg and previous["plan"] == structure:
        return previous["run"]
    return None


def train_and_evaluate(
    name: str,
    seed: int,
    budget: Budget,
    data: TaskData,
    plan_file: Path | None,
    out: Path,
    fresh: bool,
    log: Callable[[str], None],
) -> tuple[dict, dict | None, bool]:
    """One method at one seed: (its run record, its plan's report row, whether an earlier run was reused).
    The record (timing, parameter counts, scores) is saved in ``out/result.json`` beside the YAML it came from."""
    rank, structure, info = plan_structure(plan_file)
    cfg = run_config(METHODS[name], seed, budget, data.paths, plan_file, out)
    saved = out / "result.json"
    if not fresh and (run := previous_run(saved, cfg, structure)) is not None:
        log(f"reuse {name} seed {seed} ({saved}; --fresh retrains)")
        return run, info, True
    log(f"train {name} seed {seed} ({budget.steps} steps)")
    timing = train_run(cfg, out, log)
    counts = count_adapter_parameters(out)
    scores = evaluate_model(out, data.tests, data.lee_texts, budget)
    run = {"method": name, "seed": seed, "rank": rank, **timing, **counts, **scores}
    saved.write_text(json.dumps({"config": cfg, "plan": structure, "run": run}, indent=1), encoding="utf-8")
    log(
        f"  {name} seed {seed}: params {counts['trainable_params']:,}, train {timing['train_seconds']} s, "
        f"acc {scores['average_accuracy']:.3f}, answer loss {scores['heldout_answer_loss']:.4f}, "
        f"Lee ppl {scores['lee_ppl']:.2f}"
    )
    return run, info, False
