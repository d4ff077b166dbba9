"""Toy-world weight files (safetensors, configs as JSON in the metadata) and the public loader.

The shipped files live in ``fair_core/toyworld/weights/``:

* ``toy_text_encoder.safetensors``: CLIPTextModel weights; metadata ``fair.config`` (the CLIPTextConfig),
  ``fair.vocab`` and ``fair.merges`` (the tokenizer, stored so token ids never depend on a re-learned BPE);
* ``toy_unet.safetensors``: UNet2DConditionModel weights; metadata ``fair.config`` (its config);
* ``toy_classifier_train.safetensors`` / ``toy_classifier_eval.safetensors``: two independently trained
  :class:`~fair_core.toyworld.models.ToyClassifier`; metadata ``fair.attributes`` (names and classes in
  logit order), ``fair.input`` (size, range, layout) and ``fair.config`` (constructor arguments), as the
  torch twin of an attribute classifier (DESIGN §3.2).

Every file also carries ``fair.format_version`` and ``fair.kind``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from diffusers import DPMSolverMultistepScheduler, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from fair_core.models import DiffusionParts
from fair_core.scoring import WholeImageScorer
from fair_core.targets import Attribute, schema_from_json
from fair_core.toyworld.models import ToyClassifier, generate, make_tokenizer, sampling_scheduler
from fair_core.toyworld.world import (
    HELDOUT_OCCUPATIONS,
    IMAGE_SIZE,
    TOY_SCHEMA,
    TRAIN_OCCUPATIONS,
    prompt,
)

FORMAT_VERSION = "1"
WEIGHTS_DIR = Path(__file__).parent / "weights"
FILES = {
    "text_encoder": "toy_text_encoder.safetensors",
    "unet": "toy_unet.safetensors",
    "classifier_train": "toy_classifier_train.safetensors",
    "classifier_eval": "toy_classifier_eval.safetensors",
}


def _save(path: Path, module: torch.nn.Module, kind: str, metadata: dict[str, Any]) -> None:
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in module.state_dict().items()}
    strings = {"fair.format_version": FORMAT_VERSION, "fair.kind": kind}
    strings.update({key: json.dumps(value) for key, value in metadata.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=strings)


def _read(path: Path, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and JSON-decoded ``fair.*`` metadata of a toy weight file, checked to be of ``kind``."""
    if not path.is_file():
        raise FileNotFoundError(f"toy-world weight file not found: {path}")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    if metadata.get("fair.kind") != kind or metadata.get("fair.format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} is not a toy-world {kind} file of format {FORMAT_VERSION} "
            f"(kind={metadata.get('fair.kind')!r}, version={metadata.get('fair.format_version')!r})"
        )
    decoded = {k: json.loads(v) for k, v in metadata.items() if k not in ("fair.kind", "fair.format_version")}
    return tensors, decoded


def _load_state(module: torch.nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    try:
        module.load_state_dict(tensors, strict=True)
    except RuntimeError as error:
        raise ValueError(f"{path}: weights do not match the stored config: {error}") from None


def save_text_encoder(path: Path, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, merges: Sequence[tuple[str, str]]) -> None:
    """Write the text encoder with its config and the tokenizer's vocabulary and merges."""
    metadata = {"fair.config": text_encoder.config.to_dict(), "fair.vocab": tokenizer.get_vocab(),
                "fair.merges": [list(m) for m in merges]}
    _save(path, text_encoder, "text_encoder", metadata)


def load_text_encoder(path: Path) -> tuple[CLIPTextModel, CLIPTokenizer]:
    tensors, metadata = _read(path, "text_encoder")
    text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(metadata["fair.config"]))
    _load_state(text_encoder, tensors, path)
    tokenizer = make_tokenizer(metadata["fair.vocab"], [tuple(m) for m in metadata["fair.merges"]])
    return text_encoder.eval().requires_grad_(False), tokenizer


def save_unet(path: Path, unet: UNet2DConditionModel) -> None:
    _save(path, unet, "unet", {"fair.config": dict(unet.config)})


