"""What the AUTOMATIC1111 / Forge script (``scripts/fair_adaptors.py``) needs besides the adaptor file itself.

The script only moves values between the web UI and these functions; every rule lives here, testable without a
web UI:

* :class:`FairSettings` and the infotext keys: what the accordion writes to ``p.extra_generation_params`` and how
  a pasted infotext restores the accordion (:func:`infotext_params`, :func:`complete_pasted_params`).
* :func:`adaptor_prompt`: the positive prompt with the adaptor's ``<lora:...>`` tag and the words of its soft
  tokens at the start (right after BOS, as trained). Negative prompts are never touched.
* :func:`prepare_adaptor`: read and check a file once per (file, model), with what Forge needs: the embeddings
  (Forge never reads ``bundle_emb``) at its widths (768 SD1.x, 2048 = clip_l + clip_g SDXL), and a LoRA-only
  copy when Forge would drop the whole file for too many unknown keys.
* :func:`audit_target`, :func:`audit_line`, :func:`audit_html`: a batch audit's target, its infotext line and
  the panel shown under the gallery.
* The experimental mid-block bypass (maths in :mod:`fair_core.midblock`): :class:`MidBlockHooks` (torch hooks on
  A1111's UNet) and :func:`forge_block_modifier` (Forge's UNet patcher).

No host application (gradio, ``modules.*``) is imported here.
"""

from __future__ import annotations

import hashlib
import html
import re
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from fair_core.adaptor.errors import AdaptorError
from fair_core.adaptor.hosts import HOST_ENCODERS, AdaptorHeader, prompt_words
from fair_core.adaptor.reader import read_adaptor
from fair_core.adaptor.writer import save_adaptor
from fair_core.audit import AuditResult
from fair_core.midblock import BypassSchedule, blend, row_weights
from fair_core.host_helpers import resolve_in_folders
from fair_core.resolve import PRETRAINED, PRETRAINED_CHOICES, TOY, resolve_audit_scorer, resolve_target
from fair_core.scoring import AttributeScorer
from fair_core.targets import Attribute, TargetDistribution

NO_ADAPTOR = "None"
"""Dropdown choice for "audit only, apply nothing"."""
INFOTEXT_ADAPTOR = "Fair adaptor"
INFOTEXT_STRENGTH = "Fair strength"
INFOTEXT_AUDIT = "Fair audit"
PASTE_ENABLED = "Fair enabled"
"""Derived on paste (:func:`complete_pasted_params`), never written: the accordion's toggle."""
PASTE_AUDIT_ON = "Fair audit on"
"""Derived on paste, never written: the "audit this batch" checkbox."""
INFOTEXT_BYPASS = "Fair mid-block bypass"
"""λ_min of the experimental mid-block bypass."""
INFOTEXT_BYPASS_END = "Fair mid-block bypass end"
PASTE_BYPASS_ON = "Fair mid-block bypass on"
"""Derived on paste, never written: the bypass checkbox."""
PASTE_FIELDS = (PASTE_ENABLED, INFOTEXT_ADAPTOR, INFOTEXT_STRENGTH, PASTE_AUDIT_ON, PASTE_BYPASS_ON, INFOTEXT_BYPASS,
                INFOTEXT_BYPASS_END)
"""Infotext key of each accordion input, in the order of :meth:`FairSettings.ui_values`."""

ENCODER_WIDTHS = {"clip_l": 768, "clip_g": 1280}
FORGE_ENCODERS = {"sd15": ("clip_l",), "sdxl": ("clip_l", "clip_g")}
FORGE_EMBEDDING_WIDTH = {"sd15": 768, "sdxl": 2048}
"""Forge's textual-inversion width per base: SDXL embeddings count clip_l + clip_g."""
FORGE_MAX_UNMATCHED_KEYS = 12
"""Forge's ``load_lora_for_models`` drops a whole LoRA with more unmatched keys than this."""
_NETWORK_KEY_UNSAFE = re.compile(r"[:<>,]")
CLASSIFIER_SUFFIXES = (".onnx", ".safetensors")


