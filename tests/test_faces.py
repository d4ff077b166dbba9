"""Face pipeline: offline detection on real photos, differentiable crops, bad inputs, ONNX detectors."""

from __future__ import annotations

import dataclasses
import math

import cv2
import dlib
import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from fair_core.classifiers.metadata import FaceCropSpec
from fair_core.classifiers.model import AttributeClassifier
from fair_core.classifiers.onnx_export import export_onnx
from fair_core.classifiers.pretrained import dlib_age_classifier, dlib_gender_classifier
from fair_core.classifiers.runtime import OnnxClassifier
from fair_core.faces import (
    DlibLandmarker,
    FaceAttributeScorer,
    FaceFinder,
    OnnxFaceDetector,
    chip_transform,
    crop_face,
    square_region,
)
from fair_core.images import image_to_tensor, load_image, to_rgb_uint8

ASTRONAUT_FACE_CENTRE = (223.0, 127.0)  # centre of the face in skimage's astronaut photo (pixels)

# the legacy ONNX exporter (dynamo=False) warns on every call; it is the documented choice here
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return skdata.astronaut()


@pytest.fixture(scope="module")
def gender() -> AttributeClassifier:
    return dlib_gender_classifier()


@pytest.fixture(scope="module")
def finder() -> FaceFinder:
    return FaceFinder(landmarker=DlibLandmarker())


def box_centre(box) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


# ----------------------------------------------------------------------------- real photos
def test_astronaut_one_face_female_adult(astronaut, gender):
    age = dlib_age_classifier(cuts=(18, 65))  # classes 0-17, 18-64, 65+
    scorer = FaceAttributeScorer(None, [gender, age])
    images = image_to_tensor(astronaut)[None]
    detections = scorer.detect(images)
    assert detections[0].num_faces == 1
    face = detections[0].face
    cx, cy = box_centre(face.box)
    assert math.dist((cx, cy), ASTRONAUT_FACE_CENTRE) < 15
    assert 60 < face.box[2] - face.box[0] < 130
    scores = scorer.score(images, detections)
    gender_p, age_p = scores.probabilities()
    assert scores.has_face.tolist() == [True]
    assert gender_p[0, 0] > 0.8  # female
    assert age.spec.attributes[0].classes[int(age_p[0].argmax())] == "18-64"
    assert age_p[0, 1] > 0.9
    torch.testing.assert_close(scores.boxes[0], torch.tensor(face.box, dtype=torch.float32))


def test_cat_and_noise_have_no_face(gender):
    cat = cv2.resize(skdata.chelsea(), (512, 512))
    noise = np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    scorer = FaceAttributeScorer(None, gender)
    images = torch.stack([image_to_tensor(cat), image_to_tensor(noise)])
    detections = scorer.detect(images)
    assert [(d.face, d.num_faces, d.note) for d in detections] == [(None, 0, "no face found")] * 2
    scores = scorer.score(images, detections)
    assert scores.has_face.tolist() == [False, False]
    assert torch.isnan(scores.boxes).all()
    assert torch.equal(scores.logits[0], torch.zeros(2, 2))


