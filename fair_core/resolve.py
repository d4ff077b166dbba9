"""One resolver for what users type: a model spec, a classifier spec, a target, preservation encoders and the
``toy`` shortcuts. ``fair train``, ``fair eval``, ``fair demo``, ``fair adaptor convert-paper`` and the host
applications all call it, so the same input means the same thing, and fails with the same one-line message,
everywhere.

Everything here is cheap and happens before any diffusion model loads: a typo in a target costs nothing. The toy
world's branches are the only place outside ``fair_core/toyworld`` that imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from fair_core.classifiers.runtime import torch_device
from fair_core.scoring import AttributeScorer
from fair_core.targets import Attribute, TargetDistribution, TargetError

TOY = "toy"
PRETRAINED = "pretrained:"
"""``pretrained:gender,age``: the offline CC0 dlib gender/age networks (``fair classifier pretrained``)."""
PRETRAINED_CLASSIFIERS = ("gender", "age")
PRETRAINED_CHOICES = (f"{PRETRAINED}gender,age", f"{PRETRAINED}gender", f"{PRETRAINED}age")
"""What the hosts' classifier dropdowns offer before the files of their classifier folder."""


@dataclass
class ResolvedScorer:
    """A scorer with what a report needs to say about it.

    Attributes:
        scorer: images ``(N, 3, H, W)`` in [-1, 1] -> attribute scores.
        identity: ``{"classifier": name}`` plus ``"classifier_sha256"`` for files (cache keys, report notes).
        input_size: a whole-image classifier's fixed input size (the toy world's), None for face classifiers.
    """

    scorer: AttributeScorer
    identity: dict[str, str]
    input_size: int | None = None

    @property
    def attributes(self) -> tuple[Attribute, ...]:
        return tuple(self.scorer.attributes)


def resolve_scorer(spec: str, device: str = "cpu", *, training: bool = False) -> ResolvedScorer:
    """The scorer named by ``spec``.

    Args:
        spec: ``toy`` (the toy world's classifier: its training one with ``training``, else its independent
            evaluation one), ``pretrained:gender,age`` (either or both), or a classifier file: ``.onnx`` (audits
            only) or ``.safetensors`` (torch, differentiable).
        device: ``cpu``, ``cuda`` (``cuda:N``), or ``auto``: torch models on a GPU when torch sees one, ONNX on
            the CUDA provider when present (:func:`fair_core.classifiers.runtime.torch_device`).
        training: the trainer needs gradients: ONNX files are refused.
    """
    if spec == TOY:
        from fair_core.toyworld import IMAGE_SIZE, load_toy_world

        world = load_toy_world(device=torch_device(device))
        if training:
            return ResolvedScorer(world.train_scorer, {"classifier": "toy-train"}, IMAGE_SIZE)
        return ResolvedScorer(world.eval_scorer, {"classifier": "toy-eval"}, IMAGE_SIZE)
    from fair_core.faces import FaceAttributeScorer

    if spec.startswith(PRETRAINED):
        scorer = FaceAttributeScorer(None, _pretrained_classifiers(spec, device))
        return ResolvedScorer(scorer, {"classifier": spec})
    from fair_core.classifiers import load_classifier
    from fair_core.classifiers.metadata import file_identity

    if training and not spec.endswith(".safetensors"):
        raise ValueError(f"training needs a torch classifier (.safetensors) for gradients, got {spec!r}")
    if not Path(spec).is_file():
        raise FileNotFoundError(f"classifier file not found: {spec}")
    identity = file_identity(spec)
    scorer = FaceAttributeScorer(None, load_classifier(spec, device=device))
    return ResolvedScorer(scorer, {"classifier": identity["name"], "classifier_sha256": identity["sha256"]})


def resolve_audit_scorer(spec: str, device: str = "auto") -> AttributeScorer:
    """The scorer a host's audit uses (see :func:`resolve_scorer`)."""
    return resolve_scorer(spec, device).scorer


