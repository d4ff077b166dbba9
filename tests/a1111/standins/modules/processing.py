"""Stand-in for ``modules/processing.py`` (A1111 1.10, and Forge's copy of it), written for these tests.

``StableDiffusionProcessing`` keeps the fields the script reads and writes (``prompt``, ``all_prompts``,
``prompts``, ``negative_prompts``, ``extra_generation_params``, ``comment()``, ``sd_model``, ``script_args``, and the
txt2img hires fields ``enable_hr``/``all_hr_prompts``). ``process_images(p)`` runs the hooks in the order of
``process_images_inner``: ``setup_prompts``, ``scripts.process``, then per batch ``before_process_batch`` ->
``parse_extra_network_prompts`` -> ``extra_networks.activate`` -> ``process_batch`` -> conditioning (recorded in
``p.conds``) -> the first batch's infotext to params.txt (``p.params_txt``) -> sampling
(random pixels; the UNet is called as :func:`run_unet` says) -> prompts reset from ``all_prompts`` ->
``postprocess_batch_list`` -> one ``create_infotext`` per image; then ``scripts.postprocess``. With ``enable_hr`` the
hires pass parses ``all_hr_prompts`` and activates its own networks, and the infotext has a "Hires prompt" when it
differs from the prompt, as ``StableDiffusionProcessingTxt2Img`` does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from modules import extra_networks, infotext_utils, scripts


@dataclass(repr=False)
class StableDiffusionProcessing:
    sd_model: Any = None
    prompt: str = ""
    negative_prompt: str = ""
    seed: int = 1
    steps: int = 20
    width: int = 16
    height: int = 16
    batch_size: int = 1
    n_iter: int = 1
    enable_hr: bool = False
    scripts: Any = None
    script_args: list = field(default_factory=list)
    extra_generation_params: dict = field(default_factory=dict)
    comments: dict = field(default_factory=dict)
    conds: list = field(default_factory=list)
    """What the text encoders saw per batch (stand-in only): ``(positive prompts, negative prompts)``; with hires also
    ``("hires", hires prompts)``."""
    unet_outputs: list = field(default_factory=list)
    """The UNet's outputs, per batch and step (stand-in only)."""

    def comment(self, text):
        self.comments[text] = 1

    def setup_prompts(self):
        self.all_prompts = self.batch_size * self.n_iter * [self.prompt]
        self.all_negative_prompts = [self.negative_prompt] * len(self.all_prompts)
        self.all_hr_prompts = list(self.all_prompts) if self.enable_hr else None

    def parse_extra_network_prompts(self):
        self.prompts, self.extra_network_data = extra_networks.parse_prompts(self.prompts)
        if self.enable_hr:
            batch = slice(self.iteration * self.batch_size, (self.iteration + 1) * self.batch_size)
            self.hr_prompts, self.hr_extra_network_data = extra_networks.parse_prompts(self.all_hr_prompts[batch])


class Processed:
    def __init__(self, p, images_list, infotexts):
        self.images = images_list
        self.infotexts = infotexts
        self.comments = "".join(f"{comment}\n" for comment in p.comments)


def create_infotext(p, all_prompts, all_seeds, index=0):
    """Image ``index``'s infotext: its prompt, the negative prompt line, then ``Key: value`` pairs (values quoted
    by ``infotext_utils.quote``); a "Hires prompt" only when the hires prompt differs from the prompt."""
    parameters = {"Steps": p.steps, "Seed": all_seeds[index], "Size": f"{p.width}x{p.height}",
                  **p.extra_generation_params}
    if p.enable_hr and p.all_hr_prompts[index] != all_prompts[index]:
        parameters["Hires prompt"] = p.all_hr_prompts[index]
    lines = [all_prompts[index]]
    if p.negative_prompt:
        lines.append(f"Negative prompt: {p.negative_prompt}")
    lines.append(", ".join(f"{key}: {infotext_utils.quote(value)}" for key, value in parameters.items()
                           if value is not None))
    return "\n".join(lines)


