"""Preservation losses with tiny random CLIP / DINOv2 / face-embedding models built from configs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, Dinov2Config, Dinov2Model

from fair_core.losses import (
    FaceRealismLoss,
    ImageEncoder,
    ImagePreservationLoss,
    intersect_boxes,
    load_face_bank,
    preservation_factors,
    save_face_bank,
    scale_gradient_in_boxes,
    square_boxes,
)

NAN = math.nan


@pytest.fixture(scope="module")
def encoder_dirs(tmp_path_factory):
    """Tiny random CLIP-vision and DINOv2 models saved as local model folders."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("encoders")
    clip = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                                          num_hidden_layers=2, image_size=32, patch_size=8, projection_dim=16))
    dino = Dinov2Model(Dinov2Config(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                                    image_size=32, patch_size=8))
    clip.save_pretrained(root / "clip")
    dino.save_pretrained(root / "dino")
    return root / "clip", root / "dino"


@pytest.fixture(scope="module")
def image_loss(encoder_dirs):
    clip_dir, dino_dir = encoder_dirs
    return ImagePreservationLoss([ImageEncoder.from_pretrained(clip_dir, "clip"), ImageEncoder.from_pretrained(dino_dir, "dino")])


def images(n=3, size=48, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_encoder_matches_manual_preprocessing(encoder_dirs):
    clip_dir, _ = encoder_dirs
    encoder = ImageEncoder.from_pretrained(clip_dir, "clip")
    model = CLIPVisionModelWithProjection.from_pretrained(clip_dir).eval()
    x = images()
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    pixels = ((F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True) + 1) / 2 - mean) / std
    with torch.no_grad():
        expected = F.normalize(model(pixel_values=pixels).image_embeds, dim=-1)
        torch.testing.assert_close(encoder(x), expected)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ImageEncoder.from_pretrained(clip_dir.parent, "clip")


def test_image_loss_values(image_loss):
    x, reference = images(seed=0), images(seed=1)
    assert torch.allclose(image_loss(x, x), torch.zeros(3), atol=1e-5)
    with torch.no_grad():
        expected = sum(1 - F.cosine_similarity(e(x), e(reference), dim=-1) for e in image_loss.encoders)
        loss = image_loss(x, reference)
    torch.testing.assert_close(loss, expected)
    assert (loss > 0).all()
    weights = torch.tensor([1.0, 0.2, 0.0])
    torch.testing.assert_close(image_loss(x, image_loss.embed(reference), weights=weights), expected * weights)


def test_face_box_gradient_is_scaled_inside_the_box_only(image_loss):
    x, reference = images(seed=0), images(seed=1)
    boxes = torch.tensor([[4.0, 6.0, 20.0, 30.0], [NAN, NAN, NAN, NAN], [0.0, 0.0, 48.0, 48.0]])
    plain = x.clone().requires_grad_(True)
    image_loss(plain, reference).sum().backward()
    scaled = x.clone().requires_grad_(True)
    image_loss(scaled, reference, face_boxes=boxes, factor2=torch.tensor([0.2, 0.2, 0.5])).sum().backward()
    expected = plain.grad.clone()
    expected[0, :, 6:30, 4:20] *= 0.2  # rows y0..y1, columns x0..x1
    expected[2] *= 0.5
    torch.testing.assert_close(scaled.grad, expected)
    assert plain.grad[0, :, 6:30, 4:20].abs().sum() > 0


def test_gradient_scaling_leaves_other_losses_alone():
    x = torch.randn(1, 3, 8, 8, requires_grad=True)
    box = torch.tensor([[0.0, 0.0, 4.0, 4.0]])
    (scale_gradient_in_boxes(x, box, 0.1).sum() + x.sum()).backward()
    expected = torch.ones(1, 3, 8, 8) * 2
    expected[..., :4, :4] = 1.1
    torch.testing.assert_close(x.grad, expected)


def test_intersect_boxes():
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 5.0, 5.0], [0.0, 0.0, 5.0, 5.0]])
    b = torch.tensor([[5.0, 2.0, 20.0, 8.0], [6.0, 6.0, 9.0, 9.0], [NAN, NAN, NAN, NAN]])
    out = intersect_boxes(a, b)
    assert out[0].tolist() == [5.0, 2.0, 10.0, 8.0]
    assert out[1:].isnan().all()


