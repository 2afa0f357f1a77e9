"""FSDP2 (``fsdp_version: 2``) with tied LoRA modules (sharelora_plugin/fsdp.py).

Unit tests run real FSDP2 on CPU over gloo: in this process (a world of one) and in two processes (this file run by
torchrun, see ``_two_process_worker``), through Axolotl 0.19's and accelerate's own ``fsdp2_prepare_model``. The
e2e tests train the embedded SmolLM2 cut to its first 4 layers (``model_config: num_hidden_layers: 4``, real weights)
with ``recipes/smollm2_sharelora_fsdp2.yml`` through ``accelerate launch --multi_gpu --num_processes 2 -m
axolotl.cli.train`` and compare with one process of the same global batch.
"""

from __future__ import annotations

import copy
import json
import os
import random
import re
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import ROOT, tiny_llama

SHARE_SETS = [[1, 2, 3]]
TARGETS = ["q_proj", "v_proj", "down_proj"]
RECIPE = ROOT / "recipes" / "smollm2_sharelora_fsdp2.yml"


# ---------------------------------------------------------------- helpers (also used by the torchrun worker)


def _tied_model_and_reference(seed: int = 0):
    """A tiny Llama with LoRA (random A and B) tied by ``SHARE_SETS``, and an untied copy whose members hold equal
    copies of the leader's values (the same function, each layer with its own tensors)."""
    from peft import LoraConfig, get_peft_model

    from sharelora_plugin.tying import tie_lora_modules

    model = get_peft_model(
        tiny_llama(num_layers=4, seed=seed),
        LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False),
    )
    reference = copy.deepcopy(model)
    layers = reference.base_model.model.model.layers
    for leader, *members in SHARE_SETS:
        for member in members:
            for name, module in layers[member].named_modules():
                if name.endswith(("lora_A.default", "lora_B.default")):
                    module.load_state_dict(layers[leader].get_submodule(name).state_dict())
    tie_lora_modules(model, SHARE_SETS)
    return model, reference


def _accelerator(mp_policy=None, reshard_after_forward: bool = True):
    """What both ``fsdp2_prepare_model`` functions read from an ``Accelerator``: its FSDP2 plugin, no device mesh."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
        reshard_after_forward=reshard_after_forward,
        mixed_precision_policy=mp_policy,
    )
    state = types.SimpleNamespace(fsdp_plugin=plugin, device_mesh=None)
    return types.SimpleNamespace(
        state=state,
        is_main_process=True,
        device=torch.device("cpu"),
        torch_device_mesh=None,
        mixed_precision="no",
    )


def _engines() -> dict:
    from accelerate.utils import fsdp_utils
    from axolotl.monkeypatch.accelerate import fsdp2 as axolotl_fsdp2

    return {"axolotl": axolotl_fsdp2.fsdp2_prepare_model, "accelerate": fsdp_utils.fsdp2_prepare_model}


def _prepare_with_sharelora(engine: str, accelerator, model):
    """Install ``engine``'s prepare function where accelerate's Trainer path calls it, wrap it as the plugin does,
    run it, and put the previous function back."""
    import accelerate.accelerator

    from sharelora_plugin import fsdp

    before = accelerate.accelerator.fsdp2_prepare_model
    accelerate.accelerator.fsdp2_prepare_model = _engines()[engine]
    try:
        fsdp.shard_shared_modules_once()
        return accelerate.accelerator.fsdp2_prepare_model(accelerator, model)
    finally:
        accelerate.accelerator.fsdp2_prepare_model = before


def _loss(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def _reference_grad(reference, name: str) -> torch.Tensor:
    """The gradient the tied parameter ``name`` must have: the sum over the members of its share set."""
    params = dict(reference.named_parameters())
    match = re.search(r"\.layers\.(\d+)\.", name)
    if match and ".lora_" in name:
        for share_set in SHARE_SETS:
            if int(match.group(1)) == min(share_set):
                return sum(params[name.replace(match.group(0), f".layers.{i}.")].grad for i in share_set)
    return params[name].grad


def _grad_differences(model, reference) -> tuple[float, float]:
    """Largest |FSDP2 gradient − reference gradient| over the trainable parameters (gathered to full tensors), and
    the largest reference gradient of a tied tensor (to show the comparison is not between zeros)."""
    from torch.distributed.tensor import DTensor

    worst, tied_scale = 0.0, 0.0
    for name, param in model.named_parameters():  # deduplicated: a tied tensor once, under its leader's name
        if not param.requires_grad:
            continue
        grad = param.grad.full_tensor() if isinstance(param.grad, DTensor) else param.grad
        expected = _reference_grad(reference, name)
        worst = max(worst, (grad - expected).abs().max().item())
        if f".layers.{min(SHARE_SETS[0])}." in name and ".lora_" in name:
            tied_scale = max(tied_scale, expected.abs().max().item())
    return worst, tied_scale


@pytest.fixture
def world_of_one(tmp_path):
    """A gloo process group of one process (FSDP2 on CPU without a launcher)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


