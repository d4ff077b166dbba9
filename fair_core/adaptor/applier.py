"""Put a fair adaptor onto diffusers/transformers models: as peft LoRA layers, merged into the weights, or (for
soft tokens) as new tokenizer entries with learned input embeddings.

Every LoRA module of the adaptor must find its layer, of the right shape, in the models given; anything else is an
:class:`AdaptorError` listing what did not fit. Nothing is loaded with ``strict=False``.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Sequence

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from fair_core.adaptor.container import FairAdaptor, LoraWeights, SoftTokens
from fair_core.adaptor.errors import AdaptorError, list_some
from fair_core.adaptor.naming import TEXT_ENCODER_FAMILIES, family_of_prefix, prefixes_of_modules
from fair_core.soft_prompt import SoftPrompt

if TYPE_CHECKING:
    from fair_core.models import DiffusionParts


@dataclass
class _Target:
    """One adaptor module and the linear layer it belongs on."""

    module_name: str
    layer: nn.Linear
    weights: LoraWeights


def apply_adaptor(
    adaptor: FairAdaptor,
    *,
    unet: nn.Module | None = None,
    text_encoders: Mapping[str, nn.Module] | None = None,
    adapter_name: str = "fair",
    strength: float = 1.0,
) -> None:
    """Add the adaptor's LoRA to the models as a peft adapter ``adapter_name`` with the file's ranks and alphas.

    Args:
        adaptor: from :func:`read_adaptor` or :func:`adaptor_from_models`.
        unet: diffusers UNet, needed when the adaptor has ``lora_unet_*`` modules.
        text_encoders: ``{"te": ...}`` (SD1.x) or ``{"te1": CLIP-L, "te2": CLIP-G}`` (SDXL), needed for the
            adaptor's text-encoder families.
        adapter_name: peft adapter name; must not exist in the models yet.
        strength: multiplier of every update: ``W + strength * (alpha / rank) * up @ down``.

    The adapter stays trainable and can be switched with the usual diffusers/peft adapter calls. Soft tokens are
    not touched here; see :func:`add_soft_tokens`.
    """
    if hasattr(nn.ModuleDict(), adapter_name):  # peft keeps adapters in ModuleDicts, keyed by attribute name
        raise AdaptorError(f"adapter name {adapter_name!r} clashes with a torch.nn.Module attribute")
    resolved = _resolve(adaptor, unet, text_encoders)
    for model, _ in resolved:
        if any(adapter_name in layer.lora_A for layer in model.modules() if isinstance(layer, LoraLayer)):
            raise AdaptorError(f"the model already has a LoRA adapter named {adapter_name!r}")
    for model, targets in resolved:
        config = _lora_config(targets)
        inject_adapter_in_model(config, model, adapter_name=adapter_name)  # as fair_core.trainable does
        with torch.no_grad():
            for target in targets:
                layer = model.get_submodule(target.module_name)
                layer.lora_A[adapter_name].weight.copy_(target.weights.down)
                layer.lora_B[adapter_name].weight.copy_(target.weights.up)
                layer.set_scale(adapter_name, strength)


def text_encoders_by_family(parts: DiffusionParts) -> dict[str, nn.Module]:
    """The parts' text encoders keyed by adaptor family: ``{"te": ...}`` (SD1.x, toy) or ``{"te1": ..., "te2": ...}``
    (SDXL)."""
    families = TEXT_ENCODER_FAMILIES.get(parts.base)
    if families is None or len(families) != len(parts.text_encoders):
        raise AdaptorError(f"no adaptor families for a {parts.base!r} model with {len(parts.text_encoders)} text encoder(s)")
    return dict(zip(families, parts.text_encoders))


def apply_adaptor_to_parts(adaptor: FairAdaptor, parts: DiffusionParts, strength: float = 1.0) -> DiffusionParts:
    """:func:`apply_adaptor` on the parts' UNet and text encoders, and the adaptor's soft tokens as
    ``parts.soft_prompt`` (:func:`soft_prompt_of`), in place; returns ``parts``. Generating with them reproduces
    what the trainer validated."""
    if parts.soft_prompt is not None and adaptor.tokens:
        raise AdaptorError("the model already carries soft tokens; apply one adaptor with tokens at a time")
    encoders = text_encoders_by_family(parts)
    apply_adaptor(adaptor, unet=parts.unet, text_encoders=encoders, strength=strength)
    soft_prompt = soft_prompt_of(adaptor, tuple(encoders))
    if soft_prompt is not None:
        parts.soft_prompt = soft_prompt.to(parts.text_encoder.device)
    return parts


def merge_adaptor(
    adaptor: FairAdaptor,
    *,
    unet: nn.Module | None = None,
    text_encoders: Mapping[str, nn.Module] | None = None,
    strength: float = 1.0,
) -> None:
    """Add ``strength * (alpha / rank) * up @ down`` to each target layer's weight in place (computed in at least
    float32, then cast to the weight's dtype).

    Arguments as in :func:`apply_adaptor`. Layers already wrapped by peft get the update in their base layer.
    """
    with torch.no_grad():
        for _, targets in _resolve(adaptor, unet, text_encoders):
            for target in targets:
                weight = target.layer.weight
                dtype = torch.promote_types(weight.dtype, torch.float32)
                delta = target.weights.delta(dtype).to(weight.device)
                weight.copy_(weight.to(dtype) + strength * delta)


def add_soft_tokens(
    tokens: Sequence[SoftTokens],
    tokenizers: Mapping[str, object],
    text_encoders: Mapping[str, nn.Module],
) -> dict[str, str]:
    """Register soft tokens as new words in the tokenizers and write their vectors into the input embeddings.

    A token ``name`` of ``n`` vectors becomes the words ``name, name_1, ..., name_{n-1}`` (the diffusers
    textual-inversion convention).

    Args:
        tokens: e.g. ``adaptor.tokens``.
        tokenizers: per encoder family (``"te"`` or ``"te1"``/``"te2"``), transformers CLIP tokenizers.
        text_encoders: the matching CLIP text models; their embedding tables are resized.

    Returns:
        token name to the prompt text that stands for it, e.g. ``{"fairtoken": "fairtoken fairtoken_1 ..."}``.
    """
    prompts = {}
    for token in tokens:
        words = [token.name] + [f"{token.name}_{i}" for i in range(1, token.num_vectors)]
        for family, vectors in token.vectors.items():
            if family not in tokenizers or family not in text_encoders:
                raise AdaptorError(
                    f"soft token {token.name!r} has vectors for {family!r} but no tokenizer/encoder was given"
                )
            tokenizer, encoder = tokenizers[family], text_encoders[family]
            width = encoder.get_input_embeddings().weight.shape[1]
            if vectors.shape[1] != width:
                raise AdaptorError(
                    f"soft token {token.name!r} ({family}) has width {vectors.shape[1]}, the encoder {width}"
                )
            if tokenizer.add_tokens(words) != len(words):
                raise AdaptorError(f"soft token {token.name!r}: the {family} tokenizer already has one of {words}")
            encoder.resize_token_embeddings(len(tokenizer))
            embeddings = encoder.get_input_embeddings().weight
            with torch.no_grad():
                embeddings[tokenizer.convert_tokens_to_ids(words)] = vectors.to(embeddings)
        prompts[token.name] = " ".join(words)
    return prompts


def soft_prompt_of(adaptor: FairAdaptor, families: Sequence[str]) -> SoftPrompt | None:
    """The adaptor's soft tokens as the trainer used them: a :class:`~fair_core.soft_prompt.SoftPrompt` put right
    after BOS of conditional prompts (``families``: the text encoders' order, ``("te",)`` or ``("te1", "te2")``),
    or None when the adaptor has no tokens. :func:`add_soft_tokens` is the other way, as words of a prompt."""
    if not adaptor.tokens:
        return None
    missing = [f for t in adaptor.tokens for f in families if f not in t.vectors]
    if missing:
        raise AdaptorError(f"soft tokens have no vectors for text encoder(s) {sorted(set(missing))}")
    return SoftPrompt([torch.cat([t.vectors[f] for t in adaptor.tokens]) for f in families])


def _resolve(
    adaptor: FairAdaptor, unet: nn.Module | None, text_encoders: Mapping[str, nn.Module] | None
) -> list[tuple[nn.Module, list[_Target]]]:
    """Pair every LoRA module of the adaptor with its linear layer, per model; raise on anything that does not fit."""
    models = ({"unet": unet} if unet is not None else {}) | dict(text_encoders or {})
    families = sorted({family_of_prefix(prefix) for prefix in adaptor.lora})
    missing = [family for family in families if family not in models]
    if missing:
        kind = f"{adaptor.base_model} adaptor" if adaptor.base_model else "adaptor"
        raise AdaptorError(
            f"the {kind} has LoRA for {', '.join(missing)} but no such model was given "
            f"(given: {', '.join(models) or 'none'})"
        )
    resolved = []
    for family in families:
        model = models[family]
        names = prefixes_of_modules(family, (name for name, _ in model.named_modules()))
        lora = adaptor.lora_of_family(family)
        unused = [prefix for prefix in lora if prefix not in names]
        if unused:
            raise AdaptorError(
                f"{len(unused)} adaptor module(s) match no layer of the {family} model: {list_some(unused)}"
            )
        resolved.append((model, [_target(prefix, names[prefix], model, weights) for prefix, weights in lora.items()]))
    return resolved


def _target(prefix: str, module_name: str, model: nn.Module, weights: LoraWeights) -> _Target:
    module = model.get_submodule(module_name)
    layer = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
    if not isinstance(layer, nn.Linear):
        raise AdaptorError(f"{prefix}: the model's {module_name} is a {type(layer).__name__}, not a linear layer")
    expected = (weights.up.shape[0], weights.down.shape[1])
    if (layer.out_features, layer.in_features) != expected:
        raise AdaptorError(
            f"{prefix}: adaptor needs a layer (out, in) = {expected}, the model's is "
            f"{(layer.out_features, layer.in_features)}; is it for another base model?"
        )
    return _Target(module_name, layer, weights)


def _lora_config(targets: list[_Target]) -> LoraConfig:
    """peft config with the most common rank/alpha as defaults and exact-name patterns for the others."""
    rank = Counter(t.weights.rank for t in targets).most_common(1)[0][0]
    alpha = Counter(t.weights.alpha for t in targets).most_common(1)[0][0]
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=[t.module_name for t in targets],
        rank_pattern={re.escape(t.module_name): t.weights.rank for t in targets if t.weights.rank != rank},
        alpha_pattern={re.escape(t.module_name): t.weights.alpha for t in targets if t.weights.alpha != alpha},
    )
