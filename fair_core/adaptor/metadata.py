"""Safetensors header metadata of a fair adaptor: kohya ``ss_*``, ``modelspec.*`` and our ``fair.*`` keys.

All values are strings; structured ones are JSON. Loaders that only read tensors ignore the keys, except that
A1111 sorts LoRAs into SD1/SDXL tabs by ``ss_base_model_version``, so it is always written.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Mapping

from fair_core.adaptor.errors import AdaptorError
from fair_core.adaptor.naming import BASES
from fair_core.targets import Attribute, TargetDistribution, TargetError, schema_from_json
from fair_core.terminal import escape

FORMAT_VERSION = "1"
# "toy" is no kohya base: the toy world is a model of its own, and saying "sd_v1" would offer its adaptors to SD1.
KOHYA_BASE_VERSION = {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0", "toy": "fair_toyworld"}
MODELSPEC_ARCHITECTURE = {
    "sd15": "stable-diffusion-v1/lora", "sdxl": "stable-diffusion-xl-v1-base/lora", "toy": "fair-toyworld/lora"
}
MODELSPEC_RESOLUTION = {"sd15": "512x512", "sdxl": "1024x1024", "toy": "32x32"}

# Written by the writer from the tensors themselves (see writer.tensor_metadata), not kept in FairMetadata.
# sshs_model_hash is the tensor data's hash (see checksum.py); a stale sshs_legacy_hash is dropped, never copied.
TENSOR_KEYS = (
    "ss_network_dim", "ss_network_alpha", "fair.tokens", "modelspec.trigger_phrase", "sshs_model_hash",
    "sshs_legacy_hash",
)
# Values kohya writes for ss_network_dim / ss_network_alpha when they are not one number (str(None) when unset).
NOT_A_NUMBER = ("", "Dynamic", "None")
_WHOLE_NUMBER = re.compile(r"[0-9]+")  # ASCII only: str.isdigit() accepts '²', which int() refuses
_DECIMAL = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")

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
        resolution: the side in pixels of the images trained on (``modelspec.resolution``); None: the base
            model's native size.
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
    resolution: int | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.base_model is not None and self.base_model not in BASES:
            raise AdaptorError(f"unknown base model {self.base_model!r} (known: {', '.join(BASES)})")
        if not self.attributes and self.target is not None:
            self.attributes = self.target.attributes
        self.attributes = tuple(self.attributes)
        classifier = self.classifier
        if classifier is not None and (
            not isinstance(classifier, dict) or set(classifier) != {"name", "sha256"}
            or not all(isinstance(value, str) for value in classifier.values())
        ):
            raise AdaptorError(
                f"classifier metadata must be {{'name': <string>, 'sha256': <string>}}, got {_shown(classifier)}"
            )

    @property
    def prompt_encoding(self) -> str:
        """How the adaptor's prompts were tokenised in training (``training_args.prompt_encoding``): ``host`` or
        ``paper``; ``host`` when not recorded (files written before the option existed, third-party LoRAs)."""
        value = self.training_args.get("prompt_encoding", "host")
        return value if value in ("host", "paper") else "host"

    def to_metadata(self) -> dict[str, str]:
        """The header keys this metadata owns (everything but :data:`TENSOR_KEYS`, which are never taken from
        :attr:`extra`: they describe tensors that may have changed)."""
        if self.base_model is None:
            raise AdaptorError("base_model must be set ('sd15' or 'sdxl'): loaders need ss_base_model_version")
        base = self.base_model
        header = {key: value for key, value in self.extra.items() if key not in TENSOR_KEYS}
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
            "modelspec.resolution": f"{self.resolution}x{self.resolution}" if self.resolution else MODELSPEC_RESOLUTION[base],
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
        values = {key: _json(header, key, kind) for key, kind in FAIR_JSON_KEYS.items() if key in header}
        try:
            attributes = tuple(schema_from_json(values.get("fair.attributes", [])).values())
        except TargetError as error:
            raise AdaptorError(f"metadata fair.attributes: {escape(str(error))}") from None
        try:
            target_json = values.get("fair.target_distribution")
            target = TargetDistribution.from_json(target_json) if target_json is not None else None
        except TargetError as error:
            raise AdaptorError(f"metadata fair.target_distribution: {escape(str(error))}") from None
        base = base_from_header(header)
        return cls(
            base_model=base,
            name=header.get("ss_output_name", header.get("modelspec.title", "")),
            sd_model_name=header.get("ss_sd_model_name", ""),
            attributes=attributes,
            target=target,
            classifier=values.get("fair.classifier"),
            training_args=values.get("fair.training_args", {}),
            eval=values.get("fair.eval", {}),
            date=header.get("modelspec.date", ""),
            resolution=_resolution(header.get("modelspec.resolution", ""), base),
            extra={k: v for k, v in header.items() if k not in OWN_KEYS},
        )


def _resolution(text: str, base: str | None) -> int | None:
    """The side of ``modelspec.resolution`` (``"64x64"``) when it is square and not the base's native size."""
    width, _, height = text.partition("x")
    if base is not None and text == MODELSPEC_RESOLUTION.get(base):
        return None
    return int(width) if _WHOLE_NUMBER.fullmatch(width) and width == height else None


