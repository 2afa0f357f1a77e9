"""The command line of the reproduction, ``python -m bench.reproduce_small [--quick ...]`` from the repository root:
flags → data → one calibration and the plans → the base model and every (method, seed) run → the report."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bench.reproduce_small as package
from bench.common import REPO, use_offline_env
from bench.reproduce_small.evaluation import evaluate_model
from bench.reproduce_small.report import build_report, render, write_report
from bench.reproduce_small.runs import calibrate_once, count_decoder_layers, make_plans, train_and_evaluate
from bench.reproduce_small.settings import FULL, METHODS, QUICK, Budget
from bench.reproduce_small.tasks import TaskData, prepare_data

COMMAND = "python -m bench.reproduce_small"
RESULTS_DIR = REPO / "bench" / "results"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The flags; ``--methods`` without ``lora`` is refused (every fraction is measured against it)."""
    parser = argparse.ArgumentParser(
        prog=COMMAND, description=package.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="a couple of steps, 1 seed, tiny test split (~4 min)"
    )
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, help="override the seeds")
    parser.add_argument("--steps", type=int, help="override the training steps")
    parser.add_argument("--workdir", default=str(REPO / "outputs" / "reproduce_small"))
    parser.add_argument(
        "--results-dir",
        help="where reproduce_small.{json,md,png} go (default: bench/results; with --quick <workdir>/quick, so a "
        "pipeline check never overwrites the committed full-run results)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="torch/OpenMP threads for training and evaluation (default: all cores; use 1 on a busy machine, "
        "where 2 threads contending with other work run several times slower)",
    )
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="retrain every run (default: reuse a run whose YAML is unchanged)",
    )
    parser.add_argument(
        "--render",
        action="store_true",
        help="only rebuild reproduce_small.md/.png (and the findings) from the reproduce_small.json already in "
        "--results-dir; trains and evaluates nothing",
    )
    args = parser.parse_args(argv)
    if not args.render and "lora" not in args.methods:
        parser.error("--methods must include lora (the baseline every fraction is measured against)")
    return args


def set_threads(threads: int | None) -> None:
    """Pin torch and the OpenMP/MKL threads of this process and of the training processes it starts."""
    if not threads:
        return
    import torch

    torch.set_num_threads(threads)
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[key] = str(threads)


def budget_for(args: argparse.Namespace) -> Budget:
    """``FULL`` or ``QUICK``, with ``--seeds`` and ``--steps`` applied."""
    budget = QUICK if args.quick else FULL
    if args.seeds:
        budget = Budget(**{**budget.__dict__, "seeds": tuple(args.seeds)})
    if args.steps:
        budget = Budget(**{**budget.__dict__, "steps": args.steps})
    return budget


def results_dir_for(args: argparse.Namespace) -> Path:
    """``--results-dir``, else ``<workdir>/quick`` for ``--quick`` (never the committed results), else bench/results."""
    if args.results_dir:
        return Path(args.results_dir)
    return Path(args.workdir) / "quick" if args.quick else RESULTS_DIR


def timed_log() -> Callable[[str], None]:
    """A logger that prefixes each line with the seconds since it was made."""
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {message}", flush=True)

    return log


def plan_files(
    budget: Budget, methods: list[str], workdir: Path, log: Callable[[str], None]
) -> dict[str, Any]:
    """Calibrate once and write every ShareLoRA method's plan files (none when only plain LoRA runs)."""
    if not any(METHODS[name].strategy for name in methods):
        return {"files": {}, "threshold": None}
    result, cal_settings = calibrate_once(budget.calibration_samples, log)
    plans = make_plans(result, cal_settings, budget.seeds, methods, workdir)
    log(f"ε = {plans['threshold']}; plans in {workdir / 'plans'}")
    return plans


def run_all(
    args: argparse.Namespace,
    budget: Budget,
    methods: list[str],
    data: TaskData,
    plans: dict[str, Any],
    log: Callable[[str], None],
) -> tuple[list[dict], dict[str, dict[int, dict]], int]:
    """Every method at every seed: (the runs, each ShareLoRA method's plan per seed, how many were reused)."""
    runs, plan_info, reused = [], {}, 0
    for seed in budget.seeds:
        for name in methods:
            plan_file = plans["files"][name][seed] if METHODS[name].strategy else None
            out = Path(args.workdir) / "runs" / f"{name}_seed{seed}"
            run, info, was_reused = train_and_evaluate(
                name, seed, budget, data, plan_file, out, args.fresh, log
            )
            if info is not None:
                plan_info.setdefault(name, {})[seed] = info
            runs.append(run)
            reused += was_reused
    return runs, plan_info, reused


def main(argv: list[str] | None = None) -> int:
    """Run the comparison (or only ``--render`` its report) and print the Markdown report."""
    args = parse_args(argv)
    if args.render:
        return render(Path(args.results_dir or RESULTS_DIR) / "reproduce_small")
    use_offline_env()
    set_threads(args.threads)
    budget = budget_for(args)
    methods = [m for m in METHODS if m in args.methods]
    workdir, results_dir = Path(args.workdir), results_dir_for(args)
    workdir.mkdir(parents=True, exist_ok=True)
    results_dir.mkdir(parents=True, exist_ok=True)
    started, log = time.perf_counter(), timed_log()

    data = prepare_data(budget.train_per_task, budget.test_per_task, budget.lee_test_texts, workdir)
    log(
        f"data: {len(data.train_rows)} train rows, {sum(map(len, data.tests.values()))} test rows in "
        f"{workdir / 'data'}"
    )
    num_layers = count_decoder_layers()
    plans = plan_files(budget, methods, workdir, log)
    base = evaluate_model(None, data.tests, data.lee_texts, budget)
    log(f"base model: accuracy {base['average_accuracy']:.3f}, Lee ppl {base['lee_ppl']:.2f}")
    runs, plan_info, reused = run_all(args, budget, methods, data, plans, log)

    report = build_report(
        quick=bool(args.quick),
        command=f"{COMMAND} " + " ".join(argv if argv is not None else sys.argv[1:]),
        total_minutes=round((time.perf_counter() - started) / 60, 2),
        budget=budget,
        methods=methods,
        data=data,
        num_layers=num_layers,
        threshold=plans["threshold"],
        plans=plan_info,
        base=base,
        runs=runs,
        reused=reused,
    )
    stem = results_dir / "reproduce_small"
    write_report(report, stem)
    log(f"wrote {stem}.json/.md/.png")
    print(stem.with_suffix(".md").read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
