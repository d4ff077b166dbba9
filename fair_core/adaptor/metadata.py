"""Safetensors header metadata of a fair adaptor: kohya ``ss_*``, ``modelspec.*`` and our ``fair.*`` keys.

All values are strings; structured ones are JSON. Loaders that only read tensors ignore the keys, except that
A1111 sorts LoRAs into SD1/SDXL tabs by ``ss_base_model_version``, so it is always written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Mapping

from fair_core.adaptor.errors import AdaptorError
from fair_core.adaptor.naming import BASES
from fair_core.targets import Attribute, TargetDistribution, TargetError, schema_from_json

FORMAT_VERSION = "1"
KOHYA_BASE_VERSION = {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0", "toy": "sd_v1"}
MODELSPEC_ARCHITECTURE = {
    "sd15": "stable-diffusion-v1/lora", "sdxl": "stable-diffusion-xl-v1-base/lora", "toy": "fair-toyworld/lora"
}
MODELSPEC_RESOLUTION = {"sd15": "512x512", "sdxl": "1024x1024", "toy": "32x32"}

# Written by the writer from the tensors themselves (see writer.tensor_metadata), not kept in FairMetadata.
TENSOR_KEYS = ("ss_network_dim", "ss_network_alpha", "fair.tokens", "modelspec.trigger_phrase")
# Written by FairMetadata.to_metadata; every other header key is kept in FairMetadata.extra.
OWN_KEYS = (
    "ss_network_module", "ss_base_model_version", "ss_v2", "ss_output_name", "ss_sd_model_name",
    "modelspec.sai_model_spec", "modelspec.architecture", "modelspec.implementation", "modelspec.title",
    "modelspec.date", "modelspec.resolution",
    "fair.format_version", "fair.base_model", "fair.attributes", "fair.target_distribution", "fair.classifier",
    "fair.training_args", "fair.eval",
) + TENSOR_KEYS


@dataclass
class FairMetadata:
    """What a fair adaptor says about itself.

    Attributes:
        base_model: ``"sd15"`` or ``"sdxl"``. ``None`` only for third-party files that do not say.
        name: ``ss_output_name`` / ``modelspec.title``; A1111's ``<lora:name:1>`` alias.
        sd_model_name: ``ss_sd_model_name``, the checkpoint trained on.
        attributes: protected attributes, in the classifier's order (``fair.attributes``). Defaults to the
            target's attributes.
        target: the target distribution trained for (``fair.target_distribution``).
        classifier: ``{"name": ..., "sha256": ...}`` of the training classifier (``fair.classifier``).
        training_args: JSON-ready training settings (``fair.training_args``).
        eval: JSON-ready evaluation results, e.g. bias before/after (``fair.eval``).
        date: ``modelspec.date``, ISO 8601; the time of writing when empty.
        extra: other header keys, kept as they are (e.g. ``modelspec.author`` or a third party's ``ss_*``).
    """

    base_model: str | None = None
    name: str = "fair_adaptor"
    sd_model_name: str = ""
    attributes: tuple[Attribute, ...] = ()
    target: TargetDistribution | None = None
    classifier: dict[str, str] | None = None
    training_args: dict[str, Any] = field(default_factory=dict)
    eval: dict[str, Any] = field(default_factory=dict)
    date: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.base_model is not None and self.base_model not in BASES:
            raise AdaptorError(f"unknown base model {self.base_model!r} (known: {', '.join(BASES)})")
        if not self.attributes and self.target is not None:
            self.attributes = self.target.attributes
        self.attributes = tuple(self.attributes)
        classifier = self.classifier
        if classifier is not None and (not isinstance(classifier, dict) or set(classifier) != {"name", "sha256"}):
            raise AdaptorError(f"classifier metadata must be {{'name': ..., 'sha256': ...}}, got {classifier!r}")

    def to_metadata(self) -> dict[str, str]:
        """The header keys this metadata owns (everything but :data:`TENSOR_KEYS`)."""
        if self.base_model is None:
            raise AdaptorError("base_model must be set ('sd15' or 'sdxl'): loaders need ss_base_model_version")
        base = self.base_model
        header = dict(self.extra)
        header.update({
            "ss_network_module": "networks.lora",
            "ss_base_model_version": KOHYA_BASE_VERSION[base],
            "ss_v2": "False",
            "ss_output_name": self.name,
            "ss_sd_model_name": self.sd_model_name,
            "modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": MODELSPEC_ARCHITECTURE[base],
            "modelspec.implementation": "diffusers",
            "modelspec.title": self.name,
            "modelspec.date": self.date or datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "modelspec.resolution": MODELSPEC_RESOLUTION[base],
            "fair.format_version": FORMAT_VERSION,
            "fair.base_model": base,
            "fair.attributes": json.dumps([a.to_json() for a in self.attributes]),
            "fair.training_args": json.dumps(self.training_args, default=str),
            "fair.eval": json.dumps(self.eval, default=str),
        })
        if self.target is not None:
            header["fair.target_distribution"] = json.dumps(self.target.to_json())
        if self.classifier is not None:
            header["fair.classifier"] = json.dumps(self.classifier)
        return header

    @classmethod
    def from_metadata(cls, header: Mapping[str, str]) -> "FairMetadata":
        """Parse a header written by :meth:`to_metadata` or by another kohya-style trainer."""
        version = header.get("fair.format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise AdaptorError(f"unsupported fair.format_version {version!r} (this version reads {FORMAT_VERSION!r})")
        try:
            attributes = tuple(schema_from_json(_json(header, "fair.attributes", [])).values())
            target_json = _json(header, "fair.target_distribution", None)
            target = TargetDistribution.from_json(target_json) if target_json is not None else None
        except TargetError as error:
            raise AdaptorError(f"metadata fair.attributes/fair.target_distribution: {error}") from None
        return cls(
            base_model=base_from_header(header),
            name=header.get("ss_output_name", header.get("modelspec.title", "")),
            sd_model_name=header.get("ss_sd_model_name", ""),
            attributes=attributes,
            target=target,
            classifier=_json(header, "fair.classifier", None),
            training_args=_json(header, "fair.training_args", {}),
            eval=_json(header, "fair.eval", {}),
            date=header.get("modelspec.date", ""),
            extra={k: v for k, v in header.items() if k not in OWN_KEYS},
        )


def base_from_header(header: Mapping[str, str]) -> str | None:
    """The base model named by ``fair.base_model``, ``ss_base_model_version`` or ``modelspec.architecture``.

    Raises :class:`AdaptorError` when they disagree or name a base other than SD1.x/SDXL.
    """
    if header.get("fair.base_model") == "toy":
        return "toy"  # the toy world writes SD1's kohya layout (ss_base_model_version sd_v1) for a model of its own
    claims: dict[str, str] = {}
    if "fair.base_model" in header:
        claims["fair.base_model"] = _known_base("fair.base_model", header["fair.base_model"], {b: b for b in BASES})
    if header.get("ss_base_model_version"):
        claims["ss_base_model_version"] = _known_base(
            "ss_base_model_version", header["ss_base_model_version"], {"sdxl": "sdxl", "sd_v1": "sd15"}
        )
    if header.get("modelspec.architecture"):
        claims["modelspec.architecture"] = _known_base(
            "modelspec.architecture", header["modelspec.architecture"],
            {"stable-diffusion-xl-v1": "sdxl", "stable-diffusion-v1": "sd15"},
        )
    if len(set(claims.values())) > 1:
        said = ", ".join(f"{key} says {base}" for key, base in claims.items())
        raise AdaptorError(f"metadata disagrees about the base model: {said}")
    return next(iter(claims.values()), None)


def _known_base(key: str, value: str, prefixes: Mapping[str, str]) -> str:
    for prefix, base in prefixes.items():
        if value.startswith(prefix):
            return base
    raise AdaptorError(f"unsupported base model {key}={value!r}: fair adaptors are for {' or '.join(BASES)}")


def _json(header: Mapping[str, str], key: str, default: Any) -> Any:
    if key not in header:
        return default
    try:
        return json.loads(header[key])
    except json.JSONDecodeError as error:
        raise AdaptorError(f"metadata {key} is not valid JSON ({error.msg} at position {error.pos})") from None
