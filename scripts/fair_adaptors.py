"""AUTOMATIC1111 / Forge: the "Fair Adaptor" accordion in txt2img and img2img.

It applies a fair adaptor through the built-in Lora (``<lora:name:w>``, so "Lora hashes" and the infotext work as
for any LoRA), makes its soft tokens take effect as trained (their words at the start of the positive prompt; on
Forge, which never reads a LoRA file's ``bundle_emb`` tokens, it registers them as embeddings itself) and audits each
batch against the target. Optionally (experimental) it bypasses the UNet mid-block early in sampling
(:mod:`fair_core.midblock`): torch hooks on A1111, Forge's UNet patcher on Forge. Thin: every rule is in
:mod:`fair_core.webui` and :mod:`fair_core.adaptor.hosts`.
"""

from __future__ import annotations

import sys
from pathlib import Path

EXTENSION_DIR = Path(__file__).resolve().parents[1]
if str(EXTENSION_DIR) not in sys.path:  # A1111 puts it on sys.path only while it imports this file
    sys.path.insert(0, str(EXTENSION_DIR))

import gradio as gr  # noqa: E402
from modules import paths, script_callbacks, scripts, shared  # noqa: E402
from modules.ui_components import FormRow, InputAccordion, ToolButton  # noqa: E402

from fair_core import webui  # noqa: E402
from fair_core.adaptor.errors import AdaptorError  # noqa: E402
from fair_core.adaptor.hosts import AdaptorHeader, list_adaptors  # noqa: E402
from fair_core.audit import audit_images  # noqa: E402
from fair_core.images import from_chw01  # noqa: E402

LOG_PREFIX = "[Fair Adaptors]"
CLASSIFIER_FOLDER = Path(paths.models_path) / "attribute_classifiers"
FORGE_CACHE = EXTENSION_DIR / ".cache" / "forge"
SECTION = ("fair_adaptors", "Fair Adaptors")
OPTION_CLASSIFIER = "fair_adaptors_classifier"
OPTION_TARGET = "fair_adaptors_target"
OPTION_AUDIT = "fair_adaptors_audit"
OPTION_STRENGTH = "fair_adaptors_strength"
DEFAULT_CLASSIFIER = "pretrained:gender,age"
LIVE_BYPASS_HOOKS: list[webui.MidBlockHooks] = []
"""Mid-block hooks on the loaded UNet, shared by both tabs' scripts: removed after each generation and, in case a
generation failed before ``postprocess``, before the next one of either tab."""


def adaptor_folders() -> list[Path]:
    """Where adaptors are listed from: the Lora folder and ``models/fair_adaptors``."""
    return [Path(shared.cmd_opts.lora_dir), Path(paths.models_path) / "fair_adaptors"]


def option(key: str, default):
    """A setting of Settings > Fair Adaptors (its default before the settings page was ever saved)."""
    return getattr(shared.opts, key, default)


def report(p, line: str) -> None:
    """One line under the gallery (the generation's comments) and in the console."""
    p.comment(line)
    print(f"{LOG_PREFIX} {line}")


def model_base(sd_model) -> str | None:
    """``sdxl`` / ``sd15`` / None for the loaded checkpoint (``is_sdxl`` and ``is_sd1`` exist on A1111 and Forge)."""
    if getattr(sd_model, "is_sdxl", False):
        return "sdxl"
    return "sd15" if getattr(sd_model, "is_sd1", False) else None


def remove_bypass_hooks() -> None:
    while LIVE_BYPASS_HOOKS:
        LIVE_BYPASS_HOOKS.pop().remove()


def is_forge(sd_model) -> bool:
    return hasattr(sd_model, "forge_objects")


def forge_embedding_databases(sd_model) -> list:
    """Forge's textual-inversion databases: one per text encoder (``text_processing_engine`` SD1.x, ``_l``/``_g``
    SDXL)."""
    names = ("text_processing_engine", "text_processing_engine_l", "text_processing_engine_g")
    return [getattr(sd_model, name).embeddings for name in names if hasattr(sd_model, name)]


