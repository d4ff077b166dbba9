"""One web-UI tab around the script: build its UI through the ``ScriptRunner`` stand-in, set the accordion's
values, generate, paste an infotext back. Also writes the adaptor files the tests use (with the library's own
writer) and the loaded-model stand-ins."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fair_core.adaptor import FairAdaptor, FairMetadata, LoraWeights, SoftTokens, save_adaptor
from fair_core.targets import TargetDistribution
from fair_core.toyworld.world import TOY_SCHEMA

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


class A1111Model:
    """A loaded checkpoint as the script sees it on A1111 1.10 (``modules/sd_models.py`` sets ``is_sdxl`` and
    ``is_sd1``)."""

    def __init__(self, base: str) -> None:
        self.is_sdxl = base == "sdxl"
        self.is_sd1 = base == "sd15"


class ForgeEngine:
    """Forge's ``ClassicTextProcessingEngine``: holds its text encoder's ``embeddings`` database."""

    def __init__(self, expected_shape: int) -> None:
        from backend.text_processing.textual_inversion import EmbeddingDatabase

        self.embeddings = EmbeddingDatabase(None, expected_shape)


class ForgeModel(A1111Model):
    """Forge's ``backend/diffusion_engine/sd15.py`` / ``sdxl.py``: ``forge_objects`` and one text-processing engine
    per text encoder (``text_processing_engine`` SD1.x with width 768; ``_l`` and ``_g`` SDXL, both 2048)."""

    def __init__(self, base: str) -> None:
        super().__init__(base)
        self.forge_objects = object()
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

    def set(self, enabled: bool = True, adaptor: str = "None", strength: float = 1.0, audit: bool = False) -> None:
        for control, value in zip(self.controls, (enabled, adaptor, strength, audit)):
            control.value = value

    def generate(self, model, **fields):
        from modules import processing

        values = [c.value if c is not None else None for c in self.runner.inputs]
        p = processing.StableDiffusionProcessing(sd_model=model, scripts=self.runner, script_args=values, **fields)
        return p, processing.process_images(p)

    def paste(self, infotext: str) -> list:
        """What pasting ``infotext`` (PNG info / the paste button) sets each accordion input to."""
        from modules import infotext_utils

        return infotext_utils.paste_values(self.runner.infotext_fields, infotext)
