"""Load Stable Diffusion 1.5 / SDXL components with no model hub.

Two kinds of source are accepted:

* a diffusers model directory (``model_index.json`` + one folder per component), and
* a single-file checkpoint ``.safetensors`` as ComfyUI and A1111 users keep them, in the original LDM key
  layout (``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.transformer.*`` for SD1,
  ``conditioner.embedders.0/1.*`` for SDXL).

Single files are read with diffusers' single-file loader against the component configs that ship in
``fair_core/configs/<base>/``, and the CLIP tokenizer is built from the BPE vocabulary that ships in
``fair_core/data/``; nothing is looked up on the hub.
"""

from __future__ import annotations

import gzip
import importlib
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet2DConditionModel
from safetensors import SafetensorError, safe_open
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from fair_core.soft_prompt import SoftPrompt

CONFIG_DIR = Path(__file__).parent / "configs"
CLIP_VOCAB_FILE = Path(__file__).parent / "data" / "bpe_simple_vocab_16e6.txt.gz"
CLIP_VOCAB_SIZE = 49408
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"

# Key prefixes every full single-file checkpoint of a base model has (original LDM layout).
CHECKPOINT_PREFIXES = {
    "sd15": {
        "unet": "model.diffusion_model.",
        "vae": "first_stage_model.",
        "text_encoder": "cond_stage_model.transformer.",
    },
    "sdxl": {
        "unet": "model.diffusion_model.",
        "vae": "first_stage_model.",
        "text_encoder": "conditioner.embedders.0.transformer.",
        "text_encoder_2": "conditioner.embedders.1.model.",
    },
}
_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "text_encoder_2", "tokenizer_2")


@dataclass
class DiffusionParts:
    """The components the trainer, sampler and prompt encoder work with.

    Attributes:
        unet: the denoiser (epsilon prediction).
        vae: latent autoencoder, or ``None`` for a pixel-space model (the toy world).
        text_encoder: CLIP text encoder (CLIP ViT-L/14 for SD1.5 and as SDXL's first encoder).
        tokenizer: its tokenizer (77 tokens).
        scheduler: DPM-Solver++ 2M with the model's training noise schedule.
        text_encoder_2: SDXL only, OpenCLIP ViT-bigG/14 text encoder with projection.
        tokenizer_2: SDXL only, the same vocabulary padded with ``"!"``.
        base: ``"sd15"``, ``"sdxl"``, ``"toy"`` or another name of the base model family (keyword-only, required).
        soft_prompt: soft tokens that every conditional prompt encoded with these parts gets right after BOS (an
            applied adaptor's tokens, or the ones being trained); None for none (keyword-only).
        prompt_encoding: how prompts are tokenised, ``host`` (77 tokens, as diffusers, ComfyUI and A1111) or
            ``paper`` (Shen et al.'s short masked context); see :mod:`fair_core.conditioning` (keyword-only).
    """

    unet: UNet2DConditionModel
    vae: AutoencoderKL | None
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DPMSolverMultistepScheduler
    text_encoder_2: CLIPTextModelWithProjection | None = None
    tokenizer_2: CLIPTokenizer | None = None
    base: str = field(kw_only=True)
    soft_prompt: SoftPrompt | None = field(default=None, kw_only=True)
    prompt_encoding: str = field(default="host", kw_only=True)

    @property
    def text_encoders(self) -> list[CLIPTextModel | CLIPTextModelWithProjection]:
        """The text encoders in order (one for SD1.5/toy, two for SDXL)."""
        return [e for e in (self.text_encoder, self.text_encoder_2) if e is not None]

    @property
    def tokenizers(self) -> list[CLIPTokenizer]:
        """The tokenizers, one per text encoder."""
        return [t for t in (self.tokenizer, self.tokenizer_2) if t is not None]

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent pixel along each side (8 for SD; 1 without a VAE)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1

    @property
    def image_size(self) -> tuple[int, int]:
        """Native (height, width) in pixels: 512x512 for SD1.5, 1024x1024 for SDXL."""
        size = self.unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else size
        return height * self.vae_scale_factor, width * self.vae_scale_factor

    def to(self, *args, **kwargs) -> DiffusionParts:
        """``torch.nn.Module.to`` on every model (device and/or dtype), in place; returns self."""
        for model in (self.unet, self.vae, *self.text_encoders, self.soft_prompt):
            if model is not None:
                model.to(*args, **kwargs)
        return self