def process_images(p: StableDiffusionProcessing) -> Processed:
    p.setup_prompts()
    p.all_seeds = [p.seed + x for x in range(len(p.all_prompts))]
    p.scripts.process(p)
    infotexts, output_images = [], []
    for n in range(p.n_iter):
        p.iteration = n
        batch = slice(n * p.batch_size, (n + 1) * p.batch_size)
        p.prompts, p.negative_prompts, p.seeds = p.all_prompts[batch], p.all_negative_prompts[batch], p.all_seeds[batch]
        p.scripts.before_process_batch(p, batch_number=n, prompts=p.prompts, seeds=p.seeds, subseeds=p.seeds)
        p.parse_extra_network_prompts()
        extra_networks.activate(p, p.extra_network_data)
        p.scripts.process_batch(p, batch_number=n, prompts=p.prompts, seeds=p.seeds, subseeds=p.seeds)
        p.conds.append((list(p.prompts), list(p.negative_prompts)))
        if n == 0:
            p.params_txt = create_infotext(p, p.all_prompts, p.all_seeds)
        if p.enable_hr:
            extra_networks.activate(p, p.hr_extra_network_data)
            p.conds.append(("hires", list(p.hr_prompts)))
        generator = torch.Generator().manual_seed(p.seeds[0])
        x_samples = torch.rand(len(p.prompts), 3, p.height, p.width, generator=generator)
        run_unet(p, x_samples)
        p.prompts, p.negative_prompts = p.all_prompts[batch], p.all_negative_prompts[batch]
        batch_params = scripts.PostprocessBatchListArgs(list(x_samples))
        p.scripts.postprocess_batch_list(p, batch_params, batch_number=n)
        for i, image in enumerate(batch_params.images):
            infotexts.append(create_infotext(p, p.prompts, p.seeds, index=i))
            output_images.append(image)
    res = Processed(p, output_images, infotexts)
    p.scripts.postprocess(p, res)
    return res


def run_unet(p, x):
    """Two sampling steps' UNet calls (model timesteps 999, then 0), outputs appended to ``p.unet_outputs``.

    A1111 calls ``sd_model.model.diffusion_model`` as ldm's ``DiffusionWrapper`` does for SD1.x (``(x, t,
    context=...)``) and sgm's ``OpenAIWrapper`` for SDXL (``(x, timesteps=t, ...)``). Forge resets ``forge_objects``
    from ``forge_objects_after_applying_lora``, calls the scripts' ``process_before_every_sampling``, then runs its
    UNet patcher's model as ``backend/sampling/sampling_function.py`` does: the patcher's block modifiers, the rows'
    ``sigmas`` and ``cond_or_uncond`` in ``transformer_options``, the timesteps from the predictor.
    """
    forge = hasattr(p.sd_model, "forge_objects")
    if forge:
        p.sd_model.forge_objects = p.sd_model.forge_objects_after_applying_lora.shallow_copy()
        p.scripts.process_before_every_sampling(p, x=x, noise=x, c=None, uc=None)
    for step in (999, 0):
        t = torch.full((x.shape[0],), float(step))
        if forge:
            patcher = p.sd_model.forge_objects.unet
            sigmas = patcher.model.predictor.sigma(t)
            options = {"block_modifiers": list(patcher.block_modifiers), "sigmas": sigmas, "cond_or_uncond": [0]}
            timesteps = patcher.model.predictor.timestep(sigmas)
            out = patcher.model.diffusion_model(x, timesteps, transformer_options=options)
        elif p.sd_model.is_sdxl:
            out = p.sd_model.model.diffusion_model(x, timesteps=t, context=None)
        else:
            out = p.sd_model.model.diffusion_model(x, t, context=None)
        p.unet_outputs.append(out.detach())
