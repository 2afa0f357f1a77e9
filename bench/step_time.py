"""Training step time ShareLoRA ÷ LoRA on the embedded SmolLM2, plus optimizer state and peak memory.

    python bench/step_time.py [--steps 12] [--warmup 2] [--plan outputs/smollm2_sharelora/sharelora_plan.json]

Both models are built from the same weights with PEFT (r=8, q,k,v,up,down) and trained on the same batches
with AdamW; their steps are interleaved (LoRA, ShareLoRA, LoRA, …) so machine noise hits both alike. The median
of the per-step times after warm-up is compared. Peak RSS is measured in a fresh process per variant.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run by path: make `bench` importable
from bench.common import (  # noqa: E402
    LORA_ALPHA,
    LORA_DROPOUT,
    LORA_R,
    REPO,
    TARGET_MODULES,
    child_json,
    use_offline_env,
)

use_offline_env()

# the greedy plan at ε = 0.90 from a SmolLM2 calibration (used when no plan file is given)
DEFAULT_SETS = [[1, 2, 3], [4, 5], [9, 10], [11, 12, 13], [14, 15], [16, 17], [21, 22], [24, 25, 26]]


def _share_sets(plan: str | None) -> list[list[int]]:
    if plan and Path(plan).is_file():
        return json.loads(Path(plan).read_text())["share_sets"]
    return DEFAULT_SETS


def _build(variant: str, share_sets, seed: int = 0):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from bench.embedded import model_dir
    from sharelora_plugin.tying import tie_lora_modules

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir(), dtype=torch.float32)
    model = get_peft_model(
        model,
        LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT, target_modules=TARGET_MODULES),
    )
    if variant == "sharelora":
        tie_lora_modules(model, share_sets)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=1e-4)


def _batches(n: int, batch_size: int, length: int):
    import torch

    gen = torch.Generator().manual_seed(1)
    return [torch.randint(3, 49152, (batch_size, length), generator=gen) for _ in range(n)]


def _step(model, opt, ids) -> float:
    start = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    return time.perf_counter() - start


def _optimizer_bytes(opt) -> int:
    return sum(
        t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if hasattr(t, "numel")
    )


def interleaved(args) -> None:
    sets = _share_sets(args.plan)
    lora, lora_opt = _build("lora", sets)
    share, share_opt = _build("sharelora", sets)
    batches = _batches(args.warmup + args.steps, args.batch_size, args.length)
    t_lora, t_share = [], []
    for i, ids in enumerate(batches):
        a = _step(lora, lora_opt, ids)
        b = _step(share, share_opt, ids)
        if i >= args.warmup:
            t_lora.append(a)
            t_share.append(b)
    from sharelora_plugin.tying import unique_trainable_parameters

    print(f"share sets: {sets}")
    print(
        f"batch {args.batch_size} x {args.length} tokens, {args.steps} timed steps after {args.warmup} warm-up"
    )
    print(f"{'':>10} {'median step (s)':>16} {'trainable':>11} {'optimizer state (MB)':>21}")
    for name, times, model, opt in (
        ("LoRA", t_lora, lora, lora_opt),
        ("ShareLoRA", t_share, share, share_opt),
    ):
        print(
            f"{name:>10} {statistics.median(times):>16.3f} {unique_trainable_parameters(model):>11,} "
            f"{_optimizer_bytes(opt) / 2**20:>21.2f}"
        )
    print(
        f"RATIO step time ShareLoRA / LoRA = {statistics.median(t_share) / statistics.median(t_lora):.3f} (goal <= 1.02)"
    )
    print(
        f"RATIO optimizer state ShareLoRA / LoRA = {_optimizer_bytes(share_opt) / _optimizer_bytes(lora_opt):.3f}"
    )


def peak_child(args) -> None:
    model, opt = _build(args.peak_child, _share_sets(args.plan))
    for ids in _batches(3, args.batch_size, args.length):
        _step(model, opt, ids)
    print(
        json.dumps(
            {
                "variant": args.peak_child,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=12, help="timed steps per variant (default 12)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--batch-size", type=int, default=2, help="sequences per step (default 2)")
    parser.add_argument("--length", type=int, default=256, help="tokens per sequence (default 256)")
    parser.add_argument(
        "--plan",
        default=str(REPO / "outputs" / "smollm2_sharelora" / "sharelora_plan.json"),
        help="sharelora_plan.json whose share sets to tie (default: the demo's; a built-in plan if absent)",
    )
    parser.add_argument("--no-peak", action="store_true", help="skip the peak-RSS subprocesses")
    parser.add_argument("--peak-child", choices=["lora", "sharelora"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak_child:
        peak_child(args)
        return
    interleaved(args)
    if not args.no_peak:
        rows = {}
        for variant in ("lora", "sharelora"):
            child = child_json(
                __file__, "--peak-child", variant, "--plan", args.plan,
                "--batch-size", str(args.batch_size), "--length", str(args.length),
            )  # fmt: skip
            rows[variant] = child["peak_rss_mb"]
        print(
            f"peak RSS (fresh process, 3 steps): LoRA {rows['lora']:.0f} MB, ShareLoRA {rows['sharelora']:.0f} MB"
        )


if __name__ == "__main__":
    main()