def resolve_target(spec: str | Mapping[str, Any] | None, attributes: Sequence[Attribute],
                   what: str = "target") -> TargetDistribution:
    """Parse a target against the classifier's ``attributes``.

    Args:
        spec: an expression (``gender=uniform;age=young:0.75,old:0.25``), a ``.yaml``/``.json`` file, a mapping (a
            YAML config's ``target:``), or None for uniform over every attribute of the classifier.
        attributes: what the classifier predicts; a target naming anything else is refused.
        what: how the message names the input (``--target``, ``target``, ...).

    Raises:
        TargetError: one line naming ``what``, the problem and the classifier's attributes.
    """
    schema = {a.name: a for a in attributes}
    if spec is None:
        return TargetDistribution.uniform(tuple(attributes))
    if isinstance(spec, str) and not spec.strip():
        raise TargetError(f"{what} is empty; leave it out for uniform over {', '.join(schema)}")
    try:
        if isinstance(spec, Mapping):
            return TargetDistribution.from_mapping(spec, schema)
        if Path(spec).is_file() and Path(spec).suffix.lower() not in {".yaml", ".yml", ".json"}:
            raise TargetError(f"target files end in .yaml, .yml or .json, got {spec}")
        return TargetDistribution.load(str(spec), schema)
    except TargetError as error:
        raise TargetError(f"{what}: {error}; the classifier's attributes: {_describe(attributes)}") from None


def resolve_model_loader(spec: str, base: str | None = None, device: str = "cpu") -> Callable[[], Any]:
    """A function loading fresh :class:`~fair_core.models.DiffusionParts` for ``spec`` (``toy``, a diffusers folder
    or a single-file checkpoint) each time it is called; the spec is checked now, the model loads later."""
    if spec == TOY:
        from fair_core.toyworld import load_toy_world

        return lambda: load_toy_world(device=device).parts()
    if not Path(spec).exists():
        raise FileNotFoundError(f"model not found: {spec} (a diffusers folder, a .safetensors checkpoint, or 'toy')")
    from fair_core.models import load_diffusion_parts

    return lambda: load_diffusion_parts(spec, base=base, device=device)


def resolve_prompt_lists(model: str, train: str, val: str, template: str | None = None) -> tuple[list[str], list[str]]:
    """Training and validation prompts: the named sets (files or built-in sets, see
    :func:`fair_core.prompts.resolve_prompt_set`), or the toy world's own occupations for ``model: toy``."""
    if model == TOY:
        from fair_core.toyworld import load_toy_world

        world = load_toy_world()
        return ([world.prompt(o) for o in world.train_occupations], [world.prompt(o) for o in world.heldout_occupations])
    from fair_core.prompts import resolve_prompt_set

    return list(resolve_prompt_set(train, template).prompts), list(resolve_prompt_set(val, template).prompts)


def resolve_preservation(entries: Sequence[str], model: str, device: str = "cpu"):
    """The image-preservation loss for ``entries`` (``toy``; or ``clip:DIR`` and/or ``dino:DIR``), None if empty;
    ``toy`` only with the toy model, and the encoder folders must exist (checked before any model loads)."""
    if not entries:
        return None
    if TOY in entries:
        if model != TOY or len(entries) > 1:
            raise ValueError("preservation: 'toy' is the toy world's colour-blind view, alone and with model: toy; "
                             "for Stable Diffusion use clip:DIR and/or dino:DIR")
        from fair_core.toyworld.preservation import ColourBlindPreservationLoss

        return ColourBlindPreservationLoss()
    from fair_core.losses import load_preservation_loss

    for entry in entries:
        kind, _, folder = entry.partition(":")
        if kind not in ("clip", "dino") or not Path(folder).is_dir():
            raise ValueError(f"preservation entry {entry!r}: expected clip:DIR or dino:DIR with an existing folder")
    return load_preservation_loss(entries, device)


def _pretrained_classifiers(spec: str, device: str) -> list:
    from fair_core.classifiers.pretrained import dlib_age_classifier, dlib_gender_classifier

    builders = {"gender": dlib_gender_classifier, "age": dlib_age_classifier}
    names = [n.strip() for n in spec.removeprefix(PRETRAINED).split(",") if n.strip()]
    unknown = [n for n in names if n not in builders]
    if not names or unknown:
        raise ValueError(f"{spec!r}: expected pretrained: followed by {' and/or '.join(PRETRAINED_CLASSIFIERS)}, "
                         "e.g. pretrained:gender,age")
    return [builders[name]().to(torch_device(device)) for name in names]


def _describe(attributes: Sequence[Attribute]) -> str:
    return ", ".join(f"{a.name} ({'/'.join(a.classes)})" for a in attributes)
