"""Paired statistics and the decision rules, fixed before any number is seen.

Differences are paired by seed: every arm trains at a seed on the same rows, order, learning rate and schedule, so
the seed-to-seed variation common to all arms cancels. Perplexity differences are relative (percent of the
reference's perplexity at that seed); intervals are t-based 95 % intervals over seeds. Accuracy differences use a
paired bootstrap that resamples seeds and test items together.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

CONFIDENCE = 0.95
GATE_PPL_PERCENT = 2.0  # LoRA must lower the primary perplexity by at least this much vs the base model
GATE_ACCURACY_POINTS = (
    2.0  # ... and raise a task's accuracy by at least this many points, else it is uninformative
)
H1_MARGIN = 0.5  # % perplexity: similarity sharing keeps quality when the whole interval is below +0.5 %
H3_MARGIN = 0.25  # % perplexity: rank expansion matches LoRA when the whole interval is at or below +0.25 %

RULES = [
    (
        "validity gate",
        f"LoRA lowers the pooled test perplexity below the base model's by at least {GATE_PPL_PERCENT:g} % (mean over "
        "seeds) with the whole 95 % interval below 0; otherwise training did not learn the tasks and no hypothesis is "
        f"judged. A task's accuracy counts only where LoRA's mean gain over the base model is at least "
        f"{GATE_ACCURACY_POINTS:g} points with the bootstrap interval above 0; otherwise that accuracy is declared "
        "uninformative.",
    ),
    (
        "H1 similarity sharing keeps quality",
        f"greedy vs LoRA, Δ perplexity %: holds if the upper bound < +{H1_MARGIN:g} %; fails if the lower bound >= "
        f"+{H1_MARGIN:g} %; else inconclusive.",
    ),
    (
        "H2 similarity-chosen sets beat random adjacent sets",
        "greedy vs ShareLoRA* (mean of the seed's random plans), Δ perplexity %: holds if the whole interval < 0; "
        "fails if the whole interval > 0; else inconclusive.",
    ),
    (
        "H3 rank expansion matches LoRA",
        f"greedy + rank expansion vs LoRA, Δ perplexity %: holds if the upper bound <= +{H3_MARGIN:g} %; fails if the "
        f"lower bound > +{H3_MARGIN:g} %; else inconclusive.",
    ),
    (
        "H4 the gradient_subspace plan beats the similarity plan",
        "gradient_subspace greedy vs angular greedy (same saving), Δ perplexity %: holds if the whole interval < 0; "
        "fails if the whole interval > 0; else inconclusive.",
    ),
]


@dataclass
class Paired:
    """A paired comparison over seeds: mean, 95 % interval, sign counts (lower = better for perplexity)."""

    n: int
    mean: float
    low: float
    high: float
    lower: int  # seeds where the difference is < 0
    higher: int  # seeds where it is > 0
    values: list[float]

    def as_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}


def paired_interval(differences: Sequence[float], confidence: float = CONFIDENCE) -> Paired:
    """Mean and t-based interval of per-seed differences; with fewer than 2 seeds the interval is undefined (nan)."""
    from scipy import stats

    values = [float(v) for v in differences]
    n = len(values)
    mean = float(np.mean(values)) if values else float("nan")
    if n >= 2:
        sem = float(np.std(values, ddof=1)) / math.sqrt(n)
        half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sem
        low, high = mean - half, mean + half
    else:
        low = high = float("nan")
    return Paired(
        n=n,
        mean=mean,
        low=low,
        high=high,
        lower=sum(v < 0 for v in values),
        higher=sum(v > 0 for v in values),
        values=values,
    )


def relative_percent(values: Sequence[float], reference: Sequence[float]) -> list[float]:
    """Per seed, ``100 · (value / reference − 1)``."""
    return [100.0 * (v / r - 1.0) for v, r in zip(values, reference, strict=True)]


def paired_bootstrap_accuracy(
    arm: np.ndarray,
    reference: np.ndarray,
    resamples: int = 2000,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> dict:
    """Accuracy difference in points (arm − reference) with a bootstrap interval that resamples seeds and test
    items together. ``arm`` and ``reference`` are ``[seeds, items]`` 0/1 arrays paired on both axes (a reference
    without seeds, the base model, is a ``[1, items]`` array broadcast to every seed)."""
    arm = np.asarray(arm, dtype=np.float64)
    reference = np.broadcast_to(np.asarray(reference, dtype=np.float64), arm.shape)
    diff = arm - reference
    seeds, items = diff.shape
    rng = np.random.default_rng(seed)
    draws = np.empty(resamples)
    for b in range(resamples):
        s = rng.integers(0, seeds, seeds)
        i = rng.integers(0, items, items)
        draws[b] = diff[np.ix_(s, i)].mean()
    alpha = (1 - confidence) / 2
    return {
        "mean": 100 * float(diff.mean()),
        "low": 100 * float(np.quantile(draws, alpha)),
        "high": 100 * float(np.quantile(draws, 1 - alpha)),
        "n_seeds": seeds,
        "n_items": items,
    }


def non_inferior(p: Paired, margin: float, strict: bool = True) -> str:
    """'holds' when the upper bound is below ``margin`` (at or below when not ``strict``), 'fails' when the lower
    bound is beyond it, else 'inconclusive' (also when there is no interval)."""
    if math.isnan(p.low) or math.isnan(p.high):
        return "inconclusive"
    if p.high < margin or (not strict and p.high <= margin):
        return "holds"
    if p.low > margin or (strict and p.low >= margin):
        return "fails"
    return "inconclusive"


def better(p: Paired) -> str:
    """'holds' when the whole interval is below 0, 'fails' when it is above 0, else 'inconclusive'."""
    if math.isnan(p.low) or math.isnan(p.high):
        return "inconclusive"
    if p.high < 0:
        return "holds"
    if p.low > 0:
        return "fails"
    return "inconclusive"


def gate(lora_vs_base: Paired) -> str:
    """The validity gate on the primary metric: 'passes' or 'fails'."""
    if math.isnan(lora_vs_base.high):
        return "fails"
    ok = lora_vs_base.mean <= -GATE_PPL_PERCENT and lora_vs_base.high < 0
    return "passes" if ok else "fails"


def accuracy_informative(lora_vs_base: dict) -> bool:
    """A task's accuracy counts when LoRA's gain over the base model clears the gate."""
    return lora_vs_base["mean"] >= GATE_ACCURACY_POINTS and lora_vs_base["low"] > 0
