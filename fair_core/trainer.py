"""The fair-adaptor training loop (Shen et al. 2024, Algorithm A.1), one page in the style of accelerate's examples.

Each iteration takes P prompts (``prompts_per_iteration``, the paper's 1) and for each a global batch of N
seeded noises spread over the processes; per prompt:

1. sampling with the current model, traced for step 3 (``fair_core.dft.trace_sampling``: the UNet runs
   without gradients, its inputs and outputs are kept) -> classifier probabilities on every image;
2. probabilities gathered from all processes; the optimal-transport targets are solved once over the
   global batch with the same seed everywhere, so every process gets identical targets;
3. gradient pass in micro-batches: adjusted DFT back through each trace (no second sampling) on the
   distributional alignment loss, plus (optional) lambda_img times the image-preservation loss against
   the frozen model's image from the same noise (sampled once per iteration with the adapters off);
4. gradients accumulated over the P prompts and summed over processes (each holds its share of the mean
   loss), AdamW step (skipped and counted when a gradient is not finite), EMA update.

All randomness of a prompt's slot ``iteration * P + k`` (prompt order, step count, noises, assignment) is
derived from ``(seed, slot)``, so a resumed run, or a run on a different number of processes, repeats it exactly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from accelerate import Accelerator
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from fair_core.alignment import NO_TARGET, assign_targets, dal_loss
from fair_core.audit import score_records, summarise_records
from fair_core.checkpoints import Checkpoint, check_run_folder, read_latest_checkpoint, write_checkpoint
from fair_core.conditioning import encode_prompts
from fair_core.dft import SamplingTrace, sample, trace_sampling
from fair_core.export import export_adaptor, run_metadata
from fair_core.face_identity import FaceEmbeddings, FaceRealism, load_face_realism
from fair_core.losses import PreservationLoss, intersect_boxes, preservation_factors, square_boxes
from fair_core.models import DiffusionParts
from fair_core.prompts import stable_seed
from fair_core.sampling import decode_latents, generate_images, latent_shape, seeded_noise
from fair_core.scoring import AttributeScorer
from fair_core.targets import Attribute, TargetDistribution
from fair_core.train_config import TrainConfig
from fair_core.soft_prompt import SoftPrompt
from fair_core.trainable import adapters_disabled, add_text_encoder_lora, add_unet_lora
from fair_core.plots import save_image_grid

@dataclass
class TrainState:
    """What a checkpoint restores besides tensors."""

    iteration: int = 0
    skipped_steps: int = 0
    faceless_steps: int = 0
    """Iterations skipped because no image had a face (also counted in ``skipped_steps``)."""
    images_without_face: int = 0
    images_seen: int = 0
    history: list[dict] = field(default_factory=list)


@dataclass
class PreservationReference:
    """The frozen model's images of one iteration, as the preservation and keep losses need them (local images).

    Attributes:
        embedding: ``PreservationLoss.embed`` of the images, one ``(n, D_e)`` tensor per encoder (empty
            without a preservation loss).
        labels: ``(n, A)`` the classifier's class of each image for the target attributes, -1 where the
            image has no face.
        keep_labels: ``(n, K)`` its class for the ``keep`` attributes, -1 where the image has no face or
            the prediction is below the confidence threshold.
        boxes: ``(n, 4)`` face boxes (NaN = none), or None for whole-image scorers.
        confidence: ``(n, A)`` the probability of ``labels`` (0 where the image has no face).
        faces: the face-realism identity embeddings of the images' faces (``FaceEmbeddings``), or None
            without the face-realism loss.
    """

    embedding: list[torch.Tensor]
    labels: torch.Tensor
    keep_labels: torch.Tensor
    boxes: torch.Tensor | None
    confidence: torch.Tensor
    faces: FaceEmbeddings | None = None

    def __getitem__(self, rows: slice) -> "PreservationReference":
        faces = None if self.faces is None else FaceEmbeddings(self.faces.embeddings[rows], self.faces.has_face[rows])
        return PreservationReference([e[rows] for e in self.embedding], self.labels[rows], self.keep_labels[rows],
                                     None if self.boxes is None else self.boxes[rows], self.confidence[rows], faces)


@dataclass
class TrainResult:
    adaptor_path: Path | None
    state: TrainState
    validation_before: dict | None
    validation_after: dict | None
    seconds: float


class FairTrainer:
    """Owns the models, the trainable parameters, optimiser and EMA for one run of :func:`train`."""

    def __init__(
        self,
        config: TrainConfig,
        parts: DiffusionParts,
        scorer: AttributeScorer,
        target: TargetDistribution,
        train_prompts: Sequence[str],
        val_prompts: Sequence[str] = (),
        accelerator: Accelerator | None = None,
        preservation: PreservationLoss | None = None,
        extra_losses: Sequence[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = (),
        face_realism: FaceRealism | None = None,
    ):
        """``preservation`` is weighted by ``config.preservation_weight``; ``extra_losses`` are
        ``(images, noise) -> (n,)`` per-image terms added as they are (for experiments and tests);
        ``face_realism`` (weighted by ``config.face_realism_weight``) defaults to dlib's network with the
        ``config.face_bank`` folder when that weight is positive."""
        if not train_prompts:
            raise ValueError("no training prompts")
        self.config, self.parts, self.scorer, self.target = config, parts, scorer, target
        parts.prompt_encoding = config.prompt_encoding  # training, validation and the frozen reference alike
        self.train_prompts, self.val_prompts = list(train_prompts), list(val_prompts)
        self.preservation = preservation
        self.extra_losses = list(extra_losses)
        self.accelerator = accelerator or make_accelerator(config)
        world = self.accelerator.num_processes
        if config.images_per_prompt % world:
            raise ValueError(f"images_per_prompt={config.images_per_prompt} must be divisible by the {world} processes")
        self.local_count = config.images_per_prompt // world
        self.attribute_index = _attribute_positions(scorer, target.attributes)
        self.keep_index = _keep_positions(scorer, target, config.keep)
        self.output_dir = Path(config.output_dir)
        self.device = self.accelerator.device
        if face_realism is None and config.face_realism_weight > 0:
            face_realism = load_face_realism(config.face_bank)
        self.face_realism = face_realism.to(self.device) if config.face_realism_weight > 0 else None
        self.parameters = self._make_trainable()
        self.optimizer = torch.optim.AdamW(
            self.parameters, lr=config.learning_rate, weight_decay=config.weight_decay, betas=(0.9, 0.999), eps=1e-8
        )
        self.lr_schedule = get_scheduler(config.lr_schedule, self.optimizer, num_warmup_steps=config.lr_warmup_iterations,
                                         num_training_steps=config.iterations)
        self.ema = EMAModel(self.parameters, decay=config.ema_decay, use_ema_warmup=config.ema_warmup, inv_gamma=1.0, power=2 / 3)
        self.state = TrainState()

    # ------------------------------------------------------------------ set-up
    def _make_trainable(self) -> list[torch.nn.Parameter]:
        config, parts = self.config, self.parts
        for module in (parts.unet, parts.vae, parts.text_encoder, parts.text_encoder_2):
            if module is not None:
                module.requires_grad_(False)
        torch.manual_seed(config.seed)  # identical LoRA / token initialisation on every process
        parameters: list[torch.nn.Parameter] = []
        if "text_encoder" in config.trainable:
            for encoder in (parts.text_encoder, parts.text_encoder_2):
                if encoder is not None:
                    parameters += add_text_encoder_lora(encoder, config.lora_rank, config.lora_alpha)
        if "unet" in config.trainable:
            parameters += add_unet_lora(parts.unet, config.lora_rank, config.lora_alpha)
        if "tokens" in config.trainable:
            parts.soft_prompt = SoftPrompt.initialise(parts, config.num_tokens, seed=config.seed)
            parameters += list(parts.soft_prompt.parameters())
        weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[config.mixed_precision]
        self.autocast_dtype = None if config.mixed_precision == "no" else weight_dtype
        for module in (parts.unet, parts.vae, parts.text_encoder, parts.text_encoder_2):
            if module is not None:
                module.to(self.device)
                if module.dtype != weight_dtype:  # diffusers warns about every dtype passed to `to`, even a no-op
                    module.to(dtype=weight_dtype)
        if parts.soft_prompt is not None:
            parts.soft_prompt.to(self.device)
        for parameter in parameters:  # trainables stay float32 under mixed precision
            parameter.data = parameter.data.float()
        if config.gradient_checkpointing:
            parts.unet.enable_gradient_checkpointing()
            if parts.vae is not None:
                parts.vae.enable_gradient_checkpointing()
            parts.unet.train()
        return parameters

    # ------------------------------------------------------------------ one iteration
    def iteration_plan(self, slot: int) -> tuple[str, int, list[int]]:
        """Prompt, number of sampling steps and the N global noise seeds of prompt slot ``slot`` (iteration
        ``i`` trains slots ``i * P .. i * P + P - 1``; with P = 1 the slot is the iteration)."""
        config = self.config
        epoch, position = divmod(slot, len(self.train_prompts))
        order = np.random.default_rng([config.seed, epoch]).permutation(len(self.train_prompts))
        prompt = self.train_prompts[order[position]]
        steps = int(np.random.default_rng([config.seed, slot, 1]).integers(config.steps_min, config.steps_max + 1))
        seeds = [stable_seed(config.seed, slot, index) for index in range(config.images_per_prompt)]
        return prompt, steps, seeds

    def local_slice(self) -> slice:
        start = self.accelerator.process_index * self.local_count
        return slice(start, start + self.local_count)

    def _score(self, images: torch.Tensor):
        """Logits of the target attributes (list of ``(n, K_a)``) and the full :class:`AttributeScores`
        (whose ``logits`` hold every attribute of the classifier, the ``keep`` ones included)."""
        scores = self.scorer(images)
        return [scores.logits[i] for i in self.attribute_index], scores

    def _trace(self, prompt: str, noise: torch.Tensor, steps: int) -> list[SamplingTrace]:
        """Sample this process's images with the current model, one trace per micro-batch of ``noise``.

        The traces are the first half of the gradient pass: the targets are solved on their images, then
        each trace's backward runs without sampling again from the same noise."""
        return self._sample_micro_batches(trace_sampling, prompt, noise, steps, with_soft_prompt=True,
                                          mode=self.config.gradient_mode)

    def _sample_micro_batches(self, sampler: Callable, prompt: str, noise: torch.Tensor, steps: int,
                              with_soft_prompt: bool, **options) -> list:
        """``sampler`` (:func:`~fair_core.dft.sample` or :func:`~fair_core.dft.trace_sampling`) on each
        micro-batch of ``noise`` with ``prompt``'s conditioning (soft tokens included or not); one result per
        micro-batch."""
        results = []
        for rows in self._micro_batch_rows(noise.shape[0]):
            chunk = noise[rows]
            conditioning = encode_prompts(self.parts, [prompt] * chunk.shape[0], with_soft_prompt=with_soft_prompt)
            results.append(sampler(
                self.parts.unet, self.parts.scheduler, chunk, conditioning.cond, conditioning.uncond, steps,
                self.config.guidance_scale, added_cond=conditioning.added_cond, autocast_dtype=self.autocast_dtype,
                **options,
            ))
        return results

    def _micro_batch_rows(self, count: int) -> list[slice]:
        """Row slices of ``count`` local images, ``micro_batch`` at a time."""
        return [slice(start, start + self.config.micro_batch) for start in range(0, count, self.config.micro_batch)]

    @torch.no_grad()
    def _targets(self, traces: Sequence[SamplingTrace], slot: int) -> tuple[torch.Tensor, int]:
        """Labels ``(n_local, A)`` (-1 = no target) for this process's images, solved over the global batch."""
        images = torch.cat([decode_latents(self.parts, trace.latents) for trace in traces])
        logits, scores = self._score(images)
        has_face = scores.has_face
        probs = torch.cat([torch.softmax(l.float(), dim=-1) for l in logits], dim=-1)
        probs = self.accelerator.gather(probs.contiguous()).double().cpu().numpy()
        has_face = self.accelerator.gather(has_face.contiguous()).cpu().numpy().astype(bool)
        sizes = np.cumsum([0, *self.target.class_sizes])
        per_attribute = [probs[:, a:b] for a, b in zip(sizes[:-1], sizes[1:])]
        method, samples = assignment_settings(self.config)
        result = assign_targets(
            per_attribute, self.target, has_face=has_face, num_samples=samples, method=method,
            confidence_threshold=self.config.confidence_threshold, seed=int(stable_seed(self.config.seed, slot, "ot")),
        )
        labels = torch.from_numpy(result.labels[self.local_slice()]).to(self.device)
        return labels, int((~has_face).sum())

    @torch.no_grad()
    def _reference(self, prompt: str, noise: torch.Tensor, steps: int) -> PreservationReference:
        """The frozen model's images from the same noise (adapters and soft tokens off), embedded and scored."""
        parts = self.parts
        with adapters_disabled(*(m for m in (parts.unet, *parts.text_encoders) if m is not None)):
            images = self._sample_frozen(prompt, noise, steps)
        logits, scores = self._score(images)
        labels = _predicted_classes(logits, scores.has_face)
        keep_labels = torch.full((images.shape[0], len(self.keep_index)), NO_TARGET, dtype=torch.long, device=images.device)
        for column, index in enumerate(self.keep_index):
            confidence, predicted = torch.softmax(scores.logits[index].float(), dim=-1).max(dim=-1)
            sure = scores.has_face.to(images.device) & (confidence >= self.config.confidence_threshold)
            keep_labels[:, column] = torch.where(sure, predicted, keep_labels[:, column])
        embedding = self.preservation.embed(images) if self.preservation is not None else []
        confidence = torch.stack([torch.softmax(l.float(), dim=-1).amax(dim=-1) for l in logits], dim=1)
        confidence = torch.where(scores.has_face.to(confidence.device)[:, None], confidence, 0.0)
        faces = self.face_realism.identity(images) if self.face_realism is not None else None
        return PreservationReference(embedding, labels, keep_labels, scores.boxes, confidence, faces)

    def _sample_frozen(self, prompt: str, noise: torch.Tensor, steps: int) -> torch.Tensor:
        """Images ``(n, 3, H, W)`` without gradients and without soft tokens (the caller turns the adapters off)."""
        latents = self._sample_micro_batches(sample, prompt, noise, steps, with_soft_prompt=False)
        return torch.cat([decode_latents(self.parts, chunk) for chunk in latents])

    def _gradient_pass(self, traces: Sequence[SamplingTrace], noise: torch.Tensor, labels: torch.Tensor,
                       reference: PreservationReference | None) -> float:
        """Accumulate this process's share of d(loss)/d(params), the loss being the mean over the iteration's
        P x N global images, from its images (``traces`` of ``noise`` in micro-batches); returns that share."""
        total = 0.0
        names = [a.name for a in self.target.attributes]
        for trace, rows in zip(traces, self._micro_batch_rows(noise.shape[0])):
            chunk, chunk_labels = noise[rows], labels[rows]
            chunk_reference = None if reference is None else reference[rows]
            if bool((chunk_labels < 0).all()) and chunk_reference is None and not self.extra_losses:
                continue  # nothing to learn from these images

            def loss_fn(latents: torch.Tensor) -> torch.Tensor:
                images = decode_latents(self.parts, latents)
                logits, scores = self._score(images)
                has_face = scores.has_face
                kept = torch.where(has_face[:, None], chunk_labels, torch.full_like(chunk_labels, -1))
                per_image = dal_loss(logits, kept)
                if self.keep_index:
                    keep_labels = torch.where(has_face[:, None], chunk_reference.keep_labels, NO_TARGET)
                    per_image = per_image + self.config.keep_weight * dal_loss(
                        [scores.logits[i] for i in self.keep_index], keep_labels)
                if self.preservation is not None:
                    weights, factor2 = preservation_factors(chunk_labels, chunk_reference.labels, has_face, names)
                    boxes = None
                    if scores.boxes is not None and chunk_reference.boxes is not None:
                        expand = self.config.face_region_expand
                        boxes = intersect_boxes(square_boxes(scores.boxes.detach(), expand), square_boxes(chunk_reference.boxes, expand))
                    preserved = self.preservation(images, chunk_reference.embedding, weights, boxes, factor2)
                    per_image = per_image + self.config.preservation_weight * preserved
                if self.face_realism is not None:
                    per_image = per_image + self.config.face_realism_weight * self._face_realism(images, chunk_labels, chunk_reference)
                for extra in self.extra_losses:
                    per_image = per_image + extra(images, chunk)
                return per_image.sum() / (self.config.images_per_prompt * self.config.prompts_per_iteration)

            total += float(trace.backward(loss_fn).loss)
        return total

    def _face_realism(self, images: torch.Tensor, labels: torch.Tensor, reference: PreservationReference) -> torch.Tensor:
        """Per-image face-realism loss ``(n,)`` (Shen et al. §4.2), 0 where it does not apply.

        The target is the frozen image's own face where it has one, every target keeps its class and that
        class has probability ``>= face_own_confidence``; else the nearest face of the bank. It applies to
        every face of the current images, and for a single attribute only to faces with a target (exp-1).
        """
        kept = (labels >= 0) & (labels == reference.labels) & (reference.confidence >= self.config.face_own_confidence)
        use_own = reference.faces.has_face & kept.all(dim=1)
        loss, has_face = self.face_realism(images, reference.faces.embeddings, use_own)
        applies = has_face & ((labels >= 0).all(dim=1) if labels.shape[1] == 1 else True)
        return torch.where(applies, loss, 0.0)

    def _accumulate(self, slot: int) -> tuple[float, int, int, str]:
        """Sample, assign and accumulate the gradient of one prompt slot: (this process's loss share, images
        with a target over all processes, images without a face over all processes, the prompt)."""
        prompt, steps, seeds = self.iteration_plan(slot)
        noise = seeded_noise(seeds[self.local_slice()], latent_shape(self.parts, self.config.resolution), self.device)
        traces = self._trace(prompt, noise, steps)
        labels, no_face = self._targets(traces, slot)
        needs_reference = self.preservation is not None or bool(self.keep_index) or self.face_realism is not None
        reference = self._reference(prompt, noise, steps) if needs_reference else None
        loss = self._gradient_pass(traces, noise, labels, reference)
        self.state.images_without_face += no_face
        kept = int(self.accelerator.reduce((labels >= 0).any(dim=1).sum(), reduction="sum").item())
        return loss, kept, no_face, prompt

    def train_iteration(self, iteration: int) -> dict:
        self.optimizer.zero_grad(set_to_none=False)
        count = self.config.prompts_per_iteration
        losses, kept, no_face, prompts = zip(*(self._accumulate(slot) for slot in range(iteration * count, (iteration + 1) * count)))
        loss = float(self.accelerator.reduce(torch.tensor([sum(losses)], device=self.device), reduction="sum").item())
        for parameter in self.parameters:  # each process holds d(its share of the mean loss)/d(theta)
            # None where this process had nothing to learn from its images; every process must join the sum
            local = parameter.grad if parameter.grad is not None else torch.zeros_like(parameter)
            parameter.grad = self.accelerator.reduce(local.contiguous(), reduction="sum")
        finite = math.isfinite(loss) and all(bool(torch.isfinite(p.grad).all()) for p in self.parameters)
        # No face in any image: nothing to align, and a step on zero gradients would still move the weights
        # (AdamW's decay, the EMA), so the iteration is skipped and counted.
        faceless = sum(no_face) == self.config.images_per_prompt * count
        if finite and not faceless:
            self.optimizer.step()
            self.ema.step(self.parameters)
        else:
            self.state.skipped_steps += 1
            self.state.faceless_steps += int(faceless)
        with warnings.catch_warnings():  # the schedule follows iterations, skipped or not: a skipped first one
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            self.lr_schedule.step()
        self.state.images_seen += self.config.images_per_prompt * count
        return {"loss": loss, "kept_targets": sum(kept), "skipped": faceless or not finite, "faceless": faceless,
                "prompts": list(prompts)}

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def validate(self, use_ema: bool = True, grid_path: Path | None = None) -> dict:
        """Bias on the validation prompts, same seeds every time. Returns the metrics summary as a dict."""
        config = self.config
        prompts = self.val_prompts[: config.val_max_prompts] if config.val_max_prompts else self.val_prompts
        if not prompts:
            return {}
        if use_ema:
            self.ema.store(self.parameters)
            self.ema.copy_to(self.parameters)
        try:
            records, first_images = [], None
            for prompt in prompts:
                seeds = [stable_seed(config.seed, "val", prompt, j) for j in range(config.val_images_per_prompt)]
                images = generate_images(
                    self.parts, [prompt] * len(seeds), seeds, config.val_steps, config.guidance_scale,
                    resolution=config.resolution, batch_size=config.micro_batch,
                    device=self.device, autocast_dtype=self.autocast_dtype,
                )
                records += score_records(self.scorer, images.to(self.device), [prompt] * len(seeds),
                                         range(len(seeds)), seeds)
                first_images = images if first_images is None else first_images
        finally:
            if use_ema:
                self.ema.restore(self.parameters)
        if grid_path is not None and first_images is not None:
            save_image_grid(first_images, grid_path, upscale=max(1, 128 // first_images.shape[-1]))
        return summarise_records(records, self.target).to_json()

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path | None:
        """Write ``checkpoints/iter_XXXXXXX`` (see :mod:`fair_core.checkpoints`) on the main process."""
        directory = None
        if self.accelerator.is_main_process:
            ema_state = {k: v for k, v in self.ema.state_dict().items() if k != "shadow_params"}
            directory = write_checkpoint(
                self.output_dir, self.state.iteration, self.parameters, self.ema.shadow_params,
                self.optimizer.state_dict(), self.lr_schedule.state_dict(),
                {"train_state": self.state.__dict__, "ema": ema_state}, keep=self.config.keep_checkpoints,
            )
        self.accelerator.wait_for_everyone()
        return directory

    def load_checkpoint(self, checkpoint: Checkpoint) -> None:
        for parameter, trained in zip(self.parameters, checkpoint.trainable):
            parameter.data.copy_(trained)
        for shadow, ema in zip(self.ema.shadow_params, checkpoint.ema):
            shadow.data.copy_(ema)
        self.optimizer.load_state_dict(checkpoint.optimizer)
        self.lr_schedule.load_state_dict(checkpoint.lr_schedule)
        self.state = TrainState(**checkpoint.state["train_state"])
        self.ema.optimization_step = checkpoint.state["ema"]["optimization_step"]

    # ------------------------------------------------------------------ the loop
    def fit(self, resume: bool = False, on_iteration: Callable[[int, dict], None] | None = None) -> TrainResult:
        config, accelerator = self.config, self.accelerator
        started = time.perf_counter()
        check_run_folder(self.output_dir, dataclasses.asdict(config), resume)  # every process: a refusal stops all
        if resume:
            checkpoint = read_latest_checkpoint(self.output_dir, len(self.parameters), log=accelerator.print)
            if checkpoint is not None:
                self.load_checkpoint(checkpoint)
                accelerator.print(f"resumed from {checkpoint.path} (iteration {self.state.iteration})")
        if config.log_with:
            accelerator.init_trackers("fair", config={"config": config.to_json()})
        before = self._read_validation("before")
        if before is None:
            before = self.validate(use_ema=False, grid_path=self.output_dir / "samples" / "before.png")
            self._write_validation("before", before)
        progress = tqdm(
            range(self.state.iteration, config.iterations), initial=self.state.iteration, total=config.iterations,
            desc="fair train", disable=not accelerator.is_local_main_process, dynamic_ncols=True,
        )
        latest = f"{_headline(before)}@0"
        accelerator.print(f"before training: {_headline(before)} (distance to the target / bias, first target attribute)")
        for iteration in progress:
            record = self.train_iteration(iteration)
            self.state.iteration = iteration + 1
            accelerator.log({"train/loss": record["loss"], "train/kept_targets": record["kept_targets"],
                             "train/skipped_steps": self.state.skipped_steps}, step=self.state.iteration)
            if self.state.iteration % config.validate_every == 0 or self.state.iteration == config.iterations:
                summary = self.validate(grid_path=self.output_dir / "samples" / f"iter_{self.state.iteration:07d}.png")
                latest = f"{_headline(summary)}@{self.state.iteration}"
                accelerator.log({f"val/{k}": v for k, v in _flat_numbers(summary).items()}, step=self.state.iteration)
                self.state.history.append({"iteration": self.state.iteration, "validation": summary})
            # val: distance/bias of the latest validation @ its iteration (every validate_every), not of this batch
            progress.set_postfix(loss=f"{record['loss']:.3f}", val=latest, skipped=self.state.skipped_steps,
                                 no_face=self.state.faceless_steps)
            if record["faceless"]:
                progress.write(f"iteration {self.state.iteration}: no image of {record['prompts']} had a face; step skipped")
            _stop_if_mostly_faceless(self.state)
            if on_iteration is not None:
                on_iteration(iteration, record)
            if self.state.iteration % config.checkpoint_every == 0 or self.state.iteration == config.iterations:
                self.save_checkpoint()
        progress.close()
        after = self.state.history[-1]["validation"] if self.state.history else self.validate()
        adaptor_path = self.export(before, after) if accelerator.is_main_process else None
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return TrainResult(adaptor_path, self.state, before, after, time.perf_counter() - started)

    def _read_validation(self, name: str) -> dict | None:
        path = self.output_dir / f"validation_{name}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def _write_validation(self, name: str, summary: dict) -> None:
        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / f"validation_{name}.json").write_text(json.dumps(summary, indent=2))

    # ------------------------------------------------------------------ export
    def export(self, before: dict | None, after: dict | None) -> Path:
        """Write the EMA weights as the fair adaptor ``<output_dir>/<output_name>.safetensors``."""
        self.ema.store(self.parameters)
        self.ema.copy_to(self.parameters)
        try:
            metadata = run_metadata(self.config, self.parts, self.target, self.scorer, before, after)
            path = export_adaptor(self.output_dir / f"{self.config.output_name}.safetensors", self.config, self.parts,
                                  metadata)
        finally:
            self.ema.restore(self.parameters)
        return path


def make_accelerator(config: TrainConfig) -> Accelerator:
    """The run's accelerate state: its device (``cuda:<local rank>`` under ``accelerate launch``, the CPU
    with ``device: cpu``), mixed precision and tracker. Build it before the models when they must be loaded
    onto its device, and hand it to :class:`FairTrainer`."""
    if config.device is not None and config.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device: {config.device} asked for, but this torch ({torch.__version__}) sees no CUDA GPU; "
                         "set device: cpu or leave it empty")
    return Accelerator(mixed_precision=config.mixed_precision, log_with=config.log_with or None,
                       project_dir=config.output_dir, cpu=config.device == "cpu")


