"""Pretrain the toy world's models from scratch (the shipped weights come from this file).

    python -m fair_core.toyworld.pretrain --out fair_core/toyworld/weights --seed 0

trains, on world images drawn by :func:`~fair_core.toyworld.world.sample_world`:

1. the text encoder and pixel-space UNet together, with the epsilon-prediction loss under SD's
   scaled-linear schedule, 10% of captions replaced by ``""`` (so classifier-free guidance works) and an
   EMA of the weights (the EMA is what is saved). A quarter of the captions name the colour and,
   independently, a quarter the shape. Stage 1 (``DENOISER_STEPS``) names the image's own classes;
   stage 2 (``COMPOSE_STEPS``, lower learning rate) shows, for a caption that names an attribute, an
   image in which that attribute is balanced and the rest follows the occupation ("a photo of a blue
   firefighter": blue, and square as firefighters mostly are), so the words compose with the
   occupation instead of standing for the occupations that are mostly blue;
2. two attribute classifiers from different seeds and different images (one for training fair
   adaptors, one for evaluating them), with noise, blur and colour augmentation so they also read
   generated images;

then samples every held-out occupation with DPM-Solver++ 2M (20 steps, CFG 7.5) and reports the bias.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel, compute_snr
from tqdm import tqdm
from transformers import CLIPTextModel, CLIPTokenizer

from fair_core.metrics import class_frequencies, shen_bias, total_variation
from fair_core.toyworld.checkpoint import (
    FILES,
    ToyWorld,
    load_text_encoder,
    load_toy_world,
    load_unet,
    save_classifier,
    save_text_encoder,
    save_unet,
)
from fair_core.toyworld.models import (
    ToyClassifier,
    build_text_encoder,
    build_unet,
    encode_prompts,
    learn_vocabulary,
    make_tokenizer,
    prompt_words,
    training_scheduler,
)
from fair_core.toyworld.world import (
    HELDOUT_OCCUPATIONS,
    OCCUPATIONS,
    TOY_SCHEMA,
    WorldSample,
    occupation_distribution,
    prompt,
    sample_world,
)

CAPTION_DROPOUT = 0.1
ATTRIBUTE_WORD_RATE = 0.25  # share of captions that name the colour (and, independently, the shape)
NAMED_SUBSETS: tuple[tuple[str, ...], ...] = (("colour",), ("shape",), ("colour", "shape"))
MIN_SNR_GAMMA = 5.0
DENOISER_STEPS = 3000
COMPOSE_STEPS = 800
COMPOSE_LEARNING_RATE = 5e-4
COMPOSE_SEED_OFFSET = 100
CLASSIFIER_STEPS = 1500
TRAIN_IMAGES_PER_OCCUPATION = 1000


def min_snr_weights(noise_scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float = MIN_SNR_GAMMA) -> torch.Tensor:
    """Per-sample loss weights ``min(SNR_t, gamma) / SNR_t`` for epsilon prediction (Hang et al. 2023, Min-SNR).

    They damp the many nearly-noise-free timesteps, which speeds up learning of the figures' layout.
    """
    snr = compute_snr(noise_scheduler, timesteps)
    return snr.clamp(max=gamma) / snr


def named_world(occupations: Sequence[str], n: int, seed: int) -> dict[tuple[str, ...], WorldSample]:
    """For each set of attributes a caption can name (:data:`NAMED_SUBSETS`), ``n`` images per occupation
    in which those attributes are balanced (:func:`sample_world` ``balanced``), each set from its own seed."""
    return {names: sample_world(occupations, n, seed + 1 + k, balanced=names) for k, names in enumerate(NAMED_SUBSETS)}


def draw_batch(
    data: WorldSample, batch_size: int, generator: torch.Generator,
    named_data: Mapping[tuple[str, ...], WorldSample] | None = None,
) -> tuple[torch.Tensor, list[str]]:
    """One pretraining batch: images ``(batch_size, 3, H, W)`` and their captions.

    A caption is ``""`` with probability ``CAPTION_DROPOUT``, else the occupation prompt naming each
    attribute's class with probability ``ATTRIBUTE_WORD_RATE`` (independently). With ``named_data``, an
    image whose caption names attributes comes from the set where those are balanced, at the same index.
    """
    class_names = [attribute.classes for attribute in TOY_SCHEMA.values()]
    index = torch.randint(len(data.images), (batch_size,), generator=generator)
    dropped = torch.rand(batch_size, generator=generator) < CAPTION_DROPOUT
    named = torch.rand(batch_size, len(class_names), generator=generator) < ATTRIBUTE_WORD_RATE
    captions, images = [], []
    for k, i in enumerate(index.tolist()):
        names_on = tuple(name for name, on in zip(TOY_SCHEMA, named[k].tolist()) if on)
        source = named_data[names_on] if named_data is not None and names_on else data
        words = [names[c] for names, c, on in zip(class_names, source.labels[i].tolist(), named[k].tolist()) if on]
        captions.append("" if dropped[k] else prompt(source.occupations[i], words))
        images.append(source.images[i])
    return torch.stack(images), captions


def train_denoiser(
    data: WorldSample,
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    steps: int,
    seed: int,
    batch_size: int = 32,
    learning_rate: float = 2e-3,
    ema_decay: float = 0.998,
    progress: bool = True,
    named_data: Mapping[tuple[str, ...], WorldSample] | None = None,
    description: str = "denoiser",
) -> None:
    """Train ``unet`` and ``text_encoder`` together, in place, on ``data``; they end holding the EMA weights.

    Batches, captions dropped to ``""`` (``CAPTION_DROPOUT``) or naming the image's classes
    (``ATTRIBUTE_WORD_RATE`` per attribute), timesteps and noise all come from one
    generator seeded with ``seed``, so two calls with the same data and seed see identical batches
    whatever the UNet's depth. With ``named_data`` (from :func:`named_world`, the same occupations and
    size as ``data``), an image whose caption names attributes is taken from the set where those are
    balanced, at the same index (so the same occupation). ``progress`` shows a tqdm bar labelled ``description``.
    """
    generator = torch.Generator().manual_seed(int(seed))
    noise_scheduler = training_scheduler()
    modules = (unet, text_encoder)
    parameters = [p for m in modules for p in m.parameters()]
    for module in modules:
        module.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.01)
    lr_schedule = get_cosine_schedule_with_warmup(optimizer, min(100, steps // 10 + 1), steps)
    ema = EMAModel(parameters, decay=ema_decay, use_ema_warmup=True, power=3 / 4)
    for _ in tqdm(range(steps), desc=description, disable=not progress):
        images, captions = draw_batch(data, batch_size, generator, named_data)
        noise = torch.randn(images.shape, generator=generator)
        timesteps = torch.randint(noise_scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
        noisy = noise_scheduler.add_noise(images, noise, timesteps)
        context = encode_prompts(text_encoder, tokenizer, captions)
        prediction = unet(noisy, timesteps, encoder_hidden_states=context).sample
        loss = (min_snr_weights(noise_scheduler, timesteps) * (prediction - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        lr_schedule.step()
        ema.step(parameters)
    ema.copy_to(parameters)
    for module in modules:
        module.eval().requires_grad_(False)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random blur, colour/contrast shift and Gaussian noise, per image; ``(N, 3, H, W)`` in ``[-1, 1]``.

    Makes the classifiers read imperfect generated figures (soft edges, off colours, speckle).
    """
    n = images.shape[0]
    box = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    blur = torch.rand(n, 1, 1, 1, generator=generator)
    blurred = (1 - blur) * images + blur * box
    contrast = 0.7 + 0.5 * torch.rand(n, 1, 1, 1, generator=generator)
    shift = 0.15 * (2 * torch.rand(n, 3, 1, 1, generator=generator) - 1)
    noise_level = 0.15 * torch.rand(n, 1, 1, 1, generator=generator)
    noisy = blurred * contrast + shift + noise_level * torch.randn(images.shape, generator=generator)
    return noisy.clamp(-1, 1)


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over attributes of the cross-entropy of each attribute's slice of ``logits`` ``(N, 5)``."""
    sizes = [len(a.classes) for a in TOY_SCHEMA.values()]
    return sum(F.cross_entropy(part, labels[:, i]) for i, part in enumerate(torch.split(logits, sizes, dim=1)))


