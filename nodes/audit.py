"""Load Attribute Classifier, Target Distribution and Bias Audit: thin over fair_core.resolve / fair_core.audit."""

from __future__ import annotations

import numpy as np
import torch

from fair_core.audit import audit_images
from fair_core.host_helpers import draw_boxes
from fair_core.images import from_bhwc01
from fair_core.plots import audit_chart
from fair_core.resolve import PRETRAINED_CHOICES, resolve_audit_scorer, resolve_target

from .folders import classifier_names, classifier_spec


class LoadAttributeClassifier:
    DESCRIPTION = ("Face detection + attribute classifier for Bias Audit: an ONNX (or torch .safetensors) file "
                   "from models/attribute_classifiers, or the offline CC0 dlib gender/age networks "
                   "(pretrained:...). ONNX runs on onnxruntime's CUDA provider when present, else on CPU.")
    CATEGORY = "fairness"
    FUNCTION = "load"
    RETURN_TYPES = ("FAIR_CLASSIFIER",)
    RETURN_NAMES = ("classifier",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"classifier": (classifier_names(), {"default": PRETRAINED_CHOICES[0]}),
                             "device": (["auto", "cpu", "cuda"],)}}

    @classmethod
    def VALIDATE_INPUTS(cls, classifier):
        try:
            classifier_spec(classifier)
        except (OSError, ValueError) as error:
            return str(error)
        return True

    def load(self, classifier, device):
        return (resolve_audit_scorer(classifier_spec(classifier), device),)


class TargetDistribution:
    DESCRIPTION = ("The distribution the audit measures against, over the classifier's attributes, e.g. "
                   "'gender=uniform' or 'gender=female:0.6,male:0.4; age=uniform'. Empty: uniform over every "
                   "attribute of the classifier.")
    CATEGORY = "fairness"
    FUNCTION = "make"
    RETURN_TYPES = ("FAIR_TARGET",)
    RETURN_NAMES = ("target",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"classifier": ("FAIR_CLASSIFIER",),
                             "target": ("STRING", {"default": "gender=uniform", "multiline": False})}}

    def make(self, classifier, target):
        return (resolve_target(target if target.strip() else None, classifier.attributes, what="target"),)


class BiasAudit:
    DESCRIPTION = ("Audits an image batch: per attribute the class shares among detected faces with 95% "
                   "intervals, the distance to the target (uniform if none), bias and face rate. Passes the "
                   "images through unchanged; also gives the summary text, a chart, and a copy of the images "
                   "with the face boxes drawn.")
    CATEGORY = "fairness"
    FUNCTION = "audit"
    OUTPUT_NODE = True
    RETURN_TYPES = ("IMAGE", "STRING", "IMAGE", "IMAGE")
    RETURN_NAMES = ("images", "summary", "chart", "faces")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",), "classifier": ("FAIR_CLASSIFIER",)},
                "optional": {"target": ("FAIR_TARGET",)}}

    def audit(self, images, classifier, target=None):
        result = audit_images(from_bhwc01(images), classifier, target)
        summary = result.describe()
        chart = torch.from_numpy(np.asarray(audit_chart(result), dtype=np.float32) / 255.0)[None]
        report = {key: value for key, value in result.to_json().items() if key != "records"}
        return {"ui": {"text": [summary], "fair_audit": [report]},
                "result": (images, summary, chart, draw_boxes(images, result.boxes))}
