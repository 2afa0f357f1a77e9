"""Shared fixtures: offline environment, tiny random Llama models, the embedded SmolLM2."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
for key, value in {
    "AXOLOTL_DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(key, value)
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct prepared by `make setup`."""
    from bench.embedded import model_dir

    path = model_dir()
    if not (path / "config.json").is_file():
        pytest.fail(f"{path} is missing: run `make setup` (it converts the embedded SmolLM2)")
    return path


@pytest.fixture(scope="session")
def data_dir() -> Path:
    from bench.embedded import data_dir as _data_dir

    path = _data_dir()
    if not (path / "lee_background.jsonl").is_file():
        pytest.fail(f"{path} is missing: run `make setup`")
    return path


def tiny_llama(num_layers: int = 6, seed: int = 0, hidden: int = 32, vocab_size: int = 128, **overrides):
    """A random Llama small enough for logic tests (a few thousand parameters per layer)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        **overrides,
    )
    model = LlamaForCausalLM(config)
    model.eval()
    return model


_PATCHABLE = ("forward", "_original_forward")


def _model_classes():
    for name, module in list(sys.modules.items()):
        if name.startswith("transformers.models.") and module is not None:
            for value in list(vars(module).values()):
                if isinstance(value, type) and value.__module__ == name:
                    yield value


@pytest.fixture(autouse=True, scope="module")
def _undo_axolotl_class_patches():
    """In-process Axolotl training rewrites transformers classes (its LoRA kernels replace
    ``LlamaAttention.forward`` with one that needs per-instance ``apply_qkv``). Restore the classes after each
    test module so later modules see stock transformers, as a fresh process would."""
    import transformers.models.llama.modeling_llama  # noqa: F401  (the class Axolotl patches most)

    saved = {cls: {k: cls.__dict__[k] for k in _PATCHABLE if k in cls.__dict__} for cls in _model_classes()}
    yield
    for cls in _model_classes():
        before = saved.get(cls)
        if before is None:
            continue
        for key in _PATCHABLE:
            if key in before:
                setattr(cls, key, before[key])
            elif key in cls.__dict__:
                delattr(cls, key)


def load_script(path: Path, name: str):
    """Import a script by path (llava/ holds scripts, deliberately not a package); cached in sys.modules."""
    import importlib.util

    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny_llava(smollm2_dir) -> Path:
    """The tiny LLaVA folder (built once into .cache/tiny_llava; reused while its version stamp matches)."""
    build_tiny = load_script(ROOT / "llava" / "build_tiny.py", "llava_build_tiny_under_test")
    return build_tiny.build()


def pad_batches(samples, side: str, batch_size: int) -> list[dict]:
    """Token-id tensors padded (id 0) on ``side`` into batches with an attention mask, as a tokenizer would."""
    import torch

    batches = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, s in enumerate(chunk):
            cols = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
            ids[row, cols], mask[row, cols] = s, 1
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def write_config(path: Path, smollm2_dir: Path, data_dir: Path, output_dir: Path, **overrides) -> Path:
    """A small version of recipes/smollm2_sharelora.yml: few calibration samples, a few steps."""
    import yaml

    cfg = yaml.safe_load((ROOT / "recipes" / "smollm2_sharelora.yml").read_text())
    cfg.update(
        base_model=str(smollm2_dir),
        output_dir=str(output_dir),
        dataset_prepared_path=str(output_dir.parent / "prepared"),
        max_steps=3,
        save_steps=2,
        logging_steps=1,
        micro_batch_size=2,
        sequence_len=128,
    )
    cfg["datasets"][0]["path"] = str(data_dir / "chatterbot_en.jsonl")
    cfg["sharelora"]["calibration"].update(
        path=str(data_dir / "lee_background.jsonl"),
        num_samples=16,
        max_length=64,
        batch_size=8,
        min_samples=8,
    )
    for key, value in overrides.items():
        cfg[key] = value
    path.write_text(yaml.safe_dump(cfg))
    return path


def train_subprocess(config: Path) -> str:
    """`python -m axolotl.cli.train CONFIG` in a fresh process; returns its combined output."""
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-m", "axolotl.cli.train", str(config)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=900,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout + proc.stderr
