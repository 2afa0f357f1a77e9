"""Stop-when-stable calibration on the embedded SmolLM2 with the Lee news texts: samples used and agreement.

    python bench/calibration_convergence.py [--orders 5] [--thresholds 0.85,0.88,0.90] [--refresh]

One calibration pass over all 256 Lee background texts (max 256 tokens, the demo's settings) keeps every sample's
L x L distance matrices (cached in outputs/calibration_convergence/per_sample.npz; ~3 min on 2 CPU cores the first
time). Each sample's matrix depends on that sample alone, so stop-when-stable calibration over a shuffled sample
order is replayed from the cache: batches of 16 in that order are handed to the plugin's own stopping rule
(``planning.StopWhenStable``, the object the plugin calls after every calibration batch) until it says stop or the
256 are used. For every ε and order it prints the samples used and whether the stopped plan equals the plan of
all 256 samples, then per ε the means and the machine-readable lines

    RATIO samples used / 256 at eps 0.90 = x.xx
    AGREEMENT stopped plan = full plan at eps 0.90 = y.yy

It also prints the bootstrap stability of each full 256-sample plan (what `sharelora show` reports) and, as a
check of what the bootstrap estimates, how often the plan of a random subset of 16/32/64/128 texts (20 subsets
each) equals the 256-sample plan.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run by path: make `bench` importable
from bench.common import REPO, calibrate_on_lee, use_offline_env  # noqa: E402

use_offline_env()

import numpy as np  # noqa: E402

from sharelora_plugin.planning import (  # noqa: E402
    StopWhenStable,
    load_per_sample,
    plan_with_stability,
    save_per_sample,
    similarity_from_distances,
)
from sharelora_plugin.planning.rules import (  # noqa: E402
    DEFAULT_MIN_SAMPLES,
    DEFAULT_RESAMPLES,
    DEFAULT_STABILITY_TARGET,
)

NUM_SAMPLES = 256
BATCH_SIZE = 16  # the demo recipe's calibration batch
MAX_LENGTH = 256
CACHE = REPO / "outputs" / "calibration_convergence" / "per_sample.npz"


def per_sample_matrices(refresh: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample angular distances and cosines of the 256 Lee texts, from the cache or one calibration pass
    through the plugin's own calibration (``workflow.run_calibration``)."""
    if CACHE.is_file() and not refresh:
        return load_per_sample(CACHE)
    result, _, seconds = calibrate_on_lee(NUM_SAMPLES, MAX_LENGTH, BATCH_SIZE)
    print(f"calibration: {result.num_samples} texts, {result.num_tokens} tokens, {seconds:.0f} s")
    save_per_sample(CACHE, result.per_sample_angular, result.per_sample_cosine)
    return result.per_sample_angular, result.per_sample_cosine


def replay(samples: np.ndarray, order: np.ndarray, options: dict) -> tuple[int, list[list[int]]]:
    """Stop-when-stable over ``samples`` taken in ``order``, in calibration batches; returns the samples used and
    the plan made from them (as the plugin makes it after calibration stops)."""
    stopper = StopWhenStable(
        plan_options=options, min_samples=DEFAULT_MIN_SAMPLES, target=DEFAULT_STABILITY_TARGET
    )
    used = len(order)
    for end in range(BATCH_SIZE, len(order) + 1, BATCH_SIZE):
        taken = samples[order[:end]]
        if stopper(taken.mean(axis=0), taken):
            used = end
            break
    taken = samples[order[:used]]
    plan = plan_with_stability(taken, taken.mean(axis=0), **{**options, "resamples": 0})
    return used, plan.share_sets


def subset_agreement(
    samples: np.ndarray, options: dict, full_sets: list[list[int]], size: int, draws: int
) -> int:
    """How many of ``draws`` random subsets of ``size`` samples give exactly the full plan's sets."""
    rng = np.random.default_rng(size)
    same = 0
    for _ in range(draws):
        taken = samples[rng.choice(samples.shape[0], size=size, replace=False)]
        plan = plan_with_stability(taken, taken.mean(axis=0), **{**options, "resamples": 0})
        same += plan.share_sets == full_sets
    return same


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--orders", type=int, default=5, help="shuffled sample orders per ε (default 5)")
    parser.add_argument(
        "--thresholds", default="0.85,0.88,0.90", help="comma list of ε (default 0.85,0.88,0.90)"
    )
    parser.add_argument("--strategy", default="greedy", choices=("greedy", "optimal"))
    parser.add_argument("--refresh", action="store_true", help="recalibrate instead of using the cache")
    args = parser.parse_args()

    angular, cosine = per_sample_matrices(args.refresh)
    samples = similarity_from_distances(angular, cosine, "angular")
    full_mean = samples.mean(axis=0)
    print(
        f"SmolLM2-135M-Instruct, {samples.shape[0]} Lee texts, {samples.shape[1]} layers, angular, {args.strategy}; "
        f"stop rule: min {DEFAULT_MIN_SAMPLES} samples, plan frequency >= {DEFAULT_STABILITY_TARGET} over "
        f"{DEFAULT_RESAMPLES} resamples, checked every {BATCH_SIZE} samples"
    )
    for threshold in [float(part) for part in args.thresholds.split(",")]:
        options = {
            "metric": "angular",
            "strategy": args.strategy,
            "threshold": threshold,
            "resamples": DEFAULT_RESAMPLES,
            "bootstrap_seed": 42,
        }
        full = plan_with_stability(samples, full_mean, **options)
        stability = full.stability
        print(f"\neps {threshold:.2f}: full plan {full.share_sets} ({full.layers_saved} layers saved)")
        print(
            f"  bootstrap of the 256-sample plan: plan frequency {stability['plan_frequency']:.2f}, set frequencies "
            + ", ".join(f"{value:.2f}" for value in stability["set_frequency"])
        )
        used_counts, agree = [], []
        for order_seed in range(args.orders):
            order = np.random.default_rng(1000 + order_seed).permutation(samples.shape[0])
            start = time.perf_counter()
            used, sets = replay(samples, order, options)
            same = sets == full.share_sets
            used_counts.append(used)
            agree.append(same)
            print(
                f"  order {order_seed}: stopped at {used:>3} samples, plan {'=' if same else '!='} full plan "
                f"({time.perf_counter() - start:.1f} s of planning)"
            )
        print(
            f"  samples used: mean {np.mean(used_counts):.0f}, min {min(used_counts)}, max {max(used_counts)}"
        )
        agreement = [
            f"{size}: {subset_agreement(samples, options, full.share_sets, size, 20)}/20"
            for size in (16, 32, 64, 128)
        ]
        print("  random subsets whose plan equals the 256-sample plan: " + ", ".join(agreement))
        print(
            f"RATIO samples used / {samples.shape[0]} at eps {threshold:.2f} = {np.mean(used_counts) / samples.shape[0]:.2f}"
        )
        print(f"AGREEMENT stopped plan = full plan at eps {threshold:.2f} = {np.mean(agree):.2f}")


if __name__ == "__main__":
    main()
