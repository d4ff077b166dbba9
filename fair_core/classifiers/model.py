"""Torch attribute classifiers: one network, one logit head per attribute, saved as ``.safetensors``.

Backbone choice. The paper uses torchvision's MobileNetV3-Large; torchvision is not a dependency
(it drags in a CUDA build of torch). ``transformers`` is, and it builds MobileNetV2 (the paper's
backbone family, 2.2M parameters, fast on GPU and in ONNX), ResNet and ConvNeXt from a config with
no download. So a backbone is any transformers vision model with a pooled output:

* ``mobilenet_v2`` (default), ``resnet18`` and ``tiny`` (a 3-stage ResNet for tests and the toy
  world) are built from configs with random weights;
* a local model directory (e.g. a copy of ``google/mobilenet_v2_1.0_224``) gives ImageNet-pretrained
  weights, as in the paper, with its own input normalisation read from ``preprocessor_config.json``.

Every network here maps crops ``(N, 3, S, S)`` RGB in [-1, 1] to logits ``(N, sum K_a)``; the
architecture is stored as JSON in the file's ``fair.architecture`` metadata so loading rebuilds the
exact module before reading the weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from fair_core.classifiers.graph import OnnxGraphNet, graph_from_description
from fair_core.classifiers.metadata import ClassifierFileError, ClassifierSpec, file_identity
from fair_core.scoring import split_logits

KEY_ARCHITECTURE = "fair.architecture"
HALF = [0.5, 0.5, 0.5]

BACKBONE_PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "mobilenet_v2": ("mobilenet_v2", {"tf_padding": False}),
    "resnet18": ("resnet", {"embedding_size": 64, "hidden_sizes": [64, 128, 256, 512], "depths": [2, 2, 2, 2], "layer_type": "basic"}),
    "tiny": ("resnet", {"embedding_size": 16, "hidden_sizes": [16, 32, 64], "depths": [1, 1, 1], "layer_type": "basic"}),
}


class Normalize(nn.Module):
    """[-1, 1] -> ``((x + 1) / 2 - mean) / std`` per channel (the backbone's own convention)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x + 1) * 0.5 - self.mean) / self.std


class TransformersNet(nn.Module):
    """A transformers vision backbone's pooled features followed by one linear layer over all logits."""

    def __init__(self, backbone: nn.Module, num_logits: int, mean: Sequence[float], std: Sequence[float], input_size: int):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.backbone = backbone
        training = backbone.training
        with torch.no_grad():  # probe the feature size in eval mode: no batch-norm statistics change
            output = backbone.eval()(pixel_values=self.normalize(torch.zeros(1, 3, input_size, input_size)))
        backbone.train(training)
        if getattr(output, "pooler_output", None) is None:
            raise ValueError(f"{type(backbone).__name__} gives no pooled output; pick a backbone with a pooler")
        features = output.pooler_output.flatten(1)
        self.head = nn.Linear(features.shape[1], num_logits)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(pixel_values=self.normalize(x)).pooler_output.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self._features(x))


