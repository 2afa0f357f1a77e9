"""Gradient-subspace overlap between decoder layers (``sharelora.metric: gradient_subspace``), from sketches.

Representation similarity (angular, cosine) says two layers *compute* alike. What one shared LoRA costs is
whether the two layers' first updates want the same directions. For a target module with weight
``W`` (``d_out x d_in``) the first-step weight gradient on the calibration texts is ``dW``. Its row space
(``d_in`` side) and column space (``d_out`` side) are sketched with fixed Gaussian test matrices shared by every
layer: ``dWᵀΩ`` (``d_in x k``) and ``dW·Ω'`` (``d_out x k``). With ``Q`` the orthonormal basis of a sketch, the
overlap of layers i and j on one side is ``‖QᵢᵀQⱼ‖²_F / k``: 1 for the same subspace, about ``k / d`` for
unrelated ones. The layer-pair overlap is the mean over both sides and every target module the two layers have.

No per-module rule is needed for sides whose coordinates are an arbitrary per-layer basis (the output side of
q/k/v/up: heads and MLP units are permuted freely between layers): such a side sits at the random level ``k / d``
for every pair, so it shifts the whole matrix a little and does not reorder pairs.

Sketches are linear in the gradient, so the sketch of a set of samples is the sum of the sketches of its blocks.
:class:`SubspaceSketches` keeps one sketch per block of samples; the mean matrix uses the sum of all blocks and the
bootstrap resamples blocks (with multiplicity) and sums them. Numpy only: the torch side that collects the
sketches lives in :mod:`sharelora_plugin.gradient_sketch`.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sharelora_plugin.planning.files import write_atomic
from sharelora_plugin.planning.rules import PlanError

SKETCH_FILENAME = "sharelora_sketches.npz"
SIDES = ("in", "out")


@dataclass
class SubspaceSketches:
    """Per-block gradient sketches of every (target module, side): ``blocks[(target, side)]`` is float32
    ``[num_blocks, L, d, k]`` (``d`` = ``d_in`` for side ``in``, ``d_out`` for ``out``). ``present[target]`` marks
    the layers that have the target (layers of another kind may lack it; their entries are zero and ignored).
    ``block_samples`` is the number of samples in each block."""

    blocks: dict[tuple[str, str], np.ndarray]
    present: dict[str, np.ndarray]
    block_samples: list[int] = field(default_factory=list)

    @property
    def num_blocks(self) -> int:
        return int(next(iter(self.blocks.values())).shape[0])

    @property
    def num_layers(self) -> int:
        return int(next(iter(self.blocks.values())).shape[1])

    @property
    def num_samples(self) -> int:
        return int(sum(self.block_samples))

    @property
    def nbytes(self) -> int:
        return int(sum(array.nbytes for array in self.blocks.values()))

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(num_blocks, L, L)``: what the bootstrap sees (blocks play the role of samples)."""
        return (self.num_blocks, self.num_layers, self.num_layers)

    def overlap(self, weights: np.ndarray | None = None) -> np.ndarray:
        """The L x L overlap matrix of the blocks summed with ``weights`` (default: every block once)."""
        return overlap_matrix(self.summed(weights), self.present)

    def summed(self, weights: np.ndarray | None = None) -> dict[tuple[str, str], np.ndarray]:
        """``[L, d, k]`` sketches of the weighted sum of blocks."""
        if weights is None:
            return {key: array.sum(axis=0, dtype=np.float64) for key, array in self.blocks.items()}
        weights = np.asarray(weights, dtype=np.float64)
        return {key: np.tensordot(weights, array, axes=(0, 0)) for key, array in self.blocks.items()}

    def resampled(self, resamples: int, seed: int) -> np.ndarray:
        """``[B, L, L]`` overlap matrices of B bootstrap resamples of the blocks (drawn with replacement)."""
        if self.num_blocks < 2:
            raise PlanError(
                f"a bootstrap needs at least 2 sketch blocks; got {self.num_blocks} (lower "
                "sharelora.calibration.batch_size or raise num_samples)"
            )
        rng = np.random.default_rng(seed)
        counts = rng.multinomial(
            self.num_blocks, np.full(self.num_blocks, 1.0 / self.num_blocks), size=resamples
        )
        return np.stack([self.overlap(row) for row in counts])

    def prefix(self, num_blocks: int) -> SubspaceSketches:
        """The first ``num_blocks`` blocks (what stop-when-stable has seen so far)."""
        return SubspaceSketches(
            blocks={key: array[:num_blocks] for key, array in self.blocks.items()},
            present=self.present,
            block_samples=self.block_samples[:num_blocks],
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Write the sketches as a compressed ``.npz`` (atomically): one array per ``target/side``, the layer
        masks as ``present/target``, and ``block_samples``."""
        arrays = {f"{target}/{side}": array for (target, side), array in self.blocks.items()}
        arrays.update({f"present/{target}": mask for target, mask in self.present.items()})
        arrays["block_samples"] = np.asarray(self.block_samples, dtype=np.int64)
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        return write_atomic(path, buffer.getvalue())

    @classmethod
    def load(cls, path: str | os.PathLike) -> SubspaceSketches:
        """Read what :meth:`save` wrote."""
        path = Path(path)
        if not path.is_file():
            raise PlanError(f"gradient sketch file not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {key: np.asarray(data[key]) for key in data.files}
        except (OSError, ValueError) as err:
            raise PlanError(f"cannot read {path} as a .npz file: {err}") from None
        try:
            block_samples = [int(n) for n in arrays.pop("block_samples")]
            present = {
                key.split("/", 1)[1]: arrays.pop(key).astype(bool)
                for key in list(arrays)
                if key.startswith("present/")
            }
            blocks = {tuple(key.split("/", 1)): array for key, array in arrays.items()}
        except (KeyError, IndexError) as err:
            raise PlanError(f"{path} is not a gradient sketch file ({err})") from None
        sketches = cls(blocks=blocks, present=present, block_samples=block_samples)  # type: ignore[arg-type]
        check_sketches(sketches, str(path))
        return sketches


def check_sketches(sketches: SubspaceSketches, name: str = "sketches") -> None:
    """Raise :class:`PlanError` unless every array is ``[blocks, L, d, k]`` with the same blocks and L, finite,
    with a layer mask per target."""
    if not sketches.blocks:
        raise PlanError(f"{name}: no sketches")
    shapes = {key: array.shape for key, array in sketches.blocks.items()}
    if any(len(shape) != 4 for shape in shapes.values()):
        raise PlanError(f"{name}: every sketch must be [blocks, L, d, k]; got {shapes}")
    if len({shape[:2] for shape in shapes.values()}) != 1:
        raise PlanError(f"{name}: sketches differ in blocks or layers: {shapes}")
    for (target, side), array in sketches.blocks.items():
        if side not in SIDES:
            raise PlanError(f"{name}: unknown side {side!r} for {target}; expected one of {SIDES}")
        mask = sketches.present.get(target)
        if mask is None or mask.shape != (array.shape[1],):
            raise PlanError(f"{name}: no layer mask of length {array.shape[1]} for {target}")
        if not np.isfinite(array).all():
            raise PlanError(f"{name}: non-finite values in the {target}/{side} sketches")
    if len(sketches.block_samples) != sketches.num_blocks:
        raise PlanError(f"{name}: {len(sketches.block_samples)} block sizes for {sketches.num_blocks} blocks")


def orthonormal_basis(sketch: np.ndarray) -> np.ndarray:
    """Orthonormal bases of ``[..., d, k]`` sketches (reduced QR). A zero sketch (a layer whose gradient
    vanished) gives a zero basis, which overlaps nothing."""
    sketch = np.asarray(sketch, dtype=np.float64)
    scale = np.linalg.norm(sketch, axis=(-2, -1), keepdims=True)
    q, r = np.linalg.qr(np.where(scale > 0, sketch / np.where(scale > 0, scale, 1.0), 0.0))
    # drop directions the sketch does not have (rank < k): their R diagonal is ~0
    keep = np.abs(np.diagonal(r, axis1=-2, axis2=-1)) > 1e-10
    return q * keep[..., None, :]


def overlap_matrix(summed: dict[tuple[str, str], np.ndarray], present: dict[str, np.ndarray]) -> np.ndarray:
    """L x L overlap ``‖QᵢᵀQⱼ‖²_F / k`` averaged over the sides and targets both layers have; diagonal 1."""
    num_layers = next(iter(summed.values())).shape[0]
    total = np.zeros((num_layers, num_layers))
    count = np.zeros((num_layers, num_layers))
    for (target, _side), sketch in summed.items():
        k = sketch.shape[-1]
        q = orthonormal_basis(sketch)  # [L, d, k]
        cross = np.einsum("idk,jdl->ijkl", q, q)
        value = (cross**2).sum(axis=(-2, -1)) / k
        mask = np.asarray(present[target], dtype=bool)
        both = np.outer(mask, mask)
        total += np.where(both, value, 0.0)
        count += both
    with np.errstate(invalid="ignore", divide="ignore"):
        matrix = np.where(count > 0, total / np.maximum(count, 1), 0.0)
    matrix = np.clip((matrix + matrix.T) / 2.0, 0.0, 1.0)
    np.fill_diagonal(matrix, 1.0)
    return matrix


def random_level(dims: Sequence[int], k: int) -> float:
    """The expected overlap of two unrelated k-dimensional subspaces, averaged over sides of dimensions ``dims``
    (``k / d`` each): the floor of the gradient_subspace scale."""
    return float(np.mean([min(1.0, k / d) for d in dims]))