def _stop_if_mostly_faceless(state: TrainState, grace: int = 4) -> None:
    """Stop a run in which most iterations so far (after ``grace``) had no face at all: it is not training."""
    if state.iteration > grace and 2 * state.faceless_steps > state.iteration:
        raise ValueError(f"{state.faceless_steps} of {state.iteration} iterations had no face in any image: the "
                         "face detector finds none at this resolution or with these prompts; check a sample image "
                         "(samples/), raise resolution, or use prompts that show a person's face")


def _attribute_positions(scorer: AttributeScorer, attributes: Sequence[Attribute]) -> list[int]:
    """Index of each attribute in the classifier's output; error if it is missing or its classes differ."""
    names = [a.name for a in scorer.attributes]
    positions = []
    for attribute in attributes:
        if attribute.name not in names:
            raise ValueError(f"the classifier has no attribute {attribute.name!r} (it has: {', '.join(names)})")
        theirs = scorer.attributes[names.index(attribute.name)]
        if theirs.classes != attribute.classes:
            raise ValueError(f"attribute {attribute.name!r}: target classes {list(attribute.classes)} differ from the classifier's {list(theirs.classes)}")
        positions.append(names.index(attribute.name))
    return positions


def _keep_positions(scorer: AttributeScorer, target: TargetDistribution, keep: Sequence[str]) -> list[int]:
    """Classifier indices of the ``keep`` attributes, which must be the classifier's and outside the target."""
    targeted = [name for name in keep if name in target.names]
    if targeted:
        raise ValueError(f"keep: {targeted} also in the target; an attribute is either balanced or kept")
    by_name = {a.name: a for a in scorer.attributes}
    missing = [name for name in keep if name not in by_name]
    if missing:
        raise ValueError(f"keep: the classifier has no attribute {missing} (it has: {', '.join(by_name)})")
    return _attribute_positions(scorer, [by_name[name] for name in keep])