def test_onnx_scorer_matches_torch_scorer(astronaut, gender, tmp_path):
    """The audit path (ONNX via onnxruntime) scores the same face as the training path (torch)."""
    export_onnx(gender, tmp_path / "gender.onnx")
    images = image_to_tensor(astronaut)[None]
    torch_scores = FaceAttributeScorer(None, gender)(images)
    onnx_classifier = OnnxClassifier(tmp_path / "gender.onnx", device="cpu")
    assert onnx_classifier.provider == "CPUExecutionProvider"
    onnx_scores = FaceAttributeScorer(None, onnx_classifier)(images)
    torch.testing.assert_close(onnx_scores.logits[0], torch_scores.logits[0].detach(), atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- crops and gradients
def test_box_crop_gradient_only_inside_square(astronaut, gender):
    box_gender = AttributeClassifier(gender.net, dataclasses.replace(gender.spec, face_crop=FaceCropSpec("box", expand=0.5)), gender.architecture)
    scorer = FaceAttributeScorer(None, box_gender)
    images = image_to_tensor(astronaut)[None].requires_grad_(True)
    scores = scorer(images)
    scores.logits[0][0, 1].backward()
    grad = images.grad[0].abs().sum(0)
    x0, y0, side = square_region(scores.boxes[0].tolist(), 0.5)
    inside = torch.zeros_like(grad, dtype=torch.bool)
    inside[y0 : y0 + side, x0 : x0 + side] = True
    assert grad[~inside].max() == 0
    assert (grad[inside] > 0).float().mean() > 0.95


def test_aligned_crop_gradient_only_in_chip_footprint(astronaut, finder, gender):
    scorer = FaceAttributeScorer(finder, gender)  # the CC0 gender net reads 32 px aligned chips, padding 0.2
    images = image_to_tensor(astronaut)[None].requires_grad_(True)
    detections = scorer.detect(images)
    scorer.score(images, detections).logits[0][0, 0].backward()
    face, size, padding = detections[0].face, 32, 0.2
    grad = images.grad[0].abs().sum(0).numpy()
    # chip coordinates of every pixel centre, through the inverse of the chip transform
    transform = chip_transform(face.landmarks, size, padding)
    linear, offset = transform[:, :2], transform[:, 2]
    step = math.sqrt(abs(np.linalg.det(linear)))
    ys, xs = np.mgrid[0 : astronaut.shape[0], 0 : astronaut.shape[1]]
    chip = np.linalg.solve(linear, np.stack([xs.ravel() - offset[0], ys.ravel() - offset[1]])).T.reshape(*xs.shape, 2)
    low, high = -0.5, size - 0.5  # extent of the sample points in chip pixels
    margin = 1.5 / step  # bilinear sampling touches pixels up to 1 image pixel away
    outside = ((chip < low - margin) | (chip > high + margin)).any(axis=-1)
    well_inside = ((chip > low + margin) & (chip < high - margin)).all(axis=-1)
    assert grad[outside].max() == 0
    assert (grad[well_inside] > 0).mean() > 0.95
    assert outside.sum() > 0.8 * outside.size  # the chip is a small part of the photo


def test_aligned_crop_matches_dlib_chip(astronaut, finder):
    """Independent check of the chip geometry: dlib's own extract_image_chip at 64 px."""
    face = finder.find(astronaut).face
    points = [dlib.point(int(x), int(y)) for x, y in face.landmarks]
    details = dlib.get_face_chip_details(dlib.full_object_detection(dlib.rectangle(0, 0, 1, 1), points), 64, 0.2)
    reference = dlib.extract_image_chip(astronaut, details)
    ours = crop_face(image_to_tensor(astronaut), face, FaceCropSpec("aligned", padding=0.2), 64)
    difference = (ours - image_to_tensor(reference)).abs().mean() * 127.5
    assert difference < 2.5  # grey levels (measured 1.6); shifting the chip by half a pixel gives 3.9


# ----------------------------------------------------------------------------- several faces, border faces
def test_strided_views_are_detected_like_copies(astronaut, finder):
    """dlib misreads non-contiguous arrays: a mirrored view must give the mirrored box."""
    mirrored = astronaut[:, ::-1]
    detection = finder.find(mirrored)
    assert detection.num_faces == 1
    cx, cy = box_centre(detection.face.box)
    assert math.dist((astronaut.shape[1] - cx, cy), ASTRONAUT_FACE_CENTRE) < 15


def test_several_faces_largest_is_kept(astronaut, finder):
    face = astronaut[40:220, 140:310]
    canvas = np.full((420, 700, 3), 128, np.uint8)
    canvas[100:280, 20:190] = face
    big = cv2.resize(face, None, fx=1.8, fy=1.8)
    canvas[40 : 40 + big.shape[0], 360 : 360 + big.shape[1]] = big
    detection = finder.find(canvas)
    assert detection.num_faces == 2
    assert box_centre(detection.face.box)[0] > 360


def test_border_face_crop_is_padded_with_minus_one(astronaut, finder):
    shifted = np.ascontiguousarray(astronaut[40:300, 170:470])  # face now ~10 px from the left edge
    face = finder.find(shifted).face
    assert face is not None and face.box[0] < 20
    x0, _, side = square_region(face.box, 1.1)
    assert x0 < 0
    size = 64
    crop = crop_face(image_to_tensor(shifted), face, FaceCropSpec("box", expand=1.1), size)
    padded_columns = int(-x0 / side * size) - 1  # the last one may blend with the image (antialiasing)
    assert padded_columns >= 5
    torch.testing.assert_close(crop[:, :, :padded_columns], torch.full((3, size, padded_columns), -1.0), atol=1e-5, rtol=0)
    assert crop[:, :, padded_columns + 2 :].max() > -0.5


# ----------------------------------------------------------------------------- bad inputs
def test_grayscale_is_repeated_and_still_detected(astronaut, finder):
    gray = cv2.cvtColor(astronaut, cv2.COLOR_RGB2GRAY)
    rgb = to_rgb_uint8(gray)
    assert rgb.shape == (512, 512, 3) and np.array_equal(rgb[..., 0], gray) and np.array_equal(rgb[..., 2], gray)
    assert to_rgb_uint8(gray[:, :, None]).shape == (512, 512, 3)
    detection = finder.find(rgb)
    assert detection.num_faces == 1 and math.dist(box_centre(detection.face.box), ASTRONAUT_FACE_CENTRE) < 15


def test_rgba_is_composited_over_white():
    pixel = np.array([[[10, 20, 30, 128], [10, 20, 30, 255], [10, 20, 30, 0]]], np.uint8)
    alpha = 128 / 255
    expected = np.round(np.array([10, 20, 30]) / 255 * alpha + (1 - alpha), 9) * 255
    out = to_rgb_uint8(pixel)
    assert out[0, 0].tolist() == np.round(expected).astype(int).tolist()
    assert out[0, 1].tolist() == [10, 20, 30]
    assert out[0, 2].tolist() == [255, 255, 255]
    assert to_rgb_uint8(Image.fromarray(pixel, "RGBA")).tolist() == out.tolist()


def test_sixteen_bit_images(astronaut, tmp_path):
    sixteen = astronaut.astype(np.uint16) * 257
    assert np.array_equal(to_rgb_uint8(sixteen), astronaut)
    gray = cv2.cvtColor(astronaut, cv2.COLOR_RGB2GRAY).astype(np.uint16) * 257
    path = tmp_path / "gray16.png"
    cv2.imwrite(str(path), gray)  # a real 16-bit PNG
    loaded = load_image(path)
    assert loaded.shape == (512, 512, 3) and loaded.dtype == np.uint8
    assert np.array_equal(loaded[..., 1], (gray // 257).astype(np.uint8))


def test_float_palette_and_unusable_inputs(astronaut):
    assert np.array_equal(to_rgb_uint8(astronaut.astype(np.float32) / 255), astronaut)
    palette = Image.fromarray(astronaut).convert("P")
    assert to_rgb_uint8(palette).shape == (512, 512, 3)
    with pytest.raises(ValueError, match="shape"):
        to_rgb_uint8(np.zeros((8, 8, 5), np.uint8))
    with pytest.raises(ValueError, match="shape"):
        to_rgb_uint8(np.zeros((0, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="cannot read image"):
        load_image(__file__)


def test_tiny_image_reports_too_small(gender):
    finder = FaceFinder()
    detection = finder.find(np.zeros((20, 40, 3), np.uint8))
    assert detection.face is None and "smaller than 32 px" in detection.note
    scores = FaceAttributeScorer(None, gender)(torch.zeros(2, 3, 16, 16))
    assert scores.has_face.tolist() == [False, False]


def test_small_image_searched_on_an_enlarged_copy(astronaut):
    small = cv2.resize(astronaut[40:240, 130:330], (64, 64), interpolation=cv2.INTER_AREA)  # face ~28 px
    assert FaceFinder(upscale_below=0).find(small).num_faces == 0  # below HOG's 80 px window
    detection = FaceFinder().find(small)  # searched at 160 px
    assert detection.num_faces == 1
    x0, y0, x1, y1 = detection.face.box
    assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64 and 15 < x1 - x0 < 45


def test_huge_image_detected_on_a_shrunk_copy(astronaut):
    factor = 6.0
    huge = cv2.resize(astronaut, None, fx=factor, fy=factor, interpolation=cv2.INTER_LINEAR)  # 3072 x 3072
    detection = FaceFinder().find(huge)
    assert detection.num_faces == 1
    cx, cy = box_centre(detection.face.box)
    assert math.dist((cx / factor, cy / factor), ASTRONAUT_FACE_CENTRE) < 15
    assert 60 < (detection.face.box[2] - detection.face.box[0]) / factor < 130


def test_scorer_rejects_non_rgb_tensors(gender):
    scorer = FaceAttributeScorer(None, gender)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        scorer(torch.zeros(1, 1, 64, 64))
    with pytest.raises(ValueError, match="float"):
        scorer(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))


# ----------------------------------------------------------------------------- user ONNX detectors
class FixedBoxes(torch.nn.Module):
    """A stand-in detector graph: fixed boxes (in input pixels) and scores, following the contract."""

    def forward(self, image: torch.Tensor):
        zero = image.mean() * 0
        boxes = torch.tensor([[10.0, 20.0, 110.0, 140.0], [12.0, 22.0, 108.0, 138.0], [150.0, 10.0, 170.0, 30.0]]) + zero
        scores = torch.tensor([0.9, 0.8, 0.3]) + zero
        return boxes[None], scores[None]


def test_onnx_detector_contract(tmp_path):
    path = tmp_path / "detector.onnx"
    torch.onnx.export(FixedBoxes(), (torch.zeros(1, 3, 250, 250),), str(path), input_names=["input"],
                      output_names=["boxes", "scores"], opset_version=17, dynamo=False)
    detector = OnnxFaceDetector(path, input_size=250, score_threshold=0.5, device="cpu")
    faces = detector.detect(np.zeros((500, 1000, 3), np.uint8))  # 1000 px wide -> factor 0.25
    assert len(faces) == 1  # the overlapping 0.8 box is suppressed, the 0.3 box is below threshold
    assert faces[0].box == pytest.approx((40.0, 80.0, 440.0, 560.0))
    assert faces[0].score == pytest.approx(0.9)
    detection = FaceFinder(detector).find(np.zeros((500, 1000, 3), np.uint8))
    assert detection.face.box == pytest.approx((40.0, 80.0, 440.0, 500.0))  # clipped to the image


def test_onnx_detector_without_contract_outputs_is_rejected(tmp_path):
    path = tmp_path / "bad.onnx"
    torch.onnx.export(torch.nn.Identity(), (torch.zeros(1, 3, 8, 8),), str(path), input_names=["input"],
                      output_names=["out"], opset_version=17, dynamo=False)
    with pytest.raises(ValueError, match="'boxes' and 'scores'"):
        OnnxFaceDetector(path)