def test_preservation_factors_follow_the_paper():
    attributes = ["gender", "race", "age"]
    original = torch.tensor([[0, 1, 0]] * 5)
    targets = torch.tensor([[0, 1, 0], [1, 1, 0], [0, 2, 0], [0, 2, 1], [-1, 1, 0]])
    has_face = torch.tensor([True, True, True, True, True])
    weight, factor2 = preservation_factors(targets, original, has_face, attributes)
    torch.testing.assert_close(weight, torch.tensor([1.0, 0.2, 0.6, 0.6, 0.2]))
    torch.testing.assert_close(factor2, torch.tensor([1.0, 0.2, 0.3, 0.3, 0.2]))
    weight, factor2 = preservation_factors(targets, original, torch.tensor([False] * 5), attributes)
    torch.testing.assert_close(weight, torch.full((5,), 0.2))
    torch.testing.assert_close(factor2, torch.full((5,), 0.2))

    # one attribute (the official gender and race runs): an image without a face keeps weight 1
    weight, _ = preservation_factors(torch.tensor([[1], [0]]), torch.tensor([[0], [0]]), torch.tensor([False, False]), ["gender"])
    torch.testing.assert_close(weight, torch.ones(2))


def test_faceless_original_differs_from_every_target():
    """A frozen image without a face has original label -1: never "unchanged", whatever the target."""
    weight, factor2 = preservation_factors(torch.tensor([[0], [0]]), torch.tensor([[-1], [0]]), torch.tensor([True, True]), ["gender"])
    torch.testing.assert_close(weight, torch.tensor([0.2, 1.0]))
    torch.testing.assert_close(factor2, torch.tensor([0.2, 1.0]))


def test_square_boxes_are_the_official_expanded_crop_boxes():
    """Worked by hand with the official expand_bbox(bbox, expand_coef, target_ratio=1)."""
    boxes = torch.tensor([
        [100.0, 120.0, 200.0, 260.0],  # taller: h = 140 -> side 294 (1.1); x margin (294 - 100) / 2 = 97, y 77
        [10.0, 20.0, 50.0, 40.0],      # wider: w = 40 -> side 60 (0.5); x margin 10, y margin 20
        [NAN, NAN, NAN, NAN],
    ])
    out = square_boxes(boxes[:1], 1.1)
    assert out.tolist() == [[3.0, 43.0, 297.0, 337.0]]
    assert square_boxes(boxes[1:2], 0.5).tolist() == [[0.0, 0.0, 60.0, 60.0]]
    assert square_boxes(boxes, 1.1)[2].isnan().all()
    assert square_boxes(torch.tensor([[0.0, 0.0, 3.0, 2.0]]), 0.0).tolist() == [[0.0, 0.0, 3.0, 2.0]]  # 2 -> 3: margins 0.5 round to even
    # the region the gradient is scaled in: the overlap of the current and the original expanded boxes
    current, original = torch.tensor([[100.0, 100.0, 200.0, 200.0]]), torch.tensor([[130.0, 90.0, 230.0, 190.0]])
    region = intersect_boxes(square_boxes(current, 1.1), square_boxes(original, 1.1))
    assert region.tolist() == [[75.0, 45.0, 255.0, 245.0]]  # squares [45, 45, 255, 255] and [75, 35, 285, 245]


# ----------------------------------------------------------------------------- face realism
class TinyFaceNet(torch.nn.Module):
    def __init__(self, dim=8):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, stride=2)
        self.fc = torch.nn.Linear(4 * 4, dim)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(torch.relu(self.conv(x)), 2).flatten(1))


def test_face_realism_uses_nearest_bank_face_or_own_face(tmp_path):
    torch.manual_seed(0)
    net = TinyFaceNet()
    bank = torch.randn(50, 8)
    path = save_face_bank(tmp_path / "bank.safetensors", bank, source="random")
    loss_fn = FaceRealismLoss(net, load_face_bank(path))
    faces = images(4, 16, seed=3).requires_grad_(True)
    with torch.no_grad():
        embedding = F.normalize(net(faces) + net(faces.flip(-1)), dim=-1)
        unit_bank = F.normalize(bank, dim=-1)
        nearest = unit_bank[torch.stack([torch.stack([e @ b for b in unit_bank]).argmax() for e in embedding])]
    loss = loss_fn(faces)
    torch.testing.assert_close(loss, 1 - (embedding * nearest).sum(-1))
    assert (loss >= 0).all() and (loss < 1).all()  # the nearest of 50 random directions has positive cosine here
    loss.sum().backward()
    assert faces.grad.abs().sum() > 0 and net.conv.weight.grad is None  # frozen embedder

    own = torch.randn(4, 8)
    use_own = torch.tensor([True, False, True, False])
    mixed = loss_fn(faces.detach(), own=own, use_own=use_own)
    own_unit = F.normalize(own, dim=-1)
    torch.testing.assert_close(mixed[0], 1 - embedding[0] @ own_unit[0])
    torch.testing.assert_close(mixed[1], loss[1].detach())


def test_face_realism_rejects_mismatched_bank():
    with pytest.raises(ValueError, match=r"\(M, D\)"):
        FaceRealismLoss(TinyFaceNet(), torch.zeros(0, 8))
    with pytest.raises(ValueError, match="8-d embeddings, the face bank holds 5-d"):
        FaceRealismLoss(TinyFaceNet(), torch.randn(3, 5))(images(1, 16))