class FairAdaptorScript(scripts.Script):
    """The accordion; one instance per tab. Per-generation state lives in ``self.run`` (A1111 runs one job at a
    time)."""

    def __init__(self) -> None:
        self.choices: dict[str, AdaptorHeader] = {}
        self.run = GenerationState()
        self.audit_panel = ""

    def title(self) -> str:
        return "Fair Adaptor"

    def show(self, is_img2img: bool):
        return scripts.AlwaysVisible

    # ------------------------------------------------------------------------- UI
    def ui(self, is_img2img: bool) -> list:
        self.refresh_choices()
        with InputAccordion(False, label="Fair Adaptor", elem_id=self.elem_id("enable")) as enabled:
            with FormRow():
                adaptor = gr.Dropdown(label="Adaptor", choices=self.dropdown_choices(), value=webui.NO_ADAPTOR,
                                      elem_id=self.elem_id("adaptor"))
                refresh = ToolButton(value="\U0001f504", elem_id=self.elem_id("refresh"))
            about = gr.HTML(value="", elem_id=self.elem_id("about"))
            strength = gr.Slider(minimum=0.0, maximum=2.0, step=0.05, value=option(OPTION_STRENGTH, 1.0),
                                 label="Strength", elem_id=self.elem_id("strength"))
            audit = gr.Checkbox(value=option(OPTION_AUDIT, False), label="Audit this batch (Settings > Fair Adaptors)",
                                elem_id=self.elem_id("audit"))
            bypass, bypass_lambda, bypass_end = self.bypass_ui()
        refresh.click(fn=self.refreshed_dropdown, inputs=[adaptor], outputs=[adaptor, about])
        adaptor.change(fn=self.describe, inputs=[adaptor], outputs=[about])
        controls = [enabled, adaptor, strength, audit, bypass, bypass_lambda, bypass_end]
        self.infotext_fields = list(zip(controls, webui.PASTE_FIELDS))
        self.paste_field_names = list(webui.PASTE_FIELDS)
        self.on_after_component(self.add_audit_panel, elem_id=f"html_log_{'img2img' if is_img2img else 'txt2img'}")
        return controls

    def bypass_ui(self) -> tuple:
        with gr.Accordion(label="Mid-block bypass (experimental)", open=False, elem_id=self.elem_id("bypass_group")):
            bypass = gr.Checkbox(value=False, elem_id=self.elem_id("bypass"),
                                 label="Bypass the UNet mid-block early in sampling (experimental, untuned: Hakemi "
                                       "et al. 2025 v1, reconstructed)")
            bypass_lambda = gr.Slider(minimum=0.0, maximum=1.0, step=0.05, value=0.5,
                                      elem_id=self.elem_id("bypass_lambda"),
                                      label="Strongest bypass (0 skips the mid-block, 1 changes nothing)")
            bypass_end = gr.Slider(minimum=0.05, maximum=1.0, step=0.05, value=0.3, elem_id=self.elem_id("bypass_end"),
                                   label="Back to normal at (fraction of sampling)")
        return bypass, bypass_lambda, bypass_end

    def refresh_choices(self) -> None:
        headers, problems = list_adaptors(adaptor_folders())
        self.choices = webui.adaptor_choices(headers)
        for problem in problems:
            print(f"{LOG_PREFIX} not listed: {problem}")

    def dropdown_choices(self) -> list[str]:
        return [webui.NO_ADAPTOR, *self.choices]

    def refreshed_dropdown(self, current: str):
        self.refresh_choices()
        value = current if current in self.choices else webui.NO_ADAPTOR
        return gr.update(choices=self.dropdown_choices(), value=value), self.describe(value)

    def describe(self, choice: str) -> str:
        header = self.choices.get(choice)
        return "" if header is None else webui.describe_header_html(header)

    def add_audit_panel(self, on_component) -> None:
        """Right after the gallery's log (A1111 calls this while building the output panel): our audit panel,
        refreshed whenever the log changes, which it does at the end of every generation."""
        panel = gr.HTML(value="", elem_id=self.elem_id("audit_panel"))
        on_component.component.change(fn=lambda: self.audit_panel, inputs=[], outputs=[panel])

    # ------------------------------------------------------------------------- processing hooks
    def process(self, p, *args) -> None:
        remove_bypass_hooks()
        settings = webui.FairSettings.from_args(args)
        self.run = GenerationState()
        if not settings.enabled:
            return
        if settings.applies_adaptor:
            self.run.adaptor = self.prepare_adaptor(p, settings)
        if settings.applies_bypass:
            self.run.bypass = self.prepare_bypass(p, settings)
        p.extra_generation_params.update(
            webui.infotext_params(settings, self.run.adaptor is not None, self.run.bypass is not None))
        if settings.audit:
            self.run.audit = self.prepare_audit(p)

    def prepare_adaptor(self, p, settings: webui.FairSettings) -> AppliedAdaptor | None:
        """The adaptor checked against the loaded model, or None (and one line) when it cannot be used."""
        header = self.choices.get(settings.adaptor)
        if header is None:
            self.refresh_choices()
            header = self.choices.get(settings.adaptor)
        try:
            if header is None:
                raise AdaptorError(f"not found in {', '.join(map(str, adaptor_folders()))}")
            forge = is_forge(p.sd_model)
            prepared = webui.prepare_adaptor(header.path, model_base(p.sd_model), forge=forge, cache_dir=FORGE_CACHE)
        except AdaptorError as error:
            report(p, f"Fair adaptor {settings.adaptor!r} not applied: {error}")
            return None
        for note in prepared.notes:
            print(f"{LOG_PREFIX} {note}")
        return AppliedAdaptor(settings.adaptor, header, prepared, settings.strength, forge)

    def prepare_bypass(self, p, settings: webui.FairSettings):
        """The bypass schedule, hooked into A1111's UNet now (Forge: per sampling pass), or None and one line."""
        try:
            schedule = settings.bypass_schedule()
            if is_forge(p.sd_model):
                unet = p.sd_model.forge_objects.unet.model.diffusion_model
                if not hasattr(unet, "middle_block"):
                    raise ValueError(f"this model ({type(unet).__name__}) has no UNet mid-block")
            else:
                LIVE_BYPASS_HOOKS.append(webui.MidBlockHooks(p.sd_model.model.diffusion_model, schedule))
        except (ValueError, AttributeError) as error:
            report(p, f"Fair mid-block bypass not applied: {error}")
            return None
        return schedule

    def process_before_every_sampling(self, p, *args, **kwargs) -> None:
        """Forge, before each sampling pass (hires included): the bypass on a clone of the UNet patcher, the way
        Forge's own FreeU patches it."""
        if self.run.bypass is None or not is_forge(p.sd_model):
            return
        unet = p.sd_model.forge_objects.unet.clone()
        unet.add_block_modifier(webui.forge_block_modifier(self.run.bypass, unet.model.predictor.timestep))
        p.sd_model.forge_objects.unet = unet

    def prepare_audit(self, p) -> AuditSetup | None:
        choice = option(OPTION_CLASSIFIER, DEFAULT_CLASSIFIER)
        try:
            scorer = webui.audit_scorer(webui.classifier_spec(choice, CLASSIFIER_FOLDER))
            adaptor_target = self.run.adaptor.header.target if self.run.adaptor is not None else None
            target = webui.audit_target(adaptor_target, option(OPTION_TARGET, ""), scorer.attributes)
        except (ValueError, OSError, ImportError) as error:  # TargetError and the classifiers' errors included
            report(p, f"Fair audit off: {error}")
            return None
        return AuditSetup(scorer, target)

    def before_process_batch(self, p, *args, batch_number: int, prompts: list[str], **kwargs) -> None:
        """Called before the built-in Lora parses ``<lora:...>`` out of the prompts: add ours and the token words
        (positive prompts only; the saved prompt stays as typed)."""
        applied = self.run.adaptor
        if applied is None:
            return
        key = self.register_network(applied)
        if applied.forge:
            self.register_forge_embeddings(p, applied)
        edit = lambda prompt: webui.adaptor_prompt(prompt, key, applied.strength, applied.prepared.words)  # noqa: E731
        prompts[:] = [edit(prompt) for prompt in prompts]
        self.edit_hires_prompts(p, batch_number, edit)

    def register_network(self, applied: AppliedAdaptor) -> str:
        """Make the built-in Lora know the adaptor's file (it lists only the Lora folder, and a refresh of its page
        forgets what was added), under a name free of other files."""
        import network
        import networks

        lora_file = applied.prepared.lora_file
        taken = {name: entry.filename for name, entry in networks.available_network_aliases.items()}
        key = webui.network_key(applied.choice, lora_file, taken)
        if key not in taken:
            entry = network.NetworkOnDisk(key, str(lora_file))
            networks.available_networks[key] = entry
            networks.available_network_aliases[key] = entry
        return key

    def register_forge_embeddings(self, p, applied: AppliedAdaptor) -> None:
        from backend.text_processing.textual_inversion import Embedding

        for database in forge_embedding_databases(p.sd_model):
            for token in applied.prepared.forge_embeddings:
                embedding = Embedding(token.vec, token.name)
                embedding.shape, embedding.vectors = token.shape, token.vectors
                database.register_embedding(embedding)
                self.run.forge_embeddings.append((database, token.name))

    def edit_hires_prompts(self, p, batch_number: int, edit) -> None:
        """The hires pass parses its own prompts out of ``p.all_hr_prompts`` right after this hook: edit this
        batch's until then (:meth:`process_batch` restores them), so that the adaptor stays active there too."""
        if not getattr(p, "enable_hr", False) or not getattr(p, "all_hr_prompts", None):
            return
        batch = slice(batch_number * p.batch_size, (batch_number + 1) * p.batch_size)
        self.run.hires_originals = (batch, p.all_hr_prompts[batch])
        p.all_hr_prompts[batch] = [edit(prompt) for prompt in p.all_hr_prompts[batch]]

    def process_batch(self, p, *args, **kwargs) -> None:
        """After the prompts were parsed, before params.txt and the infotexts are written: the hires prompts as
        typed again."""
        if self.run.hires_originals is not None:
            batch, originals = self.run.hires_originals
            p.all_hr_prompts[batch] = originals
            self.run.hires_originals = None

    def postprocess_batch_list(self, p, pp, *args, batch_number: int, **kwargs) -> None:
        """Before this batch's infotexts are written: audit the batch."""
        if self.run.audit is not None and pp.images:
            try:
                self.audit_batch(p, pp.images, batch_number)
            except (ValueError, RuntimeError, ImportError) as error:  # the images are kept whatever happens
                p.extra_generation_params.pop(webui.INFOTEXT_AUDIT, None)  # not the previous batch's line
                report(p, f"Fair audit of batch {batch_number + 1} failed: {error}")

    def audit_batch(self, p, images, batch_number: int) -> None:
        setup = self.run.audit
        result = audit_images(from_chw01(images), setup.scorer, setup.target,
                              prompt=f"batch {batch_number + 1}")
        line = webui.audit_line(result)
        p.extra_generation_params[webui.INFOTEXT_AUDIT] = line
        self.run.panels.append(webui.audit_html(result, f"Fair audit, batch {batch_number + 1}"))
        print(f"{LOG_PREFIX} batch {batch_number + 1}: {line}")

    def postprocess(self, p, processed, *args) -> None:
        remove_bypass_hooks()
        for database, name in self.run.forge_embeddings:
            database.register_embedding_by_name(None, name)
        self.run.forge_embeddings.clear()
        self.audit_panel = "".join(self.run.panels)


