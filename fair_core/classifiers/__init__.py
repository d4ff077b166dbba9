"""Attribute classifiers: file format, torch models, training, ONNX export and onnxruntime inference.

* :mod:`.metadata` - the DESIGN §3.2 metadata (:class:`ClassifierSpec`, :class:`FaceCropSpec`).
* :mod:`.model` - :class:`AttributeClassifier` (torch, ``.safetensors``) and its backbones.
* :mod:`.train` - label readers (folder, CSV/FairFace, CelebA), training loop, per-group report.
* :mod:`.onnx_export` / :mod:`.runtime` - ONNX files and onnxruntime sessions (CUDA or CPU).
* :mod:`.pretrained` - the offline CC0 gender/age networks as classifier files.
"""

from fair_core.classifiers.metadata import ClassifierFileError, ClassifierSpec, FaceCropSpec
from fair_core.classifiers.model import AttributeClassifier, build_classifier
from fair_core.classifiers.onnx_export import export_onnx
from fair_core.classifiers.runtime import OnnxClassifier, load_classifier, select_providers

__all__ = [
    "AttributeClassifier",
    "ClassifierFileError",
    "ClassifierSpec",
    "FaceCropSpec",
    "OnnxClassifier",
    "build_classifier",
    "export_onnx",
    "load_classifier",
    "select_providers",
]