# ---------------------------------------------------------------- unit tests


@pytest.mark.parametrize(
    ("engine", "error"),
    [
        ("axolotl", "can only be applied to a module once"),
        # the member's layer meets the leader's already-sharded DTensor and takes it for tensor parallelism
        ("accelerate", "value was None when it should not be"),
    ],
)
def test_fsdp2_prepare_alone_cannot_shard_a_tied_module(engine, error, world_of_one):
    """Why the plugin steps in: Axolotl shards every LoRA module once per parent (twice for a tied one); accelerate
    lets the leader's decoder layer take the tied parameters and then the member's layer again."""
    model, _ = _tied_model_and_reference()
    with pytest.raises(Exception, match=error):
        prepared = _engines()[engine](_accelerator(), model)
        _loss(prepared, torch.randint(0, 128, (2, 8)))


@pytest.mark.parametrize("engine", ["axolotl", "accelerate"])
def test_each_tied_module_is_one_group_with_the_runs_settings(engine, world_of_one):
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy

    from sharelora_plugin.fsdp import tied_lora_modules

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    model, _ = _tied_model_and_reference()
    tied = tied_lora_modules(model)
    assert len(tied) == len(TARGETS) * 2  # lora_A and lora_B of each target, one set
    _prepare_with_sharelora(engine, _accelerator(policy, reshard_after_forward=False), model)

    def group(module):
        return module._get_fsdp_state()._fsdp_param_group

    tied_params = {id(p) for module in tied for p in module.parameters()}
    for module in tied:
        assert isinstance(module, FSDPModule)
        assert {id(fp.sharded_param) for fp in group(module).fsdp_params} == {
            id(p) for p in module.parameters()
        }
        assert group(module).mp_policy == policy
        assert group(module).post_forward_mesh_info is None  # reshard_after_forward: false, as configured
    for layer in model.base_model.model.model.layers:
        assert isinstance(layer, FSDPModule)
        assert not tied_params & {id(fp.sharded_param) for fp in group(layer).fsdp_params}
        assert group(layer).mp_policy == policy
    untied_lora = model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"]
    if engine == "axolotl":  # Axolotl gives every LoRA module a group: the untied ones are set up alike
        assert isinstance(untied_lora, FSDPModule) and group(untied_lora).mp_policy == policy


