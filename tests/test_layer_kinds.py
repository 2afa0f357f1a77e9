"""Layer lists that mix kinds (dense and MoE layers): sets only form within one kind, for every strategy."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sharelora_plugin.layer_kinds import layer_kinds
from sharelora_plugin.planning import PlanError, SharePlan, make_plan, plan_with_stability

KINDS = [1, 1, 0, 0, 0, 0]  # two dense layers first, then MoE layers (DeepSeek-V3's first_k_dense_replace)


def _uniform_similarity(value: float = 0.95, num_layers: int = 6) -> np.ndarray:
    sim = np.full((num_layers, num_layers), value)
    np.fill_diagonal(sim, 1.0)
    return sim


def _within_kinds(sets: list[list[int]], kinds: list[int]) -> bool:
    return all(len({kinds[layer] for layer in members}) == 1 for members in sets)


@pytest.mark.parametrize("strategy", ["greedy", "optimal"])
def test_data_strategies_never_pair_layers_of_two_kinds(strategy):
    sim = _uniform_similarity()
    sim[1, 2] = sim[2, 1] = 0.99  # the most similar pair crosses the kinds
    plan = make_plan(num_layers=6, strategy=strategy, similarity=sim, threshold=0.9, layer_kinds=KINDS)
    assert _within_kinds(plan.share_sets, KINDS)
    assert sorted(plan.share_sets) == [[0, 1], [2, 3, 4, 5]]
    assert plan.layer_kinds == KINDS and plan.similarity[1][2] == 0.99  # the stored matrix is not masked
    plain = make_plan(num_layers=6, strategy=strategy, similarity=sim, threshold=0.9)
    assert not _within_kinds(plain.share_sets, KINDS) and plain.layer_kinds is None


def test_random_alternate_and_manual_respect_kinds():
    sim = _uniform_similarity()
    for seed in range(20):
        plan = make_plan(
            num_layers=6, strategy="random", similarity=sim, threshold=0.9, seed=seed, layer_kinds=KINDS
        )
        assert _within_kinds(plan.share_sets, KINDS), seed
    kinds = [0, 0, 0, 1, 1, 1]
    assert make_plan(num_layers=6, strategy="alternate", layer_kinds=kinds).share_sets == [[0, 1], [4, 5]]
    with pytest.raises(PlanError, match=r"mixes layer kinds \(layer 1 is kind 1, layer 2 is kind 0\)"):
        make_plan(num_layers=6, strategy="manual", share_sets=[[1, 2]], layer_kinds=KINDS)
    # one kind everywhere: nothing recorded, sets as without kinds
    same = make_plan(num_layers=6, strategy="alternate", layer_kinds=[0] * 6)
    assert same.layer_kinds is None and same.share_sets == [[0, 1], [2, 3], [4, 5]]


def test_random_sets_cannot_fit_runs_that_are_too_short():
    alternating = [0, 1, 0, 1, 0, 1]  # Llama 4 style: dense and MoE interleaved, no two adjacent alike
    with pytest.raises(PlanError, match="fit within one layer kind"):
        make_plan(
            num_layers=6,
            strategy="random",
            similarity=_uniform_similarity(),
            threshold=0.9,
            layer_kinds=alternating,
        )


def test_plan_file_keeps_kinds_and_refuses_sets_across_them(tmp_path):
    plan = make_plan(
        num_layers=6,
        similarity=_uniform_similarity(),
        threshold=0.9,
        layer_kinds=KINDS,
        layer_kind_descriptions=["moe", "dense"],
    )
    plan.save(tmp_path / "plan.json")
    loaded = SharePlan.load(tmp_path / "plan.json")
    assert loaded.layer_kinds == KINDS and loaded.layer_kind_descriptions == ["moe", "dense"]
    assert "dense: layers 0-1" in loaded.summary_table() and "moe: layers 2-5" in loaded.summary_table()
    data = json.loads((tmp_path / "plan.json").read_text())
    data["share_sets"] = [[1, 2]]
    with pytest.raises(PlanError, match="mixes layer kinds"):
        SharePlan.from_dict(data)


def test_bootstrap_with_kinds_replans_within_kinds():
    rng = np.random.default_rng(0)
    samples = _uniform_similarity()[None].repeat(30, axis=0) + rng.normal(0, 0.005, size=(30, 6, 6))
    samples = (samples + samples.transpose(0, 2, 1)) / 2
    samples[:, np.arange(6), np.arange(6)] = 1.0
    plan = plan_with_stability(
        samples, samples.mean(axis=0), metric="angular", threshold=0.9, layer_kinds=KINDS
    )
    assert plan.share_sets == [[0, 1], [2, 3, 4, 5]] and plan.stability["set_frequency"][0] == 1.0
    comembership = np.asarray(plan.stability["comembership"])
    kinds = np.asarray(KINDS)
    assert (comembership[kinds[:, None] != kinds[None, :]] == 0.0).all()  # no resample paired two kinds


def _tiny_deepseek(first_dense: int = 2, vocab_size: int = 128):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "deepseek_v3",
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=5,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        first_k_dense_replace=first_dense,
        q_lora_rank=None,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=16,
        n_group=1,
        topk_group=1,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def test_deepseek_dense_and_moe_layers_are_two_kinds_and_the_plan_ties(smollm2_dir, tmp_path):
    """DeepSeek-V3 with two dense layers before the MoE ones: calibration records the kinds, a plan at a threshold
    where every pair is similar still keeps dense and MoE layers apart, and PEFT LoRA ties without complaint."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    from sharelora_plugin.args import ShareLoRAConfig
    from sharelora_plugin.tying import tie_lora_modules, verify_ties
    from sharelora_plugin.workflow import plan_from_calibration, run_calibration

    model = _tiny_deepseek(vocab_size=49152)
    kinds = layer_kinds(model.model.layers)
    assert kinds.kinds == [1, 1, 0, 0, 0] and "DeepseekV3DecoderLayer" in kinds.descriptions[1]
    assert "mlp.gate_proj" in kinds.descriptions[1]  # the dense MLP is what differs
    path = tmp_path / "texts.jsonl"
    path.write_text(
        "".join(json.dumps({"text": f"text number {k} " * (k % 4 + 1)}) + "\n" for k in range(12))
    )
    settings = ShareLoRAConfig(
        threshold=0.05, calibration={"path": str(path), "num_samples": 12, "batch_size": 4}
    ).model_dump()
    result = run_calibration(
        model, AutoTokenizer.from_pretrained(smollm2_dir), settings, {"base_model": "tiny"}
    )
    assert result.layer_kinds == [1, 1, 0, 0, 0]
    plan = plan_from_calibration(result, settings, 4)
    assert plan.share_sets and _within_kinds(plan.share_sets, plan.layer_kinds)
    assert plan.layer_kind_descriptions == kinds.descriptions and "layer kinds" in plan.summary_table()
    peft_model = get_peft_model(
        model, LoraConfig(r=4, target_modules=["q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    )
    tie_lora_modules(peft_model, plan.share_sets)
    verify_ties(peft_model, plan.share_sets)


def test_a_saved_plan_that_joins_two_kinds_is_refused_for_this_model():
    from sharelora_plugin.args import ShareLoRAConfig
    from sharelora_plugin.workflow import check_plan_fits

    model = _tiny_deepseek()
    settings = ShareLoRAConfig().model_dump()
    check_plan_fits(
        make_plan(num_layers=5, strategy="manual", share_sets=[[2, 3, 4]]), model, settings, "ok.json"
    )
    crossing = make_plan(num_layers=5, strategy="manual", share_sets=[[1, 2]])
    with pytest.raises(PlanError, match=r"plan\.json: share set \[1, 2\] mixes layer kinds"):
        check_plan_fits(crossing, model, settings, "plan.json")
