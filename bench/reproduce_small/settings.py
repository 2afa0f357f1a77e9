"""What the reproduction compares and at what size: the methods (one arm each, all at the same LoRA settings from
:mod:`bench.common`) and the two budgets, ``FULL`` (`make reproduce`) and ``QUICK`` (``--quick``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    """One arm of the comparison: how its share plan is made (``None`` = plain LoRA)."""

    name: str
    label: str
    strategy: str | None
    rank_expansion: bool = False


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("lora", "LoRA r=8", None),
        Method("sharelora", "ShareLoRA (greedy)", "greedy"),
        Method("sharelora_rx", "ShareLoRA (greedy) + rank expansion", "greedy", rank_expansion=True),
        Method("sharelora_optimal", "ShareLoRA (optimal)", "optimal"),
        Method("sharelora_random", "ShareLoRA* (random adjacent sets)", "random"),
        Method("naive_share", "Naive share (odd = even)", "alternate"),
    )
}


@dataclass(frozen=True)
class Budget:
    """Sizes that decide the run time; ``--quick`` shrinks all of them."""

    steps: int
    seeds: tuple[int, ...]
    train_per_task: int
    test_per_task: int
    calibration_samples: int
    lee_test_texts: int
    micro_batch_size: int = 4
    sequence_len: int = 128
    learning_rate: float = 1e-3
    eval_batch_size: int = 16
    max_new_tokens: int = 8


FULL = Budget(
    steps=48, seeds=(0, 1), train_per_task=300, test_per_task=24, calibration_samples=64, lee_test_texts=50
)
QUICK = Budget(
    steps=2, seeds=(0,), train_per_task=40, test_per_task=2, calibration_samples=8, lee_test_texts=2
)
