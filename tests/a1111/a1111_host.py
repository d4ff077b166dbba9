"""One web-UI tab around the script: load the script, build its UI through the ``ScriptRunner`` stand-in, set the
accordion's values, generate, paste an infotext back. Also writes the adaptor files the tests use (with the
library's own writer) and the loaded-model stand-ins. Needs the ``standins`` fixture."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from fair_core.adaptor import FairAdaptor, FairMetadata, LoraWeights, SoftTokens, save_adaptor
from fair_core.targets import TargetDistribution
from fair_core.toyworld.world import TOY_SCHEMA

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "fair_adaptors.py"
WIDTHS = {"te": 768, "te1": 768, "te2": 1280}
TEXT_FAMILIES = {"sd15": ("te",), "sdxl": ("te1", "te2")}


def write_test_adaptor(path: Path, base: str = "sd15", name: str = "nurse_fair", tokens: int = 1,
                       vectors: int = 3) -> Path:
    """A small adaptor for ``base``: one UNet and one text-encoder LoRA module (rank 2) per text encoder, and
    ``tokens`` soft tokens of ``vectors`` vectors each, trained for the toy world's uniform colour target."""
    generator = torch.Generator().manual_seed(0)
    lora = {"lora_unet_down_blocks_0_attentions_0_proj_in": LoraWeights(torch.randn(2, 8, generator=generator),
                                                                          torch.randn(8, 2, generator=generator), 2.0)}
    for family in TEXT_FAMILIES[base]:
        width = WIDTHS[family]
        lora[f"lora_{family}_text_model_encoder_layers_0_self_attn_q_proj"] = LoraWeights(
            torch.randn(2, width, generator=generator), torch.randn(width, 2, generator=generator), 2.0)
    soft = [SoftTokens(name if i == 0 else f"{name}{i}",
                       {f: torch.randn(vectors, WIDTHS[f], generator=generator) for f in TEXT_FAMILIES[base]})
            for i in range(tokens)]
    target = TargetDistribution.uniform((TOY_SCHEMA["colour"],))
    metadata = FairMetadata(base_model=base, name=name, target=target)
    return save_adaptor(FairAdaptor(metadata=metadata, lora=lora, tokens=soft), path)


def load_script(models: Path, forge: bool):
    """Import the script as A1111's ``script_loading.load_module`` does (by file location, not registered in
    ``sys.modules``), after pointing the stand-ins' ``paths.models_path`` and ``--lora-dir`` at ``models`` and
    registering the built-in Lora; Forge's LoRA-only copies go to ``models/.cache``."""
    from modules import extra_networks, paths, shared

    import extra_networks_lora
    import networks

    paths.models_path = str(models)
    shared.cmd_opts.lora_dir = str(models / "Lora")
    networks.FORGE = forge
    networks.list_available_networks()
    extra_networks.register_extra_network(extra_networks_lora.ExtraNetworkLora())
    spec = importlib.util.spec_from_file_location("fair_adaptors", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.FORGE_CACHE = models / ".cache"
    return module


class MiddleBlock(torch.nn.Module):
    """ldm's ``TimestepEmbedSequential`` middle block, called ``(h, emb, context)``; here ``2 h + 1``."""

    def forward(self, h, emb=None, context=None):
        return 2 * h + 1


class TinyUNet(torch.nn.Module):
    """The call structure of ldm's ``openaimodel.UNetModel.forward(x, timesteps=None, context=None, ...)`` around its
    ``middle_block``, with Forge's ``backend/nn/unet.py`` block-modifier calls (``"before"``/``"after"`` with
    ``transformer_options["block"] == ("middle", 0)``); one 1x1 convolution stands for the input and output blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.input_blocks = torch.nn.Conv2d(3, 4, 1)
        self.middle_block = MiddleBlock()
        self.out = torch.nn.Conv2d(4, 3, 1)

    def forward(self, x, timesteps=None, context=None, transformer_options=None):
        options = transformer_options if transformer_options is not None else {}
        h = self.input_blocks(x)
        options["block"] = ("middle", 0)
        for modifier in options.get("block_modifiers", []):
            h = modifier(h, "before", options)
        h = self.middle_block(h, None, context)
        for modifier in options.get("block_modifiers", []):
            h = modifier(h, "after", options)
        return self.out(h)


class A1111Model:
    """A loaded checkpoint as the script sees it on A1111 1.10 (``modules/sd_models.py`` sets ``is_sdxl`` and
    ``is_sd1``; ``model.diffusion_model`` is the UNet)."""

    def __init__(self, base: str) -> None:
        self.is_sdxl = base == "sdxl"
        self.is_sd1 = base == "sd15"
        self.model = SimpleNamespace(diffusion_model=TinyUNet())


class ForgeEngine:
    """Forge's ``ClassicTextProcessingEngine``: holds its text encoder's ``embeddings`` database."""

    def __init__(self, expected_shape: int) -> None:
        from backend.text_processing.textual_inversion import EmbeddingDatabase

        self.embeddings = EmbeddingDatabase(None, expected_shape)


class Prediction:
    """Forge's ``backend/modules/k_prediction.py`` predictor: ``sigma(timestep)`` and ``timestep(sigma)`` (nearest
    entry of a table of 1000 sigmas)."""

    sigmas = torch.linspace(0.03, 14.6, 1000)

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        return self.sigmas[timestep.long()]

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return (sigma.reshape(-1, 1) - self.sigmas.reshape(1, -1)).abs().argmin(dim=1).float()


class UnetPatcher:
    """Forge's ``backend/patcher/unet.py`` ``UnetPatcher``: ``model`` (``diffusion_model``, ``predictor``),
    ``clone()`` and ``add_block_modifier(modifier, ensure_uniqueness=False)``."""

    def __init__(self, model) -> None:
        self.model = model
        self.block_modifiers: list = []

    def clone(self) -> "UnetPatcher":
        clone = UnetPatcher(self.model)
        clone.block_modifiers = list(self.block_modifiers)
        return clone

    def add_block_modifier(self, modifier, ensure_uniqueness=False) -> None:
        self.block_modifiers.append(modifier)


class ForgeObjects:
    """Forge's ``ForgeObjects`` (the UNet patcher here) and its ``shallow_copy()``."""

    def __init__(self, unet: UnetPatcher) -> None:
        self.unet = unet

    def shallow_copy(self) -> "ForgeObjects":
        return ForgeObjects(self.unet)


