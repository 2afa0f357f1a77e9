"""What the bench scripts share: the repo root, the offline environment, the LoRA setup they measure (the paper's
commonsense setup, DESIGN.md §1), the paper's LLaMA-7B share sets, the Lee texts, one calibration pass of the
plugin on the embedded SmolLM2, and reading a child process's JSON line.

Every script imports these from here instead of restating them, so a change lands in all of them at once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

# What `make` exports; a script run by hand gets the same offline, untracked behaviour.
OFFLINE_ENV = {
    "AXOLOTL_DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
}

# The paper's commonsense LoRA: r=8, alpha 16, dropout 0.05 on q, k, v, up, down.
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
LORA_R, LORA_ALPHA, LORA_DROPOUT = 8, 16, 0.05

# The paper's LLaMA-7B share sets (DESIGN.md §1).
PAPER_LLAMA_7B_SETS = [[16, 17], [18, 19], [20, 21, 22], [23, 24, 25, 26, 27], [28, 29, 30]]


def use_offline_env() -> None:
    """Set :data:`OFFLINE_ENV` in this process wherever the caller has not set a value of its own."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)


def read_lee_texts(filename: str) -> list[str]:
    """The ``text`` of every line of one of the embedded Lee corpus files (``lee_background.jsonl``: 300 news
    articles; ``lee_test.jsonl``: 50)."""
    from bench.embedded import data_dir
    from sharelora_plugin.planning.files import read_jsonl

    return [row["text"] for row in read_jsonl(data_dir() / filename)]


def calibrate_on_lee(num_samples: int, max_length: int, batch_size: int) -> tuple[Any, dict, float]:
    """The plugin's own calibration (``workflow.run_calibration``) of the embedded SmolLM2 on ``num_samples`` Lee
    background texts; returns (the ``CalibrationResult``, the ``sharelora`` settings used, seconds taken)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.embedded import data_dir, model_dir
    from sharelora_plugin.args import ShareLoRAConfig
    from sharelora_plugin.workflow import run_calibration

    settings = ShareLoRAConfig(
        calibration={
            "path": str(data_dir() / "lee_background.jsonl"),
            "num_samples": num_samples,
            "max_length": max_length,
            "batch_size": batch_size,
        }
    ).model_dump()
    model = AutoModelForCausalLM.from_pretrained(model_dir(), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir())
    start = time.perf_counter()
    result = run_calibration(model, tokenizer, settings, {"base_model": str(model_dir())})
    return result, settings, time.perf_counter() - start


def child_json(script: str, *args: str) -> dict:
    """Run ``script`` in a fresh Python process (a peak-memory measurement must not share this one's heap) and
    parse the JSON object on the last line of its output."""
    out = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])
