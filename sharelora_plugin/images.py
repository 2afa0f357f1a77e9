"""Loading a calibration row's images: PIL images, file paths (relative ones looked up in the given image roots,
then the working directory), datasets' undecoded ``{"bytes"}``, ``data:`` URIs, bare base64 and http(s) URLs."""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def resolve_image_path(ref: str, image_roots: Sequence[Path]) -> Path:
    """An existing file for ``ref``: as given when absolute, else the first ``root / ref`` that exists, else
    ``ref`` relative to the working directory. Raises ``FileNotFoundError`` listing what was tried."""
    path = Path(ref).expanduser()
    candidates = [path] if path.is_absolute() else [Path(root) / path for root in image_roots] + [path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    tried = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(f"image {ref!r} not found (tried {tried})")


def load_image(ref: Any, image_roots: Sequence[Path]):
    """A PIL RGB image from a PIL image, a path (resolved with :func:`resolve_image_path`), a ``data:`` URI or
    base64 string, or an http(s) URL (needs network)."""
    from PIL import Image

    if isinstance(ref, Image.Image):
        return ref.convert("RGB")
    if isinstance(ref, Mapping) and ref.get("bytes"):  # datasets' Image feature, undecoded
        return Image.open(io.BytesIO(ref["bytes"])).convert("RGB")
    if isinstance(ref, Mapping) and ref.get("path"):
        ref = ref["path"]
    if not isinstance(ref, str):
        raise TypeError(f"cannot load an image from {type(ref).__name__}")
    if ref.startswith(("http://", "https://")):
        from transformers.image_utils import load_image as load_remote

        return load_remote(ref).convert("RGB")
    if ref.startswith("data:image"):
        ref = ref.split(",", 1)[1]
        return Image.open(io.BytesIO(base64.b64decode(ref))).convert("RGB")
    try:
        path = resolve_image_path(ref, image_roots)
    except FileNotFoundError:
        if len(ref) > 256:  # a long string that is no file: base64 without the data: prefix
            return Image.open(io.BytesIO(base64.b64decode(ref))).convert("RGB")
        raise
    with Image.open(path) as image:
        return image.convert("RGB")
