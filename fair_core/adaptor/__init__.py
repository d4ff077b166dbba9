"""The fair-adaptor file format (DESIGN §3.1): one ``.safetensors`` file that stock ComfyUI, A1111 and Forge load
as a kohya LoRA, with optional A1111 bundled soft tokens and ``fair.*`` metadata.

Pieces, each with one job:

* :mod:`~fair_core.adaptor.naming`: module name <-> kohya key (``lora_unet_*``, ``lora_te*_*``, ``bundle_emb.*``).
* :mod:`~fair_core.adaptor.metadata`: :class:`FairMetadata` <-> header strings (``ss_*``, ``modelspec.*``, ``fair.*``).
* :mod:`~fair_core.adaptor.container`: :class:`FairAdaptor`, :class:`LoraWeights`, :class:`SoftTokens`.
* :mod:`~fair_core.adaptor.validate`: the checks every read and write passes.
* :mod:`~fair_core.adaptor.writer` / :mod:`~fair_core.adaptor.reader`: peft models -> file -> :class:`FairAdaptor`.
* :mod:`~fair_core.adaptor.applier`: :class:`FairAdaptor` -> peft LoRA on fresh models, merged weights, soft tokens.
* :mod:`~fair_core.adaptor.paper`: the released ``.pth`` checkpoints of Shen et al. -> :class:`FairAdaptor`.
"""

from fair_core.adaptor.applier import (add_soft_tokens, apply_adaptor, apply_adaptor_to_parts, merge_adaptor, soft_prompt_of,
                                      text_encoders_by_family)
from fair_core.adaptor.container import FairAdaptor, LoraWeights, SoftTokens
from fair_core.adaptor.errors import AdaptorError
from fair_core.adaptor.metadata import FairMetadata
from fair_core.adaptor.naming import BASES, TEXT_ENCODER_FAMILIES, lora_prefix
from fair_core.adaptor.paper import convert_paper_checkpoints
from fair_core.adaptor.reader import read_adaptor
from fair_core.adaptor.validate import validate_adaptor
from fair_core.adaptor.writer import adaptor_from_models, lora_from_model, save_adaptor, write_adaptor

__all__ = [
    "BASES",
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
