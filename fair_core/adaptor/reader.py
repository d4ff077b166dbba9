"""Read and validate fair-adaptor files (safetensors only; nothing is unpickled)."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import stat
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load

from fair_core.adaptor.checksum import HEADER_LENGTH_BYTES, check_content_hash, data_sha256
from fair_core.adaptor.container import FairAdaptor, LoraWeights, SoftTokens
from fair_core.adaptor.errors import AdaptorError, list_some
from fair_core.adaptor.metadata import FairMetadata, token_order
from fair_core.adaptor.naming import LoraKey, TokenKey, lora_key, parse_lora_key, parse_token_key, token_key
from fair_core.adaptor.validate import base_from_keys, check_dtype, check_tensor_dtypes, validate_adaptor
from fair_core.terminal import escape, shown_path

MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
_PICKLE_STARTS = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")  # torch.save: zip, or pickle
_FILE_KINDS = {
    stat.S_ISDIR: "a directory", stat.S_ISFIFO: "a FIFO (named pipe)", stat.S_ISSOCK: "a socket",
    stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device",
}


@dataclass(frozen=True)
class SafetensorsFile:
    """A safetensors file as read: its tensors (CPU), its metadata and kohya's hash of its tensor data."""

    tensors: dict[str, torch.Tensor]
    header: dict[str, str]
    data_sha256: str


def read_adaptor(path: str | Path, expected_base: str | None = None) -> FairAdaptor:
    """Load and validate a fair-adaptor (or plain kohya LoRA) ``.safetensors`` file.

    Args:
        path: the file.
        expected_base: ``"sd15"`` or ``"sdxl"`` to reject adaptors for the other base model.

    Raises:
        AdaptorError: not a regular readable file, not a safetensors file, tensor data that does not match the
            recorded ``sshs_model_hash`` (corruption), unknown keys, non-float tensors, incomplete LoRA pairs,
            shapes inconsistent with the rank, wrong-typed metadata, non-finite values, or a base-model mismatch
            (see :func:`validate_adaptor`). A file without ``sshs_model_hash`` loads unverified.
    """
    file = read_safetensors(path, check_keys=check_key_families)
    check_content_hash(file.header, file.data_sha256, escape(Path(path).name))
    check_tensor_dtypes(file.tensors)
    adaptor = adaptor_from_state_dict(file.tensors, file.header)
    validate_adaptor(adaptor, expected_base)
    return adaptor


def read_safetensors(path: str | Path, check_keys: Callable[[Iterable[str]], None] | None = None) -> SafetensorsFile:
    """Read a safetensors file whole: tensors, metadata and the hash of its tensor data, with every file problem
    (missing, a directory/FIFO/link loop, unreadable, damaged) as a one-line :class:`AdaptorError`.

    ``check_keys`` sees the tensor keys of the header before the tensor data is read, so a file that is not an
    adaptor (a multi-GB checkpoint) is refused without loading it. File names need not be UTF-8.
    """
    path = Path(path)
    size = regular_file_size(path)
    name = escape(path.name)
    try:
        with path.open("rb") as file:
            header = _check_header(file, size, name, check_keys)
            file.seek(0)
            blob = file.read()
    except OSError as error:
        raise AdaptorError(f"{shown_path(path)}: cannot read: {error.strerror or error}") from None
    try:
        tensors = load(blob)
    except SafetensorError as error:
        raise AdaptorError(f"{name}: {_describe(error)}") from None
    except (TypeError, ValueError, KeyError, RuntimeError) as error:  # a dtype this torch has no type for
        raise AdaptorError(
            f"{name}: a tensor dtype this torch cannot load ({escape(str(error))}); LoRA, alpha and soft-token "
            "tensors must be F16, BF16 or F32"
        ) from None
    return SafetensorsFile(tensors, dict(header.get("__metadata__") or {}), data_sha256(blob))


def check_key_families(keys: Iterable[str]) -> None:
    """Raise :class:`AdaptorError` listing keys that are neither kohya LoRA keys nor ``bundle_emb`` token keys."""
    unknown = [key for key in keys if _lora_part(key) is None and _token_part(key) is None]
    if unknown:
        raise AdaptorError(
            f"unknown key family: {list_some(unknown)} (expected lora_unet_*, lora_te*_* or bundle_emb.*)"
        )


def adaptor_from_state_dict(tensors: Mapping[str, torch.Tensor], header: Mapping[str, str]) -> FairAdaptor:
    """Group file tensors into LoRA modules and soft tokens (no numeric checks; see :func:`validate_adaptor`)."""
    check_key_families(tensors)
    parts: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    token_vectors: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, tensor in tensors.items():
        if (lora := _lora_part(key)) is not None:
            parts[lora.prefix][lora.part] = tensor
        elif (token := _token_part(key)) is not None:
            token_vectors[token.name][token.family] = tensor
    adaptor = FairAdaptor(
        metadata=FairMetadata.from_metadata(header),
        lora={prefix: _lora_weights(prefix, found) for prefix, found in sorted(parts.items())},
        tokens=[SoftTokens(name, dict(sorted(token_vectors[name].items())))
                for name in token_order(header, token_vectors)],
        header=dict(header),
    )
    if adaptor.base_model is None:
        adaptor.metadata = dataclasses.replace(adaptor.metadata, base_model=base_from_keys(adaptor))
    return adaptor


def _lora_part(key: str) -> LoraKey | None:
    """:func:`parse_lora_key`, for keys spelled exactly as :func:`lora_key` writes them (no trailing newline)."""
    lora = parse_lora_key(key)
    return lora if lora is not None and lora_key(lora.prefix, lora.part) == key else None