def base_from_header(header: Mapping[str, str]) -> str | None:
    """The base model named by ``fair.base_model``, ``ss_base_model_version`` or ``modelspec.architecture``.

    Raises :class:`AdaptorError` when they disagree or name a base other than SD1.x/SDXL.
    """
    if header.get("fair.base_model") == "toy":
        return "toy"  # SD1's key layout for a model of its own (ss_base_model_version fair_toyworld)
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


def network_dim(header: Mapping[str, str]) -> int | None:
    """The rank recorded as ``ss_network_dim``; None when absent or not one number (``Dynamic``, ``None``).

    Raises :class:`AdaptorError` for any other value, e.g. ``'²'`` or ``'4.5'``.
    """
    value = header.get("ss_network_dim", "")
    if value.strip() in NOT_A_NUMBER:
        return None
    if not _WHOLE_NUMBER.fullmatch(value):
        raise AdaptorError(
            f"metadata ss_network_dim must be a whole number (the LoRA rank) or 'Dynamic', got {_shown(value)}"
        )
    return int(value)


def network_alpha(header: Mapping[str, str]) -> float | None:
    """The alpha recorded as ``ss_network_alpha``; None when absent or not one number (``Dynamic``, ``None``).

    Raises :class:`AdaptorError` for any other value, e.g. ``'abc'`` or ``'nan'``.
    """
    value = header.get("ss_network_alpha", "")
    if value.strip() in NOT_A_NUMBER:
        return None
    if not _DECIMAL.fullmatch(value.strip()) or not math.isfinite(float(value)):
        raise AdaptorError(f"metadata ss_network_alpha must be a finite number or 'Dynamic', got {_shown(value)}")
    return float(value)


def check_header_types(header: Mapping[str, str]) -> None:
    """Raise :class:`AdaptorError` naming the key, the expected type and the value for any ``fair.*`` JSON value
    of the wrong type and any ``ss_network_dim`` / ``ss_network_alpha`` that is not a number or ``Dynamic``."""
    for key, kind in FAIR_JSON_KEYS.items():
        if key in header:
            _json(header, key, kind)
    network_dim(header)
    network_alpha(header)


def _known_base(key: str, value: str, prefixes: Mapping[str, str]) -> str:
    for prefix, base in prefixes.items():
        if value.startswith(prefix):
            return base
    raise AdaptorError(f"unsupported base model {key}={value!r}: fair adaptors are for {' or '.join(BASES)}")


class _Kind:
    """The JSON shape a ``fair.*`` value must have: ``check(value)`` gives the first wrong part, or None."""

    def __init__(self, description: str, check: Callable[[Any], tuple[str, Any] | None]) -> None:
        self.description = description
        self.check = check


