"""Similarity matrix -> :class:`SharePlan` (which decoder layers share one set of LoRA modules).

The pure planning layer of ShareLoRA (paper §3): it knows nothing of torch, PEFT or Axolotl, so every algorithm
here can be tested on plain matrices. One module per job:

* :mod:`.rules`       every rule, constant and default (threshold range, strategies, ``contiguous``, set shapes)
* :mod:`.similarity`  validating and reading similarity matrices; the per-sample ``sharelora_calibration.npz``
* :mod:`.sets`        share sets and their counts (layers saved, distinct modules, eq. 3, rank expansion)
* :mod:`.strategies`  greedy (Algorithm 1, constraint re-checked), optimal (MILP / contiguous DP), random, alternate
* :mod:`.budget`      the threshold for a parameter budget
* :mod:`.plan`        :class:`SharePlan` and its JSON file format
* :mod:`.planner`     :func:`make_plan`: the similar pairs and the sets of each strategy
* :mod:`.stability`   bootstrap stability of a plan, the robust option and the stop-when-stable rule
* :mod:`.files`       JSON / JSONL reading and atomic writing (plan, calibration and the repo's scripts)
"""

from sharelora_plugin.planning.budget import threshold_for_budget, threshold_for_params
from sharelora_plugin.planning.plan import FORMAT_VERSION, SharePlan, stability_line
from sharelora_plugin.planning.planner import choose_share_sets, evidence_similarity, make_plan
from sharelora_plugin.planning.rules import (
    DATA_STRATEGIES,
    DEFAULT_MIN_SAMPLES,
    DEFAULT_OPTIMAL_TIME_LIMIT_S,
    DEFAULT_RESAMPLES,
    DEFAULT_SEED,
    DEFAULT_STABILITY_TARGET,
    DEFAULT_THRESHOLD,
    METRICS,
    STRATEGIES,
    PlanError,
)
from sharelora_plugin.planning.sets import (
    distinct_modules,
    expanded_rank,
    layers_covered,
    layers_saved,
    satisfies_threshold,
    set_min_similarity,
    validate_share_sets,
)
from sharelora_plugin.planning.similarity import (
    CALIBRATION_FILENAME,
    load_per_sample,
    load_similarity,
    save_per_sample,
    similarity_from_distances,
    synthetic_similarity,
    validate_similarity,
)
from sharelora_plugin.planning.stability import (
    StopWhenStable,
    lower_bound,
    plan_with_stability,
    resampled_means,
    stability_report,
)
from sharelora_plugin.planning.strategies import (
    alternate_share_sets,
    greedy_share_sets,
    optimal_share_sets,
    random_adjacent_share_sets,
)

__all__ = [
    "CALIBRATION_FILENAME",
    "DATA_STRATEGIES",
    "DEFAULT_MIN_SAMPLES",
    "DEFAULT_OPTIMAL_TIME_LIMIT_S",
    "DEFAULT_RESAMPLES",
    "DEFAULT_SEED",
    "DEFAULT_STABILITY_TARGET",
    "DEFAULT_THRESHOLD",
    "FORMAT_VERSION",
    "METRICS",
    "STRATEGIES",
    "PlanError",
    "SharePlan",
    "StopWhenStable",
    "alternate_share_sets",
    "choose_share_sets",
    "distinct_modules",
    "evidence_similarity",
    "expanded_rank",
    "greedy_share_sets",
    "layers_covered",
    "layers_saved",
    "load_per_sample",
    "load_similarity",
    "lower_bound",
    "make_plan",
    "optimal_share_sets",
    "plan_with_stability",
    "random_adjacent_share_sets",
    "resampled_means",
    "satisfies_threshold",
    "save_per_sample",
    "set_min_similarity",
    "similarity_from_distances",
    "stability_line",
    "stability_report",
    "synthetic_similarity",
    "threshold_for_budget",
    "threshold_for_params",
    "validate_share_sets",
    "validate_similarity",
]