def _token_part(key: str) -> TokenKey | None:
    """:func:`parse_token_key`, for keys spelled exactly as :func:`token_key` writes them."""
    token = parse_token_key(key)
    if token is None:
        return None
    try:
        return token if token_key(token.name, token.family) == key else None
    except AdaptorError:
        return None


def _lora_weights(prefix: str, found: dict[str, torch.Tensor]) -> LoraWeights:
    for part, other in (("lora_down.weight", "lora_up.weight"), ("lora_up.weight", "lora_down.weight")):
        if part not in found:
            raise AdaptorError(f"LoRA module {prefix} has no {part}" + (f" (only {other})" if other in found else ""))
    down, up = found["lora_down.weight"], found["lora_up.weight"]
    if "alpha" not in found:  # kohya convention: no alpha tensor means scale 1
        return LoraWeights(down, up, alpha=float(down.shape[0]))
    alpha = found["alpha"]
    check_dtype(f"{prefix}.alpha", alpha)  # an integer alpha is refused like any integer tensor, not cast
    if alpha.numel() != 1:
        raise AdaptorError(f"{prefix}.alpha must be a scalar, got shape {tuple(alpha.shape)}")
    return LoraWeights(down, up, alpha=float(alpha.float().item()))


def regular_file_size(path: Path) -> int:
    """The size of ``path`` if it is a regular file (after links); otherwise an :class:`AdaptorError` saying what
    it is: missing, a dangling link, a link loop, a directory, a FIFO, a device."""
    shown = shown_path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        if path.is_symlink():
            target = shown_path(os.readlink(path))
            raise AdaptorError(f"{shown}: a symbolic link to a missing file ({target})") from None
        raise AdaptorError(f"{shown}: no such file") from None
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise AdaptorError(f"{shown}: a loop of symbolic links (a link that leads back to itself)") from None
        if error.errno == errno.ENOTDIR:
            raise AdaptorError(f"{shown}: no such file (a part of the path is a file, not a folder)") from None
        raise AdaptorError(f"{shown}: cannot read: {error.strerror or error}") from None
    for is_kind, kind in _FILE_KINDS.items():
        if is_kind(info.st_mode):
            raise AdaptorError(f"{shown}: is {kind}, not an adaptor file")
    return info.st_size


def read_header(file: BinaryIO, size: int, name: str) -> tuple[int, Any]:
    """``(header length, the header's JSON value)`` of the safetensors file open in ``file`` (``size`` bytes,
    ``name`` for messages), reading the header and nothing after it; the value is None when the header is not JSON.
    Refuses a file too short for a header, a torch checkpoint (pickle or zip) and a header length beyond the file."""
    if size == 0:
        raise AdaptorError(f"{name}: empty file (0 bytes), not a safetensors file")
    if size < HEADER_LENGTH_BYTES:
        raise AdaptorError(f"{name}: not a safetensors file ({size} bytes, shorter than its 8-byte header length)")
    start = file.read(HEADER_LENGTH_BYTES)
    opens_json = file.read(1) == b"{"
    file.seek(HEADER_LENGTH_BYTES)
    # A header of 640, 896, 1152 or 1408 bytes begins with the bytes of a pickle's protocol mark (b"\x80\x05" is
    # length 1408): a safetensors header is told apart by the "{" that opens its JSON.
    if start.startswith(_PICKLE_STARTS) and not opens_json:
        raise AdaptorError(
            f"{name}: not a safetensors file but a torch checkpoint (pickle), which is never unpickled here; "
            "convert the paper's .pth files with `fair adaptor convert-paper`"
        )
    length = int.from_bytes(start, "little")
    if length > min(MAX_HEADER_BYTES, size - HEADER_LENGTH_BYTES):
        raise AdaptorError(
            f"{name}: not a safetensors file, or its header is damaged or truncated "
            f"(header length {length} bytes, the file has {size})"
        )
    try:
        return length, json.loads(file.read(length))
    except (ValueError, RecursionError):
        return length, None


def _check_header(file: BinaryIO, size: int, name: str, check_keys: Callable[[Iterable[str]], None] | None) -> dict:
    """Refuse early what the header alone shows (:func:`read_header`'s checks, tensor data that does not end where
    the file does, and, with ``check_keys``, keys of another kind of file); returns the header ({} when it is not
    a JSON object: loading the file then says what is wrong)."""
    length, header = read_header(file, size, name)
    if not isinstance(header, dict):
        return {}
    entries = {key: entry for key, entry in header.items() if key != "__metadata__"}
    ends = [_data_end(entry) for entry in entries.values()]
    if ends and None not in ends and HEADER_LENGTH_BYTES + length + max(ends) != size:
        raise AdaptorError(
            f"{name}: truncated or damaged safetensors file: the header describes {max(ends)} bytes of tensor "
            f"data, the file holds {size - HEADER_LENGTH_BYTES - length}"
        )
    if check_keys is not None:
        check_keys(entries)
    return header


def _data_end(entry: object) -> int | None:
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    if isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets):
        return max(offsets)
    return None


def _describe(error: SafetensorError) -> str:
    reason = escape(str(error).removeprefix("Error while deserializing header: ").strip())
    if "not fully covered" in reason:
        return f"truncated or damaged safetensors file: the tensor data does not match the header ({reason})"
    return f"not a safetensors file, or its header is damaged or truncated ({reason})"
