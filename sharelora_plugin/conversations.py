"""LLaVA / ShareGPT conversations (``from: human/gpt``, ``value`` with ``<image>`` placeholders) → OpenAI-style
messages with image entries in the content — the one parser behind ``llava/convert_instruct.py`` (upstream
LLaVA-Instruct → Axolotl rows) and visual-text calibration on upstream-format rows, so both place an image at the
same spot.

An ``<image>`` placeholder becomes the row's next image entry, at the placeholder's position in the turn (the
newline upstream writes between the placeholder and the text goes with it). A row whose image has no placeholder
gets it first in its first user turn, where upstream LLaVA's preprocessing moves every image. Axolotl's
``chat_template`` processing then renders each entry where it stands (entries that carry a ``path``/``image`` are
never moved by its image-column logic). Torch-free.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

IMAGE_PLACEHOLDER = "<image>"
ROLE_OF = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
FROM_OF = {"user": "human", "assistant": "gpt", "system": "system"}


class ConversationError(ValueError):
    """The turns cannot be turned into messages; the message says why."""


def split_placeholders(value: str) -> list[str | None]:
    """Split a turn's text at ``<image>``: text parts as strings, each placeholder as ``None``.

    The newline that upstream puts between the placeholder and the text is removed with it; empty text parts are
    dropped. ``"<image>\\nWhat is it?"`` → ``[None, "What is it?"]``.
    """
    pieces = value.split(IMAGE_PLACEHOLDER)
    parts: list[str | None] = []
    for k, piece in enumerate(pieces):
        if k > 0:
            parts.append(None)
            if piece.startswith("\n"):
                piece = piece[1:]
        if k < len(pieces) - 1 and piece.endswith("\n"):
            piece = piece[:-1]
        if piece:
            parts.append(piece)
    return parts


def conversations_to_messages(
    turns: Any, images: Sequence[dict[str, Any]] = (), *, system_prompt: str | None = None
) -> list[dict[str, Any]]:
    """Messages from LLaVA/ShareGPT ``turns``; ``images`` are the row's image entries (``{"type": "image", ...}``)
    in order: the k-th placeholder gets a copy of the k-th entry. Raises :class:`ConversationError` for a turn
    without a string ``value``, an unknown role, more placeholders than images, or images left over after the
    placeholders (a row without any placeholder gets its first image first in the first user turn)."""
    if not isinstance(turns, list) or not turns:
        raise ConversationError("no 'conversations' list")
    messages: list[dict[str, Any]] = []
    if system_prompt:
        messages.append({"role": "system", "content": [{"type": "text", "text": system_prompt}]})
    placed = 0
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise ConversationError(f"turn {k} has no string 'value'")
        role = ROLE_OF.get(str(turn.get("from", "")).lower())
        if role is None:
            raise ConversationError(f"turn {k} has unknown role from={turn.get('from')!r}")
        content: list[dict[str, Any]] = []
        for part in split_placeholders(turn["value"]):
            if part is None:
                if placed >= len(images):
                    raise ConversationError(
                        f"turn {k} has an {IMAGE_PLACEHOLDER} placeholder without a matching image"
                    )
                content.append(dict(images[placed]))
                placed += 1
            else:
                content.append({"type": "text", "text": part})
        messages.append({"role": role, "content": content})
    if images and placed == 0:
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            raise ConversationError("an image but no user turn to attach it to")
        first_user["content"].insert(0, dict(images[0]))
        placed = 1
    if placed < len(images):
        raise ConversationError(f"{len(images)} images but {placed} {IMAGE_PLACEHOLDER} placeholders")
    return messages
