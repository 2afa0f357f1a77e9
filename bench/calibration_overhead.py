"""Calibration cost on the embedded SmolLM2: wall time ÷ a plain no-grad forward over the same batches, and peak
memory against the number of samples (it must stay flat: only a [batch, hidden] slice per layer is kept).

    python bench/calibration_overhead.py [--samples 64] [--rounds 3] [--memory-samples 16,64,256]
    python bench/calibration_overhead.py --rounds 0 --max-length 128      # memory table only

Both timings run in one process, interleaved round by round, and the ratio of medians is printed (the machine
is noisy; absolute times mean little). Memory is the peak RSS of a fresh process per sample count.
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
from bench.common import child_json, read_lee_texts, use_offline_env  # noqa: E402

use_offline_env()


def _load(samples: int, max_length: int, batch_size: int):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.embedded import model_dir
    from sharelora_plugin.calibration import text_batches

    model = AutoModelForCausalLM.from_pretrained(model_dir(), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir())
    rows = read_lee_texts("lee_background.jsonl")
    texts = (rows * (samples // len(rows) + 1))[:samples]
    return model, text_batches(tokenizer, texts, batch_size=batch_size, max_length=max_length)


def time_ratio(samples: int, rounds: int, max_length: int, batch_size: int) -> None:
    import torch

    from sharelora_plugin.calibration import calibrate

    model, batches = _load(samples, max_length, batch_size)

    @torch.no_grad()
    def plain_forward() -> None:
        for batch in batches:
            model.model(**batch, use_cache=False)

    plain_forward()  # warm-up
    plain, calib = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        plain_forward()
        plain.append(time.perf_counter() - start)
        start = time.perf_counter()
        calibrate(model, batches, progress=False)
        calib.append(time.perf_counter() - start)
    print(f"samples={samples} max_length={max_length} batch_size={batch_size} rounds={rounds}")
    print(f"plain no-grad forward (no LM head): median {statistics.median(plain):.2f} s  {plain}")
    print(f"calibration (hooks + eq. 4):        median {statistics.median(calib):.2f} s  {calib}")
    print(
        f"RATIO calibration / plain forward = {statistics.median(calib) / statistics.median(plain):.3f} (goal <= 1.10)"
    )


def memory_child(samples: int, max_length: int, batch_size: int) -> None:
    """Fixed-shape batches ([batch_size, max_length] of real tokens) so only the sample count varies."""
    import torch

    from sharelora_plugin.calibration import calibrate

    model, text = _load(batch_size, max_length, batch_size)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    batches = [
        {
            "input_ids": torch.randint(3, vocab, (batch_size, max_length), generator=gen),
            "attention_mask": torch.ones(batch_size, max_length, dtype=torch.long),
        }
        for _ in range(samples // batch_size)
    ]
    del text
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    calibrate(model, batches, progress=False)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {"samples": samples, "peak_rss_mb_before": before / 1024, "peak_rss_mb_after": after / 1024}
        )
    )


def memory_table(counts: list[int], max_length: int, batch_size: int) -> None:
    print(
        f"\npeak RSS of a fresh process (model load, then calibration of [{batch_size} x {max_length}] batches):"
    )
    print(f"{'samples':>8} {'peak before (MB)':>17} {'peak after (MB)':>16} {'growth (MB)':>12}")
    shape = ("--max-length", str(max_length), "--batch-size", str(batch_size))
    for n in counts:
        row = child_json(__file__, "--memory-child", str(n), *shape)
        growth = row["peak_rss_mb_after"] - row["peak_rss_mb_before"]
        print(f"{n:>8} {row['peak_rss_mb_before']:>17.0f} {row['peak_rss_mb_after']:>16.0f} {growth:>12.0f}")
    n = max(counts)
    keep_all = n * max_length * 30 * 576 * 4 / 2**20  # SmolLM2: 30 layers x 576 hidden, fp32
    print(
        f"for scale: keeping every layer's hidden states (O(tokens)) would hold {keep_all:,.0f} MB at {n} samples; "
        "calibration keeps one [batch, hidden] slice per layer and L x L sums"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64, help="Lee texts timed per round (default 64)")
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds; 0 skips timing (default 3)")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per sample (default 256)")
    parser.add_argument("--batch-size", type=int, default=8, help="calibration batch size (default 8)")
    parser.add_argument(
        "--memory-samples", default="16,64,256", help="comma list of sample counts for the memory table"
    )
    parser.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, args.max_length, args.batch_size)
        return
    if args.rounds > 0:
        time_ratio(args.samples, args.rounds, args.max_length, args.batch_size)
    if args.memory_samples:
        memory_table([int(x) for x in args.memory_samples.split(",")], args.max_length, args.batch_size)


if __name__ == "__main__":
    main()