@dataclass(frozen=True)
class FairSettings:
    """The accordion's values, in the order ``ui()`` returns its components.

    Attributes:
        enabled: the accordion's checkbox; off means the script does nothing at all.
        adaptor: a dropdown choice (:func:`adaptor_choices`) or :data:`NO_ADAPTOR`.
        strength: the LoRA multiplier (text encoder and UNet alike).
        audit: audit each batch (face detection + classifier) against the target.
        bypass: the experimental mid-block bypass (:mod:`fair_core.midblock`).
        bypass_lambda: its strongest bypass λ_min (0 skips the mid-block, 1 changes nothing).
        bypass_end: the sampling progress by which λ is back to 1 (it starts at λ_min).
    """

    enabled: bool
    adaptor: str
    strength: float
    audit: bool
    bypass: bool = False
    bypass_lambda: float = 0.5
    bypass_end: float = 0.3

    @classmethod
    def from_args(cls, args: Sequence) -> "FairSettings":
        """From the values a processing hook receives (``*args``), as ``ui()`` ordered them."""
        enabled, adaptor, strength, audit, bypass, bypass_lambda, bypass_end = args
        return cls(bool(enabled), str(adaptor or NO_ADAPTOR), float(strength), bool(audit), bool(bypass),
                   float(bypass_lambda), float(bypass_end))

    def ui_values(self) -> tuple:
        return (self.enabled, self.adaptor, self.strength, self.audit, self.bypass, self.bypass_lambda,
                self.bypass_end)

    @property
    def applies_bypass(self) -> bool:
        return self.enabled and self.bypass

    def bypass_schedule(self) -> BypassSchedule:
        """λ from ``bypass_lambda`` at the first step back to 1 at ``bypass_end`` (linear); ``ValueError`` names a
        value out of range."""
        return BypassSchedule(lambda_min=self.bypass_lambda, start=0.0, end=self.bypass_end, schedule="linear")

    @property
    def applies_adaptor(self) -> bool:
        return self.enabled and self.adaptor != NO_ADAPTOR


def infotext_params(settings: FairSettings, adaptor_applied: bool, bypass_applied: bool) -> dict[str, str]:
    """What goes into ``p.extra_generation_params`` for what was applied (the audit adds :data:`INFOTEXT_AUDIT` per
    batch itself)."""
    params = {}
    if settings.applies_adaptor and adaptor_applied:
        params |= {INFOTEXT_ADAPTOR: settings.adaptor, INFOTEXT_STRENGTH: format_number(settings.strength)}
    if settings.applies_bypass and bypass_applied:
        params |= {INFOTEXT_BYPASS: format_number(settings.bypass_lambda),
                   INFOTEXT_BYPASS_END: format_number(settings.bypass_end)}
    return params


def complete_pasted_params(params: dict[str, str]) -> None:
    """For ``on_infotext_pasted``: add the keys of the checkboxes (toggle, audit, bypass), which are never written
    but follow from the others, so that pasting an infotext without our keys switches the accordion off."""
    audited, bypassed = INFOTEXT_AUDIT in params, INFOTEXT_BYPASS in params
    params[PASTE_ENABLED] = str(INFOTEXT_ADAPTOR in params or audited or bypassed)
    params[PASTE_AUDIT_ON] = str(audited)
    params[PASTE_BYPASS_ON] = str(bypassed)
    if audited or bypassed:
        params.setdefault(INFOTEXT_ADAPTOR, NO_ADAPTOR)


def format_number(value: float) -> str:
    """``0.8`` not ``0.8000000001``; integers without ``.0``."""
    return f"{value:.4g}"


# ----------------------------------------------------------------------------- adaptor choices and prompts
def adaptor_choices(headers: Iterable[AdaptorHeader]) -> dict[str, AdaptorHeader]:
    """Dropdown choice -> header: the adaptor's name (its ``<lora:name>`` alias), or ``name (file name)`` for a
    later file of the same name."""
    choices: dict[str, AdaptorHeader] = {}
    for header in headers:
        choice = header.name if header.name not in choices else f"{header.name} ({header.path.name})"
        choices[choice] = header
    return choices


def describe_header_html(header: AdaptorHeader) -> str:
    """Two lines under the dropdown: the adaptor's label, then its attributes and file."""
    attributes = ", ".join(f"{a.name} ({'/'.join(a.classes)})" for a in header.attributes) or "none recorded"
    return (f"{html.escape(header.label())}<br>attributes: {html.escape(attributes)}; "
            f"file: {html.escape(str(header.path))}")


