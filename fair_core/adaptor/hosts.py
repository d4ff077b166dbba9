"""What host applications (ComfyUI, A1111, Forge) need from a fair-adaptor file, and nothing they must re-derive.

* :func:`read_adaptor_header` / :func:`list_adaptors`: attributes, target, base, ranks, modules and tokens from the
  safetensors header alone (the tensor bytes are never read), for listing many files fast.
* :func:`lora_state_dict`: the LoRA tensors alone under kohya names, what a host's LoRA loader takes.
* :func:`soft_token_vectors`: the soft-token vectors per host text encoder (``clip_l`` 768, ``clip_g`` 1280), to be
  placed as trained: right after BOS of the positive prompt only (:data:`TOKEN_PLACEMENT`).
* :func:`prompt_words`: the words an A1111-style prompt needs to use the bundled embedding.
* :func:`check_base`: one line when an adaptor does not fit the loaded model.

No host application is imported here; the hosts call these functions.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import torch

from fair_core.adaptor.container import FairAdaptor
from fair_core.adaptor.errors import AdaptorError
from fair_core.adaptor.metadata import FairMetadata, token_order
from fair_core.adaptor.naming import FAMILIES, LORA_PARTS, lora_key, parse_lora_key, parse_token_key, token_key
from fair_core.adaptor.reader import read_header, regular_file_size
from fair_core.targets import Attribute, TargetDistribution
from fair_core.terminal import escape, shown_path

TOKEN_PLACEMENT = "right after BOS of the positive prompt only; the negative/unconditional prompt gets none"
HOST_ENCODERS = {"te": "clip_l", "te1": "clip_l", "te2": "clip_g"}
"""Our text-encoder family -> the host's name of that encoder (A1111/ComfyUI SDXL embedding keys)."""
ADAPTOR_SUFFIX = ".safetensors"


@dataclass(frozen=True)
class TokenInfo:
    """One soft token as the header describes it: ``widths`` maps our family (``te``/``te1``/``te2``) to width."""

    name: str
    num_vectors: int
    widths: dict[str, int]


@dataclass(frozen=True)
class AdaptorHeader:
    """A fair adaptor (or plain kohya LoRA) file as its header describes it.

    Attributes:
        path: the file.
        name: ``ss_output_name`` (A1111's ``<lora:name:..>`` alias), else the file stem.
        base_model: ``"sd15"``, ``"sdxl"``, ``"toy"``, or None when the file does not say.
        is_fair: True when the file carries ``fair.format_version`` (written by this project).
        attributes: the protected attributes, in the classifier's order.
        target: the target distribution trained for; None for plain LoRAs.
        ranks: distinct LoRA ranks, ascending.
        modules: LoRA modules per family (``unet``, ``te``, ``te1``, ``te2``).
        tokens: soft tokens, in file order.
        classifier: ``{"name", "sha256"}`` of the training classifier, if recorded.
    """

    path: Path
    name: str
    base_model: str | None
    is_fair: bool
    attributes: tuple[Attribute, ...]
    target: TargetDistribution | None
    ranks: tuple[int, ...]
    modules: dict[str, int]
    tokens: tuple[TokenInfo, ...]
    classifier: dict[str, str] | None

    def label(self) -> str:
        """One line for a dropdown or a listing, e.g. ``"nurse_fair (sd15): gender uniform; 5 tokens"``."""
        target = self.target.describe() if self.target is not None else "no target"
        tokens = sum(t.num_vectors for t in self.tokens)
        suffix = f"; {tokens} soft token vector(s)" if tokens else ""
        return f"{self.name} ({self.base_model or 'base unknown'}): {target}{suffix}"


def read_safetensors_header(path: str | Path) -> tuple[dict[str, dict], dict[str, str]]:
    """``({tensor key: {"dtype", "shape", "data_offsets"}}, metadata)`` of a safetensors file, from its header alone.

    Reads the 8-byte length and the JSON header, never the tensor data, so a file whose data is cut off still
    lists. Raises :class:`AdaptorError` naming the problem for anything that is not a safetensors header.
    """
    path = Path(path)
    size = regular_file_size(path)  # missing, a directory, a FIFO, a link loop: each said as such
    try:
        with path.open("rb") as file:
            _, header = read_header(file, size, escape(path.name))
    except OSError as error:
        raise AdaptorError(f"{shown_path(path)}: cannot read: {error.strerror or error}") from None
    if header is None:
        raise AdaptorError(f"{path.name}: not a safetensors file (its header is not JSON)")
    if not isinstance(header, dict):
        raise AdaptorError(f"{path.name}: not a safetensors file (its header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise AdaptorError(f"{path.name}: safetensors metadata must map strings to strings")
    for key, entry in header.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("shape"), list):
            raise AdaptorError(f"{path.name}: header entry {key!r} is not a tensor description")
    return header, metadata


