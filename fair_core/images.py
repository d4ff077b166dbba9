"""Image conversion, in one place: files, PIL images, numpy arrays and host tensors to the library's two forms.

* ``(H, W, 3)`` uint8 RGB arrays (what face detectors see), and
* float tensors ``(N, 3, H, W)`` in ``[-1, 1]`` (what scorers, the sampler and the audit take).

The rules are fixed and the toughest of the cases met in the wild win: grayscale is repeated to RGB; gray+alpha,
RGBA and palette images with transparency are composited over white; integer types other than uint8 (16-bit
PNG/TIFF, PIL modes ``I``/``I;16``) are read as 16-bit (``/ 257``); floats are read as [0, 1] and clipped; bool
as 0/255; CMYK and other PIL modes go through PIL's RGB conversion. Files are read with their EXIF orientation
applied, and a file that declares more than :data:`MAX_IMAGE_PIXELS` pixels is refused before it is decoded.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

MAX_IMAGE_PIXELS = 64_000_000
"""Largest image (width x height) a file may declare: 8000 x 8000. Decoding is refused above it, so a forged
header cannot make a reader allocate gigabytes (PIL's own guard warns at 89 M and stops at 179 M pixels)."""
_PIL_DIRECT_MODES = ("1", "L", "LA", "RGB", "RGBA", "I", "I;16", "I;16B", "I;16L", "F")


def to_rgb_uint8(image) -> np.ndarray:
    """Any still image (numpy array or PIL image) as a C-contiguous ``(H, W, 3)`` uint8 RGB array, by the module's
    rules. Anything else (empty, 2 or more than 4 channels, more dimensions) raises ``ValueError`` naming the
    shape."""
    array = _pil_to_array(image) if not isinstance(image, np.ndarray) else image
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 2, 3, 4) or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"expected an image (H, W), (H, W, 1/3/4) or gray+alpha (H, W, 2), got shape {array.shape}")
    values = _to_unit_float(array)
    if values.shape[2] in (2, 4):
        alpha = values[:, :, -1:]
        values = values[:, :, :-1] * alpha + (1.0 - alpha)
    if values.shape[2] == 1:
        values = np.repeat(values, 3, axis=2)
    return np.ascontiguousarray(np.round(values * 255.0).astype(np.uint8))


def load_image(path: str | Path) -> np.ndarray:
    """Read an image file (EXIF orientation applied) as ``(H, W, 3)`` uint8 RGB; ``ValueError`` (one line naming
    the file) when it cannot be read or declares more than :data:`MAX_IMAGE_PIXELS` pixels."""
    return read_image_file(path)[0]


def read_image_file(path: str | Path) -> tuple[np.ndarray, str]:
    """:func:`load_image`, plus the file's PIL mode (``"RGB"`` when no conversion was needed)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                width, height = opened.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise ValueError(f"{width}x{height} pixels, over the {MAX_IMAGE_PIXELS:,}-pixel limit")
                image = ImageOps.exif_transpose(opened)
                image.load()
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as error:
        raise ValueError(f"cannot read image {path}: {error}") from None
    return to_rgb_uint8(image), image.mode


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """``(H, W, 3)`` uint8 -> float ``(3, H, W)`` in [-1, 1]."""
    return torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1).float() / 127.5 - 1.0


def tensor_to_uint8(images: torch.Tensor) -> np.ndarray:
    """Detached ``(N, 3, H, W)`` in [-1, 1] -> ``(N, H, W, 3)`` uint8 on the CPU (what detectors and PNGs get)."""
    with torch.no_grad():
        values = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return np.ascontiguousarray(values.permute(0, 2, 3, 1).cpu().numpy())


def from_bhwc01(images: torch.Tensor) -> torch.Tensor:
    """A ComfyUI ``IMAGE`` batch ``(B, H, W, C)`` float in [0, 1] (C = 3, or 4 with alpha composited over white)
    -> ``(B, 3, H, W)`` float32 in [-1, 1] on the same device."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"expected an image batch (B, H, W, 1/3/4) in [0, 1], got {shape}")
    values = images.detach().float().clamp(0, 1)
    if values.shape[-1] == 4:
        values = values[..., :3] * values[..., 3:] + (1.0 - values[..., 3:])
    elif values.shape[-1] == 1:
        values = values.expand(*values.shape[:-1], 3)
    return values.permute(0, 3, 1, 2).contiguous() * 2.0 - 1.0


def from_chw01(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """An A1111 batch (``PostprocessBatchListArgs.images``: ``(3, H, W)`` float in [0, 1] each, one size) ->
    ``(N, 3, H, W)`` float32 in [-1, 1] on the CPU."""
    return torch.stack([image.detach().float().cpu() for image in images]).clamp(0, 1) * 2.0 - 1.0


def _pil_to_array(image) -> np.ndarray:
    from PIL import Image

    if not isinstance(image, Image.Image):
        raise ValueError(f"expected a numpy array or a PIL image, got {type(image).__name__}")
    if image.mode == "P":
        image = image.convert("RGBA")
    elif image.mode not in _PIL_DIRECT_MODES:
        image = image.convert("RGB")
    return np.asarray(image)


def _to_unit_float(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if array.dtype == np.bool_:
        return array.astype(np.float32)
    if np.issubdtype(array.dtype, np.integer):
        return np.clip(array.astype(np.float32) / 65535.0, 0.0, 1.0)
    if np.issubdtype(array.dtype, np.floating):
        return np.clip(np.nan_to_num(array.astype(np.float32)), 0.0, 1.0)
    raise ValueError(f"unsupported image dtype {array.dtype}")
