"""Benchmark of the face pipeline: detection + crop + classification throughput (crops per second).

Not run in CI. Images are 512 x 512 variants of scikit-image's astronaut photo (shifted, mirrored,
brightness-scaled; one face each). Classifiers:

* ``dlib-onnx``: the CC0 gender (32 px) + age (64 px) nets as our ONNX files (onnxruntime);
* ``dlib-torch``: their torch twins (what the trainer uses for the alignment loss);
* ``mnv2-onnx`` / ``mnv2-torch``: a MobileNetV2 classifier at 224 px (gender + race + age heads,
  random weights: the size of a classifier trained with ``fair classifier train``).

Detection (dlib HOG) always runs on the CPU; classification on ``--device``.

    PYTHONPATH=. python bench/bench_faces.py --threads 2      # CPU figure for bench/RESULTS.md
    PYTHONPATH=. python bench/bench_faces.py --device cuda    # torch on CUDA, onnxruntime-gpu if installed

Prints one markdown table row per (stage, classifier).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from skimage import data as skdata

from fair_core.classifiers.metadata import ClassifierSpec
from fair_core.classifiers.model import build_classifier
from fair_core.classifiers.onnx_export import export_onnx
from fair_core.classifiers.pretrained import dlib_age_classifier, dlib_gender_classifier
from fair_core.classifiers.runtime import OnnxClassifier
from fair_core.faces import FaceAttributeScorer
from fair_core.images import image_to_tensor
from fair_core.targets import DEFAULT_SCHEMA


def make_images(count: int, seed: int = 0) -> torch.Tensor:
    """``(count, 3, 512, 512)`` in [-1, 1]: the astronaut photo shifted, mirrored and re-lit."""
    rng = np.random.default_rng(seed)
    photo = image_to_tensor(skdata.astronaut())
    images = []
    for _ in range(count):
        image = torch.roll(photo, shifts=(int(rng.integers(-60, 60)), int(rng.integers(-60, 60))), dims=(1, 2))
        image = image.flip(-1) if rng.random() < 0.5 else image
        images.append(((image + 1) * rng.uniform(0.8, 1.1) - 1).clamp(-1, 1))
    return torch.stack(images)


def classifiers(kind: str, device: str, folder: Path, threads: int) -> list:
    """The classifier set ``kind``, on ``device`` (torch) or through onnxruntime."""
    if kind.startswith("dlib"):
        models = [dlib_gender_classifier(), dlib_age_classifier()]
    else:
        spec = ClassifierSpec((DEFAULT_SCHEMA["gender"], DEFAULT_SCHEMA["race"], DEFAULT_SCHEMA["age"]), 224)
        models = [build_classifier(spec, "mobilenet_v2").eval()]
    if kind.endswith("torch"):
        return [m.to(device) for m in models]
    paths = []
    for index, model in enumerate(models):
        export_onnx(model, folder / f"{kind}-{index}.onnx")
        paths.append(folder / f"{kind}-{index}.onnx")
    return [OnnxClassifier(p, device="cpu" if device == "cpu" else "auto", threads=threads) for p in paths]


def rate(function, count: int, repeats: int) -> float:
    """Items per second of ``function()`` handling ``count`` items (best of ``repeats`` after a warm-up)."""
    function()
    best = float("inf")
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        function()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return count / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch and onnxruntime CPU threads")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--classifiers", nargs="+", default=["dlib-onnx", "dlib-torch", "mnv2-onnx", "mnv2-torch"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    images = make_images(args.images).to(args.device)
    print(f"device: {torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU'}, {args.threads} threads, "
          f"{args.images} images 512x512, torch {torch.__version__}")
    print("| stage | classifiers | provider | rate |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder, torch.no_grad():
        for kind in args.classifiers:
            models = classifiers(kind, args.device, Path(folder), args.threads)
            scorer = FaceAttributeScorer(None, models)
            detections = scorer.detect(images)
            faces = sum(d.face is not None for d in detections)
            provider = getattr(models[0], "provider", f"torch {args.device}")
            if kind == args.classifiers[0]:
                detect_rate = rate(lambda: scorer.detect(images), args.images, args.repeats)
                print(f"| detection + landmarks (dlib HOG, CPU) | - | - | {detect_rate:.1f} images/s ({faces}/{args.images} faces) |")
            classify_rate = rate(lambda: scorer.score(images, detections), faces, args.repeats)
            total_rate = rate(lambda: scorer(images), faces, args.repeats)
            print(f"| crop + classify | {kind} | {provider} | {classify_rate:.1f} crops/s |")
            print(f"| detect + crop + classify | {kind} | {provider} | {total_rate:.1f} crops/s |")


if __name__ == "__main__":
    main()