def network_key(choice: str, path: Path, taken: Mapping[str, str]) -> str:
    """The name the built-in Lora knows the file by (``<lora:KEY:w>``): the choice without ``:<>,``, kept if free
    or already naming ``path`` in ``taken`` (name -> file), else prefixed with ``fair_`` until it is."""
    key = _NETWORK_KEY_UNSAFE.sub("_", choice)
    while key in taken and Path(taken[key]).resolve() != path.resolve():
        key = f"fair_{key}"
    return key


def lora_tag(key: str, strength: float) -> str:
    return f"<lora:{key}:{format_number(strength)}>"


def adaptor_prompt(prompt: str, key: str, strength: float, words: str) -> str:
    """``prompt`` with ``words`` (soft tokens, right after BOS) at its start and exactly one ``<lora:key:strength>``:
    tags the user typed for the same network are replaced by ours."""
    own_tags = re.compile(rf"<lora:{re.escape(key)}(:[^>]*)?>")
    body = own_tags.sub("", prompt)
    text = f"{words} {body}" if words and body else words or body
    return text + lora_tag(key, strength)


# ----------------------------------------------------------------------------- reading an adaptor for a host
@dataclass(frozen=True)
class ForgeEmbedding:
    """One soft token as Forge's ``backend.text_processing.textual_inversion.Embedding`` wants it.

    Attributes:
        name: the prompt word.
        vec: ``(n, 768)`` for SD1.x; ``{"clip_l": (n, 768), "clip_g": (n, 1280)}`` for SDXL.
        shape: the embedding width Forge checks (:data:`FORGE_EMBEDDING_WIDTH`).
        vectors: ``n``, the prompt positions it takes.
    """

    name: str
    vec: torch.Tensor | dict[str, torch.Tensor]
    shape: int
    vectors: int


@dataclass(frozen=True)
class PreparedAdaptor:
    """An adaptor checked against the loaded model, with what the script applies.

    Attributes:
        lora_file: the file the built-in Lora loads (a LoRA-only copy on Forge when needed, else the adaptor).
        words: the soft tokens' prompt words ("" without tokens).
        forge_embeddings: the tokens for Forge's text encoders (empty unless prepared for Forge).
        notes: one line each for what was done to fit the host (printed to the console).
    """

    lora_file: Path
    words: str
    forge_embeddings: tuple[ForgeEmbedding, ...]
    notes: tuple[str, ...]


def prepare_adaptor(path: str | Path, base: str, *, forge: bool, cache_dir: str | Path) -> PreparedAdaptor:
    """Read and check ``path`` for a loaded model of ``base`` (``sd15``/``sdxl``); cached per file version.

    Raises:
        AdaptorError: one line, for a malformed file or one made for another base model.
    """
    path = Path(path)
    try:
        stat = path.stat()
    except OSError as error:
        raise AdaptorError(f"{path.name}: cannot be read ({error.strerror})") from None
    return _prepare(path.resolve(), stat.st_mtime_ns, stat.st_size, base, forge, Path(cache_dir))


@lru_cache(maxsize=8)
def _prepare(path: Path, mtime_ns: int, size: int, base: str, forge: bool, cache_dir: Path) -> PreparedAdaptor:
    if base not in FORGE_EMBEDDING_WIDTH:
        raise AdaptorError(f"{path.name}: fair adaptors are for SD1.5 and SDXL; "
                           f"the loaded model is {base or 'neither'}")
    adaptor = read_adaptor(path, expected_base=base)
    if not forge:
        return PreparedAdaptor(path, prompt_words(adaptor), (), ())
    embeddings = tuple(forge_embedding(t.name, t.vectors, base) for t in adaptor.tokens)
    unmatched = sum(len(t.vectors) for t in adaptor.tokens)
    if unmatched <= FORGE_MAX_UNMATCHED_KEYS:
        return PreparedAdaptor(path, prompt_words(adaptor), embeddings, ())
    digest = hashlib.sha256(f"{path}|{mtime_ns}|{size}".encode()).hexdigest()[:12]
    copy = cache_dir / f"{path.stem}.lora-only.{digest}.safetensors"
    if not copy.is_file():
        save_adaptor(replace(adaptor, tokens=[], header={}), copy)
    note = (f"{path.name}: Forge drops a LoRA with more than {FORGE_MAX_UNMATCHED_KEYS} unknown keys and this file "
            f"has {unmatched} soft-token keys, so Forge loads the LoRA-only copy {copy} and the tokens are supplied "
            "as embeddings")
    return PreparedAdaptor(copy, prompt_words(adaptor), embeddings, (note,))


