"""Similarity matrices: validation, reading them from plan files and CSVs, per-sample distance files, and a
synthetic matrix for tests and benchmarks.

The mean L x L matrix is what the planner compares against ε. The per-sample matrices
(``sharelora_calibration.npz``: keys ``angular_distance`` and ``cosine``, each float32 ``[N, L, L]``) are what the
bootstrap resamples; they are written beside the plan by calibration.
"""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from sharelora_plugin.planning.files import read_json, write_atomic
from sharelora_plugin.planning.rules import PlanError, check_metric, check_num_layers

CALIBRATION_FILENAME = "sharelora_calibration.npz"
PER_SAMPLE_KEYS = ("angular_distance", "cosine")

# Similarities come from float32 activations averaged over samples; anything this close to the valid range or to
# symmetry is rounding, not a wrong matrix.
_TOLERANCE = 1e-6


def validate_similarity(matrix: Any, name: str = "similarity") -> np.ndarray:
    """Return ``matrix`` as a float64 ``L x L`` array, or raise :class:`PlanError` saying what is wrong.

    Requirements: 2-D, square, ``L >= 2``, finite, values in ``[-1, 1]`` (values within 1e-6 outside are clipped)
    and symmetric within 1e-6 (the result is exactly symmetrised). The diagonal is ignored and set to 1.
    """
    try:
        array = np.array(matrix, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise PlanError(
            f"{name} must be an L x L matrix of numbers; could not read it as one ({err})"
        ) from None
    if array.ndim != 2 or array.shape[0] != array.shape[1]:
        raise PlanError(f"{name} must be a square L x L matrix; got shape {tuple(array.shape)}")
    num_layers = array.shape[0]
    if num_layers < 2:
        raise PlanError(f"{name} must cover at least 2 layers; got a {num_layers} x {num_layers} matrix")
    off_diagonal = ~np.eye(num_layers, dtype=bool)
    bad = off_diagonal & ~np.isfinite(array)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise PlanError(
            f"{name} has a non-finite value {array[i, j]} at [{i}][{j}]; all values must be finite"
        )
    outside = off_diagonal & ((array < -1 - _TOLERANCE) | (array > 1 + _TOLERANCE))
    if outside.any():
        i, j = np.argwhere(outside)[0]
        raise PlanError(f"{name}[{i}][{j}] = {array[i, j]!r} is outside the valid range [-1, 1]")
    asymmetric = off_diagonal & (np.abs(array - array.T) > _TOLERANCE)
    if asymmetric.any():
        i, j = np.argwhere(asymmetric)[0]
        raise PlanError(
            f"{name} must be symmetric; {name}[{i}][{j}] = {array[i, j]!r} but {name}[{j}][{i}] = {array[j, i]!r}"
        )
    array = np.clip((array + array.T) / 2.0, -1.0, 1.0)
    np.fill_diagonal(array, 1.0)
    return array


def similarity_from_distances(angular_distance: np.ndarray, cosine: np.ndarray, metric: str) -> np.ndarray:
    """Similarity for ``metric`` from distance arrays of any leading shape (``[..., L, L]``): ``1 - d`` for
    ``angular`` (eq. 4), the cosine itself for ``cosine``; float64, diagonal exactly 1."""
    check_metric(metric)
    sim = (
        1.0 - np.asarray(angular_distance, dtype=np.float64)
        if metric == "angular"
        else np.array(cosine, dtype=np.float64)
    )
    index = np.arange(sim.shape[-1])
    sim[..., index, index] = 1.0
    return sim


def save_per_sample(path: str | os.PathLike, angular_distance: np.ndarray, cosine: np.ndarray) -> Path:
    """Write per-sample ``[N, L, L]`` angular distances and cosines as float32 ``sharelora_calibration.npz``
    (atomically, see :func:`files.write_atomic`)."""
    angular_distance = np.asarray(angular_distance, dtype=np.float32)
    cosine = np.asarray(cosine, dtype=np.float32)
    if angular_distance.ndim != 3 or angular_distance.shape != cosine.shape:
        raise PlanError(
            f"per-sample matrices must both be [N, L, L]; got {angular_distance.shape} and {cosine.shape}"
        )
    buffer = io.BytesIO()
    np.savez_compressed(buffer, angular_distance=angular_distance, cosine=cosine)
    return write_atomic(path, buffer.getvalue())


def load_per_sample(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read ``sharelora_calibration.npz``: ``(angular_distance, cosine)``, each ``[N, L, L]`` float32."""
    path = Path(path)
    if not path.is_file():
        raise PlanError(
            f"per-sample calibration file not found: {path}; it is written beside sharelora_plan.json by "
            "calibration (plans made before it existed, or from a plan_file, have none)"
        )
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [key for key in PER_SAMPLE_KEYS if key not in data.files]
            if missing:
                raise PlanError(
                    f"{path} lacks key(s) {', '.join(missing)}; expected {', '.join(PER_SAMPLE_KEYS)}"
                )
            angular, cosine = (np.asarray(data[key]) for key in PER_SAMPLE_KEYS)
    except (OSError, ValueError) as err:
        if isinstance(err, PlanError):
            raise
        raise PlanError(f"cannot read {path} as a .npz file: {err}") from None
    if angular.ndim != 3 or angular.shape[1] != angular.shape[2] or angular.shape != cosine.shape:
        raise PlanError(f"{path}: arrays must both be [N, L, L]; got {angular.shape} and {cosine.shape}")
    if angular.shape[0] < 2:
        raise PlanError(f"{path}: a bootstrap needs at least 2 samples; the file has {angular.shape[0]}")
    if not (np.isfinite(angular).all() and np.isfinite(cosine).all()):
        raise PlanError(f"{path}: non-finite values in the per-sample matrices")
    return angular, cosine


def load_similarity(path: str | os.PathLike) -> tuple[np.ndarray, dict]:
    """Read a similarity matrix from a ``sharelora_plan.json`` (or a JSON list of rows) or an ``L x L`` CSV.

    Returns the validated matrix and, for a plan file, the plan dict (else an empty dict). A CSV may have one
    non-numeric header row, which is skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise PlanError(f"similarity file not found: {path}")
    head = path.read_bytes()[:64].lstrip()
    if path.suffix.lower() == ".json" or head[:1] in (b"{", b"["):
        data = read_json(path)
        if isinstance(data, list):
            return validate_similarity(data, name=str(path)), {}
        if not isinstance(data, dict) or data.get("similarity") is None:
            raise PlanError(
                f"{path} has no 'similarity' matrix; pass a sharelora_plan.json written after calibration"
            )
        return validate_similarity(data["similarity"], name=f"{path}: similarity"), data
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            rows = [row for row in csv.reader(handle) if row and any(cell.strip() for cell in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise PlanError(f"cannot read {path} as CSV: {err}") from None
    if rows:
        try:
            [float(cell) for cell in rows[0]]
        except ValueError:
            rows = rows[1:]  # header
    try:
        matrix = [[float(cell) for cell in row] for row in rows]
    except ValueError as err:
        raise PlanError(f"{path} must be an L x L CSV of numbers: {err}") from None
    if any(len(row) != len(matrix) for row in matrix):
        raise PlanError(
            f"{path} must be an L x L CSV; row lengths {sorted({len(r) for r in matrix})} for {len(matrix)} rows"
        )
    return validate_similarity(matrix, name=str(path)), {}


def synthetic_similarity(num_layers: int = 30, seed: int = 0, dim: int = 64) -> np.ndarray:
    """A realistic angular-similarity matrix for tests, benchmarks and demos (no model needed).

    Layer states follow a random walk on the sphere with larger steps at the first and last layers and at a few
    random block boundaries, like real LLM residual streams: similarity is high near the diagonal (adjacent
    median ~0.9), decays with distance, and forms blocks.
    """
    num_layers = check_num_layers(num_layers)
    rng = np.random.default_rng(seed)
    steps = rng.lognormal(mean=np.log(0.28), sigma=0.35, size=num_layers)
    steps[[1, num_layers - 1]] *= 2.5
    boundaries = rng.choice(np.arange(2, num_layers - 1), size=max(1, num_layers // 8), replace=False)
    steps[boundaries] *= 1.8
    drift = rng.normal(size=dim)
    drift /= np.linalg.norm(drift)
    state = rng.normal(size=dim)
    state /= np.linalg.norm(state)
    states = []
    for layer in range(num_layers):
        noise = rng.normal(size=dim) / math.sqrt(dim) + 0.3 * drift
        state = state + steps[layer] * noise / np.linalg.norm(noise)
        state /= np.linalg.norm(state)
        states.append(state)
    states_array = np.array(states)
    cosine = np.clip(states_array @ states_array.T, -1.0, 1.0)
    similarity = 1.0 - np.arccos(cosine) / math.pi
    np.fill_diagonal(similarity, 1.0)
    return (similarity + similarity.T) / 2.0
