"""Bootstrap stability of a share plan, the robust option, the per-sample file and stop-when-stable calibration."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from conftest import tiny_llama

from sharelora_plugin.calibration import calibrate
from sharelora_plugin.planning import (
    CALIBRATION_FILENAME,
    PlanError,
    SharePlan,
    StopWhenStable,
    load_per_sample,
    lower_bound,
    make_plan,
    plan_with_stability,
    resampled_means,
    save_per_sample,
    similarity_from_distances,
)


def block_samples(num_samples: int, blocks: list[list[int]], num_layers: int, seed: int = 0) -> np.ndarray:
    """Per-sample similarities: ~0.95 inside each block, ~0.5 elsewhere, small per-sample noise."""
    rng = np.random.default_rng(seed)
    base = np.full((num_layers, num_layers), 0.5)
    for members in blocks:
        base[np.ix_(members, members)] = 0.95
    noise = rng.normal(0.0, 0.01, size=(num_samples, num_layers, num_layers))
    samples = base + (noise + noise.transpose(0, 2, 1)) / 2
    index = np.arange(num_layers)
    samples[:, index, index] = 1.0
    return np.clip(samples, 0.0, 1.0)


def test_well_separated_blocks_are_fully_stable():
    blocks = [[0, 1, 2], [3, 4], [5, 6, 7]]
    samples = block_samples(64, blocks, 8)
    plan = plan_with_stability(
        samples, samples.mean(axis=0), metric="angular", threshold=0.85, bootstrap_seed=3
    )
    assert plan.share_sets == blocks
    report = plan.stability
    assert report["plan_frequency"] == 1.0 and report["resamples"] == 200 and report["num_samples"] == 64
    assert report["set_frequency"] == [1.0, 1.0, 1.0] and report["constraint_frequency"] == [1.0, 1.0, 1.0]
    comembership = np.asarray(report["comembership"])
    for i in range(8):
        for j in range(8):
            same = any(i in members and j in members for members in blocks)
            assert comembership[i, j] == (1.0 if same else 0.0), (i, j)
    for margin, (low, high) in zip(report["margin"], report["margin_interval"], strict=True):
        assert 0.05 < low <= margin <= high < 0.15  # ~0.95 - 0.85, tight interval


def test_pair_exactly_on_threshold_is_a_coin_flip():
    rng = np.random.default_rng(7)
    num_samples = 400
    samples = np.full((num_samples, 4, 4), 0.3)
    values = 0.85 + rng.normal(0.0, 0.05, size=num_samples)
    samples[:, 0, 1] = samples[:, 1, 0] = values
    samples[:, np.arange(4), np.arange(4)] = 1.0
    mean = samples.mean(axis=0)
    threshold = float(mean[0, 1])  # the full plan sits exactly on ε
    plan = plan_with_stability(samples, mean, metric="angular", threshold=threshold, resamples=400)
    assert plan.share_sets == [[0, 1]]
    assert 0.4 <= plan.stability["plan_frequency"] <= 0.6
    assert plan.stability["set_frequency"][0] == plan.stability["plan_frequency"]
    assert plan.stability["margin"] == [0.0]
    low, high = plan.stability["margin_interval"][0]
    assert low < 0 < high


def test_resampling_is_seeded_and_reproducible():
    samples = block_samples(40, [[0, 1], [2, 3, 4]], 6, seed=1)
    samples[:20, 1, 2] = samples[:20, 2, 1] = 0.95  # half the samples pull layer 1 towards layer 2
    mean = samples.mean(axis=0)
    first = plan_with_stability(samples, mean, metric="angular", threshold=0.7, bootstrap_seed=11)
    again = plan_with_stability(samples, mean, metric="angular", threshold=0.7, bootstrap_seed=11)
    assert first.stability == again.stability and first.stability["seed"] == 11
    assert np.array_equal(resampled_means(samples, 50, 11), resampled_means(samples, 50, 11))
    assert not np.array_equal(resampled_means(samples, 50, 11), resampled_means(samples, 50, 12))
    # the plan round-trips through JSON with its report
    assert SharePlan.from_dict(json.loads(json.dumps(first.to_dict()))).stability == first.stability


def test_resampled_means_are_means_of_drawn_samples():
    samples = block_samples(5, [[0, 1]], 3, seed=2)
    means = resampled_means(samples, 30, 0)
    assert means.shape == (30, 3, 3)
    # each resampled mean is the mean of 5 draws with replacement: multinomial counts of the same seeded generator
    values = samples[:, 0, 2]
    counts = np.random.default_rng(0).multinomial(5, np.full(5, 0.2), size=30)
    assert np.allclose(means[:, 0, 2], counts @ values / 5)


def test_optimal_and_target_fraction_are_bootstrapped_with_their_own_settings():
    samples = block_samples(48, [[0, 1, 2, 3], [4, 5, 6]], 8, seed=4)
    mean = samples.mean(axis=0)
    optimal = plan_with_stability(samples, mean, metric="angular", strategy="optimal", threshold=0.9)
    assert optimal.share_sets == [[0, 1, 2, 3], [4, 5, 6]] and optimal.stability["plan_frequency"] == 1.0
    budget = plan_with_stability(samples, mean, metric="angular", threshold=None, target_fraction=0.7)
    assert budget.target_fraction == 0.7 and budget.param_fraction <= 0.7
    assert budget.stability["plan_frequency"] is not None and budget.stability["strategy"] == "greedy"


def test_manual_plan_reports_the_greedy_reference():
    blocks = [[0, 1, 2], [4, 5]]
    samples = block_samples(32, blocks, 6)
    plan = plan_with_stability(
        samples,
        samples.mean(axis=0),
        metric="angular",
        strategy="manual",
        share_sets=[[0, 1], [3, 4]],
        threshold=0.85,
    )
    report = plan.stability
    assert plan.share_sets == [[0, 1], [3, 4]] and report["reference_strategy"] == "greedy"
    assert report["plan_frequency"] is None and report["reference_plan_frequency"] == 1.0
    # greedy always forms {0,1,2} and {4,5}: never exactly {0,1} or {3,4}; {3,4} never meets ε
    assert report["set_frequency"] == [0.0, 0.0] and report["constraint_frequency"] == [1.0, 0.0]
    assert np.asarray(report["comembership"])[0, 2] == 1.0


def test_robust_option_never_shares_a_pair_whose_lower_bound_misses_threshold():
    rng = np.random.default_rng(5)
    for trial in range(6):
        num_layers = 7
        base = rng.uniform(0.75, 0.98, size=(num_layers, num_layers))
        spread = rng.uniform(0.0, 0.15, size=(num_layers, num_layers))
        noise = rng.normal(size=(24, num_layers, num_layers)) * spread
        samples = np.clip(base + noise, 0.0, 1.0)
        samples = (samples + samples.transpose(0, 2, 1)) / 2
        samples[:, np.arange(num_layers), np.arange(num_layers)] = 1.0
        mean = samples.mean(axis=0)
        for strategy in ("greedy", "optimal"):
            plan = plan_with_stability(
                samples,
                mean,
                metric="angular",
                strategy=strategy,
                threshold=0.85,
                confidence=0.9,
                bootstrap_seed=trial,
            )
            bound = np.asarray(plan.stability["lower_bound"])
            expected = lower_bound(resampled_means(samples, 200, trial), 0.9)
            assert np.allclose(bound, expected, atol=1e-6)
            for members in plan.share_sets:
                for i in members:
                    for j in members:
                        if i != j:
                            assert bound[i, j] >= 0.85 and mean[i, j] >= 0.85, (trial, strategy, members)


def test_robust_option_drops_a_noisy_pair_that_plain_greedy_shares():
    rng = np.random.default_rng(9)
    samples = np.full((30, 4, 4), 0.2)
    samples[:, 0, 1] = samples[:, 1, 0] = 0.95 + rng.normal(0, 0.005, 30)  # solid
    noisy = np.where(np.arange(30) % 2 == 0, 0.995, 0.735)  # mean 0.865 >= ε, but a standard error of ~0.024
    samples[:, 2, 3] = samples[:, 3, 2] = noisy
    samples[:, np.arange(4), np.arange(4)] = 1.0
    mean = samples.mean(axis=0)
    assert mean[2, 3] >= 0.85
    plain = plan_with_stability(samples, mean, metric="angular", threshold=0.85)
    robust = plan_with_stability(samples, mean, metric="angular", threshold=0.85, confidence=0.9)
    assert plain.share_sets == [[0, 1], [2, 3]]
    assert robust.share_sets == [[0, 1]] and robust.stability["confidence"] == 0.9


def test_options_are_refused_with_the_key():
    samples = block_samples(8, [[0, 1]], 3)
    mean = samples.mean(axis=0)
    with pytest.raises(PlanError, match="confidence .*greedy or optimal"):
        plan_with_stability(samples, mean, metric="angular", strategy="alternate", confidence=0.9)
    with pytest.raises(PlanError, match="confidence and target_fraction"):
        plan_with_stability(
            samples, mean, metric="angular", threshold=None, target_fraction=0.8, confidence=0.9
        )
    with pytest.raises(PlanError, match="needs the bootstrap"):
        plan_with_stability(samples, mean, metric="angular", threshold=0.8, confidence=0.9, resamples=0)
    with pytest.raises(PlanError, match="bootstrap_resamples must be 0"):
        plan_with_stability(samples, mean, metric="angular", threshold=0.8, resamples=3)
    with pytest.raises(PlanError, match="at least 2"):
        resampled_means(samples[:1], 10, 0)
    with pytest.raises(PlanError, match="nothing to wait for"):
        StopWhenStable(plan_options={"strategy": "manual", "resamples": 200})


# --------------------------------------------------------------------------------------------------------------------
# The per-sample file


def test_per_sample_file_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    angular = rng.uniform(0, 0.5, size=(5, 4, 4))
    cosine = np.cos(np.pi * angular)
    path = save_per_sample(tmp_path / CALIBRATION_FILENAME, angular, cosine)
    loaded_angular, loaded_cosine = load_per_sample(path)
    assert loaded_angular.dtype == np.float32 and loaded_angular.shape == (5, 4, 4)
    assert np.array_equal(loaded_angular, angular.astype(np.float32))
    assert np.array_equal(loaded_cosine, cosine.astype(np.float32))
    with np.load(path) as data:
        assert sorted(data.files) == ["angular_distance", "cosine"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # like a plain open(), not mkstemp's 0600
    sim = similarity_from_distances(loaded_angular, loaded_cosine, "angular")
    assert np.allclose(sim[:, 0, 1], 1 - loaded_angular[:, 0, 1]) and (sim[:, 2, 2] == 1).all()

    np.savez(tmp_path / "bad.npz", angular_distance=angular)
    with pytest.raises(PlanError, match="lacks key"):
        load_per_sample(tmp_path / "bad.npz")
    np.savez(tmp_path / "shape.npz", angular_distance=angular[0], cosine=cosine[0])
    with pytest.raises(PlanError, match=r"\[N, L, L\]"):
        load_per_sample(tmp_path / "shape.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(PlanError, match="cannot read"):
        load_per_sample(tmp_path / "junk.npz")
    with pytest.raises(PlanError, match="not found"):
        load_per_sample(tmp_path / "absent.npz")


# --------------------------------------------------------------------------------------------------------------------
# Stopping


def test_stop_rule_waits_for_min_samples_and_the_target():
    samples = block_samples(64, [[0, 1, 2], [3, 4]], 6)
    options = {"metric": "angular", "strategy": "greedy", "threshold": 0.85, "resamples": 50}
    stopper = StopWhenStable(plan_options=options, min_samples=32, target=0.95)
    assert not stopper(samples[:16].mean(axis=0), samples[:16])  # stable, but below min_samples
    assert stopper.checks == []
    assert stopper(samples[:32].mean(axis=0), samples[:32])
    assert stopper.stop_reason == "stable" and stopper.checks == [{"num_samples": 32, "plan_frequency": 1.0}]

    coin = np.full((64, 3, 3), 0.3)
    coin[:, 0, 1] = coin[:, 1, 0] = np.where(np.arange(64) % 2 == 0, 0.95, 0.75)  # mean 0.85 = ε
    coin[:, np.arange(3), np.arange(3)] = 1.0
    unstable = StopWhenStable(plan_options=options, min_samples=8, target=0.95)
    assert not any(unstable(coin[:n].mean(axis=0), coin[:n]) for n in range(8, 65, 8))
    assert unstable.stop_reason is None and len(unstable.checks) == 8


def _token_batches(num: int, batch_size: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(0, num, batch_size):
        ids = torch.randint(1, 128, (batch_size, 12), generator=gen)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return batches


def test_calibrate_stops_when_asked_and_keeps_per_sample_matrices():
    model = tiny_llama(num_layers=4)
    batches = _token_batches(24, 4)
    seen = []

    def stop_after_three(progress) -> bool:
        seen.append(progress.num_samples)
        assert progress.per_sample_angular.shape == (progress.num_samples, 4, 4)
        return progress.num_samples >= 12

    result = calibrate(model, batches, progress=False, should_stop=stop_after_three)
    assert seen == [4, 8, 12] and result.num_samples == 12 and result.stopped_early
    full = calibrate(model, batches, progress=False)
    assert full.num_samples == 24 and not full.stopped_early
    assert full.per_sample_angular.dtype == np.float32 and full.per_sample_cosine.shape == (24, 4, 4)
    # the mean is unchanged by keeping per-sample matrices, and per-sample rows are each batch's samples
    assert np.allclose(full.per_sample_angular.mean(axis=0), full.angular_distance, atol=1e-6)
    assert np.allclose(result.per_sample_angular, full.per_sample_angular[:12])
    with pytest.raises(ValueError, match="cap"):
        calibrate(model, batches, progress=False, expected_samples=10**9)


def test_online_stop_when_stable_equals_replaying_the_rule(smollm2_dir, tmp_path):
    """The plugin's calibration with stop_when_stable stops where the same rule, replayed over the per-sample
    matrices of its own batches, stops; its plan records samples used and why."""
    from transformers import AutoTokenizer

    from sharelora_plugin.args import ShareLoRAConfig
    from sharelora_plugin.workflow import plan_from_calibration, plan_options, run_calibration

    texts = [{"text": " ".join(["word"] * (3 + k % 5) + [f"item {k}"])} for k in range(40)]
    path = tmp_path / "texts.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in texts))
    model = tiny_llama(num_layers=5, hidden=32, vocab_size=49152)
    settings = ShareLoRAConfig(
        threshold=0.6,
        calibration={
            "path": str(path),
            "num_samples": 40,
            "batch_size": 4,
            "stop_when_stable": True,
            "min_samples": 8,
            "stability": 0.9,
            "bootstrap_resamples": 50,
        },
    ).model_dump()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    result = run_calibration(model, tokenizer, settings, {"base_model": "tiny"})
    info = result.settings
    assert info["stop_when_stable"] and info["num_samples_cap"] == 40 and info["min_samples"] == 8
    assert info["stop_reason"] in ("stable", "cap") and info["num_samples"] == result.num_samples
    replay = StopWhenStable(plan_options=plan_options(settings, 8), min_samples=8, target=0.9)
    samples = similarity_from_distances(result.per_sample_angular, result.per_sample_cosine, "angular")
    stopped_at = None
    for end in range(4, result.num_samples + 1, 4):
        if replay(samples[:end].mean(axis=0), samples[:end]):
            stopped_at = end
            break
    assert info["stability_checks"] == replay.checks
    assert stopped_at == (result.num_samples if info["stop_reason"] == "stable" else None)
    plan = plan_from_calibration(result, settings, 8)
    assert plan.stability["num_samples"] == result.num_samples
    assert plan.metadata["calibration"]["stop_reason"] == info["stop_reason"]


def test_make_plan_lower_bound_shape_is_checked():
    sim = np.eye(3)
    with pytest.raises(PlanError, match="lower_bound"):
        make_plan(num_layers=3, similarity=sim, threshold=0.5, lower_bound=np.eye(4))


# --------------------------------------------------------------------------------------------------------------------
# Seen, not only stored: the CLI, `show` and the heatmap


def _saved_plan_with_samples(folder) -> SharePlan:
    samples = block_samples(40, [[0, 1, 2], [3, 4], [6, 7]], 8, seed=6)
    samples[:, 2, 3] = samples[:, 3, 2] = 0.86 + np.random.default_rng(1).normal(0, 0.03, 40)
    angular = 1.0 - samples
    cosine = np.cos(np.pi * angular)
    angular32 = angular.astype(np.float32)
    save_per_sample(folder / CALIBRATION_FILENAME, angular32, cosine)
    sim = similarity_from_distances(angular32, cosine, "angular")
    plan = plan_with_stability(sim, sim.mean(axis=0), metric="angular", threshold=0.85, bootstrap_seed=42)
    plan.metadata["calibration"] = {"seed": 42, "num_samples": 40}
    plan.save(folder / "sharelora_plan.json")
    return plan


def test_cli_plan_matrix_stability_reproduces_the_stored_report(tmp_path, capsys):
    from sharelora_plugin.cli import main

    plan = _saved_plan_with_samples(tmp_path)
    matrix = ["plan", "--matrix", str(tmp_path / "sharelora_plan.json")]
    assert main([*matrix, "--threshold", "0.85", "--stability", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["stability"] == plan.stability and again["share_sets"] == plan.share_sets

    assert main([*matrix, "--threshold", "0.85,0.9", "--stability"]) == 0
    out = capsys.readouterr().out
    assert out.count("plan frequency") >= 2 and "threshold=0.85" in out and "threshold=0.9" in out
    assert "freq" in out and "margin [90% interval]" in out

    assert main([*matrix, "--threshold", "0.85", "--confidence", "0.9", "--json"]) == 0
    robust = json.loads(capsys.readouterr().out)
    assert robust["stability"]["confidence"] == 0.9 and robust["stability"]["lower_bound"]

    (tmp_path / CALIBRATION_FILENAME).unlink()
    assert main([*matrix, "--stability"]) == 2
    assert "per-sample calibration file not found" in capsys.readouterr().err
    assert main([*matrix, "--resamples", "50"]) == 2
    assert "need --stability" in capsys.readouterr().err


def test_show_prints_frequencies_and_margins(tmp_path, capsys):
    from sharelora_plugin.cli import main

    plan = _saved_plan_with_samples(tmp_path)
    assert main(["show", str(tmp_path / "sharelora_plan.json")]) == 0
    out = capsys.readouterr().out
    assert f"plan frequency {plan.stability['plan_frequency']:.2f}" in out
    first_margin = f"{plan.stability['margin'][0]:+.4f}"
    assert first_margin in out and f"{plan.stability['set_frequency'][0]:.2f}" in out


def test_heatmap_has_a_comembership_panel(tmp_path):
    from sharelora_plugin.heatmap import heatmap_figure, save_heatmap

    plan = _saved_plan_with_samples(tmp_path)
    figure = heatmap_figure(plan)
    images = [axes.images[0].get_array() for axes in figure.axes if axes.images]
    assert len(images) == 2
    assert np.allclose(images[1], np.asarray(plan.stability["comembership"]))
    assert "co-membership" in figure.axes[2].get_title()
    save_heatmap(plan, tmp_path / "heatmap.png")
    assert (tmp_path / "heatmap.png").read_bytes()[:4] == b"\x89PNG"
    plain = make_plan(num_layers=8, similarity=plan.similarity, threshold=0.85)
    assert len([axes for axes in heatmap_figure(plain).axes if axes.images]) == 1


def test_stop_rule_with_target_fraction_replans_each_resample():
    # three tight pairs: 5 distinct modules of 8 (fraction 0.625) is the largest fraction within 0.65, and every
    # resample finds its own ε for exactly that plan
    samples = block_samples(48, [[0, 1], [2, 3], [4, 5]], 8, seed=8)
    options = {
        "metric": "angular",
        "strategy": "greedy",
        "threshold": None,
        "target_fraction": 0.65,
        "resamples": 40,
    }
    stopper = StopWhenStable(plan_options=options, min_samples=16, target=0.95)
    assert stopper(samples[:16].mean(axis=0), samples[:16])
    assert stopper.checks == [{"num_samples": 16, "plan_frequency": 1.0}]


@pytest.mark.parametrize(("cap", "expected"), [(24, "cap"), (60, "exhausted")])
def test_calibration_that_never_settles_stops_at_the_cap_or_when_samples_run_out(
    cap, expected, smollm2_dir, tmp_path
):
    """A threshold placed exactly on the top pair's mean similarity keeps the plan a coin flip, so the rule never
    fires; the run ends at the cap (24 of 40 rows) or when the 40 rows run out (cap 60)."""
    from transformers import AutoTokenizer

    from sharelora_plugin.args import ShareLoRAConfig
    from sharelora_plugin.workflow import run_calibration

    rows = [
        {"text": f"sample {k}: " + " ".join(["alpha", "beta", "gamma"][: 1 + k % 3] * (1 + k % 4))}
        for k in range(40)
    ]
    path = tmp_path / "texts.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    model = tiny_llama(num_layers=5, hidden=32, vocab_size=49152)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    used = min(cap, 40)
    probe = ShareLoRAConfig(
        calibration={"path": str(path), "num_samples": used, "batch_size": 4}
    ).model_dump()
    probe["calibration"]["stop_when_stable"] = False
    reference = run_calibration(model, tokenizer, probe, {"base_model": "tiny"})
    sim = reference.similarity("angular")
    upper = np.triu_indices(5, k=1)
    threshold = float(sim[upper].max())
    settings = ShareLoRAConfig(
        threshold=threshold,
        calibration={
            "path": str(path),
            "num_samples": cap,
            "batch_size": 4,
            "stop_when_stable": True,
            "min_samples": used,  # one check, on all the samples the run will see
            "stability": 0.95,
        },
    ).model_dump()
    result = run_calibration(model, tokenizer, settings, {"base_model": "tiny"})
    info = result.settings
    assert info["stop_reason"] == expected and result.num_samples == used and not result.stopped_early
    assert len(info["stability_checks"]) == 1 and info["stability_checks"][0]["plan_frequency"] < 0.95
