"""The offline end-to-end demo: train a fair adaptor on the toy world and show the bias before and after.

It uses the same trainer, adaptor file and scorer interface as Stable Diffusion. Before/after are
measured on *held-out* occupations with the *evaluation* classifier (trained independently of the one
the adaptor was trained against) and paired seeds: image j of a prompt starts from the same noise in
both runs, so the grids show the same figure before and after.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from fair_core.adaptor import apply_adaptor, read_adaptor
from fair_core.metrics import Predictions, compare_bias, summarise_bias, total_variation
from fair_core.plots import distribution_chart, save_image_grid
from fair_core.prompts import stable_seed
from fair_core.sampling import generate_images
from fair_core.scoring import AttributeScorer
from fair_core.targets import TargetDistribution
from fair_core.train_config import TrainConfig
from fair_core.trainer import FairTrainer


@dataclass
class DemoSettings:
    """Knobs of ``fair demo``; the defaults fit the 5-minute budget on 2 CPU cores."""

    target: str = "colour=uniform"
    iterations: int = 40
    images_per_prompt: int = 16
    eval_images_per_prompt: int = 48
    eval_steps: int = 20
    seed: int = 0
    output_dir: str = "reports/demo"

    def train_config(self) -> TrainConfig:
        return TrainConfig(
            model="toy", classifier="toy", target=self.target, trainable=["text_encoder"], lora_rank=8, lora_alpha=8,
            images_per_prompt=self.images_per_prompt, micro_batch=self.images_per_prompt, steps_min=10, steps_max=12,
            iterations=self.iterations, learning_rate=2e-3, weight_decay=0.0, ema_decay=0.9, ema_warmup=True,
            checkpoint_every=max(1, self.iterations // 3), validate_every=self.iterations, val_images_per_prompt=8,
            val_steps=10, val_max_prompts=2, output_dir=str(Path(self.output_dir) / "training"),
            output_name="toy_fair_adaptor", log_with=None, device="cpu", seed=self.seed,
        )


def _predict(scorer: AttributeScorer, images: torch.Tensor, names: Sequence[str]) -> Predictions:
    scores = scorer(images)
    probabilities = dict(zip((a.name for a in scorer.attributes), scores.probabilities()))
    return Predictions([probabilities[n] for n in names], scores.has_face.cpu().numpy())


def _images_and_predictions(world, prompts: Sequence[str], settings: DemoSettings, names: Sequence[str]):
    images, predictions = {}, {}
    parts = world.parts()
    for prompt in prompts:
        seeds = [stable_seed("demo", settings.seed, prompt, j) for j in range(settings.eval_images_per_prompt)]
        batch = generate_images(parts, [prompt] * len(seeds), seeds, settings.eval_steps, batch_size=len(seeds))
        images[prompt] = batch
        predictions[prompt] = _predict(world.eval_scorer, batch, names)
    return images, predictions


def _mean_shares(predictions: dict[str, Predictions], attribute_index: int, classes: int) -> np.ndarray:
    shares = [np.bincount(p.labels()[p.has_face, attribute_index], minlength=classes) / max(1, p.has_face.sum())
              for p in predictions.values()]
    return np.mean(shares, axis=0)


def run_demo(settings: DemoSettings, log=print) -> dict[str, Any]:
    """Train, evaluate before/after, write the report folder; returns the figures written to ``summary.json``."""
    from fair_core.toyworld import load_toy_world
    from fair_core.toyworld.world import content_change

    started = time.perf_counter()
    out = Path(settings.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    world = load_toy_world()
    target = TargetDistribution.parse(settings.target, world.schema)
    names = [a.name for a in world.schema.values()]
    prompts = [world.prompt(o) for o in world.heldout_occupations]

    log(f"[demo] target:\n{target.describe()}")
    log(f"[demo] sampling {len(prompts)} held-out occupations x {settings.eval_images_per_prompt} images before training")
    before_images, before_full = _images_and_predictions(world, prompts, settings, names)

    log(f"[demo] training a fair adaptor on {len(world.train_occupations)} occupations, {settings.iterations} iterations")
    config = settings.train_config()
    shutil.rmtree(config.output_dir, ignore_errors=True)
    train_prompts = [world.prompt(o) for o in world.train_occupations]
    trainer = FairTrainer(config, world.parts(), world.train_scorer, target, train_prompts, prompts[:2])
    result = trainer.fit()
    adaptor_path = out / f"{config.output_name}.safetensors"
    shutil.copyfile(result.adaptor_path, adaptor_path)

    after_world = load_toy_world()
    apply_adaptor(read_adaptor(adaptor_path, expected_base="toy"), text_encoders={"te": after_world.text_encoder})
    after_images, after_full = _images_and_predictions(after_world, prompts, settings, names)

    target_names = list(target.names)
    pick = [names.index(n) for n in target_names]

    def subset(predictions: dict[str, Predictions]) -> dict[str, Predictions]:
        return {p: Predictions([v.probs[i] for i in pick], v.has_face) for p, v in predictions.items()}

    before = summarise_bias(subset(before_full), target, seed=settings.seed)
    after = summarise_bias(subset(after_full), target, seed=settings.seed)
    change = compare_bias(subset(before_full), subset(after_full), target, seed=settings.seed)

    figures: dict[str, Any] = {"target": target.to_json(), "attributes": {}}
    for index, attribute in enumerate(world.schema.values()):
        shares_before = _mean_shares(before_full, index, len(attribute.classes))
        shares_after = _mean_shares(after_full, index, len(attribute.classes))
        entry = {"classes": list(attribute.classes), "before": shares_before.tolist(), "after": shares_after.tolist(),
                 "moved_tv": float(total_variation(shares_before, shares_after)), "targeted": attribute.name in target_names}
        if attribute.name in target_names:
            entry["target"] = target.marginal(attribute.name).tolist()
            entry["distance_after_tv"] = after.overall.groups[attribute.name].distance.estimate
            per_prompt = {when: [figures_of.prompts[p].groups[attribute.name].frequencies.estimate[0] for p in prompts]
                          for when, figures_of in (("before", before), ("after", after))}
            per_prompt["target"] = [entry["target"][0]] * len(prompts)
            distribution_chart(out / f"chart_{attribute.name}.png", [p.split()[-1] for p in prompts], per_prompt,
                               title=f"share of {attribute.classes[0]} per held-out occupation (evaluation classifier)")
        figures["attributes"][attribute.name] = entry
    moved = torch.cat([content_change(before_images[p], after_images[p]) for p in prompts])
    figures["content_change"] = {"position_px": float(moved[:, 0].mean()), "size_px": float(moved[:, 1].mean()),
                                 "background": float(moved[:, 2].mean())}
    figures["before"], figures["after"], figures["change"] = before.to_json(), after.to_json(), change.to_json()
    figures["training"] = {"iterations": result.state.iteration, "skipped_steps": result.state.skipped_steps,
                           "seconds": result.seconds}
    for prompt in prompts[:3]:
        stem = prompt.split()[-1]
        save_image_grid(before_images[prompt][:16], out / f"grid_{stem}_before.png", columns=8, upscale=4)
        save_image_grid(after_images[prompt][:16], out / f"grid_{stem}_after.png", columns=8, upscale=4)
    figures["wall_seconds"] = time.perf_counter() - started
    (out / "summary.json").write_text(json.dumps(figures, indent=2))
    log(_headline(figures, before, after, change, target_names))
    log(f"[demo] report: {out}/ (summary.json, chart_*.png, grid_*_before/after.png, {adaptor_path.name})")
    return figures


def _headline(figures: dict, before, after, change, target_names: Sequence[str]) -> str:
    lines = ["", "bias on held-out occupations (mean over prompts, 95% bootstrap interval):"]
    for name in target_names:
        b = before.overall.groups[name].bias
        a = after.overall.groups[name].bias
        c = change.overall.groups[name].bias
        lines.append(f"  {name}: {b.estimate:.3f} [{b.low:.3f}, {b.high:.3f}] -> {a.estimate:.3f} [{a.low:.3f}, {a.high:.3f}]"
                     f"   change {c.estimate:+.3f} [{c.low:+.3f}, {c.high:+.3f}]")
    for name, entry in figures["attributes"].items():
        if not entry["targeted"]:
            lines.append(f"  {name} (not targeted): distribution moved by TV {entry['moved_tv']:.3f}")
        else:
            lines.append(f"  {name}: distance to target after (TV) {entry['distance_after_tv']:.3f}")
    content = figures["content_change"]
    lines.append(f"  paired images: position moved {content['position_px']:.2f} px, size {content['size_px']:.2f} px, "
                 f"background {content['background']:.3f} (16 px images)")
    lines.append(f"  wall time {figures['wall_seconds']:.0f} s")
    return "\n".join(lines)
