"""Convert the released checkpoints of Shen et al. (ICLR 2024) into fair adaptors.

The released files are plain ``torch.save`` dicts (read here with ``weights_only=True`` only):

* ``text_encoder_lora*.pth``:
  ``text_model.encoder.layers.{i}.self_attn.{q,k,v,out}_proj.lora_linear_layer.{down,up}.weight`` and
  ``...mlp.{fc1,fc2}.lora_linear_layer.{down,up}.weight``;
* ``unet_lora*.pth``: ``<attention>.processor.{to_q,to_k,to_v,to_out}_lora.{down,up}.weight`` (diffusers 0.19
  ``LoRAAttnProcessor``; ``to_out`` is the layer ``to_out.0``);
* ``prefix_embedding*.pth``: ``token_embedding.weight`` (6 x 768, row 0 unused, rows 1-5 the soft tokens),
  ``position_embedding.weight`` (a copy of CLIP's) and ``position_ids``.

All LoRA updates are ``up @ down`` with scale 1, i.e. alpha = rank (rank 50 in the release). SD 1.5 only.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Sequence

import torch

from fair_core.adaptor.container import FairAdaptor, LoraWeights, SoftTokens
from fair_core.adaptor.errors import AdaptorError, list_some
from fair_core.adaptor.metadata import FairMetadata
from fair_core.adaptor.naming import lora_prefix
from fair_core.targets import TargetDistribution

_TEXT_ENCODER_KEY = re.compile(
    r"^(text_model\.encoder\.layers\.\d+\.(?:self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12]))"
    r"\.lora_linear_layer\.(down|up)\.weight$"
)
_UNET_KEY = re.compile(r"^(.+)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_PREFIX_KEYS = {"token_embedding.weight", "position_embedding.weight", "position_ids"}
# diffusers 0.19 processor attribute -> the Attention submodule it adapts
_UNET_LAYER = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}


def load_paper_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A ``{name: tensor}`` dict saved with ``torch.save``, loaded with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise AdaptorError(f"{path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise AdaptorError(f"{path.name}: not a loadable torch checkpoint ({reason})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AdaptorError(f"{path.name}: expected a dict of tensors as saved by the paper's code")
    return state


def convert_paper_checkpoints(
    paths: Sequence[str | Path],
    *,
    name: str = "fair_adaptor",
    token_name: str = "fairtoken",
    target: TargetDistribution | None = None,
) -> FairAdaptor:
    """One SD1.5 fair adaptor from any of the paper's text-encoder, U-Net and prefix files.

    Args:
        paths: released ``.pth`` files (pass either the EMA or the non-EMA version of each kind, not both).
        name: ``ss_output_name`` of the result.
        token_name: prompt word of the 5 soft tokens of a prefix file.
        target: the distribution the checkpoint was trained for, recorded in the metadata.
    """
    lora: dict[str, LoraWeights] = {}
    tokens: list[SoftTokens] = []
    for path in paths:
        state = load_paper_checkpoint(path)
        if _PREFIX_KEYS & set(state):
            tokens.append(_prefix_tokens(Path(path).name, state, token_name))
            continue
        for prefix, weights in _paper_lora(Path(path).name, state).items():
            if prefix in lora:
                raise AdaptorError(f"{prefix} is in two of the files; pass the EMA or the non-EMA file, not both")
            lora[prefix] = weights
    if len(tokens) > 1:
        raise AdaptorError("more than one prefix-embedding file given")
    metadata = FairMetadata(
        base_model="sd15",
        name=name,
        sd_model_name="runwayml/stable-diffusion-v1-5",
        target=target,
        training_args={"source": "Shen et al. 2024 released checkpoint", "files": [Path(p).name for p in paths],
                       "prompt_encoding": "paper"},  # the official code's short, masked context
    )
    return FairAdaptor(metadata=metadata, lora=lora, tokens=tokens)


def _paper_lora(file_name: str, state: dict[str, torch.Tensor]) -> dict[str, LoraWeights]:
    parts: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in state.items():
        if (match := _TEXT_ENCODER_KEY.match(key)) is not None:
            prefix, part = lora_prefix("te", match.group(1)), match.group(2)
        elif (match := _UNET_KEY.match(key)) is not None:
            module = f"{match.group(1)}.{_UNET_LAYER[match.group(2)]}"
            prefix, part = lora_prefix("unet", module), match.group(3)
        else:
            unknown.append(key)
            continue
        parts.setdefault(prefix, {})[part] = tensor
    if unknown:
        raise AdaptorError(f"{file_name}: keys not in the paper's LoRA naming: {list_some(unknown)}")
    weights = {}
    for prefix, found in parts.items():
        if set(found) != {"down", "up"}:
            raise AdaptorError(f"{file_name}: {prefix} has only its {''.join(found)} matrix")
        weights[prefix] = LoraWeights(found["down"], found["up"], alpha=float(found["down"].shape[0]))
    return weights


def _prefix_tokens(file_name: str, state: dict[str, torch.Tensor], token_name: str) -> SoftTokens:
    if not set(state) <= _PREFIX_KEYS or "token_embedding.weight" not in state:
        raise AdaptorError(
            f"{file_name}: a prefix-embedding file holds {sorted(_PREFIX_KEYS)}, got {list_some(list(state))}"
        )
    table = state["token_embedding.weight"]
    if table.ndim != 2 or table.shape[0] < 2:
        raise AdaptorError(
            f"{file_name}: token_embedding.weight must be (1 + n_tokens, width), got {tuple(table.shape)}"
        )
    # Row 0 is a placeholder in the paper's prefix module; rows 1.. are the learned tokens.
    return SoftTokens(token_name, {"te": table[1:].clone()})
