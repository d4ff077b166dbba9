"""Preservation losses of Shen et al. (2024, §4): keep what the fairness loss should not change.

Image semantics (:class:`ImagePreservationLoss`): for each generated image ``x_i`` and the frozen
model's image ``o_i`` from the same noise,

    l_i = w_i * sum_e (1 - cos(E_e(x_i), E_e(o_i)))      over the encoders e (CLIP, DINOv2)

where ``w_i`` (:func:`preservation_factors`) is 1 when the alignment target keeps the original
image's predicted classes and smaller where it asks for a change, and the gradient reaching the
pixels inside the face box is multiplied by ``factor2_i`` (:func:`scale_gradient_in_boxes`) so the face
may change while background and clothing are held in place. The encoders are local transformers
model folders (``CLIPVisionModelWithProjection``, ``Dinov2Model``); nothing is downloaded.

Face realism (:class:`FaceRealismLoss`): ``1 - cos(g(face_i), t_i)`` with a user-supplied face
embedding network ``g`` (any torch module ``(N, 3, S, S) in [-1, 1] -> (N, D)``), where ``t_i`` is
the original face's own embedding when nothing should change, else the nearest real face in a bank
of embeddings (top-1 by cosine, chosen without gradient).

Both return one loss per image ``(N,)``; the trainer multiplies by its weights (lambda_img = 8,
lambda_face = 1 or 0.1 in the paper) and averages.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Paper values (Shen et al. §4.1): per-image weight and in-box gradient factor when an attribute's
# target differs from the original image's class; the minimum over differing attributes applies.
DEFAULT_FACTOR1 = {"gender": 0.2, "race": 0.6, "age": 0.6}
DEFAULT_FACTOR2 = {"gender": 0.2, "race": 0.3, "age": 0.3}
FALLBACK_FACTOR = 0.2


# --------------------------------------------------------------------------- image semantics
class ImageEncoder(nn.Module):
    """A frozen transformers image encoder: images ``(N, 3, H, W)`` in [-1, 1] -> unit embeddings ``(N, D)``.

    Images are resized (bilinear, antialiased, no crop) to the model's ``image_size`` and normalised
    with its mean/std. ``kind`` picks the output: ``clip`` -> projected ``image_embeds``, ``dino`` ->
    ``pooler_output`` (the final-norm CLS token).
    """

    def __init__(self, model: nn.Module, kind: str, mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        super().__init__()
        if kind not in ("clip", "dino"):
            raise ValueError(f"encoder kind must be 'clip' or 'dino', got {kind!r}")
        default_mean, default_std = (CLIP_MEAN, CLIP_STD) if kind == "clip" else (IMAGENET_MEAN, IMAGENET_STD)
        self.model = model.eval().requires_grad_(False)
        self.kind = kind
        self.image_size = int(model.config.image_size)
        self.register_buffer("mean", torch.tensor(mean or default_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std or default_std).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_pretrained(cls, path: str | Path, kind: str, dtype: torch.dtype | None = None) -> "ImageEncoder":
        """Load a local model folder (``config.json`` + weights; ``preprocessor_config.json`` optional)."""
        from transformers import CLIPVisionModelWithProjection, Dinov2Model

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: not a local transformers model folder (no config.json)")
        model_class = CLIPVisionModelWithProjection if kind == "clip" else Dinov2Model
        options = {"dtype": dtype} if dtype is not None else {}
        model = model_class.from_pretrained(str(path), local_files_only=True, **options)
        mean, std = None, None
        if (path / "preprocessor_config.json").is_file():
            processor = json.loads((path / "preprocessor_config.json").read_text())
            mean, std = processor.get("image_mean"), processor.get("image_std")
        return cls(model, kind, mean, std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        resized = F.interpolate(images.float(), size=(self.image_size, self.image_size), mode="bilinear", antialias=True, align_corners=False)
        pixels = (((resized + 1) * 0.5 - self.mean) / self.std).to(dtype)
        output = self.model(pixel_values=pixels)
        embedding = output.image_embeds if self.kind == "clip" else output.pooler_output
        return F.normalize(embedding.float(), dim=-1)


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, images: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(scale)
        return images.view_as(images)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (scale,) = ctx.saved_tensors
        return grad * scale, None


def box_scale_map(shape: torch.Size, boxes: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``(N, 1, H, W)``: ``factor_i`` on pixels ``x0 <= x < x1, y0 <= y < y1`` of ``boxes[i]``, 1 elsewhere.

    Rows of ``boxes`` with NaN (no face) are all ones.
    """
    n, _, height, width = shape
    xs = torch.arange(width, device=boxes.device, dtype=torch.float32).view(1, 1, width)
    ys = torch.arange(height, device=boxes.device, dtype=torch.float32).view(1, height, 1)
    b = boxes.float().view(n, 4, 1, 1)
    inside = (xs >= b[:, 0]) & (xs < b[:, 2]) & (ys >= b[:, 1]) & (ys < b[:, 3])
    return torch.where(inside, factor.float().view(n, 1, 1).to(boxes.device), torch.ones((), device=boxes.device))[:, None]