def load_unet(path: Path) -> UNet2DConditionModel:
    tensors, metadata = _read(path, "unet")
    config = {k: v for k, v in metadata["fair.config"].items() if not k.startswith("_")}
    unet = UNet2DConditionModel.from_config(config)
    _load_state(unet, tensors, path)
    return unet.eval().requires_grad_(False)


def save_classifier(path: Path, classifier: ToyClassifier, extra: dict[str, Any] | None = None) -> None:
    metadata = {
        "fair.attributes": [a.to_json() for a in TOY_SCHEMA.values()],
        "fair.input": {"size": IMAGE_SIZE, "range": [-1, 1], "layout": "NCHW RGB", "crop": "whole image"},
        "fair.config": {"width": classifier.width},
        **(extra or {}),
    }
    _save(path, classifier, "classifier", metadata)


def load_classifier(path: Path) -> tuple[ToyClassifier, tuple[Attribute, ...]]:
    """The classifier and the attributes its logits cover, in order."""
    tensors, metadata = _read(path, "classifier")
    classifier = ToyClassifier(**metadata["fair.config"])
    _load_state(classifier, tensors, path)
    attributes = tuple(schema_from_json(metadata["fair.attributes"]).values())
    return classifier.eval().requires_grad_(False), attributes


@dataclass
class ToyWorld:
    """The pretrained toy world, shaped like the parts of a Stable Diffusion pipeline.

    ``vae`` is None: the UNet works on pixels ``(N, 3, 16, 16)`` in ``[-1, 1]``, so decoding is the
    identity (clamped). ``train_scorer`` is for training fair adaptors, ``eval_scorer`` (independently
    trained) for measuring them.
    """

    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    train_scorer: WholeImageScorer
    eval_scorer: WholeImageScorer
    vae: None = None
    schema: dict[str, Attribute] = field(default_factory=lambda: dict(TOY_SCHEMA))
    train_occupations: tuple[str, ...] = TRAIN_OCCUPATIONS
    heldout_occupations: tuple[str, ...] = HELDOUT_OCCUPATIONS
    image_size: int = IMAGE_SIZE

    @staticmethod
    def make_scheduler() -> DPMSolverMultistepScheduler:
        """A fresh DPM-Solver++ 2M over SD's scaled-linear schedule (the model's training schedule)."""
        return sampling_scheduler()

    @staticmethod
    def prompt(occupation: str) -> str:
        return prompt(occupation)

    def parts(self) -> DiffusionParts:
        """The world as :class:`~fair_core.models.DiffusionParts` (``base="toy"``, ``vae=None``), sharing modules."""
        return DiffusionParts(self.unet, None, self.text_encoder, self.tokenizer, self.make_scheduler(), base="toy")

    def generate(self, prompts: Sequence[str], seeds: Sequence[int], num_steps: int = 20,
                 guidance_scale: float = 7.5) -> torch.Tensor:
        """Images ``(N, 3, 16, 16)`` in ``[-1, 1]``; see :func:`fair_core.toyworld.models.generate`."""
        return generate(self.unet, self.text_encoder, self.tokenizer, prompts, seeds, num_steps, guidance_scale)


def load_toy_world(weights_dir: str | Path | None = None, device: torch.device | str = "cpu") -> ToyWorld:
    """Load the pretrained toy world (default: the weights shipped in ``fair_core/toyworld/weights``).

    All modules are in eval mode with ``requires_grad`` False; the caller enables what it trains.
    """
    directory = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    text_encoder, tokenizer = load_text_encoder(directory / FILES["text_encoder"])
    unet = load_unet(directory / FILES["unet"])
    scorers = []
    for name in ("classifier_train", "classifier_eval"):
        classifier, attributes = load_classifier(directory / FILES[name])
        if attributes != tuple(TOY_SCHEMA.values()):
            raise ValueError(f"{directory / FILES[name]}: classifier attributes {attributes} are not the toy schema")
        scorers.append(WholeImageScorer(classifier.to(device), attributes))
    return ToyWorld(unet.to(device), text_encoder.to(device), tokenizer, scorers[0], scorers[1])
