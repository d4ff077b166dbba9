"""Load Fair Adaptor and Fair Text Encode: the LoRA through ComfyUI's own patching, the soft tokens into the
positive prompt only."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fair_core.adaptor import AdaptorError, check_base, lora_state_dict, read_adaptor, read_adaptor_header, \
    soft_token_vectors
from fair_core.host_helpers import placeholder_prompt, splice_soft_tokens

from .folders import adaptor_names, adaptor_path

BASES = {"SD15": "sd15", "SDXL": "sdxl"}
"""ComfyUI's model-config class name -> our base name (others are reported by their ComfyUI name)."""


@dataclass(frozen=True)
class FairTokens:
    """What travels on a FAIR_ADAPTOR link: the adaptor's soft-token vectors per text encoder (``clip_l``
    ``(n, 768)``, SDXL also ``clip_g`` ``(n, 1280)``; empty without tokens) and its one-line description."""

    name: str
    vectors: dict[str, torch.Tensor] = field(default_factory=dict)
    label: str = ""

    @property
    def count(self) -> int:
        return int(next(iter(self.vectors.values())).shape[0]) if self.vectors else 0


def encode(clip, tokens) -> list:
    """CONDITIONING of ``tokens`` the way this ComfyUI's CLIPTextEncode makes it (newer builds schedule hooks)."""
    if hasattr(clip, "encode_from_tokens_scheduled"):
        return clip.encode_from_tokens_scheduled(tokens)
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    return [[cond, {"pooled_output": pooled}]]


class LoadFairAdaptor:
    DESCRIPTION = ("Applies a fair adaptor's LoRA to MODEL and CLIP with ComfyUI's own LoRA patching (like Load "
                   "LoRA: stacks, unpatches cleanly). Its soft tokens, if any, leave on the fair_adaptor output: "
                   "connect it to Fair Text Encode for the POSITIVE prompt, which puts them right after BOS as "
                   "they were trained. Encode the negative prompt with the stock CLIP Text Encode: it gets no "
                   "tokens. Strengths scale the LoRA only. Lists fair adaptors in models/fair_adaptors and "
                   "models/loras; refuses an adaptor made for another base model.")
    CATEGORY = "fairness"
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL", "CLIP", "FAIR_ADAPTOR")
    RETURN_NAMES = ("model", "clip", "fair_adaptor")

    def __init__(self):
        self.loaded = None  # (path, mtime_ns, size, FairAdaptor), like LoraLoader's one-file cache

    @classmethod
    def INPUT_TYPES(cls):
        strength = {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}
        return {"required": {"model": ("MODEL",), "clip": ("CLIP",), "adaptor": (adaptor_names(),),
                             "strength_model": ("FLOAT", strength), "strength_clip": ("FLOAT", strength)}}

    @classmethod
    def VALIDATE_INPUTS(cls, adaptor):
        try:
            read_adaptor_header(adaptor_path(adaptor))
        except (AdaptorError, OSError, ValueError) as error:
            return str(error)
        return True

    def load(self, model, clip, adaptor, strength_model, strength_clip):
        path = adaptor_path(adaptor)
        stat = path.stat()
        if self.loaded is None or self.loaded[:3] != (path, stat.st_mtime_ns, stat.st_size):
            self.loaded = (path, stat.st_mtime_ns, stat.st_size, read_adaptor(path))
        fair = self.loaded[3]
        config = type(model.model.model_config).__name__
        check_base(fair, BASES.get(config, config))
        tokens = FairTokens(fair.metadata.name, soft_token_vectors(fair), read_adaptor_header(path).label())
        if strength_model == 0 and strength_clip == 0:
            return (model, clip, tokens)
        import comfy.sd

        model, clip = comfy.sd.load_lora_for_models(model, clip, lora_state_dict(fair), strength_model, strength_clip)
        return (model, clip, tokens)


class FairTextEncode:
    DESCRIPTION = ("CLIP Text Encode for the POSITIVE prompt with a fair adaptor's soft tokens right after BOS "
                   "(the same conditioning as 'embedding:<tokens> text' with the tokens saved as an embedding). "
                   "Use the stock CLIP Text Encode for the negative prompt.")
    CATEGORY = "fairness"
    FUNCTION = "encode"
    RETURN_TYPES = ("CONDITIONING",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip": ("CLIP",), "fair_adaptor": ("FAIR_ADAPTOR",),
                             "text": ("STRING", {"multiline": True, "dynamicPrompts": True})}}

    def encode(self, clip, fair_adaptor, text):
        tokens = clip.tokenize(placeholder_prompt(text, fair_adaptor.count))
        return (encode(clip, splice_soft_tokens(tokens, fair_adaptor.vectors)),)