def scale_gradient_in_boxes(images: torch.Tensor, boxes: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    """Identity on ``images`` ``(N, 3, H, W)``; the gradient flowing back through it is multiplied by
    ``factor_i`` inside ``boxes[i]`` (pixels, end exclusive; NaN = no box). Only this path is scaled:
    other losses on ``images`` keep their full gradient."""
    factor = torch.as_tensor(factor, dtype=torch.float32, device=images.device).expand(images.shape[0])
    scale = box_scale_map(images.shape, boxes.to(images.device), factor).to(images.dtype)
    return _ScaleGradient.apply(images, scale)


def square_boxes(boxes: torch.Tensor, expand: float) -> torch.Tensor:
    """The official code's ``expand_bbox(box, expand, target_ratio=1)`` on boxes ``(N, 4)`` xyxy (NaN stays NaN).

    The longer side grows by ``expand`` times itself, the shorter to the same length, both about the box
    centre; each edge is rounded to a whole pixel (half to even). The result may reach outside the image.
    """
    width, height = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    side = (1.0 + expand) * torch.maximum(width, height)
    grow = torch.stack([side - width, side - height], dim=1) * 0.5  # (N, 2): x and y margins
    return torch.round(torch.cat([boxes[:, :2] - grow, boxes[:, 2:] + grow], dim=1))


def intersect_boxes(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise intersection of boxes ``(N, 4)`` xyxy; NaN where either is NaN or they do not overlap."""
    out = torch.cat([torch.maximum(a[:, :2], b[:, :2]), torch.minimum(a[:, 2:], b[:, 2:])], dim=1)
    empty = (out[:, 2] <= out[:, 0]) | (out[:, 3] <= out[:, 1]) | out.isnan().any(dim=1)
    return torch.where(empty[:, None], torch.full_like(out, float("nan")), out)


def preservation_factors(
    targets: torch.Tensor,
    original: torch.Tensor,
    has_face: torch.Tensor,
    attributes: Sequence[str],
    factor1: Mapping[str, float] = DEFAULT_FACTOR1,
    factor2: Mapping[str, float] = DEFAULT_FACTOR2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image weight ``w`` and in-face gradient factor, both ``(N,)``.

    Args:
        targets: alignment targets ``(N, A)`` (-1 = none), in ``attributes`` order.
        original: the frozen model's image's predicted classes ``(N, A)``.
        has_face: ``(N,)`` whether the current image has a face.

    An attribute "differs" where its target is -1 or not the original class (-1 where the frozen image
    has no face). ``w`` and ``factor2`` are 1 where nothing differs, else the minimum of the differing
    attributes' factors. Images without a face get weight 1 for a single attribute (the official gender
    and race runs) and the minimum factor over all attributes for several (its joint runs).
    """
    f1 = torch.tensor([factor1.get(n, FALLBACK_FACTOR) for n in attributes], dtype=torch.float32, device=targets.device)
    f2 = torch.tensor([factor2.get(n, FALLBACK_FACTOR) for n in attributes], dtype=torch.float32, device=targets.device)
    differs = (targets < 0) | (targets != original)
    weight = torch.where(differs, f1, torch.ones_like(f1)).amin(dim=1)
    scale = torch.where(differs, f2, torch.ones_like(f2)).amin(dim=1)
    no_face = ~has_face.to(targets.device)
    no_face_weight = f1.new_ones(()) if len(attributes) == 1 else f1.min()
    return torch.where(no_face, no_face_weight, weight), torch.where(no_face, f2.min(), scale)


class PreservationLoss(nn.Module):
    """``(images, reference, weights, face_boxes, factor2) -> (N,)``: ``w_i * d(x_i, o_i)`` between each
    current image and the frozen model's image from the same noise.

    Subclasses define the comparison: :meth:`embed` (the reference side, computed once per batch) and
    :meth:`distance`. This class owns what every preservation loss shares: embedding a raw reference,
    scaling the gradient inside the face boxes, and the per-image weights.
    """

    def embed(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Reference representation of images ``(N, 3, H, W)``: a list of ``(N, D)`` tensors, no gradient."""
        raise NotImplementedError

    def distance(self, images: torch.Tensor, targets: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-image distance ``(N,)`` of current images (with gradient) to :meth:`embed` output."""
        raise NotImplementedError

    def forward(
        self,
        images: torch.Tensor,
        reference: torch.Tensor | Sequence[torch.Tensor],
        weights: torch.Tensor | None = None,
        face_boxes: torch.Tensor | None = None,
        factor2: torch.Tensor | float = 1.0,
    ) -> torch.Tensor:
        """Per-image loss ``w_i * d(x_i, o_i)``.

        Args:
            images: current images ``(N, 3, H, W)`` in [-1, 1] (with gradient).
            reference: the frozen model's images (same shape) or their :meth:`embed` output.
            weights: ``w`` ``(N,)``; default 1.
            face_boxes: ``(N, 4)`` pixels (NaN = none) where the gradient is scaled by ``factor2``.
            factor2: scalar or ``(N,)``.
        """
        targets = self.embed(reference) if isinstance(reference, torch.Tensor) else list(reference)
        if face_boxes is not None:
            images = scale_gradient_in_boxes(images, face_boxes, factor2)
        loss = self.distance(images, targets)
        return loss if weights is None else loss * weights.to(loss)


class ImagePreservationLoss(PreservationLoss):
    """Image semantics: ``d = sum_e (1 - cos(E_e(x), E_e(o)))`` over frozen encoders.

    Args:
        encoders: frozen :class:`ImageEncoder` s (the paper: CLIP ViT-H/14 and DINOv2 ViT-B/14).
    """

    def __init__(self, encoders: Sequence[ImageEncoder]):
        super().__init__()
        if not encoders:
            raise ValueError("ImagePreservationLoss needs at least one image encoder")
        self.encoders = nn.ModuleList(encoders)

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Reference embeddings, one ``(N, D_e)`` per encoder (compute once per batch of originals)."""
        return [encoder(images) for encoder in self.encoders]

    def distance(self, images: torch.Tensor, targets: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(targets) != len(self.encoders):
            raise ValueError(f"{len(targets)} reference embeddings for {len(self.encoders)} encoders")
        return sum(1.0 - (encoder(images) * target.to(images.device)).sum(dim=-1) for encoder, target in zip(self.encoders, targets))


def load_preservation_loss(entries: Sequence[str], device: str | torch.device = "cpu") -> PreservationLoss | None:
    """Build the loss named by ``TrainConfig.preservation`` entries ``clip:DIR`` / ``dino:DIR``; None if empty
    (``toy`` is the toy world's, see :func:`fair_core.resolve.resolve_preservation`)."""
    if not entries:
        return None
    encoders = []
    for entry in entries:
        kind, _, folder = entry.partition(":")
        encoders.append(ImageEncoder.from_pretrained(folder, kind))
    return ImagePreservationLoss(encoders).to(device)


# --------------------------------------------------------------------------- face realism
def flip_averaged_embedding(embedder: nn.Module, faces: torch.Tensor) -> torch.Tensor:
    """The paper's face embedding: ``normalize(g(face) + g(mirrored face))``, ``(N, 3, S, S)`` -> ``(N, D)`` float32."""
    return F.normalize((embedder(faces) + embedder(faces.flip(-1))).float(), dim=-1)


class FaceRealismLoss(nn.Module):
    """``1 - cos(g(face), target)`` per face, target = own original embedding or nearest bank face.

    Args:
        embedder: face-embedding network ``(N, 3, S, S)`` in [-1, 1] -> ``(N, D)``; frozen here.
            It receives the aligned crops the caller makes (e.g. ``fair_core.faces.crop_faces`` with
            the alignment the network was trained on).
        bank: ``(M, D)`` embeddings of real faces (:func:`load_face_bank`), normalised here.
    """

    def __init__(self, embedder: nn.Module, bank: torch.Tensor):
        super().__init__()
        if bank.dim() != 2 or bank.shape[0] == 0:
            raise ValueError(f"face bank must be a non-empty (M, D) tensor, got {tuple(bank.shape)}")
        self.embedder = embedder.eval().requires_grad_(False)
        self.register_buffer("bank", F.normalize(bank.float(), dim=-1), persistent=False)

    def embed(self, faces: torch.Tensor) -> torch.Tensor:
        """Unit embeddings ``(N, D)`` of ``g(face) + g(mirrored face)`` (:func:`flip_averaged_embedding`)."""
        embedding = flip_averaged_embedding(self.embedder, faces)
        if embedding.shape[-1] != self.bank.shape[1]:
            raise ValueError(f"embedder gives {embedding.shape[-1]}-d embeddings, the face bank holds {self.bank.shape[1]}-d")
        return embedding

    @torch.no_grad()
    def nearest(self, embeddings: torch.Tensor) -> torch.Tensor:
        """The bank embedding with the highest cosine to each row, ``(N, D)``."""
        return self.bank[(embeddings.detach() @ self.bank.t()).argmax(dim=1)]

    def forward(self, faces: torch.Tensor, own: torch.Tensor | None = None, use_own: torch.Tensor | None = None) -> torch.Tensor:
        """Per-face loss ``(N,)``.

        Args:
            faces: aligned face crops ``(N, 3, S, S)`` in [-1, 1] (with gradient).
            own: the original faces' :meth:`embed` ``(N, D)``; used where ``use_own`` ``(N,)`` is True.
        """
        embeddings = self.embed(faces)
        targets = self.nearest(embeddings)
        if own is not None and use_own is not None:
            targets = torch.where(use_own.to(targets.device)[:, None], F.normalize(own.float(), dim=-1).to(targets.device), targets)
        return 1.0 - (embeddings * targets).sum(dim=-1)


def save_face_bank(path: str | Path, embeddings: torch.Tensor, source: str = "") -> Path:
    """Write a face bank ``(M, D)`` as ``.safetensors`` (tensor ``embeddings``, metadata ``fair.face_bank``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"embeddings": embeddings.detach().float().cpu().contiguous()}, str(path), metadata={"fair.face_bank": json.dumps({"source": source})})
    return path


def load_face_bank(path: str | Path) -> torch.Tensor:
    """Read a face bank written by :func:`save_face_bank`."""
    tensors = load_file(str(path))
    if "embeddings" not in tensors or tensors["embeddings"].dim() != 2:
        raise ValueError(f"{path}: a face bank holds one (M, D) tensor named 'embeddings'")
    return tensors["embeddings"]