def predict(classifier: torch.nn.Module, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Argmax class per attribute, int64 ``(N, 2)``."""
    sizes = [len(a.classes) for a in TOY_SCHEMA.values()]
    with torch.no_grad():
        logits = torch.cat([classifier(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])
    return torch.stack([part.argmax(dim=1) for part in torch.split(logits, sizes, dim=1)], dim=1)


def train_classifier(seed: int, steps: int = CLASSIFIER_STEPS, batch_size: int = 64, learning_rate: float = 2e-3,
                     progress: bool = True) -> ToyClassifier:
    """A :class:`ToyClassifier` trained on augmented world images of every occupation, all drawn from ``seed``."""
    torch.manual_seed(seed)
    classifier = ToyClassifier()
    data = sample_world(OCCUPATIONS, 400, seed=seed)
    generator = torch.Generator().manual_seed(int(seed))
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=learning_rate, weight_decay=0.01)
    lr_schedule = get_cosine_schedule_with_warmup(optimizer, 50, steps)
    classifier.train()
    for _ in tqdm(range(steps), desc="classifier", disable=not progress):
        index = torch.randint(len(data.images), (batch_size,), generator=generator)
        loss = classification_loss(classifier(augment(data.images[index], generator)), data.labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr_schedule.step()
    classifier.eval().requires_grad_(False)
    return classifier


def evaluate_world(world: ToyWorld, images_per_prompt: int = 64, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Measure a toy world: classifier accuracy on clean world images, and per occupation the
    colour/shape shares of generated images (DPM-Solver++ 2M, 20 steps, CFG 7.5) under both classifiers.

    Returns a JSON-ready dict: ``classifier_accuracy`` (per classifier and attribute, on 100 fresh images
    per occupation), ``occupations`` (training share, generated share and Shen bias per attribute, and the
    train/eval classifier agreement; for held-out occupations also ``named_colour``: with the colour word
    in the prompt, the share of that colour and how far the shape distribution moved, TV),
    ``mean_heldout_colour_bias`` (the eval classifier's), and ``mean_named_colour_share`` /
    ``mean_named_colour_shape_tv`` over held-out occupations and both colours.
    """
    clean = sample_world(OCCUPATIONS, 100, seed=seed + 10_000)
    scorers = {"train": world.train_scorer.classifier, "eval": world.eval_scorer.classifier}
    accuracy = {
        name: dict(zip(TOY_SCHEMA, (predict(c, clean.images) == clean.labels).float().mean(0).tolist()))
        for name, c in scorers.items()
    }
    report: dict[str, Any] = {"classifier_accuracy": accuracy, "occupations": {}}
    seeds = [seed + i for i in range(images_per_prompt)]
    shape_classes = len(TOY_SCHEMA["shape"].classes)
    colour_column, shape_column = list(TOY_SCHEMA).index("colour"), list(TOY_SCHEMA).index("shape")
    for occupation in tqdm(OCCUPATIONS, desc="evaluate", disable=not progress):
        images = world.generate([world.prompt(occupation)] * images_per_prompt, seeds)
        labels = {name: predict(c, images).numpy() for name, c in scorers.items()}
        target = occupation_distribution(occupation)
        entry: dict[str, Any] = {"heldout": occupation in HELDOUT_OCCUPATIONS,
                                 "classifier_agreement": (labels["train"] == labels["eval"]).mean(0).tolist()}
        for index, attribute in enumerate(TOY_SCHEMA.values()):
            shares = class_frequencies(labels["eval"][:, index], len(attribute.classes))
            entry[attribute.name] = {
                "training_share": target.marginal(attribute.name).round(3).tolist(),
                "generated_share": shares.round(3).tolist(),
                "training_bias": float(shen_bias(target.marginal(attribute.name))),
                "generated_bias": float(shen_bias(shares)),
            }
        if entry["heldout"]:
            unnamed_shapes = class_frequencies(labels["eval"][:, shape_column], shape_classes)
            entry["named_colour"] = {}
            for index, colour in enumerate(TOY_SCHEMA["colour"].classes):
                named = predict(scorers["eval"], world.generate([prompt(occupation, [colour])] * images_per_prompt, seeds)).numpy()
                entry["named_colour"][colour] = {
                    "colour_share": float((named[:, colour_column] == index).mean()),
                    "shape_tv_to_unnamed": float(total_variation(class_frequencies(named[:, shape_column], shape_classes), unnamed_shapes)),
                }
        report["occupations"][occupation] = entry
    heldout = [report["occupations"][o] for o in HELDOUT_OCCUPATIONS]
    report["mean_heldout_colour_bias"] = float(np.mean([e["colour"]["generated_bias"] for e in heldout]))
    named = [v for e in heldout for v in e["named_colour"].values()]
    report["mean_named_colour_share"] = float(np.mean([v["colour_share"] for v in named]))
    report["mean_named_colour_shape_tv"] = float(np.mean([v["shape_tv_to_unnamed"] for v in named]))
    return report


def pretrain(out_dir: str | Path, seed: int = 0, denoiser_steps: int = DENOISER_STEPS,
             compose_steps: int = COMPOSE_STEPS, classifier_steps: int = CLASSIFIER_STEPS,
             init: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Train the toy world, write its four weight files to ``out_dir`` and ``out_dir/pretrain_report.json``
    (timings and :func:`evaluate_world`), and return the report.

    Two denoiser stages: (1) ``denoiser_steps`` from scratch, captions naming the image's own classes (so
    the words come mostly with the occupations that are mostly that colour or shape); (2) ``compose_steps``
    more at a lower learning rate where named attributes are balanced (:func:`named_world`), which
    teaches the words to compose with every occupation. Trained from scratch with stage 2's captions
    alone, the model never learnt the shape from the occupation (it drew the shape from the noise),
    hence the two stages.
    ``init``: a weights folder holding stage 1's text encoder and UNet; stage 1 is then skipped.
    """
    out_dir = Path(out_dir)
    timings = {}
    start = time.perf_counter()
    torch.manual_seed(seed)
    vocab, merges = learn_vocabulary(prompt_words())
    if init is None:
        tokenizer = make_tokenizer(vocab, merges)
        text_encoder, unet = build_text_encoder(tokenizer), build_unet()
        data = sample_world(OCCUPATIONS, TRAIN_IMAGES_PER_OCCUPATION, seed=seed)
        train_denoiser(data, unet, text_encoder, tokenizer, denoiser_steps, seed, progress=progress)
        timings["denoiser_seconds"] = time.perf_counter() - start
    else:
        text_encoder, tokenizer = load_text_encoder(Path(init) / FILES["text_encoder"])
        unet = load_unet(Path(init) / FILES["unet"])
    start = time.perf_counter()
    compose_seed = seed + COMPOSE_SEED_OFFSET
    data = sample_world(OCCUPATIONS, TRAIN_IMAGES_PER_OCCUPATION, seed=compose_seed)
    train_denoiser(data, unet, text_encoder, tokenizer, compose_steps, compose_seed, learning_rate=COMPOSE_LEARNING_RATE,
                   progress=progress, named_data=named_world(OCCUPATIONS, TRAIN_IMAGES_PER_OCCUPATION, compose_seed))
    timings["compose_seconds"] = time.perf_counter() - start
    save_text_encoder(out_dir / FILES["text_encoder"], text_encoder, tokenizer, merges)
    save_unet(out_dir / FILES["unet"], unet)
    for offset, name in enumerate(("classifier_train", "classifier_eval"), start=1):
        start = time.perf_counter()
        classifier = train_classifier(seed + offset, classifier_steps, progress=progress)
        timings[f"{name}_seconds"] = time.perf_counter() - start
        save_classifier(out_dir / FILES[name], classifier, {"fair.seed": seed + offset})
    start = time.perf_counter()
    report = evaluate_world(load_toy_world(out_dir), seed=seed, progress=progress)
    timings["evaluate_seconds"] = time.perf_counter() - start
    report = {"seed": seed, "denoiser_steps": denoiser_steps, "compose_steps": compose_steps,
              "init": None if init is None else str(init), "classifier_steps": classifier_steps,
              "threads": torch.get_num_threads(), "timings": {k: round(v, 1) for k, v in timings.items()}, **report}
    (out_dir / "pretrain_report.json").write_text(json.dumps(report, indent=2))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Pretrain the toy world's text-to-image model and classifiers.")
    parser.add_argument("--out", required=True, help="directory for the weight files and pretrain_report.json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--denoiser-steps", type=int, default=DENOISER_STEPS)
    parser.add_argument("--compose-steps", type=int, default=COMPOSE_STEPS)
    parser.add_argument("--classifier-steps", type=int, default=CLASSIFIER_STEPS)
    parser.add_argument("--init", default=None, help="weights folder with stage 1's text encoder and UNet (skips stage 1)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    report = pretrain(args.out, args.seed, args.denoiser_steps, args.compose_steps, args.classifier_steps, args.init)
    summary = ("timings", "classifier_accuracy", "mean_heldout_colour_bias", "mean_named_colour_share", "mean_named_colour_shape_tv")
    print(json.dumps({k: report[k] for k in summary}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
