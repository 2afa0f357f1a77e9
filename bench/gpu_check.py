"""GPU check at LLaMA-7B geometry with random weights (no Hub needed): calibration time for 256 × 512 tokens and
the training step-time ratio ShareLoRA ÷ LoRA at r=8 in bf16.

    python bench/gpu_check.py [--model-config configs/llama-7b.json] [--samples 256] [--length 512]

`bench/gpu_check.sh` runs it on a lent GPU. On a CPU, `--num-layers 2 --device cpu --samples 4 --length 16`
smoke-tests the script itself.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
# the paper's LLaMA-7B sets (DESIGN.md §1)
PAPER_SETS = [[16, 17], [18, 19], [20, 21, 22], [23, 24, 25, 26, 27], [28, 29, 30]]


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from sharelora_plugin.calibration import calibrate
    from sharelora_plugin.planning import greedy_share_sets
    from sharelora_plugin.tying import tie_lora_modules, unique_trainable_parameters

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-config", default=str(ROOT / "configs" / "llama-7b.json"))
    parser.add_argument("--num-layers", type=int, default=None)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--train-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    fields = json.loads(Path(args.model_config).read_text())
    if args.num_layers:
        fields["num_hidden_layers"] = args.num_layers
    config = LlamaConfig(**{k: v for k, v in fields.items() if k not in ("architectures", "model_type")})
    torch.manual_seed(0)
    start = time.perf_counter()
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    print(f"built {config.num_hidden_layers}-layer LLaMA geometry ({sum(p.numel() for p in model.parameters()) / 1e9:.2f}B "
          f"params, {dtype}) on {device} in {time.perf_counter() - start:.1f}s")  # fmt: skip

    gen = torch.Generator().manual_seed(1)
    batches = []
    for s in range(0, args.samples, args.batch_size):
        n = min(args.batch_size, args.samples - s)
        ids = torch.randint(3, config.vocab_size, (n, args.length), generator=gen)
        mask = torch.ones_like(ids)
        batches.append({"input_ids": ids, "attention_mask": mask})
    calibrate(model, batches[:1], progress=False)  # warm-up (kernels, allocator)
    _sync(device)
    start = time.perf_counter()
    result = calibrate(model, batches, progress=False)
    _sync(device)
    seconds = time.perf_counter() - start
    print(f"CALIBRATION {args.samples} x {args.length} tokens: {seconds:.2f} s (goal <= 10 s); "
          f"{result.num_tokens / seconds:,.0f} tokens/s")  # fmt: skip
    sets = [s for s in PAPER_SETS if max(s) < config.num_hidden_layers] or greedy_share_sets(
        result.similarity("angular"), 0.5
    )

    def make(variant: str, base):
        torch.manual_seed(0)
        peft_model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
        if variant == "sharelora":
            tie_lora_modules(peft_model, sets)
        peft_model.train()
        params = [p for p in peft_model.parameters() if p.requires_grad]
        return peft_model, torch.optim.AdamW(params, lr=1e-4)

    # two copies of the same base so the two variants' steps can be interleaved (noise hits both alike)
    variants = {"lora": make("lora", copy.deepcopy(model)), "sharelora": make("sharelora", model)}
    ids = torch.randint(3, config.vocab_size, (args.train_batch, args.length), generator=gen).to(device)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for step in range(args.warmup + args.steps):
        for name, (peft_model, opt) in variants.items():
            _sync(device)
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            peft_model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            _sync(device)
            if step >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    for name, (peft_model, _) in variants.items():
        print(f"{name:>9}: median step {statistics.median(times[name]):.3f} s, trainable "
              f"{unique_trainable_parameters(peft_model):,}")  # fmt: skip
    ratio = statistics.median(times["sharelora"]) / statistics.median(times["lora"])
    print(f"RATIO step time ShareLoRA / LoRA (r=8, {dtype}) = {ratio:.3f} (goal <= 1.02); sets {sets}")


if __name__ == "__main__":
    main()