# Plain classes, not dataclasses: A1111 imports this file without registering it in sys.modules, and dataclasses
# look their module up there to read string annotations.
class AppliedAdaptor:
    """The adaptor of this generation: dropdown choice, header, what was prepared for the host, strength."""

    def __init__(self, choice: str, header: AdaptorHeader, prepared: webui.PreparedAdaptor, strength: float,
                 forge: bool) -> None:
        self.choice, self.header, self.prepared, self.strength, self.forge = choice, header, prepared, strength, forge


class AuditSetup:
    """The scorer and target of this generation's batch audits (target None: uniform)."""

    def __init__(self, scorer, target) -> None:
        self.scorer, self.target = scorer, target


class GenerationState:
    """What one generation decided in ``process`` and the later hooks use."""

    def __init__(self) -> None:
        self.adaptor: AppliedAdaptor | None = None
        self.audit: AuditSetup | None = None
        self.bypass = None
        """The mid-block bypass schedule when it applies."""
        self.forge_embeddings: list[tuple[object, str]] = []
        self.hires_originals: tuple[slice, list[str]] | None = None
        self.panels: list[str] = []


def on_ui_settings() -> None:
    """Settings > Fair Adaptors."""
    classifier_args = lambda: {"choices": webui.classifier_choices(CLASSIFIER_FOLDER)}  # noqa: E731
    shared.opts.add_option(OPTION_CLASSIFIER, shared.OptionInfo(
        DEFAULT_CLASSIFIER, "Audit classifier (a file in models/attribute_classifiers, or the offline pretrained "
        "gender/age networks)", gr.Dropdown, classifier_args, refresh=lambda: None, section=SECTION))
    shared.opts.add_option(OPTION_TARGET, shared.OptionInfo(
        "", "Default audit target when the adaptor has none, e.g. gender=uniform;age=young:0.7,old:0.3 "
        "(empty: uniform)", section=SECTION))
    shared.opts.add_option(OPTION_AUDIT, shared.OptionInfo(False, "Audit each batch by default", section=SECTION))
    shared.opts.add_option(OPTION_STRENGTH, shared.OptionInfo(
        1.0, "Default adaptor strength", gr.Slider, {"minimum": 0.0, "maximum": 2.0, "step": 0.05}, section=SECTION))


def on_infotext_pasted(infotext: str, params: dict[str, str]) -> None:
    webui.complete_pasted_params(params)


script_callbacks.on_ui_settings(on_ui_settings)
script_callbacks.on_infotext_pasted(on_infotext_pasted)
