"""The content hash of a fair-adaptor file: kohya's ``sshs_model_hash``.

kohya sd-scripts (``library/train_util.py``: ``precalculate_safetensors_hashes`` -> ``addnet_hash_safetensors``)
writes ``sshs_model_hash`` = the SHA-256 of the file's bytes after the header, i.e. of everything after the 8-byte
header length and the JSON header: the tensor data only, so metadata can change without changing the hash. A1111
takes this value as the LoRA's hash (its "Lora hashes" infotext) instead of hashing the file itself. The data
section's layout (tensors sorted by alignment, then name) does not depend on the metadata, so the hash of a file
can be computed before its metadata is final.

kohya also writes ``sshs_legacy_hash`` (64 KiB at offset 1 MiB of a file holding only its ``ss_*`` metadata);
that depends on the header's exact bytes, cannot be verified, and is not written here.
"""

from __future__ import annotations

import hashlib
from typing import Mapping

import torch
from safetensors.torch import save

from fair_core.adaptor.errors import AdaptorError
from fair_core.terminal import escape

HASH_KEY = "sshs_model_hash"
LEGACY_HASH_KEY = "sshs_legacy_hash"
HEADER_LENGTH_BYTES = 8


def data_offset(blob: bytes | bytearray | memoryview) -> int:
    """Where a safetensors file's tensor data starts: 8 + the little-endian header length in its first 8 bytes."""
    return HEADER_LENGTH_BYTES + int.from_bytes(bytes(blob[:HEADER_LENGTH_BYTES]), "little")


def data_sha256(blob: bytes | bytearray | memoryview) -> str:
    """kohya's ``sshs_model_hash`` of a whole safetensors file held in memory (hex SHA-256 of its tensor data)."""
    return hashlib.sha256(memoryview(blob)[data_offset(blob):]).hexdigest()


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """The ``sshs_model_hash`` a file holding ``tensors`` will have, whatever its metadata."""
    return data_sha256(save(dict(tensors)))


def check_content_hash(header: Mapping[str, str], actual: str, name: str) -> None:
    """Raise :class:`AdaptorError` (reported as corruption) when ``header`` records an ``sshs_model_hash`` other than
    ``actual``, the hash of the file's tensor data. A file without the key passes; see :func:`has_content_hash`."""
    recorded = header.get(HASH_KEY)
    if recorded is None:
        return
    if recorded.strip().lower() != actual:
        raise AdaptorError(
            f"{name}: corrupt file: its tensor data does not match the {HASH_KEY} it was written with "
            f"(recorded {escape(recorded[:16])}..., the data hashes to {actual[:16]}...); "
            "the file was damaged after it was written"
        )


def has_content_hash(header: Mapping[str, str]) -> bool:
    """Whether the file carries a hash of its tensor data (else damage to the data cannot be detected)."""
    return HASH_KEY in header
