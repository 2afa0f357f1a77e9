"""The report: ``quality.json`` (everything, per seed and per item), ``quality.md`` (rules first, then numbers and
what they decide) and ``quality.png`` (per-seed paired differences with their intervals)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from bench.quality import stats
from bench.quality.analysis import COMPARISONS
from bench.quality.settings import ARMS


def _pct(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:+.{digits}f}"


def _interval(p: dict | None, unit: str = "%") -> str:
    if not p:
        return "–"
    if p.get("low") is None:
        return f"{_pct(p['mean'])} {unit} (one seed: no interval)"
    return f"{_pct(p['mean'])} {unit} [{_pct(p['low'])}, {_pct(p['high'])}]"


def render_markdown(report: dict) -> str:
    """The Markdown report (rules first, so the reader sees them before the numbers)."""
    lines = [
        f"# Does sharing keep quality? ({'QUICK pipeline check, not a measurement' if report['quick'] else 'full run'})",
        "",
    ]
    lines += [
        f"`{report['command']}` on {report['machine']}; {report['total_minutes']:.1f} min in all, the first training "
        f"run took {report['first_run_seconds']:.0f} s (training + evaluation). Model {report['model_name']}; LoRA r 8, "
        f"α 16, dropout 0.05 on q, k, v, up, down; {report['budget']['steps']} steps of micro-batch "
        f"{report['budget']['micro_batch_size']}, lr {report['budget']['learning_rate']:g} linear; seeds "
        f"{', '.join(map(str, report['budget']['seeds']))}; {report['budget']['random_plans']} ShareLoRA* plan(s) per seed.",
        "",
        "## Decision rules (fixed before the numbers; applied by `bench/quality/stats.py`)",
        "",
    ]
    lines += [f"- **{name}**: {text}" for name, text in stats.RULES]
    lines += ["", "## Tasks", ""]
    for task in report["tasks"]:
        lines.append(
            f"- `{task['name']}`: {task['train']} training rows, {task['test']} test rows ({task['scoring']})."
        )
    lines += [
        "",
        "## Decisions",
        "",
        "| rule | outcome | Δ perplexity (mean [95 % interval]) | seeds |",
        "|---|---|---|---|",
    ]
    decisions = report["analysis"]["decisions"]
    gate = decisions["gate"]
    informative = ", ".join(
        f"{t}: {'informative' if ok else 'uninformative'}" for t, ok in gate["accuracy_informative"].items()
    )
    gate_cmp = report["analysis"]["comparisons"].get("lora_vs_base")
    lines.append(
        f"| validity gate | {gate['outcome']} (accuracy — {informative or 'n/a'}) | LoRA vs base "
        f"{_interval(gate_cmp and gate_cmp['ppl_percent'])} | {len(gate_cmp['seeds']) if gate_cmp else 0} |"
    )
    for hypothesis in ("H1", "H2", "H3", "H4"):
        d = decisions.get(hypothesis)
        if not d:
            continue
        cmp = report["analysis"]["comparisons"].get(d["comparison"])
        lines.append(
            f"| {hypothesis} ({d['comparison'].replace('_vs_', ' vs ')}) | **{d['outcome']}** | "
            f"{_interval(cmp and cmp['ppl_percent'])} | {d.get('n', 0)} |"
        )
    lines += ["", "## Arms", ""]
    tasks = [t["name"] for t in report["tasks"]]
    lines.append(
        "| arm | LoRA params (distinct) | share of LoRA | test ppl (mean ± sd over seeds) | "
        + " | ".join(f"{t} accuracy" for t in tasks)
        + " | Lee ppl |"
    )
    lines.append("|---|---|---|---|" + "---|" * len(tasks) + "---|")
    params = report["params"]
    for arm, row in report["analysis"]["summary"].items():
        share = f"{params[arm] / params['lora']:.3f}" if params.get(arm) and params.get("lora") else "–"
        lee = f"{row['lee_ppl_mean']:.3f}" if row["lee_ppl_mean"] else "–"
        lines.append(
            f"| {row['label']} | {params.get(arm, 0) or 0:,} | {share} | {row['ppl_mean']:.4f} ± {row['ppl_std']:.4f} | "
            + " | ".join(f"{100 * row['accuracy'][t]:.1f} %" for t in tasks)
            + f" | {lee} |"
        )
    lines += [
        "",
        "## Paired differences (arm − reference; per seed, relative to the reference; lower perplexity is better)",
        "",
        "| comparison | test ppl % | Lee ppl % | "
        + " | ".join(f"{t} answer loss %" for t in tasks)
        + " | "
        + " | ".join(f"{t} accuracy points" for t in tasks)
        + " | lower / higher seeds |",
        "|---|---|---|" + "---|" * (2 * len(tasks)) + "---|",
    ]
    for key, *_ in COMPARISONS:
        cmp = report["analysis"]["comparisons"].get(key)
        if not cmp:
            continue
        ppl = cmp["ppl_percent"]
        lines.append(
            f"| {key.replace('_vs_', ' vs ')} | {_interval(ppl)} | {_interval(cmp.get('lee_ppl_percent'))} | "
            + " | ".join(_interval(cmp["answer_loss_percent"][t]) for t in tasks)
            + " | "
            + " | ".join(_interval(cmp["accuracy_points"][t], "pts") for t in tasks)
            + f" | {ppl['lower']} / {ppl['higher']} |"
        )
    lines += [
        "",
        "## Plans",
        "",
        "| arm | sets | rank | layers saved | share of LoRA | ε | bootstrap plan frequency |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, plan in report["plans"].items():
        freq = plan.get("plan_frequency")
        lines.append(
            f"| {ARMS[arm].label if arm in ARMS else arm} | {plan['share_sets']} | {plan['rank']} | {plan['layers_saved']} | "
            f"{plan['param_fraction']:.3f} | {'–' if plan['threshold'] is None else format(plan['threshold'], '.4g')} | "
            f"{'–' if freq is None else f'{freq:.2f}'} |"
        )
    signal = report.get("signal")
    if signal:
        perm = signal.get("greedy_vs_random_plans") or {}
        lines += [
            "",
            "## The gradient_subspace signal",
            "",
            f"- Spearman correlation with angular similarity over layer pairs: {signal['spearman_vs_angular']:.3f}.",
            f"- Overlap: adjacent layers {signal['adjacent_mean']:.4f}, all pairs {signal['all_pairs_mean']:.4f}, "
            f"random level {signal['random_level']:.4f}.",
            "- Within-set overlap: "
            + ", ".join(
                f"{name} {value:.4f}" for name, value in signal["within_set"].items() if not math.isnan(value)
            )
            + ".",
        ]
        if perm:
            lines.append(
                f"- Angular greedy plan vs {perm['draws']:,} random adjacent plans of the same shape: "
                f"{perm['observed']:.4f} vs {perm['random_mean']:.4f} ± {perm['random_std']:.4f}, "
                f"permutation p = {perm['p_value']:.3f}."
            )
    lines += [
        "",
        "## Per-seed test perplexity",
        "",
        "| arm | " + " | ".join(f"seed {s}" for s in report["budget"]["seeds"]) + " |",
    ]
    lines.append("|---|" + "---|" * len(report["budget"]["seeds"]))
    for arm, by_seed in report["analysis"]["per_seed_ppl"].items():
        values = {int(seed): ppl for seed, ppl in by_seed.items()}  # JSON keys are strings
        lines.append(
            f"| {arm} | "
            + " | ".join(f"{values[s]:.4f}" if s in values else "–" for s in report["budget"]["seeds"])
            + " |"
        )
    lines += [
        "",
        "All per-seed and per-item numbers, package versions and timings are in the JSON beside this file.",
        "",
    ]
    return "\n".join(lines)


def render_png(report: dict, path: Path) -> None:
    """Per-seed paired perplexity differences (dots) with mean and 95 % interval (bar) per comparison."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [
        (key, report["analysis"]["comparisons"].get(key)) for key, *_ in COMPARISONS if key != "lora_vs_base"
    ]
    rows = [(k, c) for k, c in rows if c]
    fig, ax = plt.subplots(figsize=(8, 0.5 + 0.55 * max(1, len(rows))))
    for y, (_key, cmp) in enumerate(rows):
        p = cmp["ppl_percent"]
        ax.scatter(p["values"], [y] * len(p["values"]), color="tab:gray", s=14, zorder=2)
        if p.get("low") is not None:
            ax.plot([p["low"], p["high"]], [y, y], color="tab:blue", lw=3, zorder=1)
        ax.scatter([p["mean"]], [y], color="tab:blue", marker="D", s=30, zorder=3)
    ax.axvline(0, color="black", lw=0.8)
    ax.axvline(stats.H1_MARGIN, color="tab:red", lw=0.8, ls="--", label=f"H1 margin +{stats.H1_MARGIN} %")
    ax.set_yticks(range(len(rows)), [k.replace("_vs_", " vs ") for k, _ in rows])
    ax.invert_yaxis()
    ax.set_xlabel("Δ test perplexity, % (per seed: dots; mean and 95 % interval: bar)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: dict, stem: Path) -> None:
    """``stem``.json / .md / .png."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1, default=_plain), encoding="utf-8")
    stem.with_suffix(".md").write_text(render_markdown(report), encoding="utf-8")
    render_png(report, stem.with_suffix(".png"))


def _plain(value):
    import numpy as np

    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