def sd_dpm_solver() -> DPMSolverMultistepScheduler:
    """DPM-Solver++ 2M with Stable Diffusion's scaled-linear beta schedule (SD1.5's, for models built from scratch
    such as the toy world; checkpoints use their own config)."""
    return DPMSolverMultistepScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
        algorithm_type="dpmsolver++", solver_order=2,
    )


def clip_tokenizer(pad_token: str = CLIP_EOS, model_max_length: int = 77) -> CLIPTokenizer:
    """The OpenAI CLIP tokenizer (49408 tokens) built from the vocabulary shipped in ``fair_core/data``.

    ``pad_token`` is ``"<|endoftext|>"`` for SD1.5 and SDXL's first encoder, ``"!"`` for SDXL's second.
    """
    vocab, merges = _clip_vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=model_max_length,
                         pad_token=pad_token)


@lru_cache(maxsize=1)
def _clip_vocab_and_merges() -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, str], ...]]:
    # The file holds a version line, then merges by rank; CLIP keeps the first 49152 - 256 - 2 of them.
    with gzip.open(CLIP_VOCAB_FILE, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = tuple(tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1])
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [CLIP_BOS, CLIP_EOS]
    return tuple((token, index) for index, token in enumerate(tokens)), merges


def load_diffusion_parts(
    source: str | Path,
    base: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    config: str | Path | None = None,
) -> DiffusionParts:
    """Load a model from a diffusers directory or an original-format single-file ``.safetensors``.

    Args:
        source: a diffusers model directory (with ``model_index.json``) or a ``.safetensors`` checkpoint.
        base: ``"sd15"`` or ``"sdxl"``; detected from the checkpoint keys (single file) or the components
            (directory) when ``None``. A value that contradicts the source raises. Directories may also name
            another family (e.g. ``"toy"``).
        dtype: dtype of every model.
        device: where the models are put.
        config: single files only: a diffusers-format config directory to use instead of the shipped
            ``fair_core/configs/<base>``. Its ``tokenizer``/``tokenizer_2`` folders are used when present;
            otherwise the shipped CLIP vocabulary.

    Raises:
        ValueError: the source does not exist, is not a supported model, or misses a component.
    """
    path = Path(source)
    if path.is_dir():
        if config is not None:
            raise ValueError("config= applies to single-file checkpoints only; a directory carries its own configs")
        parts = _load_directory(path, base, dtype)
    elif path.is_file():
        parts = _load_single_file(path, base, dtype, Path(config) if config is not None else None)
    else:
        raise ValueError(f"model not found: {path} is neither a diffusers model directory nor a checkpoint file")
    return parts.to(device)


