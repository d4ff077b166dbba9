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

from fair_core.adaptor import apply_adaptor_to_parts, read_adaptor
from fair_core.resolve import resolve_preservation
from fair_core.metrics import class_frequencies, total_variation
from fair_core.plots import distribution_chart, save_image_grid
from fair_core.evaluation import EvalSettings, generate_and_score, summarise_variants
from fair_core.scoring import AttributeScorer
from fair_core.targets import Attribute, TargetDistribution
from fair_core.train_config import TrainConfig
from fair_core.trainer import FairTrainer


DEMO_MARKER = ".fair-demo-training"

@dataclass
class DemoSettings:
    """Knobs of ``fair demo``; the defaults fit the 5-minute budget on 2 CPU cores."""

    target: str = "colour=uniform"
    iterations: int = 40
    images_per_prompt: int = 24
    learning_rate: float = 2e-2
    trainable: tuple[str, ...] = ("text_encoder",)
    lora_rank: int = 8
    preservation_weight: float = 0.0
    """lambda_img of the toy world's colour-blind preservation loss; 0 turns it off. Measured with keep
    weight 2-3: 0.25-0.5 holds the shapes better but the colour moves less (docs/toyworld-experiments.md)."""
    confidence_threshold: float = 0.6
    """C of the alignment loss: an image gets a target where the optimal-transport assignment sends it to
    one class in at least this fraction of the sampled target counts. With 24 crisply red or blue images,
    the paper's 0.8 gives no image a corrective target until 15 of the 24 share a colour (the sampled
    counts themselves spread by +-2.4 images), so a lean of up to 0.08 per occupation is never corrected;
    0.6 starts correcting at 13-14 (tests/test_alignment.py; docs/toyworld-experiments.md, "dead zone").
    Measured over seeds 0-4: colour bias 0.30 on average with 0.8, 0.18 with 0.6."""
    keep: tuple[str, ...] | None = None
    """Attributes to keep as the frozen model draws them (trainer ``keep``); None: every toy attribute
    outside the target (the shape, for a colour-only target)."""
    keep_weight: float = 1.0
    guidance_scale: float = 1.0
    """Classifier-free guidance for training and evaluation alike. At 1 the toy model reproduces its
    training skew; at SD's 7.5 it draws every image of an occupation in one colour and one shape, and
    40 iterations of the adaptor barely move it (measured: 1.00 -> 0.96)."""
    eval_images_per_prompt: int = 128
    """Paired images per held-out occupation. Shen et al.'s bias is biased upward at finite counts: a
    perfectly fair model measures about 0.07 at 128, 0.1 at 64 and 0.14 at 32 from sampling noise alone,
    and the same adaptor measured 0.167 at 64 but 0.242 at 128."""
    eval_steps: int = 12
    """Sampling steps of the before/after images, as in training (10-12). Measured on one adaptor over all 18
    occupations, 48 images each: every red share at 11 steps within 0.02 of its value at 20 steps."""
    eval_batch_size: int = 64
    seed: int = 0
    output_dir: str = "reports/demo"
    threads: int | None = None
    """CPU threads for torch (None: torch's default). The figures depend on the CPU's kernels (AVX-512 vs AVX2)
    and can depend on the thread count; ``summary.json`` records both."""

    def eval_settings(self) -> EvalSettings:
        """The before/after evaluation, as ``fair eval`` runs it with ``--batch-size eval_batch_size``."""
        return EvalSettings(images_per_prompt=self.eval_images_per_prompt, num_steps=self.eval_steps, seed=self.seed,
                            guidance_scale=self.guidance_scale,
                            batch_size=self.eval_batch_size)

    def keep_attributes(self) -> list[str]:
        from fair_core.toyworld.world import TOY_SCHEMA

        if self.keep_weight == 0:
            return []
        if self.keep is not None:
            return list(self.keep)
        targeted = TargetDistribution.parse(self.target, TOY_SCHEMA).names
        return [name for name in TOY_SCHEMA if name not in targeted]

    def train_config(self) -> TrainConfig:
        return TrainConfig(
            model="toy", classifier="toy", target=self.target, trainable=list(self.trainable), lora_rank=self.lora_rank,
            lora_alpha=self.lora_rank,
            images_per_prompt=self.images_per_prompt, micro_batch=self.images_per_prompt, steps_min=10, steps_max=12,
            iterations=self.iterations, learning_rate=self.learning_rate, weight_decay=0.0, ema_decay=0.9, ema_warmup=True,
            confidence_threshold=self.confidence_threshold,
            checkpoint_every=max(1, self.iterations // 3), validate_every=self.iterations, val_images_per_prompt=8,
            val_steps=10, val_max_prompts=2, output_dir=str(Path(self.output_dir) / "training"),
            output_name="toy_fair_adaptor", log_with=None, device="cpu", seed=self.seed,
            preservation=["toy"] if self.preservation_weight > 0 else [], preservation_weight=self.preservation_weight,
            keep=self.keep_attributes(), keep_weight=self.keep_weight, guidance_scale=self.guidance_scale,
        )


def _evaluate(parts, scorer: AttributeScorer, prompts: Sequence[str], settings: EvalSettings, name: str):
    """Records (as ``fair eval`` writes them) and the images ``{prompt: (n, 3, H, W)}`` of one variant."""
    images: dict[str, list[torch.Tensor]] = {p: [] for p in prompts}

    def keep(batch_prompts: Sequence[str], indices: Sequence[int], batch: torch.Tensor) -> None:
        for prompt, image in zip(batch_prompts, batch):
            images[prompt].append(image)

    records = generate_and_score(parts, scorer, prompts, settings, on_images=keep,
                                 description=f"demo eval ({name})")
    return records, {p: torch.stack(v) for p, v in images.items()}


def _prompt_shares(records: Sequence[dict], name: str, classes: int) -> dict[str, np.ndarray]:
    """Class shares ``(classes,)`` of attribute ``name`` among each prompt's images with a face."""
    by_prompt: dict[str, list[int]] = {}
    for r in records:
        if r["has_face"]:
            by_prompt.setdefault(r["prompt"], []).append(int(np.argmax(r["probs"][name])))
    return {p: class_frequencies(np.array(v), classes) for p, v in by_prompt.items()}


def run_demo(settings: DemoSettings, log=print) -> dict[str, Any]:
    """Train, evaluate before/after, write the report folder; returns the figures written to ``summary.json``.

    The before/after evaluation is ``fair eval``'s (same seeds, same scoring, same summary), so
    ``fair eval --model toy --adaptor <report>/toy_fair_adaptor.safetensors --prompts <report>/heldout_prompts.txt
    --classifier toy --images-per-prompt <n> --steps <eval_steps> --guidance <g> --batch-size <b> --target <target>``
    reproduces the figures (the demo prints the exact command).
    """
    from fair_core.toyworld import load_toy_world
    from fair_core.toyworld.world import content_change

    started = time.perf_counter()
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    out = Path(settings.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _clear_own_training_folder(Path(settings.train_config().output_dir))
    world = load_toy_world()
    target = TargetDistribution.parse(settings.target, world.schema)
    prompts = [world.prompt(o) for o in world.heldout_occupations]
    (out / "heldout_prompts.txt").write_text("\n".join(prompts) + "\n")
    evaluation = settings.eval_settings()

    log(f"[demo] target:\n{target.describe()}")
    log(f"[demo] sampling {len(prompts)} held-out occupations x {settings.eval_images_per_prompt} images before training")
    before_records, before_images = _evaluate(world.parts(), world.eval_scorer, prompts, evaluation, "before")

    log(f"[demo] training a fair adaptor on {len(world.train_occupations)} occupations, {settings.iterations} iterations")
    config = settings.train_config()
    train_prompts = [world.prompt(o) for o in world.train_occupations]
    trainer = FairTrainer(config, world.parts(), world.train_scorer, target, train_prompts, prompts[:2],
                          preservation=resolve_preservation(config.preservation, config.model))
    result = trainer.fit()
    adaptor_path = out / f"{config.output_name}.safetensors"
    shutil.copyfile(result.adaptor_path, adaptor_path)

    after_parts = apply_adaptor_to_parts(read_adaptor(adaptor_path, expected_base="toy"), load_toy_world().parts())
    after_records, after_images = _evaluate(after_parts, world.eval_scorer, prompts, evaluation, "after")

    variants = {"base": before_records, adaptor_path.stem: after_records}
    summary = summarise_variants(variants, target, seed=settings.seed)
    before, after = summary["summaries"]["base"], summary["summaries"][adaptor_path.stem]
    change = summary["changes"][adaptor_path.stem]

    records = (before_records, after_records)
    figures: dict[str, Any] = {"target": target.to_json(), "attributes": {
        attribute.name: _attribute_figures(attribute, target, prompts, records, (before, after), out)
        for attribute in world.schema.values()}}
    moved = torch.cat([content_change(before_images[p], after_images[p]) for p in prompts])
    figures["content_change"] = {"position_px": float(moved[:, 0].mean()), "size_px": float(moved[:, 1].mean()),
                                 "background": float(moved[:, 2].mean())}
    figures["before"], figures["after"], figures["change"] = before, after, change
    figures["training"] = {"iterations": result.state.iteration, "skipped_steps": result.state.skipped_steps,
                           "seconds": result.seconds}
    for prompt in prompts[:3]:
        stem = prompt.split()[-1]
        save_image_grid(before_images[prompt][:16], out / f"grid_{stem}_before.png", columns=8, upscale=4)
        save_image_grid(after_images[prompt][:16], out / f"grid_{stem}_after.png", columns=8, upscale=4)
    figures["wall_seconds"] = time.perf_counter() - started
    # The same seed gives different adaptors with AVX-512 and AVX2 kernels: record which ones ran.
    figures["machine"] = {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
                          "torch": torch.__version__}
    (out / "summary.json").write_text(json.dumps(figures, indent=2))
    log(_headline(figures, target.names))
    log(f"[demo] report: {out}/ (summary.json, chart_*.png, grid_*_before/after.png, {adaptor_path.name})")
    log(f"[demo] same figures from `fair eval`: fair eval --model toy --adaptor {adaptor_path} --prompts "
        f"{out / 'heldout_prompts.txt'} --classifier toy --images-per-prompt {settings.eval_images_per_prompt} "
        f"--steps {settings.eval_steps} --guidance {settings.guidance_scale} --batch-size {settings.eval_batch_size} --seed {settings.seed} --target '{settings.target}' --out {out / 'eval'}")
    return figures


def _clear_own_training_folder(folder: Path) -> None:
    """Empty the demo's training folder for a rerun, but only one the demo wrote (it carries a marker file):
    a folder of anything else under that name is refused, never deleted."""
    marker = folder / DEMO_MARKER
    if folder.exists():
        if not marker.is_file():
            raise ValueError(f"{folder} exists and was not written by fair demo; choose another --out")
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    marker.write_text("written by fair demo; rerunning the demo replaces this folder\n")


def _attribute_figures(attribute: Attribute, target: TargetDistribution, prompts: Sequence[str],
                       records: tuple[list, list], summaries: tuple[dict, dict], out: Path) -> dict[str, Any]:
    """One attribute's entry of ``summary.json``: class shares before/after (mean over ``prompts``) and how far
    each prompt's distribution moved (TV); for a targeted attribute also its target and the distance to it after.
    ``chart_<name>.png``: for a targeted two-class attribute the share of the first class per prompt (before /
    after / target); otherwise every class's share, mean over prompts (before / after, and the target if
    targeted), so a class that collapses, or an untargeted attribute that drifts, shows."""
    classes = len(attribute.classes)
    shares_before, shares_after = (_prompt_shares(r, attribute.name, classes) for r in records)
    moved = [float(total_variation(shares_before[p], shares_after[p])) for p in prompts]
    entry = {"classes": list(attribute.classes), "targeted": attribute.name in target.names,
             "before": np.mean([shares_before[p] for p in prompts], axis=0).tolist(),
             "after": np.mean([shares_after[p] for p in prompts], axis=0).tolist(),
             "moved_tv_per_prompt": dict(zip(prompts, moved)), "moved_tv": float(np.mean(moved))}
    series = {"before": entry["before"], "after": entry["after"]}
    if entry["targeted"]:
        before, after = summaries
        entry["target"] = target.marginal(attribute.name).tolist()
        entry["distance_before_tv"] = before["overall"]["groups"][attribute.name]["distance"]["estimate"]
        entry["distance_after_tv"] = after["overall"]["groups"][attribute.name]["distance"]["estimate"]  # mean over prompts
        series["target"] = entry["target"]
    if entry["targeted"] and classes == 2:
        per_prompt = {when: [s["prompts"][p]["groups"][attribute.name]["frequencies"]["estimate"][0] for p in prompts]
                      for when, s in (("before", before), ("after", after))}
        per_prompt["target"] = [entry["target"][0]] * len(prompts)
        distribution_chart(out / f"chart_{attribute.name}.png", [p.split()[-1] for p in prompts], per_prompt,
                           title=f"share of {attribute.classes[0]} per held-out occupation (evaluation classifier)")
    else:
        what = "targeted" if entry["targeted"] else "not targeted: should stay as it was"
        distribution_chart(out / f"chart_{attribute.name}.png", attribute.classes, series,
                           title=f"{attribute.name} ({what}), mean over held-out occupations")
    return entry


def _headline(figures: dict, target_names: Sequence[str]) -> str:
    lines = ["", "distance to the target on held-out occupations (TV, mean over prompts):"]
    for name in target_names:
        entry = figures["attributes"][name]
        lines.append(f"  {name}: {entry['distance_before_tv']:.3f} -> {entry['distance_after_tv']:.3f}")
    lines.append("bias (Shen et al.'s distance from uniform; mean over prompts, 95% bootstrap interval):")
    for name in target_names:
        b, a, c = (figures[k]["overall"]["groups"][name]["bias"] for k in ("before", "after", "change"))
        lines.append(f"  {name}: {b['estimate']:.3f} [{b['low']:.3f}, {b['high']:.3f}] -> {a['estimate']:.3f} "
                     f"[{a['low']:.3f}, {a['high']:.3f}]   change {c['estimate']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}]")
    for name, entry in figures["attributes"].items():
        if not entry["targeted"]:
            lines.append(f"  {name} (not targeted): distribution moved by TV {entry['moved_tv']:.3f} (mean over prompts)")
    content = figures["content_change"]
    lines.append(f"  paired images: position moved {content['position_px']:.2f} px, size {content['size_px']:.2f} px, "
                 f"background {content['background']:.3f} (16 px images)")
    lines.append(f"  wall time {figures['wall_seconds']:.0f} s")
    return "\n".join(lines)
