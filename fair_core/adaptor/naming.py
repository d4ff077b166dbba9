"""Kohya names of LoRA modules and soft tokens in a fair-adaptor file.

The LoRA on the UNet module ``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`` is stored under the
*prefix* ``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``, as three tensors::

    <prefix>.lora_down.weight   (rank, in_features)    = peft lora_A
    <prefix>.lora_up.weight     (out_features, rank)   = peft lora_B
    <prefix>.alpha              scalar                 the update is (alpha / rank) * up @ down

Text-encoder modules use the families ``te`` (SD1.x) or ``te1`` (CLIP-L) / ``te2`` (CLIP-G) (SDXL), with module
paths relative to CLIP's text transformer: ``lora_te_text_model_encoder_layers_0_self_attn_q_proj``. This is what
kohya sd-scripts writes and what ComfyUI's LoraLoader, A1111's Lora and Forge map onto their models.

Soft tokens are stored as A1111 "bundled embeddings": ``bundle_emb.<token>.string_to_param.*`` (SD1.x) or
``bundle_emb.<token>.clip_l`` / ``.clip_g`` (SDXL), each of shape ``(n_vectors, encoder width)``.

:func:`lora_prefix` is the only place where a module name becomes a file name; the way back goes through a model's
module names (:func:`prefixes_of_modules`), because underscores in the prefix are ambiguous.
"""

from __future__ import annotations

import re
from typing import Iterable, NamedTuple

from fair_core.adaptor.errors import AdaptorError

# "toy" is the built-in toy world (fair_core.toyworld): SD1-shaped keys, a tiny model of its own.
BASES = ("sd15", "sdxl", "toy")
TEXT_ENCODER_FAMILIES = {"sd15": ("te",), "sdxl": ("te1", "te2"), "toy": ("te",)}
FAMILIES = ("unet", "te", "te1", "te2")
LORA_PARTS = ("lora_down.weight", "lora_up.weight", "alpha")
TOKEN_PARTS = {"te": "string_to_param.*", "te1": "clip_l", "te2": "clip_g"}

_TEXT_MODEL = "text_model."
# fullmatch, not match with "$": "$" also matches before a trailing newline ("key\n" would pass)
_LORA_KEY = re.compile(r"^(lora_(unet|te1|te2|te)_\w+)\.(lora_down\.weight|lora_up\.weight|alpha)$")
_TOKEN_KEY = re.compile(r"^bundle_emb\.([\w<>\-]+)\.(string_to_param\.\*|clip_l|clip_g)$")
_TOKEN_NAME = re.compile(r"^[\w<>\-]+$")


class LoraKey(NamedTuple):
    prefix: str  # lora_<family>_<module path with _>
    family: str  # unet | te | te1 | te2
    part: str  # lora_down.weight | lora_up.weight | alpha


class TokenKey(NamedTuple):
    name: str
    family: str  # te | te1 | te2


def lora_prefix(family: str, module_name: str) -> str:
    """File-key prefix of the LoRA on ``module_name`` (a ``named_modules`` name) of a ``family`` model.

    Text-encoder names are taken relative to CLIP's text transformer, spelled ``text_model.``: transformers 5's
    ``CLIPTextModel`` has no such level while ``CLIPTextModelWithProjection`` has, and kohya files always spell it.
    """
    if family not in FAMILIES:
        raise AdaptorError(f"unknown model family {family!r} (known: {', '.join(FAMILIES)})")
    if family != "unet":
        module_name = _TEXT_MODEL + module_name.removeprefix(_TEXT_MODEL)
    return f"lora_{family}_{module_name.replace('.', '_')}"


def prefixes_of_modules(family: str, module_names: Iterable[str]) -> dict[str, str]:
    """``{lora prefix: module name}`` for the given module names of a ``family`` model."""
    mapping: dict[str, str] = {}
    for name in module_names:
        prefix = lora_prefix(family, name)
        if prefix in mapping and mapping[prefix] != name:
            raise AdaptorError(f"modules {mapping[prefix]!r} and {name!r} share the file name {prefix!r}")
        mapping[prefix] = name
    return mapping


def family_of_prefix(prefix: str) -> str:
    """``unet``/``te``/``te1``/``te2`` of a LoRA prefix such as ``lora_te1_text_model_...``."""
    match = _LORA_KEY.fullmatch(prefix + ".alpha")
    if match is None:
        raise AdaptorError(f"not a LoRA prefix: {prefix!r}")
    return match.group(2)


def lora_key(prefix: str, part: str) -> str:
    return f"{prefix}.{part}"


def parse_lora_key(key: str) -> LoraKey | None:
    """Split ``lora_unet_x.lora_down.weight`` into prefix, family and part; ``None`` if not a LoRA key."""
    match = _LORA_KEY.fullmatch(key)
    return LoraKey(match.group(1), match.group(2), match.group(3)) if match else None


def token_key(name: str, family: str) -> str:
    check_token_name(name)
    return f"bundle_emb.{name}.{TOKEN_PARTS[family]}"


def parse_token_key(key: str) -> TokenKey | None:
    """Split ``bundle_emb.<name>.clip_l`` into token name and encoder family; ``None`` if not a token key."""
    match = _TOKEN_KEY.fullmatch(key)
    if match is None:
        return None
    family = next(f for f, part in TOKEN_PARTS.items() if part == match.group(2))
    return TokenKey(match.group(1), family)


def check_token_name(name: str) -> None:
    """Token names become a tensor-key component and a prompt word: letters, digits, ``_``, ``-``, ``<``, ``>``."""
    if not _TOKEN_NAME.fullmatch(name):
        raise AdaptorError(f"invalid soft-token name {name!r}: use letters, digits, '_', '-', '<', '>' only")


def base_of_family(family: str) -> str | None:
    """The base model a text-encoder family belongs to (``te`` -> sd15, ``te1``/``te2`` -> sdxl); None for unet."""
    return next((base for base, families in TEXT_ENCODER_FAMILIES.items() if family in families), None)