def random_parts(base: str, device: torch.device | str = "cpu") -> DiffusionParts:
    """The published architecture of ``base`` (``"sd15"``/``"sdxl"``) from the shipped configs, with random
    weights, built directly on ``device`` (``"meta"``: shapes only). For benchmarks and tests; nothing is read
    but ``fair_core/configs/<base>`` and the shipped CLIP vocabulary."""
    if base not in CHECKPOINT_PREFIXES:
        raise ValueError(f"base must be one of {sorted(CHECKPOINT_PREFIXES)}, got {base!r}")
    folder = CONFIG_DIR / base
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        encoders = {"text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))}
        if base == "sdxl":
            second_config = CLIPTextConfig.from_pretrained(folder / "text_encoder_2")
            encoders["text_encoder_2"] = CLIPTextModelWithProjection(second_config)
    return DiffusionParts(unet=unet, vae=vae, scheduler=_training_scheduler(folder), **encoders,
                          **_config_tokenizers(folder, base), base=base)


def detect_checkpoint_base(keys: set[str] | list[str], name: str = "checkpoint") -> str:
    """``"sd15"`` or ``"sdxl"`` from the tensor names of an original-format checkpoint.

    Raises:
        ValueError: naming what the file looks like instead (LoRA, SD2, SDXL refiner, diffusers layout, ...).
    """
    keys = set(keys)

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if has("lora_") or any(".lora_" in k for k in keys) or has("bundle_emb."):
        raise ValueError(f"{name} is a LoRA / adaptor file, not a model checkpoint")
    if has("cond_stage_model.model."):
        raise ValueError(f"{name} is a Stable Diffusion 2.x checkpoint (OpenCLIP-H text encoder); only SD1.x and "
                         "SDXL are supported")
    if has("conditioner.embedders.0.model."):
        raise ValueError(f"{name} is an SDXL refiner checkpoint; use the SDXL base model")
    if has("down_blocks.") or has("unet.") or has("text_model."):
        raise ValueError(f"{name} uses diffusers key names; pass the diffusers model directory instead of one file")
    if has("conditioner.embedders."):
        base = "sdxl"
    elif has("cond_stage_model.transformer."):
        base = "sd15"
    else:
        sample = ", ".join(sorted(keys)[:3])
        raise ValueError(f"{name} is not a Stable Diffusion 1.x / SDXL checkpoint (unknown key layout: {sample}, ...)")
    missing = [part for part, prefix in CHECKPOINT_PREFIXES[base].items() if not has(prefix)]
    if missing:
        wanted = ", ".join(f"{part} ({CHECKPOINT_PREFIXES[base][part]}*)" for part in missing)
        raise ValueError(f"{name} looks like {base} but has no weights for {wanted}; a full checkpoint is needed")
    return base


def _load_single_file(path: Path, base: str | None, dtype: torch.dtype, config: Path | None) -> DiffusionParts:
    if path.suffix != ".safetensors":
        raise ValueError(f"{path.name}: only .safetensors checkpoints are supported (convert .ckpt files first)")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            in_key = CHECKPOINT_PREFIXES["sd15"]["unet"] + "input_blocks.0.0.weight"
            in_channels = f.get_slice(in_key).get_shape()[1] if in_key in keys else None
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path.name} is not a readable safetensors file: {e}") from e
    detected = detect_checkpoint_base(keys, path.name)
    if base is not None and base != detected:
        raise ValueError(f"{path.name} is an {detected} checkpoint but base={base!r} was given")
    config_dir = config if config is not None else CONFIG_DIR / detected
    if not (config_dir / "model_index.json").is_file():
        raise ValueError(f"config directory {config_dir} has no model_index.json")
    unet_config = json.loads((config_dir / "unet" / "config.json").read_text())
    if in_channels is not None and in_channels != unet_config["in_channels"]:
        raise ValueError(f"{path.name} has a UNet with {in_channels} input channels (an inpainting model?); "
                         f"{detected} expects {unet_config['in_channels']}")

    tokenizers = _config_tokenizers(config_dir, detected)
    # Imported here: the pipeline modules add seconds to `import fair_core.models`, and only single files need them.
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    pipeline_class = StableDiffusionXLPipeline if detected == "sdxl" else StableDiffusionPipeline
    try:
        pipe = pipeline_class.from_single_file(
            str(path), config=str(config_dir), local_files_only=True, torch_dtype=dtype,
            scheduler=_training_scheduler(config_dir), **tokenizers,
        )
    except SingleFileComponentError as e:
        raise ValueError(f"{path.name}: {e.message.splitlines()[0]}") from e
    except NotImplementedError as e:  # diffusers moves a UNet/VAE with unloaded (meta) weights
        if "meta tensor" not in str(e):
            raise
        raise ValueError(f"{path.name}: weights are incomplete; the checkpoint does not match the "
                         f"{config_dir} configs") from e
    parts = DiffusionParts(**{name: getattr(pipe, name, None) for name in _COMPONENTS}, base=detected)
    _check_fully_loaded(parts, path.name)
    return parts