@pytest.mark.parametrize("engine", ["axolotl", "accelerate"])
def test_tied_module_runs_once_per_member_and_gets_the_summed_gradient(engine, world_of_one):
    from sharelora_plugin.fsdp import tied_lora_modules

    model, reference = _tied_model_and_reference()
    _prepare_with_sharelora(engine, _accelerator(), model)
    calls = {id(m): 0 for m in tied_lora_modules(model)}
    for module in tied_lora_modules(model):
        module.register_forward_hook(lambda mod, args, out: calls.__setitem__(id(mod), calls[id(mod)] + 1))
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    loss, expected = _loss(model, ids), _loss(reference, ids)
    assert set(calls.values()) == {len(SHARE_SETS[0])}
    torch.testing.assert_close(loss, expected)
    loss.backward()
    expected.backward()
    worst, tied_scale = _grad_differences(model, reference)
    assert tied_scale > 1e-3
    assert worst <= 1e-5 * max(1.0, tied_scale), (worst, tied_scale)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_average_the_summed_gradients_like_one_process(tmp_path):
    """Real all-gather/reduce-scatter over gloo: rank r trains on its own batch; the gathered gradient of each tied
    tensor equals the one-process gradient of the mean of both ranks' losses, summed over the set's members."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port()), __file__, str(tmp_path),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["tied_scale"] > 1e-3
    # fp32, the same additions in another order (two ranks, three members): differences of a few ulp
    assert result["worst"] <= 1e-5 * max(1.0, result["tied_scale"]), result
    assert abs(result["loss"] - result["reference_loss"]) <= 1e-5, result


def _two_process_worker(out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model, reference = _tied_model_and_reference()  # seeded: the same on both ranks
    ids = [
        torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(10 + r)) for r in range(world)
    ]
    _prepare_with_sharelora("axolotl", _accelerator(), model)
    loss = _loss(model, ids[rank])
    loss.backward()
    reference_loss = sum(_loss(reference, batch) for batch in ids) / world
    reference_loss.backward()
    worst, tied_scale = _grad_differences(model, reference)
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    if rank == 0:
        result = {
            "worst": worst,
            "tied_scale": tied_scale,
            "loss": mean_loss.item() / world,
            "reference_loss": reference_loss.item(),
        }
        (Path(out_dir) / "result.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def test_complete_saved_adapter_adds_member_copies(tmp_path):
    from safetensors.torch import load_file, save_file

    from sharelora_plugin.fsdp import complete_saved_adapter

    prefix = "base_model.model.model.layers"
    lead = {f"{prefix}.1.self_attn.q_proj.lora_{x}.weight": torch.randn(4, 8) for x in "AB"}
    untied = {f"{prefix}.0.self_attn.q_proj.lora_A.weight": torch.randn(4, 8)}
    save_file({**lead, **untied}, str(tmp_path / "adapter_model.safetensors"))
    assert complete_saved_adapter(tmp_path, SHARE_SETS, prefix) == 4
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert len(tensors) == 7
    for member in (2, 3):
        for key, value in lead.items():
            assert torch.equal(tensors[key.replace(".1.", f".{member}.")], value)
    assert complete_saved_adapter(tmp_path, SHARE_SETS, prefix) == 0  # already complete
    tensors[f"{prefix}.3.self_attn.q_proj.lora_A.weight"] += 1
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="differs"):
        complete_saved_adapter(tmp_path, SHARE_SETS, prefix)


# ---------------------------------------------------------------- e2e: Axolotl, two processes


E2E_SETS = [[1, 2, 3]]  # of the 4 SmolLM2 layers kept; layer 0 stays untied


def _equal_length_texts(tokenizer, rows: int, words: int, seed: int = 0) -> list[str]:
    """Texts of exactly ``words`` tokens (words that are one token with their leading space), so every sample has
    the same number of trained tokens: Axolotl averages the loss per rank (``average_tokens_across_devices`` off),
    and only then is the mean of two ranks' means the one-process mean of the global batch."""
    pieces = (tokenizer.decode([i]) for i in sorted(tokenizer.get_vocab().values()))
    vocab = [w for w in pieces if w[:1] == " " and w[1:].isascii() and w[1:].isalpha() and w[1:].islower()]
    vocab = [w for w in vocab if len(tokenizer(w, add_special_tokens=False)["input_ids"]) == 1][:500]
    rng = random.Random(seed)
    texts = ["".join(rng.choice(vocab) for _ in range(words)) for _ in range(rows)]
    assert {len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts} == {words}
    return texts


def _write_config(path: Path, smollm2_dir: Path, data: Path, calib: Path, out: Path, **overrides) -> Path:
    import yaml

    cfg = yaml.safe_load(RECIPE.read_text())
    cfg.update(
        base_model=str(smollm2_dir),
        model_config={"num_hidden_layers": 4},
        output_dir=str(out),
        dataset_prepared_path=str(path.parent / "prepared"),
        datasets=[{"path": str(data), "type": "completion"}],
        max_steps=2,
        save_steps=1,
        logging_steps=1,
        micro_batch_size=1,
        sequence_len=64,
        lora_dropout=0.0,
        learning_rate=1e-3,
        warmup_steps=0,
    )
    cfg["sharelora"] = {
        "strategy": "manual",
        "share_sets": E2E_SETS,
        "calibration": {"path": str(calib), "num_samples": 8, "max_length": 32, "batch_size": 4},
    }
    cfg.update(overrides)
    for key in [k for k, v in cfg.items() if v is None]:
        cfg.pop(key)
    path.write_text(yaml.safe_dump(cfg))
    return path