def read_adaptor_header(path: str | Path) -> AdaptorHeader:
    """Describe an adaptor file from its header (see :func:`read_safetensors_header`); :class:`AdaptorError` for
    files that are not LoRA/fair-adaptor files or whose metadata is malformed."""
    path = Path(path)
    tensors, metadata = read_safetensors_header(path)
    families: Counter[str] = Counter()
    ranks: set[int] = set()
    tokens: dict[str, dict[str, list[int]]] = {}
    for key, entry in tensors.items():
        if (lora := parse_lora_key(key)) is not None:
            if lora.part == LORA_PARTS[0]:
                families[lora.family] += 1
                if entry["shape"]:
                    ranks.add(int(entry["shape"][0]))
        elif (token := parse_token_key(key)) is not None:
            tokens.setdefault(token.name, {})[token.family] = entry["shape"]
        else:
            raise AdaptorError(f"{path.name}: not a LoRA file (unknown key {key!r})")
    if not families and not tokens:
        raise AdaptorError(f"{path.name}: holds no LoRA modules and no soft tokens")
    parsed = FairMetadata.from_metadata(metadata)
    return AdaptorHeader(
        path=path,
        name=parsed.name or path.stem,
        base_model=parsed.base_model or _base_from_families(families, tokens),
        is_fair="fair.format_version" in metadata,
        attributes=parsed.attributes,
        target=parsed.target,
        ranks=tuple(sorted(ranks)),
        modules={family: families[family] for family in FAMILIES if families[family]},
        tokens=tuple(_token_info(name, tokens[name]) for name in token_order(metadata, tokens)),
        classifier=parsed.classifier,
    )


def list_adaptors(folders: Iterable[str | Path], fair_only: bool = True) -> tuple[list[AdaptorHeader], list[str]]:
    """Headers of the ``.safetensors`` files under ``folders`` (recursively, sorted by path), and one line per
    file that could not be read. With ``fair_only``, plain LoRAs are left out silently (they are not problems)."""
    headers, problems = [], []
    seen: set[Path] = set()
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob(f"*{ADAPTOR_SUFFIX}")):
            resolved = path.resolve()
            if resolved in seen or not path.is_file():
                continue
            seen.add(resolved)
            try:
                header = read_adaptor_header(path)
            except AdaptorError as error:
                problems.append(str(error) if path.name in str(error) else f"{path.name}: {error}")
                continue
            if header.is_fair or not fair_only:
                headers.append(header)
    return headers, problems


def check_base(adaptor: AdaptorHeader | FairAdaptor, base: str) -> None:
    """Raise :class:`AdaptorError` (one line) unless the adaptor fits a loaded model of ``base`` (``sd15``/``sdxl``).

    An adaptor that does not name its base is accepted here; applying it still checks every layer's shape."""
    theirs = adaptor.base_model
    if theirs is not None and theirs != base:
        name = adaptor.name if isinstance(adaptor, AdaptorHeader) else adaptor.metadata.name
        raise AdaptorError(f"adaptor {name!r} is for {theirs}, the loaded model is {base}")


def lora_state_dict(adaptor: FairAdaptor) -> dict[str, torch.Tensor]:
    """The LoRA tensors alone under kohya names (``<prefix>.lora_down.weight``, ``.lora_up.weight``, ``.alpha`` as a
    0-d float32 tensor): exactly the file's LoRA tensors, without the ``bundle_emb.*`` soft tokens."""
    down_part, up_part, alpha_part = LORA_PARTS
    tensors: dict[str, torch.Tensor] = {}
    for prefix, weights in adaptor.lora.items():
        tensors[lora_key(prefix, down_part)] = weights.down.contiguous()
        tensors[lora_key(prefix, up_part)] = weights.up.contiguous()
        tensors[lora_key(prefix, alpha_part)] = torch.tensor(weights.alpha, dtype=torch.float32)
    return tensors


def token_state_dict(adaptor: FairAdaptor) -> dict[str, torch.Tensor]:
    """The soft tokens as A1111 bundled embeddings: ``bundle_emb.<name>.string_to_param.*`` / ``.clip_l`` /
    ``.clip_g``, each ``(n_vectors, width)``."""
    return {token_key(tokens.name, family): vectors.contiguous()
            for tokens in adaptor.tokens for family, vectors in tokens.vectors.items()}


def soft_token_vectors(adaptor: FairAdaptor) -> dict[str, torch.Tensor]:
    """The soft-token vectors per host text encoder: ``{"clip_l": (n, 768)}`` for SD1.5, plus ``"clip_g": (n, 1280)``
    for SDXL, every token of the file concatenated in file order (n = total vectors). Empty without tokens.

    Where they go (as trained): :data:`TOKEN_PLACEMENT`.
    """
    vectors: dict[str, list[torch.Tensor]] = {}
    for tokens in adaptor.tokens:
        for family, tensor in tokens.vectors.items():
            vectors.setdefault(HOST_ENCODERS[family], []).append(tensor.float())
    return {encoder: torch.cat(parts) for encoder, parts in vectors.items()}


def prompt_words(adaptor: FairAdaptor | AdaptorHeader) -> str:
    """The words that make A1111 use the adaptor's bundled embeddings (each token's name stands for all its
    vectors), space-separated, for the start of the positive prompt; ``""`` without tokens."""
    return " ".join(t.name for t in adaptor.tokens)


def _token_info(name: str, shapes: Mapping[str, list[int]]) -> TokenInfo:
    counts = {int(shape[0]) for shape in shapes.values() if shape}
    return TokenInfo(name, counts.pop() if len(counts) == 1 else 0,
                     {family: int(shape[-1]) for family, shape in shapes.items() if shape})


def _base_from_families(families: Counter[str], tokens: Mapping[str, Mapping[str, list[int]]]) -> str | None:
    present = set(families) | {family for shapes in tokens.values() for family in shapes}
    if present & {"te1", "te2"}:
        return "sdxl"
    return "sd15" if "te" in present else None
