"""Read and validate fair-adaptor files (safetensors only; nothing is unpickled)."""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError, safe_open

from fair_core.adaptor.container import FairAdaptor, LoraWeights, SoftTokens
from fair_core.adaptor.errors import AdaptorError, list_some
from fair_core.adaptor.metadata import FairMetadata
from fair_core.adaptor.naming import parse_lora_key, parse_token_key
from fair_core.adaptor.validate import base_from_keys, validate_adaptor


def read_adaptor(path: str | Path, expected_base: str | None = None) -> FairAdaptor:
    """Load and validate a fair-adaptor (or plain kohya LoRA) ``.safetensors`` file.

    Args:
        path: the file.
        expected_base: ``"sd15"`` or ``"sdxl"`` to reject adaptors for the other base model.

    Raises:
        AdaptorError: unreadable file, unknown keys, incomplete LoRA pairs, shapes inconsistent with the rank,
            non-finite values, or a base-model mismatch (see :func:`validate_adaptor`).
    """
    tensors, header = load_safetensors(path)
    adaptor = adaptor_from_state_dict(tensors, header)
    validate_adaptor(adaptor, expected_base)
    return adaptor


def load_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors (CPU) and the header metadata of a safetensors file, with file problems as :class:`AdaptorError`."""
    path = Path(path)
    if not path.is_file():
        raise AdaptorError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as file:
            header = dict(file.metadata() or {})
            tensors = {key: file.get_tensor(key) for key in file.keys()}
    except SafetensorError as error:
        raise AdaptorError(f"{path.name}: {_describe(error)}") from None
    return tensors, header


def adaptor_from_state_dict(tensors: Mapping[str, torch.Tensor], header: Mapping[str, str]) -> FairAdaptor:
    """Group file tensors into LoRA modules and soft tokens (no numeric checks; see :func:`validate_adaptor`)."""
    parts: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    token_vectors: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    unknown = []
    for key, tensor in tensors.items():
        if (lora := parse_lora_key(key)) is not None:
            parts[lora.prefix][lora.part] = tensor
        elif (token := parse_token_key(key)) is not None:
            token_vectors[token.name][token.family] = tensor
        else:
            unknown.append(key)
    if unknown:
        raise AdaptorError(
            f"unknown key family: {list_some(unknown)} (expected lora_unet_*, lora_te*_* or bundle_emb.*)"
        )
    adaptor = FairAdaptor(
        metadata=FairMetadata.from_metadata(header),
        lora={prefix: _lora_weights(prefix, found) for prefix, found in sorted(parts.items())},
        tokens=[SoftTokens(name, dict(sorted(vectors.items()))) for name, vectors in token_vectors.items()],
        header=dict(header),
    )
    if adaptor.base_model is None:
        adaptor.metadata = dataclasses.replace(adaptor.metadata, base_model=base_from_keys(adaptor))
    return adaptor


def _lora_weights(prefix: str, found: dict[str, torch.Tensor]) -> LoraWeights:
    for part, other in (("lora_down.weight", "lora_up.weight"), ("lora_up.weight", "lora_down.weight")):
        if part not in found:
            raise AdaptorError(f"LoRA module {prefix} has no {part}" + (f" (only {other})" if other in found else ""))
    down, up = found["lora_down.weight"], found["lora_up.weight"]
    if "alpha" not in found:  # kohya convention: no alpha tensor means scale 1
        return LoraWeights(down, up, alpha=float(down.shape[0]))
    if found["alpha"].numel() != 1:
        raise AdaptorError(f"{prefix}.alpha must be a scalar, got shape {tuple(found['alpha'].shape)}")
    return LoraWeights(down, up, alpha=float(found["alpha"].item()))


def _describe(error: SafetensorError) -> str:
    reason = str(error).removeprefix("Error while deserializing header: ").strip()
    if "not fully covered" in reason:
        return f"truncated or damaged safetensors file: the tensor data does not match the header ({reason})"
    return f"not a safetensors file, or its header is damaged or truncated ({reason})"
