"""Write fair adaptors: read the LoRA out of peft-wrapped models, then save one safetensors file atomically."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import torch
from safetensors.torch import save_file
from torch import nn

if TYPE_CHECKING:
    from peft.tuners.lora import LoraLayer

from fair_core.adaptor.checksum import HASH_KEY, check_content_hash, data_sha256, tensors_sha256
from fair_core.adaptor.container import FairAdaptor, LoraWeights, SoftTokens
from fair_core.adaptor.errors import AdaptorError
from fair_core.adaptor.metadata import FairMetadata
from fair_core.adaptor.hosts import lora_state_dict, token_state_dict
from fair_core.adaptor.naming import base_of_family, lora_prefix
from fair_core.adaptor.validate import validate_adaptor


def lora_from_model(
    model: nn.Module, family: str, adapter_name: str | None = None, dtype: torch.dtype | None = None
) -> dict[str, LoraWeights]:
    """Copy the LoRA weights of every peft LoRA layer in ``model`` (CPU tensors, ``dtype`` or as stored).

    Args:
        model: a diffusers UNet or transformers CLIP text model with LoRA added by
            ``peft.inject_adapter_in_model`` (or a ``PeftModel`` around one).
        family: ``"unet"``, ``"te"``, ``"te1"`` or ``"te2"``.
        adapter_name: which adapter to read; may be left out when the layers hold a single one.

    Returns:
        kohya prefix to :class:`LoraWeights`. The alpha written is the one giving peft's scale (``lora_alpha``, or
        ``lora_alpha * sqrt(r)`` for rsLoRA), not any runtime ``set_scale`` multiplier.
    """
    from peft import PeftModel  # here, not at the top: saving a file must not need peft (host applications)
    from peft.tuners.lora import LoraLayer

    if isinstance(model, PeftModel):
        model = model.get_base_model()
    weights: dict[str, LoraWeights] = {}
    for name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        adapter = _adapter_of(name, layer, adapter_name)
        base_layer = layer.get_base_layer()
        if not isinstance(base_layer, nn.Linear):
            raise AdaptorError(f"{name}: only LoRA on linear layers can be written, not {type(base_layer).__name__}")
        if layer.use_dora.get(adapter, False) or getattr(layer, "lora_bias", {}).get(adapter, False):
            raise AdaptorError(f"{name}: DoRA and LoRA bias have no kohya LoRA form; train plain LoRA")
        rank = layer.r[adapter]
        alpha = layer.lora_alpha[adapter] * (math.sqrt(rank) if layer.use_rslora.get(adapter, False) else 1.0)
        down, up = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        weights[lora_prefix(family, name)] = LoraWeights(_copy(down, dtype), _copy(up, dtype), float(alpha))
    return weights


def adaptor_from_models(
    *,
    metadata: FairMetadata,
    unet: nn.Module | None = None,
    text_encoders: Mapping[str, nn.Module] | None = None,
    tokens: Sequence[SoftTokens] = (),
    adapter_name: str | None = None,
    dtype: torch.dtype | None = None,
) -> FairAdaptor:
    """Collect the LoRA of ``unet`` and ``text_encoders`` (``{"te": ...}`` or ``{"te1": ..., "te2": ...}``) and the
    ``tokens`` into a :class:`FairAdaptor`. ``metadata.base_model`` may be left ``None`` when the text-encoder
    families tell it."""
    lora: dict[str, LoraWeights] = {}
    models = ({"unet": unet} if unet is not None else {}) | dict(text_encoders or {})
    for family, model in models.items():
        found = lora_from_model(model, family, adapter_name, dtype)
        if not found:
            raise AdaptorError(f"the {family} model has no peft LoRA layers")
        lora.update(found)
    if metadata.base_model is None:
        bases = {base_of_family(f) for f in models} - {None}
        if len(bases) == 1:
            metadata = dataclasses.replace(metadata, base_model=bases.pop())
    tokens = [SoftTokens(t.name, {f: _copy(v, dtype) for f, v in t.vectors.items()}) for t in tokens]
    return FairAdaptor(metadata=metadata, lora=lora, tokens=tokens)


def tensor_metadata(adaptor: FairAdaptor) -> dict[str, str]:
    """Header keys that describe the tensors: ``ss_network_dim``/``ss_network_alpha`` (``"Dynamic"`` when they
    differ per module, as kohya writes), ``fair.tokens`` and ``modelspec.trigger_phrase``."""
    header: dict[str, str] = {}
    if adaptor.lora:
        ranks, alphas = adaptor.ranks, adaptor.alphas
        header["ss_network_dim"] = str(ranks[0]) if len(ranks) == 1 else "Dynamic"
        header["ss_network_alpha"] = str(alphas[0]) if len(alphas) == 1 else "Dynamic"
    if adaptor.tokens:
        summary = adaptor.summary()["tokens"]
        header["fair.tokens"] = json.dumps(summary)
        header["modelspec.trigger_phrase"] = " ".join(t.name for t in adaptor.tokens)
    return header


def adaptor_state_dict(adaptor: FairAdaptor) -> dict[str, torch.Tensor]:
    """The file's tensors: the kohya LoRA keys (:func:`~fair_core.adaptor.hosts.lora_state_dict`) and the
    ``bundle_emb`` token keys (:func:`~fair_core.adaptor.hosts.token_state_dict`)."""
    return lora_state_dict(adaptor) | token_state_dict(adaptor)


def save_adaptor(adaptor: FairAdaptor, path: str | Path) -> Path:
    """Validate ``adaptor`` and write it to ``path`` atomically (temporary file in the same folder, fsync,
    ``os.replace``): readers never see a half-written file, and a failed write leaves any old file intact.

    The header carries kohya's ``sshs_model_hash`` of the tensor data (see :mod:`~fair_core.adaptor.checksum`),
    checked against the written file before it replaces ``path``."""
    validate_adaptor(adaptor)
    path = Path(path)
    tensors = adaptor_state_dict(adaptor)
    header = adaptor.metadata.to_metadata() | tensor_metadata(adaptor) | {HASH_KEY: tensors_sha256(tensors)}
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        save_file(tensors, temporary, metadata=header)
        with open(temporary, "rb+") as file:
            os.fsync(file.fileno())
            file.seek(0)
            check_content_hash(header, data_sha256(file.read()), path.name)
        os.chmod(temporary, 0o644)  # mkstemp makes it 0600; model folders are shared with the UI's process
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def write_adaptor(
    path: str | Path,
    *,
    metadata: FairMetadata,
    unet: nn.Module | None = None,
    text_encoders: Mapping[str, nn.Module] | None = None,
    tokens: Sequence[SoftTokens] = (),
    adapter_name: str | None = None,
    dtype: torch.dtype | None = None,
) -> FairAdaptor:
    """Write the LoRA of peft-wrapped ``unet`` / ``text_encoders`` and ``tokens`` as a fair-adaptor file.

    See :func:`adaptor_from_models` for the arguments. Returns the adaptor written.
    """
    adaptor = adaptor_from_models(
        metadata=metadata, unet=unet, text_encoders=text_encoders, tokens=tokens, adapter_name=adapter_name, dtype=dtype
    )
    save_adaptor(adaptor, path)
    return adaptor


def _adapter_of(name: str, layer: LoraLayer, adapter_name: str | None) -> str:
    adapters = list(layer.lora_A)
    if adapter_name is not None:
        if adapter_name not in adapters:
            raise AdaptorError(f"{name}: no LoRA adapter named {adapter_name!r} (has {adapters})")
        return adapter_name
    if len(adapters) != 1:
        raise AdaptorError(f"{name}: LoRA layer holds adapters {adapters}; say which one to write")
    return adapters[0]


def _copy(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.detach().to(device="cpu", dtype=dtype, copy=True)