def _train(config: Path, processes: int) -> str:
    bin_dir = Path(sys.executable).parent
    if processes == 1:
        cmd = [sys.executable, "-m", "axolotl.cli.train", str(config)]
    else:
        cmd = [
            str(bin_dir / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(_free_port()), "-m", "axolotl.cli.train", str(config),
        ]  # fmt: skip
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    return log


def _losses(checkpoint: Path) -> dict[int, float]:
    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    return {h["step"]: h["loss"] for h in history if "loss" in h}


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def _assert_complete_and_tied(tensors: dict[str, torch.Tensor]) -> None:
    per_layer = 5 * 2  # q, k, v, up, down × A, B
    assert len(tensors) == 4 * per_layer, sorted(tensors)
    for leader, *members in E2E_SETS:
        lead = {k: v for k, v in tensors.items() if f".layers.{leader}." in k}
        assert len(lead) == per_layer
        for member in members:
            for key, value in lead.items():
                assert torch.equal(tensors[key.replace(f".layers.{leader}.", f".layers.{member}.")], value)


@pytest.fixture(scope="module")
def e2e(tmp_path_factory, smollm2_dir, data_dir):
    """Files shared by the e2e runs: equal-length training texts, and a ShareLoRA adapter to start from (random
    A and B, members equal, with its plan), so that separate runs begin from the same weights — Axolotl creates
    LoRA weights unseeded."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sharelora_plugin.planning import make_plan
    from sharelora_plugin.tying import tie_lora_modules

    work = tmp_path_factory.mktemp("fsdp2")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    data = work / "equal_length.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in _equal_length_texts(tokenizer, 64, 40)))
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, num_hidden_layers=4, dtype=torch.float32)
    lora = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"],
        init_lora_weights=False,
        task_type="CAUSAL_LM",  # as Axolotl writes it (its LoRA kernels want a PeftModelForCausalLM)
    )
    model = get_peft_model(base, lora)
    tie_lora_modules(model, E2E_SETS)
    start = work / "start_adapter"
    model.save_pretrained(str(start))
    make_plan(num_layers=4, strategy="manual", share_sets=E2E_SETS, rank=8).save(
        start / "sharelora_plan.json"
    )
    return {
        "work": work,
        "data": data,
        "calib": data_dir / "lee_background.jsonl",
        "start": start,
        "smollm2": smollm2_dir,
    }


def _run(e2e: dict, name: str, processes: int, **overrides) -> dict:
    out = e2e["work"] / name
    config = _write_config(
        e2e["work"] / f"{name}.yml", e2e["smollm2"], e2e["data"], e2e["calib"], out, **overrides
    )
    return {"out": out, "log": _train(config, processes)}


@pytest.fixture(scope="module")
def two_process_full(e2e):
    """FSDP2 on two processes from the start adapter, full-state-dict checkpoints."""
    fsdp = {"fsdp_config": {**_recipe_fsdp_config(), "state_dict_type": "FULL_STATE_DICT"}}
    return _run(e2e, "two_full", 2, lora_model_dir=str(e2e["start"]), **fsdp)


@pytest.fixture(scope="module")
def one_process(e2e):
    """The same global batch (2 samples a step) in one process without FSDP."""
    return _run(
        e2e,
        "one",
        1,
        lora_model_dir=str(e2e["start"]),
        micro_batch_size=2,
        fsdp_config=None,
        fsdp_version=None,
    )


@pytest.fixture(scope="module")
def two_process_sharded(e2e):
    """FSDP2 on two processes as the recipe has it (sharded checkpoints), calibrating on rank 0."""
    return _run(e2e, "two_sharded", 2)


def _recipe_fsdp_config() -> dict:
    import yaml

    return dict(yaml.safe_load(RECIPE.read_text())["fsdp_config"])


@pytest.mark.e2e
def test_two_processes_train_like_one_process_of_the_global_batch(two_process_full, one_process):
    two, one = _losses(two_process_full["out"] / "checkpoint-2"), _losses(one_process["out"] / "checkpoint-2")
    assert sorted(two) == sorted(one) == [1, 2]
    for step in (1, 2):
        # fp32, the same sums in another order (per rank, then averaged): measured |Δ| ≤ 4e-6 on a loss of ~25,
        # two ulp; 1e-4 leaves room for other CPUs' kernels and stays far below a step's change (~1.8 here)
        assert abs(two[step] - one[step]) <= 1e-4, (step, two[step], one[step])
    assert two[2] != pytest.approx(two[1], abs=1e-2)  # the steps see different samples: the comparison bites
    trained_two, trained_one = _adapter(two_process_full["out"]), _adapter(one_process["out"])
    _assert_complete_and_tied(trained_two)
    _assert_complete_and_tied(
        _adapter(two_process_full["out"] / "checkpoint-1")
    )  # full-state-dict checkpoint
    start = _adapter(two_process_full["out"].parent / "start_adapter")
    moved = max((trained_one[k] - start[k]).abs().max().item() for k in start)
    worst = max((trained_two[k] - trained_one[k]).abs().max().item() for k in trained_one)
    # two Adam steps at lr 1e-3 move weights by up to ~2e-3 (measured 1.5e-3); gradients not averaged over ranks or
    # not summed over members would move them differently by that order. Measured |Δ| 4e-7.
    assert moved > 1e-3 and worst <= 1e-5, (moved, worst)


@pytest.mark.e2e
def test_two_processes_calibrate_once_tie_alike_and_save_a_plain_adapter(two_process_sharded, e2e):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    log, out = two_process_sharded["log"], two_process_sharded["out"]
    assert log.count("ShareLoRA: calibrating on process") == 1
    built = {
        m.group(1): m.group(2, 3)
        for m in re.finditer(r"ShareLoRA rank (\d): plan (\w+), tie layout (\w+)", log)
    }
    assert set(built) == {"0", "1"} and built["0"] == built["1"]
    assert len(re.findall(r"ShareLoRA FSDP2: 10 tied LoRA modules sharded once each", log)) == 2
    assert (out / "checkpoint-1" / "pytorch_model_fsdp_0").is_dir()  # sharded checkpoint
    assert (out / "checkpoint-1" / "sharelora_plan.json").is_file()
    tensors = _adapter(out)
    _assert_complete_and_tied(tensors)
    base = AutoModelForCausalLM.from_pretrained(e2e["smollm2"], num_hidden_layers=4, dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, str(out))  # plain PEFT: no plugin
    state = loaded.state_dict()
    for key, value in tensors.items():
        assert torch.equal(state[key.replace(".weight", ".default.weight")], value), key


@pytest.mark.e2e
def test_resume_from_a_sharded_checkpoint_reties_and_continues(two_process_sharded, e2e):
    checkpoint = two_process_sharded["out"] / "checkpoint-1"
    unreadable = e2e["work"] / "unreadable.jsonl"
    unreadable.write_text("not json at all\n")  # a recalibration would fail the run
    resumed = _run(
        e2e,
        "resumed",
        2,
        resume_from_checkpoint=str(checkpoint),
        sharelora={"strategy": "manual", "share_sets": E2E_SETS, "calibration": {"path": str(unreadable)}},
    )
    assert "ShareLoRA: calibrating" not in resumed["log"]
    plan = json.loads((resumed["out"] / "sharelora_plan.json").read_text())
    assert plan["metadata"]["plan_source"] == str(checkpoint / "sharelora_plan.json")
    assert (
        _losses(resumed["out"] / "checkpoint-2")[2] == _losses(two_process_sharded["out"] / "checkpoint-2")[2]
    )
    uninterrupted, continued = _adapter(two_process_sharded["out"]), _adapter(resumed["out"])
    _assert_complete_and_tied(continued)
    assert all(torch.equal(continued[k], uninterrupted[k]) for k in uninterrupted)


if (
    __name__ == "__main__"
):  # torchrun entry of test_two_processes_average_the_summed_gradients_like_one_process
    _two_process_worker(sys.argv[1])
