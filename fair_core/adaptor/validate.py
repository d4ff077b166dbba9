"""Checks that make a fair adaptor safe to write or apply: one-line :class:`AdaptorError` naming the problem."""

from __future__ import annotations

import math
from typing import Mapping

import torch

from fair_core.adaptor.container import FairAdaptor, LoraWeights, SoftTokens
from fair_core.adaptor.errors import AdaptorError
from fair_core.adaptor.metadata import network_alpha, network_dim
from fair_core.adaptor.naming import BASES, TEXT_ENCODER_FAMILIES, base_of_family, family_of_prefix
from fair_core.terminal import escape

# What every loader applies as a LoRA or embedding: an integer or boolean tensor would be cast silently, float64
# doubles the file for nothing and float8 has no arithmetic on CPU. The alpha tensors follow the same rule.
FLOAT_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}


def validate_adaptor(adaptor: FairAdaptor, expected_base: str | None = None) -> None:
    """Raise :class:`AdaptorError` unless ``adaptor`` is complete, finite, shape-consistent and for ``expected_base``.

    Checks: at least one LoRA module or token; float16/bfloat16/float32 tensors; down ``(r, in)`` and up
    ``(out, r)`` with one ``r`` and no empty dimension, matching the header's ``ss_network_dim`` when that is a
    number; finite tensors and alphas; tokens of one length across encoders; key families that belong to the
    adaptor's base model; the base model equal to ``expected_base``.
    """
    if not adaptor.lora and not adaptor.tokens:
        raise AdaptorError("adaptor has no LoRA modules and no soft tokens")
    for prefix, weights in adaptor.lora.items():
        _check_lora(prefix, weights)
    _check_recorded_rank(adaptor)
    network_alpha(adaptor.header)
    for tokens in adaptor.tokens:
        _check_tokens(tokens)
    _check_base(adaptor, expected_base)


def base_from_keys(adaptor: FairAdaptor) -> str | None:
    """The base model implied by text-encoder key families (``te`` -> sd15, ``te1``/``te2`` -> sdxl), if any."""
    families = {family_of_prefix(p) for p in adaptor.lora} | {f for t in adaptor.tokens for f in t.vectors}
    bases = sorted({b for b in map(base_of_family, families) if b is not None})
    return bases[0] if len(bases) == 1 else None


def check_tensor_dtypes(tensors: Mapping[str, torch.Tensor]) -> None:
    """Raise :class:`AdaptorError` naming the first tensor (by key) that is not float16, bfloat16 or float32.

    Applied to a file's tensors as read, alphas included: an integer alpha is refused, not rounded or cast.
    """
    for key in sorted(tensors):
        check_dtype(key, tensors[key])


def check_dtype(key: str, tensor: torch.Tensor) -> None:
    """One tensor of :func:`check_tensor_dtypes`."""
    if tensor.dtype not in FLOAT_DTYPES:
        raise AdaptorError(
            f"tensor {escape(key)} has dtype {_dtype_name(tensor.dtype)}; LoRA, alpha and soft-token tensors "
            f"must be floating point: {', '.join(FLOAT_DTYPES.values())}"
        )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_finite(key: str, tensor: torch.Tensor) -> None:
    if not bool(torch.isfinite(tensor).all()):
        raise AdaptorError(f"tensor {key} has non-finite values (NaN or Inf)")


def _check_lora(prefix: str, weights: LoraWeights) -> None:
    down, up = weights.down, weights.up
    check_dtype(f"{prefix}.lora_down.weight", down)
    check_dtype(f"{prefix}.lora_up.weight", up)
    if down.ndim != 2 or up.ndim != 2:
        raise AdaptorError(
            f"{prefix}: lora_down {tuple(down.shape)} and lora_up {tuple(up.shape)} must both be 2-D "
            "(linear layers only)"
        )
    if down.shape[0] != up.shape[1]:
        raise AdaptorError(
            f"{prefix}: shapes inconsistent with one rank: lora_down {tuple(down.shape)} is (rank, in) "
            f"but lora_up {tuple(up.shape)} is (out, {up.shape[1]})"
        )
    if 0 in down.shape or 0 in up.shape:
        raise AdaptorError(f"{prefix}: empty LoRA: lora_down {tuple(down.shape)}, lora_up {tuple(up.shape)}")
    _check_finite(f"{prefix}.lora_down.weight", down)
    _check_finite(f"{prefix}.lora_up.weight", up)
    if isinstance(weights.alpha, bool) or not isinstance(weights.alpha, (int, float)):
        raise AdaptorError(f"{prefix}.alpha must be a number, got {type(weights.alpha).__name__}")
    if not math.isfinite(weights.alpha):
        raise AdaptorError(f"tensor {prefix}.alpha has non-finite values (NaN or Inf)")


def _check_recorded_rank(adaptor: FairAdaptor) -> None:
    recorded = network_dim(adaptor.header)
    if recorded is None:  # absent, or "Dynamic" for per-module ranks
        return
    wrong = sorted(prefix for prefix, w in adaptor.lora.items() if w.rank != recorded)
    if wrong:
        rank = adaptor.lora[wrong[0]].rank
        raise AdaptorError(
            f"shapes inconsistent with ss_network_dim={recorded}: {len(wrong)} module(s) have another rank, "
            f"e.g. {wrong[0]} has rank {rank}"
        )


def _check_tokens(tokens: SoftTokens) -> None:
    lengths = set()
    for family, vectors in tokens.vectors.items():
        key = f"bundle_emb.{tokens.name} ({family})"
        check_dtype(key, vectors)
        if vectors.ndim != 2 or vectors.shape[0] == 0:
            raise AdaptorError(f"{key}: soft-token vectors must be (n_vectors, width), got {tuple(vectors.shape)}")
        _check_finite(key, vectors)
        lengths.add(vectors.shape[0])
    if len(lengths) > 1:
        raise AdaptorError(
            f"soft token {tokens.name!r} has a different number of vectors per encoder: {sorted(lengths)}"
        )


def _check_base(adaptor: FairAdaptor, expected_base: str | None) -> None:
    base = adaptor.base_model
    if expected_base is not None and expected_base not in BASES:
        raise AdaptorError(f"unknown base model {expected_base!r} (known: {', '.join(BASES)})")
    if expected_base is not None and base is not None and base != expected_base:
        raise AdaptorError(f"base model mismatch: the adaptor is for {base}, not {expected_base}")
    if base is None:
        return
    allowed = set(TEXT_ENCODER_FAMILIES[base])
    for prefix in adaptor.lora:
        family = family_of_prefix(prefix)
        if family != "unet" and family not in allowed:
            raise AdaptorError(
                f"the adaptor is marked {base} but has {base_of_family(family)} text-encoder keys (lora_{family}_*)"
            )
    for tokens in adaptor.tokens:
        if set(tokens.vectors) != allowed:
            raise AdaptorError(
                f"soft token {tokens.name!r} has vectors for {sorted(tokens.vectors)}, "
                f"a {base} adaptor needs exactly {sorted(allowed)}"
            )
