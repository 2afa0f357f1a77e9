"""The numbers of a finished comparison: per-method mean and seed spread, what a constant answer scores, and the
findings — plain sentences of what the numbers say, written whichever way they go."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from bench.reproduce_small.settings import METHODS


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(runs: list[dict], methods: Sequence[str]) -> list[dict]:
    """Per method: params, fraction of LoRA, time, losses and accuracy as mean and spread (sample std) over seeds."""
    lora_params = next((r["trainable_params"] for r in runs if r["method"] == "lora"), None)
    rows = []
    for name in methods:
        mine = [r for r in runs if r["method"] == name]
        if not mine:
            continue
        params = mine[0]["trainable_params"]
        row = {
            "method": name,
            "label": METHODS[name].label,
            "seeds": [r["seed"] for r in mine],
            "trainable_params": params,
            "params_by_seed": sorted({r["trainable_params"] for r in mine}),
            "fraction_of_lora": round(statistics.fmean(r["trainable_params"] for r in mine) / lora_params, 4)
            if lora_params
            else None,
            "rank": mine[0]["rank"],
        }
        for key in (
            "train_seconds",
            "wall_seconds",
            "train_loss",
            "heldout_answer_loss",
            "lee_ppl",
            "average_accuracy",
        ):
            mean, std = _mean_std([r[key] for r in mine])
            row[key] = {"mean": round(mean, 6), "std": round(std, 6)}
        tasks = mine[0]["accuracy"].keys()
        row["accuracy"] = {t: round(statistics.fmean(r["accuracy"][t] for r in mine), 6) for t in tasks}
        row["no_answer_rate"] = round(statistics.fmean(r["unanswered"] / r["num_test"] for r in mine), 6)
        rows.append(row)
    return rows


def chance_accuracy(tests: dict[str, list[dict]]) -> float:
    """Mean over tasks of 1/number of labels: what a constant (or random) answer scores on balanced tests."""
    from bench.commonsense import infer_answer_format

    sizes = [len({r["answer"] for r in rows}) for rows in tests.values()]
    for name, rows in tests.items():
        infer_answer_format(name, rows)  # fails loudly on a malformed task
    return statistics.fmean(1.0 / n for n in sizes)


def _verdict(delta: float, spread: float) -> str:
    """How a difference reads against the seed spread (with one seed there is no spread to judge by)."""
    if abs(delta) < 1e-9:
        return "equal to"
    if abs(delta) <= spread:
        return "within the seed spread of"
    return "higher than" if delta > 0 else "lower than"


def findings(summary: list[dict], quick: bool, chance: float | None = None) -> list[str]:
    """Plain statements of what the numbers say, written whichever way they go. Losses: lower is better."""
    by = {row["method"]: row for row in summary}
    lines = []
    if quick:
        lines.append(
            "QUICK RUN: a couple of training steps per method — a pipeline check, not a measurement. "
            "Run without --quick for the result."
        )
    if summary and len(summary[0]["seeds"]) < 2:
        lines.append("One seed: there is no seed spread, so any difference below is unqualified by noise.")
    if chance is not None and summary:
        best = max(row["average_accuracy"]["mean"] for row in summary)
        worst = min(row["average_accuracy"]["mean"] for row in summary)
        near = all(abs(row["average_accuracy"]["mean"] - chance) <= 0.05 for row in summary)
        lines.append(
            f"Accuracy ranges {100 * worst:.1f}–{100 * best:.1f}% against {100 * chance:.1f}% for a constant answer"
            + (
                ": every method is at chance on the rule tasks, so accuracy does not separate the methods "
                "here; the held-out losses do."
                if near
                else "."
            )
        )
    lora = by.get("lora")
    for name, row in by.items():
        if name == "lora" or lora is None:
            continue
        acc, ref = row["average_accuracy"], lora["average_accuracy"]
        delta = acc["mean"] - ref["mean"]
        ppl, ref_ppl = row["lee_ppl"], lora["lee_ppl"]
        loss, ref_loss = row["heldout_answer_loss"], lora["heldout_answer_loss"]
        lines.append(
            f"{row['label']} ({100 * row['fraction_of_lora']:.0f}% of LoRA's trainable parameters): accuracy "
            f"{100 * acc['mean']:.1f}% vs {100 * ref['mean']:.1f}% ({_verdict(delta, max(acc['std'], ref['std']))} "
            f"LoRA); Lee perplexity {ppl['mean']:.3f} vs {ref_ppl['mean']:.3f} "
            f"({_verdict(ppl['mean'] - ref_ppl['mean'], max(ppl['std'], ref_ppl['std']))} LoRA); held-out answer "
            f"loss {loss['mean']:.4f} vs {ref_loss['mean']:.4f} "
            f"({_verdict(loss['mean'] - ref_loss['mean'], max(loss['std'], ref_loss['std']))} LoRA)."
        )
    greedy = by.get("sharelora")
    for other, what in (
        ("sharelora_random", "random adjacent sets (ShareLoRA*)"),
        ("naive_share", "naive odd/even"),
    ):
        row = by.get(other)
        if greedy and row:
            ppl, ref = greedy["lee_ppl"], row["lee_ppl"]
            lines.append(
                f"Similarity-chosen (greedy) sets vs {what}: Lee perplexity {ppl['mean']:.3f} vs {ref['mean']:.3f} "
                f"({_verdict(ppl['mean'] - ref['mean'], max(ppl['std'], ref['std']))} it), accuracy "
                f"{100 * greedy['average_accuracy']['mean']:.1f}% vs {100 * row['average_accuracy']['mean']:.1f}%, "
                f"at {100 * greedy['fraction_of_lora']:.0f}% vs {100 * row['fraction_of_lora']:.0f}% of LoRA's parameters."
            )
    return lines
