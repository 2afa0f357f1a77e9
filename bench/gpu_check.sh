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

# FSDP2 (issue 15) on two GPUs over nccl, with the FSDP2 recipe (embedded SmolLM2, ~2 min). Checks: one calibration
# (rank 0), each tied LoRA module sharded once as its own group on both ranks, a complete plain adapter (one equal copy
# per member layer, loads in plain PEFT), and a resume from the sharded checkpoint-5 that re-ties from the checkpoint's
# plan and reaches the same final loss. Then tests/test_fsdp2.py (its e2e tests launch 2 processes: 2 GPUs here).
# Skipped with fewer than 2 GPUs. Needs the repo's venv (axolotl, accelerate, peft) and `make setup`'s embedded model.
NGPU=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
if [ "$NGPU" -lt 2 ]; then
    echo "gpu_check: FSDP2 steps skipped ($NGPU GPU visible, they need 2)"
    exit 0
fi
FSDP2_OUT=outputs/gpu_check_fsdp2
rm -rf "$FSDP2_OUT" "${FSDP2_OUT}_resumed"
mkdir -p "$FSDP2_OUT"
"$PY" -m accelerate.commands.launch --num_processes 2 -m axolotl.cli.train recipes/smollm2_sharelora_fsdp2.yml \
    --output_dir "$FSDP2_OUT" >"$FSDP2_OUT.log" 2>&1 || { tail -50 "$FSDP2_OUT.log"; exit 1; }
"$PY" -m accelerate.commands.launch --num_processes 2 -m axolotl.cli.train recipes/smollm2_sharelora_fsdp2.yml \
    --output_dir "${FSDP2_OUT}_resumed" --resume_from_checkpoint "$FSDP2_OUT/checkpoint-5" \
    >"${FSDP2_OUT}_resumed.log" 2>&1 || { tail -50 "${FSDP2_OUT}_resumed.log"; exit 1; }
"$PY" - "$FSDP2_OUT" <<'PYEOF'
import json, re, sys
from pathlib import Path
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
out = Path(sys.argv[1]); resumed = Path(f"{out}_resumed")
log, log_resumed = Path(f"{out}.log").read_text(), Path(f"{resumed}.log").read_text()
problems = []
if log.count("ShareLoRA: calibrating on process") != 1:
    problems.append("calibration did not run exactly once")
if len(re.findall(r"ShareLoRA FSDP2: \d+ tied LoRA modules sharded once each", log)) != 2:
    problems.append("the tied modules were not sharded once on each of the 2 ranks")
layouts = set(re.findall(r"ShareLoRA rank \d: plan (\w+), tie layout (\w+)", log))
if len(layouts) != 1:
    problems.append(f"ranks built different plans/tie layouts: {layouts}")
plan = json.loads((out / "sharelora_plan.json").read_text())
tensors = load_file(str(out / "adapter_model.safetensors"))
if len(tensors) != 30 * 5 * 2:
    problems.append(f"adapter has {len(tensors)} tensors, expected 300 (30 layers x 5 targets x A/B)")
for leader, *members in plan["share_sets"]:
    for key in [k for k in tensors if f".layers.{leader}." in k]:
        for m in members:
            if not torch.equal(tensors.get(key.replace(f".layers.{leader}.", f".layers.{m}."), torch.empty(0)), tensors[key]):
                problems.append(f"layer {m} does not hold layer {leader}'s {key.split('.layers.')[1]}")
base = AutoModelForCausalLM.from_pretrained(plan["metadata"].get("model") or ".cache/models/SmolLM2-135M-Instruct")
state = PeftModel.from_pretrained(base, str(out)).state_dict()
if any(not torch.equal(state[k.replace(".weight", ".default.weight")], v) for k, v in tensors.items()):
    problems.append("plain PEFT did not load the adapter as saved")
if "ShareLoRA: calibrating" in log_resumed or "checkpoint-5/sharelora_plan.json" not in log_resumed:
    problems.append("the resume did not re-tie from checkpoint-5's plan")
def last_loss(folder):
    history = json.loads((folder / "checkpoint-10" / "trainer_state.json").read_text())["log_history"]
    return [h["loss"] for h in history if "loss" in h][-1]
if abs(last_loss(out) - last_loss(resumed)) > 1e-3:
    problems.append(f"resumed final loss {last_loss(resumed)} != uninterrupted {last_loss(out)}")
print("gpu_check FSDP2:", "OK" if not problems else "FAILED\n- " + "\n- ".join(problems))
sys.exit(1 if problems else 0)
PYEOF
"$PY" -m pytest -q tests/test_fsdp2.py