class DlibNet(nn.Module):
    """A CC0 dlib network (as :class:`OnnxGraphNet`) behind our input/output conventions.

    Input [-1, 1] becomes the net's ``(byte - channel_mean) / 256``; its raw class logits are returned
    as they are, or, with ``groups``, folded into one log-probability per group of classes
    (the age net's 81 one-year classes -> young/old).
    """

    def __init__(self, graph: OnnxGraphNet, means: Sequence[float], groups: Sequence[Sequence[int]] | None = None):
        super().__init__()
        self.graph = graph
        self.means = [float(m) for m in means]
        self.groups = [list(map(int, g)) for g in groups] if groups else None
        self.register_buffer("mean", torch.tensor(self.means).view(1, 3, 1, 1), persistent=False)
        if self.groups:
            membership = torch.zeros(max(max(g) for g in self.groups) + 1, len(self.groups))
            for column, members in enumerate(self.groups):
                membership[members, column] = 1.0
            self.register_buffer("membership", membership, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.graph(((x + 1) * 127.5 - self.mean) / 256.0)
        if not self.groups:
            return logits
        return torch.log(torch.softmax(logits, dim=-1) @ self.membership)


class AttributeClassifier(nn.Module):
    """Face crop -> per-attribute logits, with the metadata of DESIGN §3.2.

    Args:
        net: module ``(N, 3, S, S)`` in [-1, 1] -> ``(N, sum K_a)``.
        spec: attributes, input size and face-crop convention.
        architecture: JSON-ready description that :func:`build_net` turns back into ``net``.
    """

    def __init__(self, net: nn.Module, spec: ClassifierSpec, architecture: Mapping[str, Any]):
        super().__init__()
        self.net = net
        self.spec = spec
        self.architecture = dict(architecture)
        self.identity: dict[str, str] = {"name": type(net).__name__}

    @property
    def attributes(self):
        return self.spec.attributes

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        """``crops`` ``(N, 3, S, S)`` float RGB in [-1, 1], S = ``spec.input_size`` -> logits ``(N, sum K_a)``."""
        expected = self.spec.input_size
        if crops.dim() != 4 or crops.shape[1] != 3 or crops.shape[-2:] != (expected, expected):
            raise ValueError(f"classifier expects crops (N, 3, {expected}, {expected}), got {tuple(crops.shape)}")
        return self.net(crops.to(next(self.net.parameters()).dtype))  # e.g. fp16 VAE images, fp32 classifier

    def split(self, logits: torch.Tensor) -> list[torch.Tensor]:
        return split_logits(logits, self.spec.attributes)

    def save(self, path: str | Path) -> Path:
        """Write weights + metadata (``fair.*`` and ``fair.architecture``) to a ``.safetensors`` file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {name: tensor.detach().cpu().contiguous() for name, tensor in self.net.state_dict().items()}
        metadata = {**self.spec.to_metadata(), KEY_ARCHITECTURE: json.dumps(self.architecture)}
        save_file(state, str(path), metadata=metadata)
        return path

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "AttributeClassifier":
        """Read a classifier written by :meth:`save`; files without our metadata are rejected."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"classifier file not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                state = {name: handle.get_tensor(name) for name in handle.keys()}
        except Exception as error:  # safetensors raises its own error types for non-safetensors files
            raise ClassifierFileError(f"{path}: not a readable .safetensors file ({error})") from None
        spec = ClassifierSpec.from_metadata(metadata, str(path))
        if KEY_ARCHITECTURE not in metadata:
            raise ClassifierFileError(f"{path}: metadata {KEY_ARCHITECTURE} missing (not a torch classifier file)")
        architecture = json.loads(metadata[KEY_ARCHITECTURE])
        net = build_net(architecture, spec, state)
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise ClassifierFileError(f"{path}: weights do not match the stored architecture: {error}") from None
        classifier = cls(net, spec, architecture)
        classifier.identity = file_identity(path)
        return classifier.to(device).eval()


def build_net(architecture: Mapping[str, Any], spec: ClassifierSpec, state: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """Rebuild a network from its ``fair.architecture`` description (random weights unless ``state``)."""
    kind = architecture.get("type")
    if kind == "transformers":
        from transformers import AutoModel, CONFIG_MAPPING

        if architecture.get("model_type") not in CONFIG_MAPPING:
            raise ClassifierFileError(f"backbone type {architecture.get('model_type')!r} is unknown to this transformers version")
        config = CONFIG_MAPPING[architecture["model_type"]].from_dict(architecture["config"])
        backbone = AutoModel.from_config(config)
        return TransformersNet(backbone, spec.num_logits, architecture["mean"], architecture["std"], spec.input_size)
    if kind == "dlib_onnx_graph":
        prefix = "graph.weights."
        weights = {name[len(prefix):]: value for name, value in (state or {}).items() if name.startswith(prefix)}
        graph = graph_from_description(architecture["graph"], weights)
        return DlibNet(graph, architecture["means"], architecture.get("groups"))
    raise ClassifierFileError(f"unknown classifier architecture type {kind!r}")


def build_classifier(
    spec: ClassifierSpec,
    backbone: str = "mobilenet_v2",
    config_overrides: Mapping[str, Any] | None = None,
) -> AttributeClassifier:
    """A new classifier for ``spec`` on a transformers backbone.

    Args:
        backbone: a preset name (:data:`BACKBONE_PRESETS`) with random weights, or a local
            transformers model directory whose pretrained weights initialise the backbone.
        config_overrides: extra config fields for a preset (e.g. ``{"depth_multiplier": 0.5}``).
    """
    from transformers import AutoConfig, AutoModel

    mean, std = HALF, HALF
    if backbone in BACKBONE_PRESETS:
        model_type, fields = BACKBONE_PRESETS[backbone]
        config = AutoConfig.for_model(model_type, image_size=spec.input_size, **{**fields, **(config_overrides or {})})
        model = AutoModel.from_config(config)
    elif Path(backbone).is_dir():
        model = AutoModel.from_pretrained(backbone, local_files_only=True)
        config = model.config
        mean, std = _preprocessor_normalisation(Path(backbone))
    else:
        raise ValueError(f"backbone {backbone!r} is neither a preset ({', '.join(BACKBONE_PRESETS)}) nor a local model directory")
    net = TransformersNet(model, spec.num_logits, mean, std, spec.input_size)
    architecture = {"type": "transformers", "model_type": config.model_type, "config": config.to_dict(), "mean": list(mean), "std": list(std)}
    return AttributeClassifier(net, spec, architecture)


def _preprocessor_normalisation(directory: Path) -> tuple[list[float], list[float]]:
    """``image_mean``/``image_std`` of a local model's preprocessor config; [-1, 1] input if absent."""
    config_file = directory / "preprocessor_config.json"
    if not config_file.is_file():
        return HALF, HALF
    data = json.loads(config_file.read_text())
    return list(data.get("image_mean", HALF)), list(data.get("image_std", HALF))