def _config_tokenizers(config_dir: Path, base: str) -> dict[str, CLIPTokenizer]:
    """``tokenizer`` (and for SDXL ``tokenizer_2``, which pads with "!") from a model config folder."""
    tokenizers = {"tokenizer": _config_tokenizer(config_dir / "tokenizer", CLIP_EOS)}
    if base == "sdxl":
        tokenizers["tokenizer_2"] = _config_tokenizer(config_dir / "tokenizer_2", "!")
    return tokenizers


def _config_tokenizer(folder: Path, pad_token: str) -> CLIPTokenizer:
    if folder.is_dir() and any(folder.iterdir()):
        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    return clip_tokenizer(pad_token=pad_token)


def _training_scheduler(model_dir: Path) -> DPMSolverMultistepScheduler:
    """DPM-Solver++ 2M with the noise schedule (betas, prediction type, spacing) of the model's scheduler config."""
    if not (model_dir / "scheduler" / "scheduler_config.json").is_file():
        raise ValueError(f"{model_dir} has no scheduler/scheduler_config.json")
    return DPMSolverMultistepScheduler.from_pretrained(
        str(model_dir), subfolder="scheduler", local_files_only=True, algorithm_type="dpmsolver++", solver_order=2
    )


def _check_fully_loaded(parts: DiffusionParts, name: str) -> None:
    # diffusers leaves text-encoder weights absent from the file on the meta device instead of raising.
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        model = getattr(parts, component)
        if model is None:
            continue
        missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
        if missing:
            raise ValueError(f"{name}: weights are incomplete: {component} misses {len(missing)} tensors ("
                             f"e.g. {missing[0]}); the checkpoint does not match the {parts.base} configs")


def _load_directory(path: Path, base: str | None, dtype: torch.dtype) -> DiffusionParts:
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise ValueError(f"{path} is not a diffusers model directory (no model_index.json)")
    index = json.loads(index_file.read_text())
    listed = {name for name in _COMPONENTS if name in index and index[name][0] is not None}
    required = {"unet", "text_encoder", "tokenizer", "scheduler"}
    if not required <= listed:
        raise ValueError(f"{index_file} lists no {', '.join(sorted(required - listed))}; a text-to-image model is needed")
    for name in listed:
        if not (path / name).is_dir():
            raise ValueError(f"{path} has no {name}/ folder although model_index.json lists it")

    components = {name: _load_component(path, name, index[name], dtype) for name in listed - {"scheduler"}}
    components["scheduler"] = _training_scheduler(path)
    detected = "sdxl" if "text_encoder_2" in components else "sd15" if "vae" in components else "toy"
    if base is None:
        base = detected
    elif (base == "sdxl") != (detected == "sdxl"):
        raise ValueError(f"{path} is {'an SDXL' if detected == 'sdxl' else 'not an SDXL'} model but base={base!r} "
                         "was given")
    return DiffusionParts(**components, base=base)


def _load_component(path: Path, name: str, entry: list[str], dtype: torch.dtype) -> torch.nn.Module | CLIPTokenizer:
    library, class_name = entry
    if library not in ("diffusers", "transformers"):
        raise ValueError(f"{path}/model_index.json: component {name} comes from {library!r}; only diffusers and "
                         "transformers classes can be loaded")
    cls = getattr(importlib.import_module(library), class_name)
    kwargs = {"subfolder": name, "local_files_only": True}
    if name.startswith("text_encoder"):
        kwargs["dtype"] = dtype
    elif not name.startswith("tokenizer"):
        kwargs["torch_dtype"] = dtype
    try:
        return cls.from_pretrained(str(path), **kwargs)
    except OSError as e:
        raise ValueError(f"{path}/{name}: {str(e).splitlines()[0]}") from e
