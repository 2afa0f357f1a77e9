"""The arms of the comparison and the two budgets, ``FULL`` (``make quality``) and ``QUICK`` (``--quick``)."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Arm:
    """One arm: how its share plan is made. ``plan`` is ``None`` for plain LoRA and the untrained base model."""

    name: str
    label: str
    plan: str | None
    trained: bool = True


ARMS: dict[str, Arm] = {
    a.name: a
    for a in (
        Arm("base", "base model (no training)", None, trained=False),
        Arm("lora", "LoRA r 8", None),
        Arm("greedy", "ShareLoRA greedy (angular)", "greedy"),
        Arm("greedy_rx", "ShareLoRA greedy + rank expansion", "greedy_rx"),
        Arm("random", "ShareLoRA* random adjacent sets", "random"),
        Arm("naive", "naive odd/even", "alternate"),
        Arm("gradient", "ShareLoRA greedy (gradient_subspace)", "gradient"),
    )
}


@dataclass(frozen=True)
class Budget:
    """Sizes that decide the run time. ``random_plans`` ShareLoRA* plans are drawn per seed (their spread comes
    from the plan draw, so they get more runs than the fixed-plan arms)."""

    steps: int
    seeds: tuple[int, ...]
    random_plans: int
    train_rows: int  # per task
    test_rows: int  # per task, at most
    calibration_samples: int
    lee_texts: int
    micro_batch_size: int = 16
    sequence_len: int = 128
    learning_rate: float = 1e-3
    eval_batch_size: int = 32
    sketch_rank: int = 8

    def with_(self, **changes) -> Budget:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


FULL = Budget(
    steps=30,
    seeds=(0, 1, 2, 3),
    random_plans=2,
    train_rows=400,
    test_rows=300,
    calibration_samples=128,
    lee_texts=8,
)
QUICK = Budget(
    steps=2,
    seeds=(0,),
    random_plans=1,
    train_rows=32,
    test_rows=12,
    calibration_samples=16,
    lee_texts=2,
    micro_batch_size=4,
)
QUICK_ARMS = ("base", "lora", "greedy")