def forge_embedding(name: str, vectors: Mapping[str, torch.Tensor], base: str) -> ForgeEmbedding:
    """One token's vectors (keyed by our families ``te``/``te1``/``te2``) as Forge's embedding for ``base``."""
    host = {HOST_ENCODERS[family]: tensor.detach().float().cpu() for family, tensor in vectors.items()}
    wanted = FORGE_ENCODERS[base]
    if tuple(sorted(host)) != tuple(sorted(wanted)):
        raise AdaptorError(f"soft token {name!r} has vectors for {sorted(host)}, {base} needs {list(wanted)}")
    for encoder, tensor in host.items():
        if tensor.ndim != 2 or tensor.shape[1] != ENCODER_WIDTHS[encoder]:
            raise AdaptorError(f"soft token {name!r}: {encoder} vectors have shape {tuple(tensor.shape)}, "
                               f"expected (n, {ENCODER_WIDTHS[encoder]})")
    counts = {int(tensor.shape[0]) for tensor in host.values()}
    if len(counts) != 1:
        raise AdaptorError(f"soft token {name!r}: its encoders have different vector counts {sorted(counts)}")
    shape = sum(int(tensor.shape[1]) for tensor in host.values())
    vec = host["clip_l"] if base == "sd15" else host
    return ForgeEmbedding(name, vec, shape, counts.pop())