def _predicted_classes(logits: Sequence[torch.Tensor], has_face: torch.Tensor) -> torch.Tensor:
    """``(n, A)`` the most likely class of each attribute, from one ``(n, K_a)`` logit tensor per attribute;
    -1 (no class, so never "unchanged" by a target) where ``has_face`` ``(n,)`` is False."""
    classes = torch.stack([l.argmax(dim=-1) for l in logits], dim=1)
    return torch.where(has_face.to(classes.device)[:, None], classes, NO_TARGET)


def assignment_settings(config: TrainConfig) -> tuple[str, int]:
    """``(method, samples)`` of the target assignment: the config's, or when empty the paper's (``auto``,
    200) for Stable Diffusion and the toy world's (``sampled``, 100), with which its demo figures were made."""
    toy = config.model == "toy"
    method = config.assignment or ("sampled" if toy else "auto")
    return method, int(config.assignment_samples or (100 if toy else 200))


def _headline(summary: dict | None) -> str:
    """``"distance/bias"`` of the first target attribute, over the validation prompts, for the progress bar: the
    distance to the user's target leads (Shen et al.'s bias measures the distance from uniform)."""
    groups = (summary or {}).get("overall", {}).get("groups", {})
    if not groups:
        return "-"
    first = next(iter(groups.values()))
    values = [first.get(name, {}).get("estimate") for name in ("distance", "bias")]
    return "/".join(f"{v:.3f}" if isinstance(v, (int, float)) else "-" for v in values)


def _flat_numbers(data: dict, prefix: str = "") -> dict[str, float]:
    flat: dict[str, float] = {}
    for key, value in data.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            flat[prefix + key] = float(value)
        elif isinstance(value, dict) and key != "per_prompt":
            flat.update(_flat_numbers(value, prefix + key + "/"))
    return flat
