"""The attribute-classifier file format (DESIGN §3.2): what a classifier file says about itself.

Every classifier file, torch (``.safetensors``) or ONNX, carries the same string metadata:

* ``fair.attributes``: JSON ``[{"name": "gender", "classes": ["female", "male"]}, ...]``; the logits
  are these attributes' classes concatenated in this order.
* ``fair.input``: JSON ``{"size": 224, "range": [-1, 1], "layout": "NCHW", "channels": "RGB"}``.
* ``fair.face_crop``: JSON, how the scorer cuts the face out of an image (:class:`FaceCropSpec`).
* ``fair.format_version`` and an optional ``fair.info`` (free JSON: source, licence, validation report).

A file without this metadata is rejected with :class:`ClassifierFileError`: guessing the class order
of a classifier would silently swap labels.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from fair_core.targets import Attribute, TargetError, schema_from_json

FORMAT_VERSION = "1"
KEY_VERSION = "fair.format_version"
KEY_ATTRIBUTES = "fair.attributes"
KEY_INPUT = "fair.input"
KEY_FACE_CROP = "fair.face_crop"
KEY_INFO = "fair.info"
REQUIRED_KEYS = (KEY_ATTRIBUTES, KEY_INPUT, KEY_FACE_CROP)
INPUT_RANGE = [-1, 1]


class ClassifierFileError(ValueError):
    """A classifier file that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class FaceCropSpec:
    """How a face crop is made from a detected face.

    ``method="box"``: a square centred on the detector box, side ``(1 + expand) * max(box w, box h)``,
    parts outside the image filled with -1 (black). ``expand=1.1`` suits the tight boxes of dlib's HOG
    detector (Shen et al. use 1.1 for dlib boxes, 0.5 for the larger insightface boxes).

    ``method="aligned"``: dlib's face chip from the 5 landmarks (eyes level, face centred, rotation
    removed) with ``padding`` around the landmark template; ``padding=0.25`` reproduces FairFace's
    published crops, ``0.2`` the chips the CC0 dlib gender/age networks were trained on.
    """

    method: str = "box"
    expand: float = 1.1
    padding: float = 0.2

    def __post_init__(self) -> None:
        if self.method not in ("box", "aligned"):
            raise ClassifierFileError(f"face crop method must be 'box' or 'aligned', got {self.method!r}")
        if not (0.0 <= self.expand <= 10.0 and 0.0 <= self.padding <= 10.0):
            raise ClassifierFileError(f"face crop expand/padding out of range [0, 10]: {self}")

    def to_json(self) -> dict[str, Any]:
        if self.method == "box":
            return {"method": "box", "expand": self.expand}
        return {"method": "aligned", "landmarks": "dlib5", "padding": self.padding}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "FaceCropSpec":
        method = data.get("method")
        if method == "box":
            return cls("box", expand=float(data.get("expand", 1.1)))
        if method == "aligned":
            if data.get("landmarks", "dlib5") != "dlib5":
                raise ClassifierFileError(f"aligned face crops support the 'dlib5' landmark template only, got {data!r}")
            return cls("aligned", padding=float(data.get("padding", 0.2)))
        raise ClassifierFileError(f"unknown face crop {data!r} (method must be 'box' or 'aligned')")

    @classmethod
    def parse(cls, text: str) -> "FaceCropSpec":
        """``box``, ``box:1.1``, ``aligned`` or ``aligned:0.25`` (the CLI form)."""
        method, _, number = text.partition(":")
        if method not in ("box", "aligned"):
            raise ClassifierFileError(f"face crop must look like 'box:1.1' or 'aligned:0.25', got {text!r}")
        if not number:
            return cls(method)
        try:
            value = float(number)
        except ValueError:
            raise ClassifierFileError(f"face crop {text!r}: {number!r} is not a number") from None
        return cls(method, expand=value) if method == "box" else cls(method, padding=value)


