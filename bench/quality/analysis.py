"""From runs to conclusions: per-seed numbers per arm, the paired comparisons, and the decision rules applied."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from bench.quality import stats
from bench.quality.settings import ARMS

# (key, arm, reference, hypothesis or None): differences are arm − reference
COMPARISONS = [
    ("lora_vs_base", "lora", "base", "gate"),
    ("greedy_vs_lora", "greedy", "lora", "H1"),
    ("greedy_rx_vs_lora", "greedy_rx", "lora", "H3"),
    ("random_vs_lora", "random", "lora", None),
    ("naive_vs_lora", "naive", "lora", None),
    ("gradient_vs_lora", "gradient", "lora", None),
    ("greedy_vs_random", "greedy", "random", "H2"),
    ("greedy_vs_naive", "greedy", "naive", None),
    ("gradient_vs_greedy", "gradient", "greedy", "H4"),
]


def per_seed(runs: Sequence[dict], base: dict) -> dict[str, dict[int, dict]]:
    """{arm: {seed: numbers}}; ShareLoRA*'s draws at a seed are averaged (item correctness becomes a fraction);
    the untrained base model is the same at every seed."""
    grouped: dict[str, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        grouped[run["arm"]][run["seed"]].append(run)
    result: dict[str, dict[int, dict]] = {}
    for arm, seeds in grouped.items():
        result[arm] = {seed: _average(draws) for seed, draws in seeds.items()}
    all_seeds = sorted({r["seed"] for r in runs})
    result["base"] = {seed: _average([base]) for seed in all_seeds}
    return result


def _average(draws: Sequence[dict]) -> dict:
    tasks = draws[0]["tasks"].keys()
    return {
        "ppl": float(np.mean([d["ppl"] for d in draws])),
        "lee_ppl": float(np.mean([d["lee_ppl"] for d in draws])) if draws[0]["lee_ppl"] else None,
        "answer_loss": {
            t: float(np.mean([d["tasks"][t]["summary"]["answer_loss"] for d in draws])) for t in tasks
        },
        "accuracy": {t: float(np.mean([d["tasks"][t]["summary"]["accuracy"] for d in draws])) for t in tasks},
        "correct": {t: np.mean([d["tasks"][t]["items"]["correct"] for d in draws], axis=0) for t in tasks},
        "draws": len(draws),
    }


def compare(seeds_of: dict[str, dict[int, dict]], arm: str, reference: str) -> dict | None:
    """Paired differences of ``arm`` against ``reference`` on the seeds both have."""
    if arm not in seeds_of or reference not in seeds_of:
        return None
    seeds = sorted(set(seeds_of[arm]) & set(seeds_of[reference]))
    if not seeds:
        return None
    a = [seeds_of[arm][s] for s in seeds]
    r = [seeds_of[reference][s] for s in seeds]
    out = {
        "seeds": seeds,
        "ppl_percent": stats.paired_interval(
            stats.relative_percent([x["ppl"] for x in a], [x["ppl"] for x in r])
        ).as_dict(),
        "answer_loss_percent": {},
        "accuracy_points": {},
    }
    if a[0]["lee_ppl"] and r[0]["lee_ppl"]:
        out["lee_ppl_percent"] = stats.paired_interval(
            stats.relative_percent([x["lee_ppl"] for x in a], [x["lee_ppl"] for x in r])
        ).as_dict()
    for task in a[0]["accuracy"]:
        out["answer_loss_percent"][task] = stats.paired_interval(
            stats.relative_percent([x["answer_loss"][task] for x in a], [x["answer_loss"][task] for x in r])
        ).as_dict()
        out["accuracy_points"][task] = stats.paired_bootstrap_accuracy(
            np.stack([x["correct"][task] for x in a]), np.stack([x["correct"][task] for x in r])
        )
    return out


def decide(comparisons: dict[str, dict | None]) -> dict[str, dict]:
    """Apply the rules of :mod:`bench.quality.stats` (the gate first: without it no hypothesis is judged)."""
    decisions: dict[str, dict] = {}
    gate_cmp = comparisons.get("lora_vs_base")
    gate = "fails"
    informative: dict[str, bool] = {}
    if gate_cmp:
        gate = stats.gate(stats.Paired(**gate_cmp["ppl_percent"] | _nan_fix(gate_cmp["ppl_percent"])))
        informative = {t: stats.accuracy_informative(v) for t, v in gate_cmp["accuracy_points"].items()}
    decisions["gate"] = {"outcome": gate, "accuracy_informative": informative}
    rules = {
        "H1": lambda p: stats.non_inferior(p, stats.H1_MARGIN, strict=True),
        "H2": stats.better,
        "H3": lambda p: stats.non_inferior(p, stats.H3_MARGIN, strict=False),
        "H4": stats.better,
    }
    for key, _arm, _ref, hypothesis in COMPARISONS:
        if hypothesis not in rules:
            continue
        cmp = comparisons.get(key)
        if cmp is None:
            decisions[hypothesis] = {"outcome": "not run", "comparison": key}
            continue
        paired = stats.Paired(**cmp["ppl_percent"] | _nan_fix(cmp["ppl_percent"]))
        outcome = rules[hypothesis](paired) if gate == "passes" else "not judged (validity gate failed)"
        decisions[hypothesis] = {
            "outcome": outcome,
            "comparison": key,
            "mean": paired.mean,
            "low": paired.low,
            "high": paired.high,
            "n": paired.n,
        }
    return decisions


def _nan_fix(values: dict) -> dict:
    return {k: float("nan") for k in ("low", "high") if values.get(k) is None}


def analyze(runs: Sequence[dict], base: dict, arms: Sequence[str]) -> dict:
    """Per-seed numbers, every comparison whose arms ran, and the decisions."""
    seeds_of = per_seed(runs, base)
    comparisons = {
        key: compare(seeds_of, arm, ref) for key, arm, ref, _ in COMPARISONS if arm in arms and ref in arms
    }
    summary = {}
    for arm in arms:
        if arm not in seeds_of:
            continue
        rows = list(seeds_of[arm].values())
        ppl = [r["ppl"] for r in rows]
        summary[arm] = {
            "label": ARMS[arm].label,
            "seeds": sorted(seeds_of[arm]),
            "ppl_mean": float(np.mean(ppl)),
            "ppl_std": float(np.std(ppl, ddof=1)) if len(ppl) > 1 else 0.0,
            "lee_ppl_mean": float(np.mean([r["lee_ppl"] for r in rows])) if rows[0]["lee_ppl"] else None,
            "accuracy": {t: float(np.mean([r["accuracy"][t] for r in rows])) for t in rows[0]["accuracy"]},
            "answer_loss": {
                t: float(np.mean([r["answer_loss"][t] for r in rows])) for t in rows[0]["answer_loss"]
            },
        }
    return {
        "summary": summary,
        "per_seed_ppl": {arm: {s: v["ppl"] for s, v in seeds.items()} for arm, seeds in seeds_of.items()},
        "comparisons": comparisons,
        "decisions": decide(comparisons),
    }
