"""Greedy (Algorithm 1) vs exact optimal share sets across thresholds: distinct modules, layers saved, solve time.

    python bench/plan_quality.py                      # outputs/smollm2_sharelora/sharelora_plan.json if present
    python bench/plan_quality.py --matrix FILE        # a sharelora_plan.json or an L x L CSV of similarities
    python bench/plan_quality.py --synthetic [--layers 30 --seed 0]

Runs in seconds on a CPU (optimal is a HiGHS MILP per threshold; ``--contiguous`` also shows the exact
adjacent-runs optimum).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from sharelora_plugin.planning import (  # noqa: E402
    PlanError,
    distinct_modules,
    greedy_share_sets,
    layers_saved,
    load_similarity,
    optimal_share_sets,
    synthetic_similarity,
)

DEFAULT_PLAN = REPO / "outputs" / "smollm2_sharelora" / "sharelora_plan.json"
THRESHOLDS = [round(0.80 + 0.01 * step, 2) for step in range(16)]


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
    args = parser.parse_args()

    try:
        sim, label = load_source(args)
    except PlanError as err:
        raise SystemExit(str(err)) from None
    num_layers = sim.shape[0]
    print(f"similarity: {label} ({num_layers} layers)")
    header = f"{'eps':>5}  {'greedy':>6}  {'optimal':>7}  {'opt/greedy':>10}  {'saved g':>7}  {'saved o':>7}  {'solve s':>7}"
    if args.contiguous:
        header += f"  {'contig':>6}"
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
        print(row)


if __name__ == "__main__":
    main()