# ----------------------------------------------------------------------------- batch audit
def classifier_choices(folder: str | Path) -> list[str]:
    """Settings choices: the offline pretrained networks, then the classifier files under ``folder`` (relative)."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.suffix in CLASSIFIER_SUFFIXES) if folder.is_dir() else []
    return [*PRETRAINED_CHOICES, *(p.relative_to(folder).as_posix() for p in files)]


def classifier_spec(choice: str, folder: str | Path) -> str:
    """What :func:`fair_core.resolve.resolve_audit_scorer` takes for a settings choice: ``pretrained:...`` and
    ``toy`` as they are, a file name as its path inside ``folder`` (never outside it)."""
    if choice.startswith(PRETRAINED) or choice == TOY:
        return choice
    return str(resolve_in_folders(choice, [folder], "classifier"))


def audit_scorer(spec: str) -> AttributeScorer:
    """:func:`fair_core.resolve.resolve_audit_scorer`, kept while the spec (and a file's version) stays the same."""
    path = Path(spec)
    version = path.stat().st_mtime_ns if path.is_file() else 0
    return _audit_scorer(spec, version)


@lru_cache(maxsize=2)
def _audit_scorer(spec: str, version: int) -> AttributeScorer:
    return resolve_audit_scorer(spec)


def audit_target(adaptor_target: TargetDistribution | None, default_spec: str,
                 attributes: Sequence[Attribute]) -> TargetDistribution | None:
    """What a batch is audited against: the applied adaptor's trained target when the classifier predicts all its
    attributes (same classes), else the settings' default target, else None (uniform).

    Raises:
        TargetError: the default target does not parse against the classifier's attributes.
    """
    known = {(a.name, tuple(a.classes)) for a in attributes}
    if adaptor_target is not None and all((a.name, tuple(a.classes)) in known for a in adaptor_target.attributes):
        return adaptor_target
    if default_spec.strip():
        return resolve_target(default_spec, attributes, what="default target (Settings > Fair Adaptors)")
    return None


def audit_line(result: AuditResult) -> str:
    """The infotext summary, without commas or colons (A1111 would quote it), e.g.
    ``7/8 faces; gender female 43% male 57% (distance 0.07)``."""
    overall = result.summary.overall
    parts = [f"{overall.num_faces}/{overall.num_images} faces"]
    if overall.num_faces == 0:
        return f"{parts[0]}; no bias figures"
    for name in result.target.names:
        group = overall.groups[name]
        shares = " ".join(f"{c} {f:.0%}" for c, f in zip(group.classes, np.atleast_1d(group.frequencies.estimate)))
        parts.append(f"{name} {shares} (distance {group.distance.estimate:.2f})")
    return "; ".join(parts)


def audit_html(result: AuditResult, title: str) -> str:
    """The panel under the gallery: face rate, then per attribute a bar per class (share, its interval, and a
    mark at the target share), distance to target and bias."""
    overall = result.summary.overall
    rate = overall.face_rate
    rows = [f"<h4>{html.escape(title)}</h4>",
            f"<p>{overall.num_faces} of {overall.num_images} images with a face (face rate {rate.estimate:.0%}, "
            f"interval {rate.low:.0%}&ndash;{rate.high:.0%})</p>"]
    if overall.num_faces == 0:
        rows.append("<p>No faces: no bias figures.</p>")
    else:
        rows += [_group_html(name, overall.groups[name]) for name in result.target.names]
    return f"<div class='fair-audit'>{''.join(rows)}</div>"


def _group_html(name: str, group) -> str:
    frequencies = group.frequencies
    bars = "".join(
        _bar_html(label, share, low, high, target)
        for label, share, low, high, target in zip(group.classes, np.atleast_1d(frequencies.estimate),
                                                   np.atleast_1d(frequencies.low), np.atleast_1d(frequencies.high),
                                                   np.atleast_1d(group.target)))
    return (f"<table class='fair-audit-group'><caption>{html.escape(name)}: distance to target "
            f"{group.distance.estimate:.3f} [{group.distance.low:.3f}, {group.distance.high:.3f}], bias "
            f"{group.bias.estimate:.3f}</caption>{bars}</table>")


def _bar_html(label: str, share: float, low: float, high: float, target: float) -> str:
    bar = (f"<div style='position:relative;width:12em;height:0.9em;background:rgba(128,128,128,0.2)'>"
           f"<div style='width:{100 * share:.1f}%;height:100%;background:#4a90d9'></div>"
           f"<div title='target' style='position:absolute;top:-0.2em;left:{100 * target:.1f}%;width:2px;"
           f"height:1.3em;background:#d9534f'></div></div>")
    return (f"<tr><td>{html.escape(label)}</td><td>{bar}</td><td>{share:.0%} [{low:.0%}, {high:.0%}]</td>"
            f"<td>target {target:.0%}</td></tr>")


# ----------------------------------------------------------------------------- mid-block bypass (experimental)
def bypassed(schedule: BypassSchedule, h_in: torch.Tensor, h_mid: torch.Tensor, timesteps: torch.Tensor,
             cond_or_uncond: Sequence[int] = ()) -> torch.Tensor:
    """The mid-block's output ``h_mid`` blended with its input ``h_in`` at λ of each row's model timestep."""
    weights = row_weights(schedule, timesteps, h_mid.shape[0], cond_or_uncond)
    return blend(h_in, h_mid, weights.to(h_mid.device))


class MidBlockHooks:
    """The bypass on A1111's UNet (``sd_model.model.diffusion_model``, whose ``forward(x, timesteps, ...)`` gets the
    timesteps by position for SD1.x and by keyword for SDXL) as two torch hooks: one keeps each call's timesteps,
    one blends ``middle_block``'s output with its input. :meth:`remove` takes both off."""

    def __init__(self, unet: torch.nn.Module, schedule: BypassSchedule) -> None:
        if not isinstance(getattr(unet, "middle_block", None), torch.nn.Module):
            raise ValueError(f"the mid-block bypass needs a UNet with a middle_block; this model has "
                             f"{type(unet).__name__}")
        self.schedule = schedule
        self.timesteps: torch.Tensor | None = None
        self.handles = [unet.register_forward_pre_hook(self._keep_timesteps, with_kwargs=True),
                        unet.middle_block.register_forward_hook(self._blend)]

    def _keep_timesteps(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self.timesteps = kwargs["timesteps"] if "timesteps" in kwargs else args[1]

    def _blend(self, module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return bypassed(self.schedule, inputs[0], output, self.timesteps)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def forge_block_modifier(schedule: BypassSchedule, timestep_of: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
    """The bypass for Forge's ``UnetPatcher.add_block_modifier``: Forge calls ``modifier(h, "before"|"after",
    transformer_options)`` around every block, with ``block == ("middle", 0)`` around the mid-block, the rows'
    ``sigmas`` and ``cond_or_uncond``; ``timestep_of`` turns sigmas into model timesteps (the predictor's
    ``timestep``)."""
    kept: dict[str, torch.Tensor] = {}

    def modifier(h: torch.Tensor, when: str, options: dict) -> torch.Tensor:
        if options.get("block") != ("middle", 0):
            return h
        if when == "before":
            kept["h"] = h
            return h
        return bypassed(schedule, kept.pop("h"), h, timestep_of(options["sigmas"]), options.get("cond_or_uncond", ()))

    return modifier