@dataclass(frozen=True)
class ClassifierSpec:
    """What a classifier reads and writes.

    Attributes:
        attributes: output attributes; logits are ``(N, sum K_a)`` in this order.
        input_size: side of the square input crop, ``(N, 3, input_size, input_size)``, RGB in [-1, 1].
        face_crop: how the crop is cut from an image.
        info: free-form JSON-ready facts (source, licence, validation accuracy).
    """

    attributes: tuple[Attribute, ...]
    input_size: int = 224
    face_crop: FaceCropSpec = field(default_factory=FaceCropSpec)
    info: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.attributes:
            raise ClassifierFileError("a classifier needs at least one attribute")
        names = [a.name for a in self.attributes]
        if len(set(names)) != len(names):
            raise ClassifierFileError(f"attribute listed twice: {names}")
        if not 8 <= int(self.input_size) <= 1024:
            raise ClassifierFileError(f"input size must be between 8 and 1024 pixels, got {self.input_size}")

    @property
    def num_logits(self) -> int:
        return sum(len(a.classes) for a in self.attributes)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.attributes)

    def to_metadata(self) -> dict[str, str]:
        """String metadata for safetensors / ONNX ``metadata_props``."""
        return {
            KEY_VERSION: FORMAT_VERSION,
            KEY_ATTRIBUTES: json.dumps([a.to_json() for a in self.attributes]),
            KEY_INPUT: json.dumps({"size": int(self.input_size), "range": INPUT_RANGE, "layout": "NCHW", "channels": "RGB"}),
            KEY_FACE_CROP: json.dumps(self.face_crop.to_json()),
            KEY_INFO: json.dumps(dict(self.info)),
        }

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str] | None, source: str) -> "ClassifierSpec":
        """Parse and validate the metadata of the file ``source`` (named in every error)."""
        metadata = metadata or {}
        missing = [key for key in REQUIRED_KEYS if key not in metadata]
        if missing:
            raise ClassifierFileError(
                f"{source}: not a Fair Adaptors classifier file, metadata {', '.join(missing)} missing "
                "(write it with `fair classifier train/export/pretrained`; see DESIGN §3.2)"
            )
        version = metadata.get(KEY_VERSION, FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ClassifierFileError(f"{source}: classifier format version {version!r}, this code reads {FORMAT_VERSION!r}")
        try:
            attributes = tuple(schema_from_json(_json(metadata, KEY_ATTRIBUTES, source)).values())
            face_crop = FaceCropSpec.from_json(_json(metadata, KEY_FACE_CROP, source))
        except (TargetError, TypeError, AttributeError) as error:
            raise ClassifierFileError(f"{source}: {error}") from None
        size = _input_size(_json(metadata, KEY_INPUT, source), source)
        info = _json(metadata, KEY_INFO, source) if KEY_INFO in metadata else {}
        return cls(attributes, size, face_crop, info)


def _json(metadata: Mapping[str, str], key: str, source: str) -> Any:
    try:
        return json.loads(metadata[key])
    except (json.JSONDecodeError, TypeError) as error:
        raise ClassifierFileError(f"{source}: metadata {key} is not valid JSON ({error})") from None


def _input_size(data: Any, source: str) -> int:
    if not isinstance(data, Mapping) or "size" not in data:
        raise ClassifierFileError(f"{source}: {KEY_INPUT} must be a JSON object with a 'size'")
    if list(data.get("range", INPUT_RANGE)) != INPUT_RANGE or data.get("layout", "NCHW") != "NCHW":
        raise ClassifierFileError(f"{source}: only NCHW RGB input in [-1, 1] is supported, file declares {data}")
    return int(data["size"])


def file_identity(path: str | Path) -> dict[str, str]:
    """``{"name", "sha256"}`` of a classifier file (the adaptor's ``fair.classifier`` record)."""
    path = Path(path)
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {"name": path.name, "sha256": digest.hexdigest()}