class ForgeModel(A1111Model):
    """Forge's ``backend/diffusion_engine/sd15.py`` / ``sdxl.py``: ``forge_objects`` (and the copy kept after the
    LoRAs are applied) and one text-processing engine per text encoder (``text_processing_engine`` SD1.x with width
    768; ``_l`` and ``_g`` SDXL, both 2048)."""

    def __init__(self, base: str) -> None:
        super().__init__(base)
        patcher = UnetPatcher(SimpleNamespace(diffusion_model=self.model.diffusion_model, predictor=Prediction()))
        self.forge_objects = ForgeObjects(patcher)
        self.forge_objects_after_applying_lora = ForgeObjects(patcher)
        if base == "sdxl":
            self.text_processing_engine_l = ForgeEngine(2048)
            self.text_processing_engine_g = ForgeEngine(2048)
        else:
            self.text_processing_engine = ForgeEngine(768)

    def databases(self) -> list:
        return [value.embeddings for value in vars(self).values() if isinstance(value, ForgeEngine)]


@dataclass
class Tab:
    """One tab: the script, its runner (whose ``inputs`` are what ``p.script_args`` is taken from) and the
    components of its output panel."""

    module: Any
    script: Any
    runner: Any
    html_log: Any
    panels: list = field(default_factory=list)

    @classmethod
    def build(cls, module, is_img2img: bool = False) -> "Tab":
        import gradio as gr
        from modules import script_callbacks, scripts

        script_callbacks.ui_settings_callback()
        runner = scripts.ScriptRunner()
        script = module.FairAdaptorScript()
        runner.initialize_script(script, is_img2img)
        with gr.Column() as column:
            runner.create_script_ui(script)
        tabname = "img2img" if is_img2img else "txt2img"
        with gr.Column() as output_panel:
            html_log = gr.HTML(elem_id=f"html_log_{tabname}")
            runner.after_component(html_log)
        return cls(module, script, runner, html_log, output_panel.children[1:])

    @property
    def controls(self) -> list:
        return self.runner.inputs[self.script.args_from:self.script.args_to]

    def set(self, enabled: bool = True, adaptor: str = "None", strength: float = 1.0, audit: bool = False,
            bypass: bool = False, bypass_lambda: float = 0.5, bypass_end: float = 0.3) -> None:
        values = (enabled, adaptor, strength, audit, bypass, bypass_lambda, bypass_end)
        for control, value in zip(self.controls, values, strict=True):
            control.value = value

    def processing(self, model, **fields):
        from modules import processing

        values = [c.value if c is not None else None for c in self.runner.inputs]
        return processing.StableDiffusionProcessing(sd_model=model, scripts=self.runner, script_args=values, **fields)

    def generate(self, model, **fields):
        from modules import processing

        p = self.processing(model, **fields)
        return p, processing.process_images(p)

    def start(self, model, **fields):
        """Only the start of a generation, up to the scripts' ``process`` (as when it fails right after)."""
        p = self.processing(model, **fields)
        p.setup_prompts()
        self.runner.process(p)
        return p

    def paste(self, infotext: str) -> list:
        """What pasting ``infotext`` (PNG info / the paste button) sets each accordion input to."""
        from modules import infotext_utils

        return infotext_utils.paste_values(self.runner.infotext_fields, infotext)
