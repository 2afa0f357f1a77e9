#!/usr/bin/env bash
# GPU check for a lent accelerator (one prepared run): LLaMA-7B geometry with random weights from configs/
# (no Hub there), calibration of 256 x 512 tokens (goal <= 10 s) and the step-time ratio ShareLoRA / LoRA at
# r=8 in bf16 (goal <= 1.02). Needs a Python with torch (CUDA), transformers, peft, numpy and scipy.
# Usage: bash bench/gpu_check.sh [extra args for bench/gpu_check.py]
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 AXOLOTL_DO_NOT_TRACK=1 WANDB_MODE=disabled
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
"$PY" - <<'PYEOF'
import importlib.util, sys
missing = [m for m in ("torch", "transformers", "peft", "numpy", "scipy") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_check: missing Python packages: {', '.join(missing)}")
import torch
if not torch.cuda.is_available():
    sys.exit("gpu_check: no CUDA device visible; on a CPU run bench/gpu_check.py --device cpu --num-layers 2 --samples 4 --length 16")
print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__)
PYEOF
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader || true
"$PY" bench/gpu_check.py "$@"
