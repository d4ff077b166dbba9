"""The fair-adaptor file format (DESIGN §3.1): one ``.safetensors`` file that stock ComfyUI, A1111 and Forge load
as a kohya LoRA, with optional A1111 bundled soft tokens and ``fair.*`` metadata.

Pieces, each with one job:

* :mod:`~fair_core.adaptor.naming`: module name <-> kohya key (``lora_unet_*``, ``lora_te*_*``, ``bundle_emb.*``).
* :mod:`~fair_core.adaptor.metadata`: :class:`FairMetadata` <-> header strings (``ss_*``, ``modelspec.*``, ``fair.*``).
* :mod:`~fair_core.adaptor.container`: :class:`FairAdaptor`, :class:`LoraWeights`, :class:`SoftTokens`.
* :mod:`~fair_core.adaptor.validate`: the checks every read and write passes.
* :mod:`~fair_core.adaptor.checksum`: kohya's ``sshs_model_hash`` of the tensor bytes, written and verified.
* :mod:`~fair_core.adaptor.writer` / :mod:`~fair_core.adaptor.reader`: peft models -> file -> :class:`FairAdaptor`.
* :mod:`~fair_core.adaptor.applier`: :class:`FairAdaptor` -> peft LoRA on fresh models, merged weights, soft tokens.
* :mod:`~fair_core.adaptor.hosts`: what ComfyUI/A1111/Forge need: header-only listing, LoRA-only tensors, token
  vectors per encoder, prompt words.
* :mod:`~fair_core.adaptor.paper`: the released ``.pth`` checkpoints of Shen et al. -> :class:`FairAdaptor`.
"""

from importlib import import_module
from typing import Any

from fair_core.adaptor.container import FairAdaptor, LoraWeights, SoftTokens
from fair_core.adaptor.errors import AdaptorError
from fair_core.adaptor.hosts import (AdaptorHeader, check_base, list_adaptors, lora_state_dict, prompt_words,
                                     read_adaptor_header, soft_token_vectors)
from fair_core.adaptor.metadata import FairMetadata
from fair_core.adaptor.naming import BASES, TEXT_ENCODER_FAMILIES, lora_prefix
from fair_core.adaptor.paper import convert_paper_checkpoints
from fair_core.adaptor.reader import read_adaptor
from fair_core.adaptor.validate import validate_adaptor
from fair_core.adaptor.writer import adaptor_from_models, lora_from_model, save_adaptor, write_adaptor

# The applier needs peft (and the models it wraps); host applications that only read files and hand the tensors
# to their own LoRA loader must not pay for, or even have, peft. Imported on first use.
_LAZY = {
    "add_soft_tokens": "applier", "apply_adaptor": "applier", "apply_adaptor_to_parts": "applier",
    "merge_adaptor": "applier", "soft_prompt_of": "applier", "text_encoders_by_family": "applier",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f"fair_core.adaptor.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'fair_core.adaptor' has no attribute {name!r}")


__all__ = [
    "BASES",
    "AdaptorHeader",
    "check_base",
    "list_adaptors",
    "lora_state_dict",
    "prompt_words",
    "read_adaptor_header",
    "soft_token_vectors",
    "TEXT_ENCODER_FAMILIES",
    "AdaptorError",
    "FairAdaptor",
    "FairMetadata",
    "LoraWeights",
    "SoftTokens",
    "adaptor_from_models",
    "add_soft_tokens",
    "soft_prompt_of",
    "apply_adaptor",
    "apply_adaptor_to_parts",
    "convert_paper_checkpoints",
    "lora_from_model",
    "lora_prefix",
    "merge_adaptor",
    "read_adaptor",
    "save_adaptor",
    "text_encoders_by_family",
    "validate_adaptor",
    "write_adaptor",
]
