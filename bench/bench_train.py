"""Benchmark of whole training iterations at Stable Diffusion size: seconds per iteration and peak GPU memory.

Not run in CI. Builds SD1.5 (or SDXL) from the configs shipped in ``fair_core/configs`` with random weights
(nothing is downloaded) and runs ``FairTrainer.train_iteration`` as ``fair train`` does: sampling N images
with the current model (traced), face crops + classifier, optimal-transport targets, the adjusted-DFT gradient
pass in micro-batches, AdamW and EMA. Random weights draw no faces, so a stand-in detector returns the
central half of every image; every image then goes through the differentiable crop and the classifier (a
MobileNetV2 gender + race classifier at 224 px, random weights) as a detected face would. dlib's detection
(CPU, ~28 images/s on 2 cores, bench/bench_faces.py) is not in these figures.

    python bench/bench_train.py                       # examples/sd15_single_24gb.yaml: TE LoRA r50, N 24, micro 2, fp16
    python bench/bench_train.py --trainable text_encoder unet --images-per-prompt 4   # one GPU's share of sd15_8gpu.yaml
    python bench/bench_train.py --base tiny --device cpu --mixed-precision no --images-per-prompt 4 --steps 2  # smoke test

Prints one markdown table row per run for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fair_core.classifiers.metadata import ClassifierSpec
from fair_core.classifiers.model import build_classifier
from fair_core.faces import Face, FaceAttributeScorer, FaceFinder
from fair_core.models import DiffusionParts, random_parts
from fair_core.targets import DEFAULT_SCHEMA, TargetDistribution
from fair_core.train_config import TrainConfig
from fair_core.trainer import FairTrainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tiny models are test fixtures
from tiny_models import tiny_sd15  # noqa: E402

PROMPTS = ["a photo of a doctor", "a photo of a nurse", "a photo of a pilot", "a photo of a chef"]


class CentreDetector:
    """Stand-in face detector: the central half of every image is "the face"."""

    name = "centre"

    def detect(self, image: np.ndarray) -> list[Face]:
        height, width = image.shape[:2]
        return [Face((width / 4, height / 4, 3 * width / 4, 3 * height / 4), 1.0)]


def build_parts(base: str, device: torch.device) -> DiffusionParts:
    """``base``'s architecture with random weights on ``device``; ``tiny``: the test fixtures' SD1.5."""
    if base == "tiny":
        return DiffusionParts(**vars(tiny_sd15()), base="sd15")
    return random_parts(base, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", choices=["sd15", "sdxl", "tiny"], default="sd15")
    parser.add_argument("--trainable", nargs="+", default=["text_encoder"])
    parser.add_argument("--lora-rank", type=int, default=50)
    parser.add_argument("--images-per-prompt", type=int, default=24, help="N, the alignment batch")
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20, help="sampling steps (fixed, for steady figures)")
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="fp16")
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--iterations", type=int, default=3, help="timed iterations, after one warm-up iteration")
    parser.add_argument("--device", default="cuda", help="cpu: a smoke test of the script (minutes per iteration)")
    args = parser.parse_args()

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    parts = build_parts(args.base, device)
    spec = ClassifierSpec((DEFAULT_SCHEMA["gender"], DEFAULT_SCHEMA["race"]), 224)
    classifier = build_classifier(spec, "mobilenet_v2").to(device).eval().requires_grad_(False)
    scorer = FaceAttributeScorer(FaceFinder(CentreDetector()), classifier)
    with tempfile.TemporaryDirectory() as output_dir:
        config = TrainConfig(
            model=args.base, classifier="bench", target="gender=uniform", trainable=args.trainable,
            lora_rank=args.lora_rank, lora_alpha=args.lora_rank, images_per_prompt=args.images_per_prompt,
            micro_batch=args.micro_batch, steps_min=args.steps, steps_max=args.steps, guidance_scale=7.5,
            iterations=args.iterations + 1, mixed_precision=args.mixed_precision,
            gradient_checkpointing=not args.no_checkpointing, output_dir=output_dir, log_with=None, device=device.type,
        )
        trainer = FairTrainer(config, parts, scorer, TargetDistribution.parse("gender=uniform"), PROMPTS)
        trainer.train_iteration(0)  # warm-up: kernel selection, allocator growth
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        seconds = []
        for iteration in range(1, args.iterations + 1):
            start = time.perf_counter()
            record = trainer.train_iteration(iteration)
            if cuda:
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
            if record["skipped"]:
                raise RuntimeError(f"iteration {iteration} was skipped (non-finite gradient)")
    per_iteration = statistics.median(seconds)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    print("| device | base | trainable | N | micro | steps | precision | checkpointing | s/iteration | images/s | peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {name} | {args.base} | {'+'.join(args.trainable)} r{args.lora_rank} | {args.images_per_prompt} | "
          f"{args.micro_batch} | {args.steps} | {args.mixed_precision} | {not args.no_checkpointing} | "
          f"{per_iteration:.2f} ({min(seconds):.2f}-{max(seconds):.2f}) | {args.images_per_prompt / per_iteration:.2f} | {peak:.2f} |")


if __name__ == "__main__":
    main()