def _is_text(value: Any) -> bool:
    return isinstance(value, str)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _attribute_list(value: Any, path: str = "") -> tuple[str, Any] | None:
    if not isinstance(value, list):
        return path, value
    for index, item in enumerate(value):
        where = f"{path}[{index}]"
        if not isinstance(item, dict) or not _is_text(item.get("name")):
            return where, item
        classes = item.get("classes")
        if not isinstance(classes, list) or not all(map(_is_text, classes)):
            return f"{where}.classes", classes
    return None


def _target(value: Any) -> tuple[str, Any] | None:
    if not isinstance(value, dict):
        return "", value
    if (wrong := _attribute_list(value.get("attributes"), ".attributes")) is not None:
        return wrong
    joint = value.get("joint")
    if not isinstance(joint, dict) or not all(map(_is_number, joint.values())):
        return ".joint", joint
    return None


def _classifier(value: Any) -> tuple[str, Any] | None:
    if not isinstance(value, dict) or set(value) != {"name", "sha256"}:
        return "", value
    return next(((f".{k}", v) for k, v in value.items() if not _is_text(v)), None)


def _token_list(value: Any) -> tuple[str, Any] | None:
    if not isinstance(value, list):
        return "", value
    wrong = (item for item in enumerate(value) if not isinstance(item[1], dict) or not _is_text(item[1].get("name")))
    return next(((f"[{index}]", item) for index, item in wrong), None)


def _object(value: Any) -> tuple[str, Any] | None:
    return None if isinstance(value, dict) else ("", value)


# The JSON-valued fair.* keys and the shape each must have.
FAIR_JSON_KEYS: dict[str, _Kind] = {
    "fair.attributes": _Kind('a list of {"name": string, "classes": [string, ...]}', _attribute_list),
    "fair.target_distribution": _Kind(
        'an object {"attributes": [{"name": string, "classes": [string, ...]}, ...], "joint": {string: number}}',
        _target,
    ),
    "fair.classifier": _Kind('an object {"name": string, "sha256": string}', _classifier),
    "fair.training_args": _Kind("a JSON object", _object),
    "fair.eval": _Kind("a JSON object", _object),
    "fair.tokens": _Kind('a list of {"name": string, ...}', _token_list),
}


def _json(header: Mapping[str, str], key: str, kind: _Kind) -> Any:
    """The JSON value of ``header[key]``, checked against ``kind``; :class:`AdaptorError` naming the key, the
    expected type and the value otherwise."""
    try:
        value = json.loads(header[key])
    except (json.JSONDecodeError, RecursionError) as error:
        where = f" ({error.msg} at position {error.pos})" if isinstance(error, json.JSONDecodeError) else ""
        raise AdaptorError(f"metadata {key} is not valid JSON{where}: {_shown(header[key])}") from None
    wrong = kind.check(value)
    if wrong is not None:
        path, part = wrong
        raise AdaptorError(f"metadata {key} must be {kind.description}, got {_shown(part)}" + (
            f" at {key}{path}" if path else ""
        ))
    return value


def _shown(value: Any, limit: int = 80) -> str:
    """A value for a one-line message: JSON (``null``, ``5``, ``"text"``), escaped, cut at ``limit`` characters."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        text = repr(value)
    text = text if len(text) <= limit else text[:limit] + "..."
    return escape(text)


def token_order(header: Mapping[str, str], names: Iterable[str]) -> list[str]:
    """``names`` (soft tokens found in a file) in the order they were written: safetensors stores tensors sorted
    by key, so a file's own order is lost; ``fair.tokens`` keeps it. Names it does not list follow, as given."""
    listed = [t["name"] for t in _json(header, "fair.tokens", FAIR_JSON_KEYS["fair.tokens"])] \
        if "fair.tokens" in header else []
    names = list(names)
    return [n for n in listed if n in names] + [n for n in names if n not in listed]
