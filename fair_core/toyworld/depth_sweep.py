"""Do deeper denoisers amplify the training bias? (Hakemi et al. 2025, tested in the toy world.)

Protocol (reference ``method-hakemi2025.md`` §1.4, §2.4, §4.1): denoisers that differ only in depth
(``layers_per_block`` of the same UNet) are trained from scratch on the SAME finite biased training
set, with the same initial text encoder, batches, timesteps and noise. By default the set holds one
occupation (80% red), which makes the conditional UNet an unconditional model of it, as in the paper. Each is sampled on the same
noise seeds, by default without guidance (``guidance_scale`` 1: the model's own conditional
distribution; CFG would push every model to the majority). The evaluation classifier labels colour.

Per depth it reports, for the minority colour of each occupation (its training minority) and pooled:

* ``generated_share`` p̂(B) and ``training_share`` π(B), measured on the actual training set;
* the amplification ratio ``AR = p̂(B) / π(B)`` with a percentile bootstrap CI over generated images
  (AR < 1 with the CI below 1 means the minority was under-produced: bias amplified);
* seed-paired flips against the shallowest model: ``flip_minority_to_majority`` =
  #{seed: shallow B, deep A} / #{shallow B}, the reverse ``flip_majority_to_minority``, and the exact
  McNemar p-value on the discordant pairs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from scipy import stats

from fair_core.metrics import amplification_ratio, bootstrap_ci, class_frequencies
from fair_core.toyworld.checkpoint import FILES, WEIGHTS_DIR, load_classifier
from fair_core.toyworld.models import build_text_encoder, build_unet, generate, learn_vocabulary, make_tokenizer, prompt_words
from fair_core.toyworld.pretrain import predict, train_denoiser
from fair_core.toyworld.world import OCCUPATION_SKEWS, WorldSample, prompt, sample_world

# One occupation with an 80/20 colour split: with a single prompt the conditional UNet is an unconditional
# model of that occupation's images, as in the paper, and no training goes into learning the conditioning.
SWEEP_OCCUPATIONS: tuple[str, ...] = ("lawyer",)
BOOTSTRAP_RESAMPLES = 2000


def minority_colour(occupation: str) -> int:
    """Index of the colour that ``occupation`` draws less often in training."""
    return int(np.argmin(OCCUPATION_SKEWS[occupation][0]))


def _is_minority(colours: np.ndarray, occupations: Sequence[str]) -> np.ndarray:
    return colours == np.array([minority_colour(o) for o in occupations])


def _minority_share_ratio(flags: Sequence[np.ndarray], reference: float) -> dict[str, float]:
    """Generated minority share (mean over occupations of each one's share), its ratio to ``reference``,
    and a 95% percentile bootstrap CI of the ratio (images resampled within each occupation).

    ``flags``: one bool array ``(n,)`` per occupation, True where the image shows the minority colour.
    """
    labels = [f.astype(np.int64) for f in flags]  # class 1 = minority

    def ratio(x: np.ndarray) -> np.ndarray:
        return amplification_ratio(class_frequencies(x, 2), np.array([1 - reference, reference]))[..., 1]

    interval = bootstrap_ci(ratio, labels, num_resamples=BOOTSTRAP_RESAMPLES, seed=0)
    return {"generated_share": float(np.mean([f.mean() for f in flags])), "training_share": reference,
            "amplification_ratio": float(interval.estimate), "ar_ci_low": float(interval.low),
            "ar_ci_high": float(interval.high)}


def _paired_flips(shallow: np.ndarray, deep: np.ndarray) -> dict[str, float]:
    """Flip rates between minority flags of the same seeds under the shallow and a deeper model."""
    to_majority = int(np.sum(shallow & ~deep))
    to_minority = int(np.sum(~shallow & deep))
    discordant = to_majority + to_minority
    return {
        "flip_minority_to_majority": to_majority / max(1, int(shallow.sum())),
        "flip_majority_to_minority": to_minority / max(1, int((~shallow).sum())),
        "mcnemar_p": float(stats.binomtest(to_majority, discordant, 0.5).pvalue) if discordant else 1.0,
    }


def _depth_report(minority: np.ndarray, occupations: list[str], data: WorldSample) -> dict[str, Any]:
    train_minority = _is_minority(data.labels[:, 0].numpy(), data.occupations)
    train_occupations, generated_occupations = np.array(data.occupations), np.array(occupations)
    names = list(dict.fromkeys(occupations))
    flags = {o: minority[generated_occupations == o] for o in names}
    reference = {o: float(train_minority[train_occupations == o].mean()) for o in names}
    absent = [o for o, share in reference.items() if share == 0]
    if absent:
        raise ValueError(f"the training set has no minority-colour images of {absent}; "
                         "raise train_images_per_occupation")
    return {
        # Every occupation has as many training images, so the pooled training share is the mean share.
        "pooled": _minority_share_ratio(list(flags.values()), float(np.mean(list(reference.values())))),
        "per_occupation": {o: _minority_share_ratio([flags[o]], reference[o]) for o in names},
    }


def run_depth_sweep(
    depths: Sequence[int] = (1, 2, 3),
    steps: int = 300,
    images_per_prompt: int = 128,
    seed: int = 0,
    out_dir: str | Path | None = None,
    occupations: Sequence[str] = SWEEP_OCCUPATIONS,
    train_images_per_occupation: int = 1000,
    batch_size: int = 32,
    guidance_scale: float = 1.0,
    num_inference_steps: int = 20,
    classifier_path: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train one denoiser per depth on the same biased data, sample shared seeds, compare minority shares.

    Args:
        depths: ``layers_per_block`` values, shallowest first is the flip reference.
        steps: training steps per depth (same batches for every depth). The default (a few minutes on
            two CPU cores) leaves the models under-trained: they over-produce the minority, whatever
            their depth. Claims about depth need converged models (thousands of steps).
        images_per_prompt: generated images per occupation (seeds ``0..images_per_prompt-1``).
        out_dir: if given, the result is also written to ``out_dir/depth_sweep.json``.
        classifier_path: colour classifier file (default: the shipped evaluation classifier).
        progress: a tqdm bar per depth's training (the longest part: thousands of steps take an hour on 2 cores).

    Returns:
        JSON-ready dict: the settings, and per depth ``pooled`` and ``per_occupation`` shares and
        amplification ratios, ``flips_vs_shallowest`` (absent for the shallowest), ``train_seconds``.
    """
    depths = [int(d) for d in depths]
    if len(depths) < 2 or len(set(depths)) != len(depths) or min(depths) < 1:
        raise ValueError(f"depths must be at least two distinct positive layers_per_block values, got {depths}")
    if steps < 1 or images_per_prompt < 2:
        raise ValueError(f"need steps >= 1 and images_per_prompt >= 2, got {steps} and {images_per_prompt}")
    depths.sort()
    classifier, _ = load_classifier(Path(classifier_path) if classifier_path else WEIGHTS_DIR / FILES["classifier_eval"])
    data = sample_world(list(occupations), train_images_per_occupation, seed=seed)
    tokenizer = make_tokenizer(*learn_vocabulary(prompt_words()))
    generated_occupations = [o for o in occupations for _ in range(images_per_prompt)]
    prompts = [prompt(o) for o in generated_occupations]
    seeds = [i for _ in occupations for i in range(images_per_prompt)]

    results: dict[str, Any] = {}
    reference_minority = None
    for depth in depths:
        torch.manual_seed(seed)
        text_encoder = build_text_encoder(tokenizer)
        unet = build_unet(layers_per_block=depth)
        start = time.perf_counter()
        train_denoiser(data, unet, text_encoder, tokenizer, steps, seed, batch_size=batch_size, progress=progress,
                       description=f"depth {depth}")
        train_seconds = time.perf_counter() - start
        images = generate(unet, text_encoder, tokenizer, prompts, seeds, num_inference_steps, guidance_scale)
        minority = _is_minority(predict(classifier, images)[:, 0].numpy(), generated_occupations)
        report = _depth_report(minority, generated_occupations, data)
        report["train_seconds"] = round(train_seconds, 1)
        report["parameters"] = sum(p.numel() for p in unet.parameters())
        if reference_minority is None:
            reference_minority = minority
        else:
            report["flips_vs_shallowest"] = _paired_flips(reference_minority, minority)
        results[str(depth)] = report

    summary = {
        "settings": {"depths": depths, "steps": steps, "images_per_prompt": images_per_prompt, "seed": seed,
                     "occupations": list(occupations), "train_images_per_occupation": train_images_per_occupation,
                     "batch_size": batch_size, "guidance_scale": guidance_scale,
                     "num_inference_steps": num_inference_steps},
        "depths": results,
    }
    if out_dir is not None:
        path = Path(out_dir)
        path.mkdir(parents=True, exist_ok=True)
        (path / "depth_sweep.json").write_text(json.dumps(summary, indent=2))
    return summary


def format_depth_sweep(summary: dict[str, Any]) -> str:
    """A table of :func:`run_depth_sweep`'s result: per depth, minority share vs training share, the
    amplification ratio with its 95% interval, and same-seed flips against the shallowest model."""
    lines = ["depth  params   minority share (train)  amplification ratio [95% CI]  flips min->maj / maj->min (McNemar p)"]
    for depth, report in summary["depths"].items():
        pooled = report["pooled"]
        flips = report.get("flips_vs_shallowest")
        flip_text = (f"{flips['flip_minority_to_majority']:.3f} / {flips['flip_majority_to_minority']:.3f} "
                     f"(p={flips['mcnemar_p']:.3g})" if flips else "reference")
        lines.append(f"{depth:>5}  {report['parameters']:>7}  {pooled['generated_share']:.3f} ({pooled['training_share']:.3f})"
                     f"           {pooled['amplification_ratio']:.3f} [{pooled['ar_ci_low']:.3f}, {pooled['ar_ci_high']:.3f}]"
                     f"         {flip_text}")
    return "\n".join(lines)
