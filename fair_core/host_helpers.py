"""Small pieces of host-node logic that are more than a one-liner, kept here so they are tested without a host.

* :func:`resolve_in_folders`: a file name from a node's dropdown -> the file inside one of its model folders, never
  outside them (no absolute paths, no ``..``).
* :func:`placeholder_prompt` / :func:`splice_soft_tokens`: an adaptor's soft-token vectors into a host's token lists
  right after BOS of the positive prompt, exactly where a textual-inversion ``embedding:`` word at the start of the
  prompt would put them (ComfyUI's ``clip.tokenize`` format: per encoder key, a list of 77-entry chunks of
  ``(token, weight)`` or ``(token, weight, word_id)``; a tensor in place of a token id is embedded as that vector).
* :func:`draw_boxes`: face boxes drawn on a copy of an image batch.

No host application is imported here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path, PurePath

import numpy as np
import torch

PLACEHOLDER_WORD = "a"
"""A word that CLIP's tokenizer turns into one token and never merges with its neighbours (words are split at
spaces first). ``count`` of them, each its own word, take the slots right after BOS; the vectors then replace them,
so the rest of the prompt is chunked exactly as after an ``embedding:`` word of ``count`` vectors."""
HOST_KEYS = {"l": "clip_l", "g": "clip_g"}
"""ComfyUI's token-dict key -> the encoder name of :func:`fair_core.adaptor.hosts.soft_token_vectors`."""


def resolve_in_folders(name: str, folders: Sequence[str | Path], what: str = "file") -> Path:
    """The file ``name`` (a path relative to a model folder, as ComfyUI's dropdowns list it) in the first of
    ``folders`` that has it.

    Raises:
        ValueError: ``name`` is empty, absolute, or climbs out of the folders (``..``).
        FileNotFoundError: no folder has it.
    Both messages name ``what``, ``name`` and the folders.
    """
    where = ", ".join(str(f) for f in folders) or "(no folders registered)"
    path = PurePath(name)
    parts = path.parts
    if not name or not parts:
        raise ValueError(f"{what}: no file name given")
    if path.is_absolute() or path.drive or path.root or ".." in parts:
        raise ValueError(f"{what} {name!r} is outside the model folders; give a name relative to {where}")
    for folder in folders:
        candidate = Path(folder, *parts)
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{what} {name!r} not found in {where}")


def placeholder_prompt(text: str, count: int) -> str:
    """``text`` with ``count`` placeholder words in front (see :data:`PLACEHOLDER_WORD`); ``text`` alone for 0."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    return " ".join([PLACEHOLDER_WORD] * count + [text]) if count else text


def splice_soft_tokens(tokens: Mapping[str, list[list[tuple]]], vectors: Mapping[str, torch.Tensor]
                       ) -> dict[str, list[list[tuple]]]:
    """Put the soft-token vectors in place of the placeholders right after BOS (a new token dict; the input is
    left as it was).

    Args:
        tokens: the host's tokens of :func:`placeholder_prompt` ``(text, n)``: per encoder key (``"l"``, ``"g"``) a
            list of chunks, each a list of ``(token, weight[, word_id])``; chunk 0 starts with BOS.
        vectors: per encoder (``"clip_l"`` ``(n, 768)``, ``"clip_g"`` ``(n, 1280)``), the same n for every encoder;
            empty for an adaptor without soft tokens (the tokens come back unchanged).
    Raises:
        ValueError: an encoder of ``tokens`` has no vectors or the reverse, or the placeholders are not where
            they must be (tokens not made from :func:`placeholder_prompt` with this n).
    """
    if not vectors:
        return {key: [list(chunk) for chunk in chunks] for key, chunks in tokens.items()}
    names = {key: HOST_KEYS.get(key, f"clip_{key}") for key in tokens}
    missing = sorted(set(names.values()) - set(vectors))
    extra = sorted(set(vectors) - set(names.values()))
    if missing or extra:
        raise ValueError(f"the adaptor's soft tokens are for {', '.join(sorted(vectors)) or 'no encoder'}, the text "
                         f"encoder has {', '.join(sorted(names.values()))}")
    spliced = {}
    for key, chunks in tokens.items():
        stack = vectors[names[key]]
        count = int(stack.shape[0])
        first = list(chunks[0]) if chunks else []
        slots = first[1 : 1 + count]
        ids = {entry[0] for entry in slots}
        placeholders = len(slots) == count and len(ids) == 1 and isinstance(next(iter(ids)), int)
        if not placeholders or not isinstance(first[0][0], int):
            raise ValueError(f"encoder {key!r}: expected BOS and {count} placeholder tokens at the start of the prompt")
        for i, entry in enumerate(slots):
            first[1 + i] = (stack[i], *entry[1:])
        spliced[key] = [first] + [list(chunk) for chunk in chunks[1:]]
    return spliced


def draw_boxes(images: torch.Tensor, boxes: np.ndarray | None, colour: Sequence[float] = (0.1, 1.0, 0.2),
               thickness: int = 2) -> torch.Tensor:
    """A copy of ``images`` (``(B, H, W, 3)`` float in [0, 1], ComfyUI's IMAGE) with each finite box of ``boxes``
    (``(B, 4)`` ``x0, y0, x1, y1`` in pixels; NaN rows: no face) outlined ``thickness`` pixels wide in ``colour``."""
    out = images.detach().clone()
    if boxes is None:
        return out
    boxes = np.asarray(boxes, dtype=float).reshape(-1, 4)
    if boxes.shape[0] != out.shape[0]:
        raise ValueError(f"{boxes.shape[0]} boxes for {out.shape[0]} images")
    height, width = out.shape[1], out.shape[2]
    paint = torch.tensor(colour, dtype=out.dtype, device=out.device)
    for i, box in enumerate(boxes):
        if not np.isfinite(box).all():
            continue
        x0, x1 = (int(np.clip(round(v), 0, width - 1)) for v in (box[0], box[2]))
        y0, y1 = (int(np.clip(round(v), 0, height - 1)) for v in (box[1], box[3]))
        t = max(1, thickness)
        out[i, y0 : min(y0 + t, y1 + 1), x0 : x1 + 1] = paint
        out[i, max(y1 - t + 1, y0) : y1 + 1, x0 : x1 + 1] = paint
        out[i, y0 : y1 + 1, x0 : min(x0 + t, x1 + 1)] = paint
        out[i, y0 : y1 + 1, max(x1 - t + 1, x0) : x1 + 1] = paint
    return out
