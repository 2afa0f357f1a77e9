"""``python -m bench.quality [--quick] [--task FILE.jsonl ...] [--output DIR]`` from the repository root: data →
one calibration and the plans → the base model and every (arm, seed) run → the analysis and the report."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import bench.quality as package
from bench.common import REPO, read_lee_texts, use_offline_env
from bench.embedded import model_dir
from bench.quality.analysis import analyze
from bench.quality.data import Task, TaskError, builtin_tasks, load_task, subsample
from bench.quality.evaluation import evaluate_model
from bench.quality.report import write_report
from bench.quality.runs import (
    calibrate,
    make_plans,
    plan_row,
    run_units,
    train_and_evaluate,
    write_calibration_texts,
    write_training_data,
)
from bench.quality.settings import ARMS, FULL, QUICK, QUICK_ARMS, Budget
from bench.quality.signal import signal_report
from bench.reproduce_small.__main__ import set_threads, timed_log

COMMAND = "python -m bench.quality"
RESULTS_DIR = REPO / "bench" / "results"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=COMMAND, description=package.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="CI-sized pipeline check: 2 steps, 1 seed, two arms"
    )
    parser.add_argument(
        "--task",
        action="append",
        metavar="FILE.jsonl",
        help='your own task (rows {"prompt", "answer", "split": "train"|"test", "choices"?}); repeatable; default: '
        "the built-in sentiment and analogy tasks",
    )
    parser.add_argument(
        "--output",
        help="where quality.{json,md,png} go (default: bench/results; with --quick <workdir>/quick)",
    )
    parser.add_argument("--workdir", default=str(REPO / "outputs" / "quality"), help="runs, plans and data")
    parser.add_argument(
        "--arms", nargs="+", choices=list(ARMS), help="arms to run (base and lora are always run)"
    )
    parser.add_argument("--seeds", nargs="+", type=int, help="override the seeds")
    parser.add_argument("--steps", type=int, help="override the training steps")
    parser.add_argument("--random-plans", type=int, help="ShareLoRA* plans per seed")
    parser.add_argument("--threads", type=int, help="torch/OpenMP threads (default: all cores)")
    parser.add_argument(
        "--render",
        action="store_true",
        help="only rebuild quality.md/.png from the quality.json already in --output; trains nothing",
    )
    return parser.parse_args(argv)


def render(output: Path) -> int:
    """Rebuild the Markdown and the figure from a finished run's JSON."""
    stem = output / "quality"
    if not stem.with_suffix(".json").is_file():
        print(f"error: {stem.with_suffix('.json')} not found; run without --render first", file=sys.stderr)
        return 2
    write_report(json.loads(stem.with_suffix(".json").read_text(encoding="utf-8")), stem)
    print(stem.with_suffix(".md").read_text(encoding="utf-8"))
    return 0


def budget_for(args: argparse.Namespace) -> Budget:
    budget = QUICK if args.quick else FULL
    return budget.with_(
        seeds=tuple(args.seeds) if args.seeds else None, steps=args.steps, random_plans=args.random_plans
    )


def arms_for(args: argparse.Namespace) -> list[str]:
    chosen = set(args.arms or (QUICK_ARMS if args.quick else ARMS))
    chosen |= {"base", "lora"}
    return [arm for arm in ARMS if arm in chosen]


def load_tasks(args: argparse.Namespace, budget: Budget, workdir: Path) -> list[Task]:
    paths = [Path(p) for p in args.task] if args.task else builtin_tasks(budget.test_rows, workdir / "data")
    tasks = [subsample(load_task(p), budget.train_rows, budget.test_rows) for p in paths]
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise TaskError(f"task names must differ (the file name is the task's name); got {names}")
    return tasks


def versions() -> dict:
    from importlib.metadata import version

    return {
        name: version(name)
        for name in ("torch", "transformers", "peft", "axolotl", "accelerate", "numpy", "scipy")
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        return render(Path(args.output) if args.output else RESULTS_DIR)
    use_offline_env()
    set_threads(args.threads)
    budget, arms = budget_for(args), arms_for(args)
    workdir = Path(args.workdir)
    output = Path(args.output) if args.output else (workdir / "quick" if args.quick else RESULTS_DIR)
    workdir.mkdir(parents=True, exist_ok=True)
    started, log = time.perf_counter(), timed_log()
    try:
        tasks = load_tasks(args, budget, workdir)
    except TaskError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from transformers import AutoTokenizer

    model_path = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    paths = {
        "model": model_path,
        "train": write_training_data(tasks, tokenizer, workdir / "data"),
        "prepared": workdir / "prepared",
    }
    calibration_file = write_calibration_texts(tasks, budget.calibration_samples, workdir / "data")
    log(", ".join(f"{t.name}: {len(t.train)} train / {len(t.test)} test" for t in tasks))
    calibration = calibrate(model_path, calibration_file, budget, log)
    plans = make_plans(calibration, budget, arms, model_path, workdir)
    log(f"ε = {plans['threshold']}; plans in {workdir / 'plans'}")
    lee = read_lee_texts("lee_test.jsonl")[: budget.lee_texts]
    base = evaluate_model(model_path, None, tasks, lee, budget.eval_batch_size)
    log(f"base model: ppl {base['ppl']:.4f}")
    runs, first_run = [], None
    for unit in run_units(budget, arms):
        runs.append(train_and_evaluate(unit, budget, tasks, lee, paths, plans, workdir, log))
        if first_run is None:
            # training + scoring as recorded with the run (also right for a run reused from an earlier call)
            first_run = runs[-1]["wall_seconds"] + runs[-1]["eval_seconds"]
            log(f"first run: {first_run:.0f} s")

    sketches = calibration["sketches"]
    greedy_sets = plans["greedy"].share_sets
    plan_sets = {"greedy": greedy_sets}
    for arm in ("naive", "gradient"):
        if arm in plans["files"]:
            plan_sets[arm] = plan_row(plans["files"][arm]["all"])["share_sets"]
    dims = [array.shape[2] for array in sketches.blocks.values()]
    signal = signal_report(
        calibration["result"].similarity("angular"), sketches.overlap(), plan_sets, budget.sketch_rank, dims
    )
    plan_rows = {}
    for arm, files in plans["files"].items():
        for key, path in files.items():
            plan_rows[arm if key == "all" else f"{arm}_{key}"] = plan_row(path)
    params = {}
    for run in runs:
        params.setdefault(run["arm"], run["trainable_params"])
    report = {
        "quick": bool(args.quick),
        "command": f"{COMMAND} " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "versions": versions(),
        "model_name": model_path.name,
        "budget": budget.__dict__,
        "arms": arms,
        "tasks": [
            {
                "name": t.name,
                "train": len(t.train),
                "test": len(t.test),
                "scoring": "accuracy = argmax over choices" if t.has_choices else "accuracy = exact match",
            }
            for t in tasks
        ],
        "threshold": plans["threshold"],
        "calibration": {**calibration["result"].settings, "sketch": calibration["sketch_info"]},
        "plans": plan_rows,
        "signal": signal,
        "params": params,
        "base": base,
        "runs": runs,
        "first_run_seconds": first_run or 0.0,
        "total_minutes": (time.perf_counter() - started) / 60,
        "analysis": analyze(runs, base, arms),
    }
    stem = output / "quality"
    write_report(report, stem)
    log(f"wrote {stem}.json/.md/.png")
    print(stem.with_suffix(".md").read_text(encoding="utf-8"))
    print(json.dumps(report["analysis"]["decisions"], indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
