"""bench/reproduce_small (`python -m bench.reproduce_small`): honest data (format, balance, disjoint splits), plans
from one calibration, identical settings across methods, parameter counting, the report files, and the `--quick`
pipeline end to end."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from bench.common import REPO
from bench.commonsense import ANSWER_FORMATS, extract_answer, infer_answer_format
from bench.reproduce_small.__main__ import main
from bench.reproduce_small.evaluation import count_adapter_parameters
from bench.reproduce_small.report import write_markdown, write_plot
from bench.reproduce_small.runs import choose_threshold, make_plans, run_config
from bench.reproduce_small.settings import FULL, METHODS, QUICK
from bench.reproduce_small.summary import findings, summarize
from bench.reproduce_small.tasks import RuleTasks, make_rule_data

LLM_ADAPTERS_OPENINGS = {  # how LLM-Adapters' commonsense instructions begin, per answer format
    "true_false": "Please answer the following question with true or false, question: ",
    "solution": "Please choose the correct solution to the question: ",
    "answer": "Please choose the correct answer to the question: ",
    "ending": "Please choose the correct ending to complete the given sentence: ",
    "option": "Please choose the correct answer to fill in the blank to complete the given sentence: ",
}


@pytest.fixture(scope="module")
def data():
    return make_rule_data(train_per_task=60, test_per_task=12)


def test_rows_are_commonsense_170k_format(data):
    train, tests = data
    assert len(train) == 5 * 60 and set(tests) == set(RuleTasks().generators)
    for row in train + [r for rows in tests.values() for r in rows]:
        assert list(row) == ["instruction", "input", "output", "answer"] and row["input"] == ""
        assert row["output"] == f"the correct answer is {row['answer']}"
    for name, rows in tests.items():
        fmt = infer_answer_format(name, rows)
        assert all(r["instruction"].startswith(LLM_ADAPTERS_OPENINGS[fmt]) for r in rows)
        assert all(r["instruction"].endswith("Answer format: " + "/".join(_labels(fmt, rows))) for r in rows)
        assert all(extract_answer(r["output"], fmt) == r["answer"] for r in rows)


def _labels(fmt: str, rows) -> list[str]:
    width = max(int(re.sub(r"\D", "", r["answer"]) or 0) for r in rows)
    return list(ANSWER_FORMATS[fmt][: width or None])


def test_labels_are_exactly_balanced(data):
    _, tests = data
    for name, rows in tests.items():
        counts = {}
        for r in rows:
            counts[r["answer"]] = counts.get(r["answer"], 0) + 1
        assert len(set(counts.values())) == 1, f"{name}: {counts}"  # a constant answer scores exactly chance


def test_train_and_test_are_disjoint_by_key(data):
    train, tests = data
    train_text = {r["instruction"] for r in train}
    assert not train_text & {r["instruction"] for rows in tests.values() for r in rows}
    tasks = RuleTasks()
    for category, (train_words, test_words) in tasks.words.items():
        assert not set(train_words) & set(test_words), category
    for train_keys, test_keys in (tasks.goals, tasks.pairs, tasks.sequences, tasks.names):
        assert train_keys and test_keys and not set(train_keys) & set(test_keys)
    # a held-out word never appears in a training question
    held_out = {w for _, test_words in tasks.words.values() for w in test_words}
    boolq_train = [r["instruction"] for r in train if "true or false" in r["instruction"]]
    assert not any(re.search(rf"is {re.escape(w)} ", q) for q in boolq_train for w in held_out)


def test_data_is_deterministic():
    assert make_rule_data(20, 4) == make_rule_data(20, 4)


def _fake_calibration(num_layers: int = 30):
    from sharelora_plugin.calibration import CalibrationResult
    from sharelora_plugin.planning import synthetic_similarity

    sim = synthetic_similarity(num_layers, seed=1)
    distance = 1.0 - sim
    np.fill_diagonal(distance, 0.0)
    return CalibrationResult(
        angular_distance=distance,
        cosine=np.cos(math.pi * distance),
        num_samples=4,
        num_tokens=40,
        seconds=0.1,
        layers_path="model.layers",
        settings={"source": "synthetic"},
    )


def test_threshold_shares_about_a_third():
    from sharelora_plugin.planning import greedy_share_sets, layers_saved

    result = _fake_calibration()
    sim = result.similarity("angular")
    threshold = choose_threshold(sim, 30)
    saved = layers_saved(greedy_share_sets(sim, threshold))
    for step in range(500, 1000):  # nothing on the grid gets closer to L/3
        assert abs(saved - 10) <= abs(layers_saved(greedy_share_sets(sim, step / 1000)) - 10)


def test_plans_from_one_calibration(tmp_path):
    from sharelora_plugin.args import ShareLoRAConfig
    from sharelora_plugin.planning import SharePlan, alternate_share_sets, expanded_rank

    settings = ShareLoRAConfig().model_dump()
    plans = make_plans(_fake_calibration(), settings, (0, 1), list(METHODS), tmp_path)
    files = plans["files"]
    assert "lora" not in files and set(files) == set(METHODS) - {"lora"}
    load = {name: {seed: SharePlan.load(p) for seed, p in by_seed.items()} for name, by_seed in files.items()}
    greedy = load["sharelora"][0]
    assert greedy.threshold == plans["threshold"] and greedy.rank == 8 and greedy.strategy == "greedy"
    assert load["sharelora"][1].share_sets == greedy.share_sets  # seed-independent plans are shared
    rx = load["sharelora_rx"][0]
    assert rx.share_sets == greedy.share_sets and rx.rank == expanded_rank(30, greedy.share_sets, 8)
    assert load["sharelora_optimal"][0].layers_saved >= greedy.layers_saved
    random0, random1 = load["sharelora_random"][0], load["sharelora_random"][1]
    assert random0.share_sets != random1.share_sets  # ShareLoRA* is drawn per seed ...
    for plan in (random0, random1):  # ... with greedy's saving, from adjacent layers
        assert plan.layers_saved == greedy.layers_saved and len(plan.share_sets) == len(greedy.share_sets)
        assert all(s == list(range(s[0], s[-1] + 1)) for s in plan.share_sets)
    assert load["naive_share"][0].share_sets == alternate_share_sets(30)
    assert all(p.similarity is not None for by_seed in load.values() for p in by_seed.values())


def test_every_method_gets_the_same_settings(tmp_path):
    from sharelora_plugin.args import ShareLoRAConfig

    plan = tmp_path / "plan.json"
    plan.write_text("{}")
    paths = {"train": tmp_path / "train.json", "prepared": tmp_path / "prepared"}
    configs = {
        name: run_config(m, 3, FULL, paths, None if m.strategy is None else plan, tmp_path / name)
        for name, m in METHODS.items()
    }
    adapter_keys = {"plugins", "adapter", "sharelora", "output_dir"}
    reference = {k: v for k, v in configs["lora"].items() if k not in adapter_keys}
    for name, cfg in configs.items():
        assert {k: v for k, v in cfg.items() if k not in adapter_keys} == reference, name
        if name != "lora":
            assert cfg["adapter"] == "sharelora" and cfg["sharelora"]["plan_file"] == str(plan)
            ShareLoRAConfig(**cfg["sharelora"])
    assert (
        reference["seed"] == 3
        and reference["lora_r"] == 8
        and reference["learning_rate"] == FULL.learning_rate
    )
    assert reference["datasets"][0] == {"path": str(paths["train"]), "type": "alpaca"}


def test_parameter_count_dedupes_verified_copies(tmp_path):
    import torch
    from safetensors.torch import save_file

    from sharelora_plugin.planning import make_plan

    a = torch.randn(2, 8)
    tensors = {
        f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight": a.clone() for i in range(4)
    }
    tensors["base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"] = torch.randn(2, 8)
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    assert count_adapter_parameters(tmp_path) == {
        "saved_params": 64,
        "trainable_params": 64,
        "ties_verified": False,
    }
    make_plan(num_layers=4, strategy="manual", share_sets=[[0, 1, 2]]).save(tmp_path / "sharelora_plan.json")
    assert count_adapter_parameters(tmp_path)["trainable_params"] == 32  # layers 1, 2 are copies of 0
    make_plan(num_layers=4, strategy="manual", share_sets=[[0, 3]]).save(tmp_path / "sharelora_plan.json")
    with pytest.raises(RuntimeError, match="differs from its share-set leader"):
        count_adapter_parameters(tmp_path)


def _fake_run(method: str, seed: int, params: int, acc: float) -> dict:
    return {
        "method": method,
        "seed": seed,
        "rank": 8,
        "trainable_params": params,
        "train_seconds": 10.0 + seed,
        "wall_seconds": 30.0,
        "train_loss": 1.0,
        "heldout_answer_loss": 0.5 - acc / 10,
        "lee_ppl": 30.0,
        "average_accuracy": acc,
        "accuracy": {"rule_boolq": acc, "rule_arc": acc},
        "unanswered": 1,
        "num_test": 10,
    }


def test_summary_and_report_files(tmp_path):
    runs = [
        _fake_run("lora", 0, 1000, 0.60),
        _fake_run("lora", 1, 1000, 0.70),
        _fake_run("sharelora", 0, 700, 0.63),
        _fake_run("sharelora", 1, 700, 0.65),
    ]
    summary = summarize(runs, ["lora", "sharelora"])
    lora, share = summary
    assert lora["average_accuracy"]["mean"] == pytest.approx(0.65)
    assert lora["average_accuracy"]["std"] == pytest.approx(np.std([0.6, 0.7], ddof=1), abs=1e-6)
    assert share["fraction_of_lora"] == 0.7 and share["seeds"] == [0, 1]
    lines = findings(summary, quick=True, chance=0.4)
    assert lines[0].startswith("QUICK RUN") and "against 40.0% for a constant answer." in lines[1]
    assert (
        "(70% of LoRA's trainable parameters): accuracy 64.0% vs 65.0% (within the seed spread of" in lines[2]
    )
    assert "Lee perplexity 30.000 vs 30.000 (equal to LoRA)" in lines[2]
    one_seed = summarize([runs[0], runs[2]], ["lora", "sharelora"])
    assert "One seed" in findings(one_seed, quick=False)[0]
    assert "(lower than LoRA)" in findings(one_seed, quick=False)[1]  # accuracy 63% vs 60%: loss is lower
    assert findings(summary, quick=False, chance=0.65)[0].endswith("the held-out losses do.")
    report = {
        "quick": True,
        "created": "now",
        "command": "python -m bench.reproduce_small --quick",
        "total_minutes": 1.0,
        "run_minutes": 3.0,
        "reused_runs": 2,
        "runs": runs,
        "machine": {"cpus": 2},
        "settings": {
            "num_layers": 30,
            "steps": 2,
            "micro_batch_size": 4,
            "sequence_len": 128,
            "learning_rate": 1e-3,
            "warmup_steps": 1,
            "seeds": [0, 1],
            "data": {"train_rows": 10, "test_rows": 4, "test_per_task": 2},
            "max_new_tokens": 8,
            "chance_accuracy": 0.4,
            "lee_test_texts": 4,
            "calibration": {"num_samples": 16},
            "threshold": 0.9,
        },
        "plans": {
            "sharelora": {0: {"share_sets": [[1, 2]], "layers_saved": 1, "rank": 8, "constraint": "enforced"}}
        },
        "base_model": {
            "heldout_answer_loss": 2.0,
            "lee_ppl": 38.0,
            "average_accuracy": 0.1,
            "unanswered": 8,
            "num_test": 10,
        },
        "summary": summary,
        "findings": lines,
    }
    write_markdown(report, tmp_path / "r.md")
    write_plot(report, tmp_path / "r.png")
    text = (tmp_path / "r.md").read_text()
    assert "QUICK RUN" in text and "| LoRA r=8 | 1,000 | 100.0 |" in text and "{1,2}" in text
    assert "summed over the 4 runs 3.0 min (2 reused" in text
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_committed_results_are_a_full_run_and_render_again(tmp_path, capsys):
    """bench/results holds a full run (every method, both seeds) and --render rebuilds its md/png unchanged."""
    committed = REPO / "bench" / "results" / "reproduce_small.json"
    report = json.loads(committed.read_text())
    assert report["quick"] is False and report["settings"]["steps"] == FULL.steps
    assert report["settings"]["seeds"] == list(FULL.seeds)
    assert sorted((r["method"], r["seed"]) for r in report["runs"]) == sorted(
        (m, s) for m in METHODS for s in FULL.seeds
    )
    by = {row["method"]: row for row in report["summary"]}
    assert by["lora"]["trainable_params"] == 1_658_880 and by["naive_share"]["fraction_of_lora"] == 0.5
    assert all(r["ties_verified"] for r in report["runs"] if r["method"] != "lora")

    (tmp_path / "reproduce_small.json").write_text(committed.read_text())
    assert main(["--render", "--results-dir", str(tmp_path)]) == 0
    rendered = (tmp_path / "reproduce_small.md").read_text()
    assert rendered == (committed.with_suffix(".md")).read_text()
    assert (tmp_path / "reproduce_small.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["--render", "--results-dir", str(tmp_path / "empty")]) == 2
    assert "run the script without --render first" in capsys.readouterr().err


@pytest.mark.e2e
def test_quick_pipeline_end_to_end(tmp_path):
    """`--quick` on two methods: calibrate once, plan, train through axolotl.cli.train, evaluate, report."""
    out = tmp_path / "work" / "quick"  # --quick never writes to bench/results unless told to
    argv = [
        "--quick",
        "--methods",
        "lora",
        "sharelora",
        "--threads",
        "1",
        "--workdir",
        str(tmp_path / "work"),
    ]
    committed = (REPO / "bench" / "results" / "reproduce_small.json").read_bytes()
    assert main(argv) == 0
    assert (REPO / "bench" / "results" / "reproduce_small.json").read_bytes() == committed
    report = json.loads((out / "reproduce_small.json").read_text())
    assert report["quick"] is True and report["settings"]["steps"] == QUICK.steps
    by = {r["method"]: r for r in report["runs"]}
    assert set(by) == {"lora", "sharelora"}
    assert by["sharelora"]["ties_verified"] is True
    assert by["sharelora"]["trainable_params"] < by["lora"]["trainable_params"] == by["lora"]["saved_params"]
    for run in by.values():
        assert run["num_test"] == 5 * QUICK.test_per_task and math.isfinite(run["lee_ppl"])
        assert 0.0 <= run["average_accuracy"] <= 1.0 and run["train_seconds"] is not None
    plan = json.loads((tmp_path / "work" / "runs" / "sharelora_seed0" / "sharelora_plan.json").read_text())
    assert plan["share_sets"] == report["plans"]["sharelora"]["0"]["share_sets"]  # loaded, not recalibrated
    assert "QUICK RUN" in (out / "reproduce_small.md").read_text() and (out / "reproduce_small.png").is_file()
    # a second call reuses the finished runs instead of retraining
    assert main(argv) == 0
