"""Share sets and what they cost: counting layers saved and distinct modules, the eq. 3 check, rank expansion.

Terms (paper notation): ``L`` decoder layers; a *share set* is a set of at least two layers whose every pair has
similarity ``>= epsilon`` (eq. 3); sets are disjoint; the *leader* of a set is its smallest layer index.
Distinct LoRA modules per target module = ``L - sum|S_i| + |S|``; rank expansion
``r' = floor(L / (L - sum|S_i| + |S|) * r)`` keeps the parameter count close to plain LoRA's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from sharelora_plugin.planning.rules import check_rank, check_rank_expansion, check_share_sets
from sharelora_plugin.planning.similarity import validate_similarity


def validate_share_sets(share_sets: Any, num_layers: int, name: str = "share_sets") -> list[list[int]]:
    """Check share sets against ``num_layers`` and return them canonical (see :func:`rules.check_share_sets`)."""
    return check_share_sets(share_sets, num_layers, name)


def layers_covered(share_sets: Sequence[Sequence[int]]) -> int:
    """Number of layers inside some share set, ``sum |S_i|`` (the objective of eq. 2)."""
    return sum(len(members) for members in share_sets)


def layers_saved(share_sets: Sequence[Sequence[int]]) -> int:
    """Number of LoRA modules per target saved by sharing, ``sum (|S_i| - 1)``."""
    return sum(len(members) - 1 for members in share_sets)


def distinct_modules(num_layers: int, share_sets: Sequence[Sequence[int]]) -> int:
    """Distinct LoRA modules per target module after sharing, ``L - sum |S_i| + |S|``."""
    return num_layers - layers_saved(share_sets)


def expanded_rank(num_layers: int, share_sets: Sequence[Sequence[int]], rank: int) -> int:
    """Rank after expansion, ``r' = floor(L / (L - sum|S_i| + |S|) * r)``, computed exactly in integers."""
    rank = check_rank(rank)
    return (num_layers * rank) // distinct_modules(num_layers, share_sets)


def satisfies_threshold(similarity: Any, share_sets: Sequence[Sequence[int]], threshold: float) -> bool:
    """True when every pair of layers inside every share set has similarity >= ``threshold`` (eq. 3)."""
    sim = validate_similarity(similarity)
    return all(set_min_similarity(sim, members) >= threshold for members in share_sets)


def set_min_similarity(sim: np.ndarray, members: Sequence[int]) -> float:
    """The lowest similarity of any pair inside ``members`` (eq. 3 holds when it is ``>= epsilon``)."""
    idx = np.asarray(members)
    block = sim[np.ix_(idx, idx)]
    return float(block[~np.eye(len(idx), dtype=bool)].min())


def resolve_rank(
    num_layers: int, share_sets: Sequence[Sequence[int]], base_rank: int, rank_expansion: Any
) -> int:
    """``False`` keeps ``base_rank``, ``True`` applies :func:`expanded_rank`, an int is used as the final rank."""
    expansion = check_rank_expansion(rank_expansion)
    if isinstance(expansion, bool):
        return expanded_rank(num_layers, share_sets, base_rank) if expansion else base_rank
    return expansion
