"""Greedy (Algorithm 1) vs exact optimal share sets across thresholds: distinct modules, layers saved, solve time;
and what the robust option (``sharelora.confidence``) costs against plain greedy at the same ε.

    python bench/plan_quality.py                      # outputs/smollm2_sharelora/sharelora_plan.json if present
    python bench/plan_quality.py --matrix FILE        # a sharelora_plan.json or an L x L CSV of similarities
    python bench/plan_quality.py --synthetic [--layers 30 --seed 0]

Runs in seconds on a CPU (optimal is a HiGHS MILP per threshold; ``--contiguous`` also shows the exact
adjacent-runs optimum). When a per-sample calibration file is found beside the plan (``sharelora_calibration.npz``,
written by calibration) or given with ``--calibration``, three more columns compare plain greedy with robust
greedy (a pair counts as similar only when its lower bootstrap bound at ``--confidence`` clears ε): layers saved
by each and the bootstrap plan frequency of the plain greedy plan.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run by path: make `bench` importable
import numpy as np  # noqa: E402

from bench.common import REPO  # noqa: E402
from sharelora_plugin.planning import (  # noqa: E402
    CALIBRATION_FILENAME,
    PlanError,
    distinct_modules,
    greedy_share_sets,
    layers_saved,
    load_per_sample,
    load_similarity,
    optimal_share_sets,
    plan_with_stability,
    similarity_from_distances,
    synthetic_similarity,
)

DEFAULT_PLAN = REPO / "outputs" / "smollm2_sharelora" / "sharelora_plan.json"
THRESHOLDS = [round(0.80 + 0.01 * step, 2) for step in range(16)]


def per_sample_source(args: argparse.Namespace, metric: str) -> np.ndarray | None:
    """Per-sample similarities for the robust comparison, if a calibration file is at hand."""
    if args.synthetic:
        return None
    path = (
        Path(args.calibration)
        if args.calibration
        else Path(args.matrix or DEFAULT_PLAN).parent / CALIBRATION_FILENAME
    )
    if not path.is_file():
        return None
    return similarity_from_distances(*load_per_sample(path), metric)


def load_source(args: argparse.Namespace) -> tuple[np.ndarray, str]:
    if args.synthetic:
        return synthetic_similarity(
            args.layers, seed=args.seed
        ), f"synthetic L={args.layers} seed={args.seed}"
    path = Path(args.matrix) if args.matrix else DEFAULT_PLAN
    if not args.matrix and not path.is_file():
        raise SystemExit(f"{DEFAULT_PLAN} does not exist yet; pass --matrix FILE or --synthetic")
    matrix, _ = load_similarity(path)
    return matrix, str(path)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--matrix", help="sharelora_plan.json or L x L CSV of similarities")
    source.add_argument("--synthetic", action="store_true", help="seeded block-structured matrix (no model)")
    parser.add_argument("--layers", type=int, default=30, help="layers of the synthetic matrix (default 30)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic matrix (default 0)")
    parser.add_argument("--contiguous", action="store_true", help="also show the optimum over adjacent runs")
    parser.add_argument("--time-limit", type=float, default=60.0, help="HiGHS time limit per threshold (s)")
    parser.add_argument("--calibration", help="per-sample .npz (default: beside the plan file)")
    parser.add_argument(
        "--confidence", type=float, default=0.9, help="robust option's confidence (default 0.9)"
    )
    args = parser.parse_args()

    try:
        sim, label = load_source(args)
    except PlanError as err:
        raise SystemExit(str(err)) from None
    num_layers = sim.shape[0]
    metric = "angular"
    if not args.synthetic:
        metric = (load_similarity(Path(args.matrix) if args.matrix else DEFAULT_PLAN)[1] or {}).get(
            "metric", metric
        )
    samples = per_sample_source(args, metric)
    print(f"similarity: {label} ({num_layers} layers)")
    header = f"{'eps':>5}  {'greedy':>6}  {'optimal':>7}  {'opt/greedy':>10}  {'saved g':>7}  {'saved o':>7}  {'solve s':>7}"
    if args.contiguous:
        header += f"  {'contig':>6}"
    if samples is not None:
        print(
            f"robust: {samples.shape[0]} calibration samples, 200 resamples; 'saved r' = layers saved by greedy "
            f"when a pair must clear ε with its {args.confidence:.0%} lower bound; 'freq g' = bootstrap plan "
            "frequency of the plain greedy plan"
        )
        header += f"  {'saved r':>7}  {'r/g':>5}  {'freq g':>6}"
    print(header)
    for threshold in THRESHOLDS:
        greedy = greedy_share_sets(sim, threshold)
        start = time.perf_counter()
        try:
            optimal = optimal_share_sets(sim, threshold, time_limit=args.time_limit)
        except PlanError as err:
            print(f"{threshold:>5.2f}  {distinct_modules(num_layers, greedy):>6}  (optimal failed: {err})")
            continue
        seconds = time.perf_counter() - start
        greedy_distinct = distinct_modules(num_layers, greedy)
        optimal_distinct = distinct_modules(num_layers, optimal)
        row = (
            f"{threshold:>5.2f}  {greedy_distinct:>6}  {optimal_distinct:>7}  "
            f"{optimal_distinct / greedy_distinct:>10.3f}  {layers_saved(greedy):>7}  {layers_saved(optimal):>7}  "
            f"{seconds:>7.3f}"
        )
        if args.contiguous:
            row += f"  {distinct_modules(num_layers, optimal_share_sets(sim, threshold, contiguous=True)):>6}"
        if samples is not None:
            plain = plan_with_stability(samples, sim, metric=metric, threshold=threshold, bootstrap_seed=42)
            robust = plan_with_stability(
                samples,
                sim,
                metric=metric,
                threshold=threshold,
                confidence=args.confidence,
                bootstrap_seed=42,
            )
            ratio = f"{robust.layers_saved / plain.layers_saved:.2f}" if plain.layers_saved else "-"
            row += f"  {robust.layers_saved:>7}  {ratio:>5}  {plain.stability['plan_frequency']:>6.2f}"
        print(row)


if __name__ == "__main__":
    main()
