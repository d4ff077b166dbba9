"""fair_core.webui: the rules behind the A1111/Forge script, with hand-worked expectations."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from fair_core import webui
from fair_core.adaptor import (AdaptorError, FairAdaptor, FairMetadata, LoraWeights, SoftTokens, read_adaptor,
                               save_adaptor)
from fair_core.adaptor.hosts import read_adaptor_header
from fair_core.audit import AuditResult, summarise_records
from fair_core.targets import Attribute, TargetDistribution, TargetError

COLOUR = Attribute("colour", ("red", "blue"))
SHAPE = Attribute("shape", ("round", "square", "triangle"))


def write(path: Path, base: str = "sd15", tokens: int = 1, vectors: int = 2, name: str = "fair") -> Path:
    widths = {"sd15": {"te": 768}, "sdxl": {"te1": 768, "te2": 1280}}[base]
    family, width = next(iter(widths.items()))
    lora = {f"lora_{family}_text_model_encoder_layers_0_self_attn_q_proj":
            LoraWeights(torch.ones(2, width), torch.ones(width, 2), 2.0)}
    soft = [SoftTokens(f"{name}{i}", {f: torch.full((vectors, w), float(i)) for f, w in widths.items()})
            for i in range(tokens)]
    metadata = FairMetadata(base_model=base, name=name, target=TargetDistribution.uniform((COLOUR,)))
    return save_adaptor(FairAdaptor(metadata=metadata, lora=lora, tokens=soft), path)


# ----------------------------------------------------------------------------- settings and infotext
def test_settings_write_what_was_applied_and_paste_back_to_the_same_values():
    settings = webui.FairSettings.from_args([True, "nurse_fair", 0.8, True, True, 0.25, 0.4])
    params = webui.infotext_params(settings, adaptor_applied=True, bypass_applied=True)
    assert params == {"Fair adaptor": "nurse_fair", "Fair strength": "0.8", "Fair mid-block bypass": "0.25",
                      "Fair mid-block bypass end": "0.4"}
    params["Fair audit"] = "4/4 faces"
    webui.complete_pasted_params(params)
    pasted = [params[key] for key in webui.PASTE_FIELDS]
    assert pasted == ["True", "nurse_fair", "0.8", "True", "True", "0.25", "0.4"]
    assert webui.FairSettings.from_args(settings.ui_values()) == settings


@pytest.mark.parametrize("args, adaptor_applied, bypass_applied", [
    ([False, "nurse_fair", 0.8, True, True, 0.5, 0.3], True, True),
    ([True, "None", 1.0, False, False, 0.5, 0.3], True, True),
    ([True, "nurse_fair", 1.0, False, True, 0.5, 0.3], False, False),
])
def test_nothing_is_written_for_what_was_not_applied(args, adaptor_applied, bypass_applied):
    assert webui.infotext_params(webui.FairSettings.from_args(args), adaptor_applied, bypass_applied) == {}


def test_an_audit_only_infotext_pastes_the_none_adaptor_and_a_foreign_one_switches_off():
    audit_only = {"Fair audit": "2/2 faces"}
    webui.complete_pasted_params(audit_only)
    assert audit_only == {"Fair audit": "2/2 faces", "Fair enabled": "True", "Fair audit on": "True",
                          "Fair mid-block bypass on": "False", "Fair adaptor": "None"}
    foreign = {"Steps": "20"}
    webui.complete_pasted_params(foreign)
    assert foreign == {"Steps": "20", "Fair enabled": "False", "Fair audit on": "False",
                       "Fair mid-block bypass on": "False"}


def test_numbers_are_written_short():
    assert [webui.format_number(v) for v in (0.8, 1.0, 0.1 + 0.2, 1.25)] == ["0.8", "1", "0.3", "1.25"]


# ----------------------------------------------------------------------------- choices, network names, prompts
def test_choices_are_names_and_a_repeated_name_gets_its_file(tmp_path):
    headers = [read_adaptor_header(write(tmp_path / f"{stem}.safetensors", name=name))
               for stem, name in (("a", "nurse"), ("b", "doctor"), ("c", "nurse"))]
    choices = webui.adaptor_choices(headers)
    assert list(choices) == ["nurse", "doctor", "nurse (c.safetensors)"]
    assert choices["nurse (c.safetensors)"].path == tmp_path / "c.safetensors"
    assert "nurse (sd15): colour: red 50%, blue 50%" in webui.describe_header_html(choices["nurse"])


def test_network_key_is_the_choice_unless_another_file_has_it(tmp_path):
    ours, other = tmp_path / "ours.safetensors", tmp_path / "other.safetensors"
    assert webui.network_key("a:b<c>,d", ours, {}) == "a_b_c__d"
    assert webui.network_key("nurse", ours, {"nurse": str(ours)}) == "nurse"
    assert webui.network_key("nurse", ours, {"nurse": str(other)}) == "fair_nurse"
    assert webui.network_key("nurse", ours, {"nurse": str(other), "fair_nurse": str(other)}) == "fair_fair_nurse"


@pytest.mark.parametrize("prompt, expected", [
    ("a nurse", "w1 w2 a nurse<lora:key:0.8>"),
    ("", "w1 w2<lora:key:0.8>"),
    ("a nurse <lora:key:0.3> <lora:key>", "w1 w2 a nurse  <lora:key:0.8>"),
    ("a nurse <lora:other:0.3>", "w1 w2 a nurse <lora:other:0.3><lora:key:0.8>"),
    ("a nurse <lora:key2:0.3>", "w1 w2 a nurse <lora:key2:0.3><lora:key:0.8>"),
])
def test_the_prompt_gets_the_words_first_and_exactly_one_tag(prompt, expected):
    assert webui.adaptor_prompt(prompt, "key", 0.8, "w1 w2") == expected


def test_without_tokens_only_the_tag_is_added():
    assert webui.adaptor_prompt("a nurse", "key", 1.0, "") == "a nurse<lora:key:1>"


# ----------------------------------------------------------------------------- Forge embeddings
def test_forge_embeddings_are_768_wide_for_sd15_and_2048_for_sdxl():
    sd15 = webui.forge_embedding("t", {"te": torch.zeros(3, 768)}, "sd15")
    assert (sd15.shape, sd15.vectors, tuple(sd15.vec.shape)) == (768, 3, (3, 768))
    sdxl = webui.forge_embedding("t", {"te1": torch.zeros(3, 768), "te2": torch.ones(3, 1280)}, "sdxl")
    assert (sdxl.shape, sdxl.vectors) == (2048, 3)
    assert {k: tuple(v.shape) for k, v in sdxl.vec.items()} == {"clip_l": (3, 768), "clip_g": (3, 1280)}
    assert float(sdxl.vec["clip_g"].sum()) == 3 * 1280


@pytest.mark.parametrize("vectors, base, message", [
    ({"te": torch.zeros(3, 768)}, "sdxl", "sdxl needs"),
    ({"te1": torch.zeros(3, 768), "te2": torch.zeros(3, 1024)}, "sdxl", r"expected \(n, 1280\)"),
    ({"te1": torch.zeros(3, 768), "te2": torch.zeros(2, 1280)}, "sdxl", "different vector counts"),
])
def test_forge_embedding_refuses_vectors_that_do_not_fit(vectors, base, message):
    with pytest.raises(AdaptorError, match=message):
        webui.forge_embedding("t", vectors, base)


# ----------------------------------------------------------------------------- preparing a file
def test_a1111_loads_the_file_itself_with_the_words_of_its_tokens(tmp_path):
    path = write(tmp_path / "a.safetensors", tokens=2)
    prepared = webui.prepare_adaptor(path, "sd15", forge=False, cache_dir=tmp_path / "cache")
    assert prepared.lora_file == path.resolve() and prepared.forge_embeddings == () and prepared.notes == ()
    assert sorted(prepared.words.split()) == ["fair0", "fair1"]


@pytest.mark.parametrize("base, model, message", [
    ("sdxl", "sd15", "the adaptor is for sdxl, not sd15"),
    ("sd15", None, "the loaded model is neither"),
])
def test_an_adaptor_for_another_model_is_refused_in_one_line(tmp_path, base, model, message):
    path = write(tmp_path / "a.safetensors", base=base)
    with pytest.raises(AdaptorError, match=message) as error:
        webui.prepare_adaptor(path, model, forge=False, cache_dir=tmp_path)
    assert "\n" not in str(error.value)


def test_a_missing_file_is_refused_in_one_line(tmp_path):
    with pytest.raises(AdaptorError, match="gone.safetensors: cannot be read"):
        webui.prepare_adaptor(tmp_path / "gone.safetensors", "sd15", forge=True, cache_dir=tmp_path)


def test_forge_keeps_the_file_up_to_twelve_token_keys(tmp_path):
    path = write(tmp_path / "a.safetensors", base="sdxl", tokens=6)  # 6 tokens x 2 encoders = 12 keys
    prepared = webui.prepare_adaptor(path, "sdxl", forge=True, cache_dir=tmp_path / "cache")
    assert prepared.lora_file == path.resolve() and len(prepared.forge_embeddings) == 6
    assert not (tmp_path / "cache").exists()


def test_forge_gets_a_lora_only_copy_past_twelve_token_keys_made_once_per_file_version(tmp_path):
    path = write(tmp_path / "a.safetensors", tokens=13)
    prepared = webui.prepare_adaptor(path, "sd15", forge=True, cache_dir=tmp_path / "cache")
    copy = read_adaptor(prepared.lora_file, expected_base="sd15")
    original = read_adaptor(path)
    assert copy.tokens == [] and copy.lora.keys() == original.lora.keys()
    assert all(torch.equal(copy.lora[k].up, original.lora[k].up) for k in copy.lora)
    assert len(prepared.forge_embeddings) == 13 and "13 soft-token keys" in prepared.notes[0]
    made = prepared.lora_file.stat().st_mtime_ns
    again = webui.prepare_adaptor(path, "sd15", forge=True, cache_dir=tmp_path / "cache")
    assert again.lora_file.stat().st_mtime_ns == made
    os.utime(path, ns=(made + 10**9, made + 10**9))
    changed = webui.prepare_adaptor(path, "sd15", forge=True, cache_dir=tmp_path / "cache")
    assert changed.lora_file != prepared.lora_file


# ----------------------------------------------------------------------------- audit
def result_of(colours: list[str | None], target: TargetDistribution | None = None) -> AuditResult:
    """An audit of images whose classifier is sure of each colour (None: no face found)."""
    target = target or TargetDistribution.uniform((COLOUR,))
    records = [{"prompt": "batch", "index": i, "seed": None, "has_face": c is not None, "box": None,
                "probs": {"colour": [1.0, 0.0] if c == "red" else [0.0, 1.0]}} for i, c in enumerate(colours)]
    return AuditResult(summarise_records(records, target), records, target)


def test_audit_line_gives_faces_shares_and_distance_without_commas_or_colons():
    line = webui.audit_line(result_of(["red", "red", "red", "blue", None]))
    assert line == "4/5 faces; colour red 75% blue 25% (distance 0.25)"


def test_audit_line_without_faces():
    assert webui.audit_line(result_of([None, None])) == "0/2 faces; no bias figures"


def test_audit_html_draws_each_share_against_its_target():
    target = TargetDistribution.from_marginals([(COLOUR, [0.25, 0.75])])
    html = webui.audit_html(result_of(["red", "red", "blue", "blue"], target), "batch <1>")
    assert "batch &lt;1&gt;" in html and "4 of 4 images with a face" in html
    assert "width:50.0%" in html and "left:25.0%" in html and "left:75.0%" in html
    assert "colour: distance to target 0.250" in html and "target 25%" in html


def test_audit_target_prefers_the_adaptors_then_the_default_then_uniform():
    adaptor_target = TargetDistribution.from_marginals([(COLOUR, [0.3, 0.7])])
    assert webui.audit_target(adaptor_target, "colour=uniform", (COLOUR, SHAPE)) is adaptor_target
    other_classes = TargetDistribution.uniform((Attribute("colour", ("green", "blue")),))
    default = webui.audit_target(other_classes, "shape=round:0.5,square:0.25,triangle:0.25", (COLOUR, SHAPE))
    assert default.names == ("shape",) and list(default.marginal("shape")) == [0.5, 0.25, 0.25]
    assert webui.audit_target(None, "  ", (COLOUR,)) is None


def test_a_default_target_the_classifier_cannot_measure_is_named():
    with pytest.raises(TargetError, match="default target .*gender.*colour"):
        webui.audit_target(None, "gender=uniform", (COLOUR,))


def test_classifier_choices_and_specs(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("race.onnx", "sub/age.safetensors", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert webui.classifier_choices(tmp_path) == [
        "pretrained:gender,age", "pretrained:gender", "pretrained:age", "race.onnx", "sub/age.safetensors"]
    assert webui.classifier_choices(tmp_path / "missing")[-1] == "pretrained:age"
    assert webui.classifier_spec("pretrained:gender", tmp_path) == "pretrained:gender"
    assert webui.classifier_spec("toy", tmp_path) == "toy"
    assert webui.classifier_spec("sub/age.safetensors", tmp_path) == str(tmp_path / "sub" / "age.safetensors")
    (tmp_path.parent / "outside.onnx").write_bytes(b"")
    with pytest.raises(ValueError, match="outside the model folders"):  # a settings value never leaves the folder
        webui.classifier_spec("../outside.onnx", tmp_path)


# ----------------------------------------------------------------------------- mid-block bypass
class TwoBlockUNet(torch.nn.Module):
    """The call structure of ldm's UNetModel around its middle block: ``forward(x, timesteps, context=None)``,
    ``middle_block(h, emb, context)``; the middle block doubles, the rest is identity."""

    class Middle(torch.nn.Module):
        def forward(self, h, emb=None, context=None):
            return 2 * h

    def __init__(self) -> None:
        super().__init__()
        self.middle_block = self.Middle()

    def forward(self, x, timesteps=None, context=None):
        return self.middle_block(x, None, context)


def test_the_schedule_of_the_settings_is_linear_from_lambda_min_at_the_start():
    schedule = webui.FairSettings(True, "None", 1.0, False, True, 0.2, 0.5).bypass_schedule()
    assert [schedule.weight(s) for s in (0.0, 0.25, 0.5, 0.9)] == pytest.approx([0.2, 0.6, 1.0, 1.0])
    with pytest.raises(ValueError, match="start < end"):
        webui.FairSettings(True, "None", 1.0, False, True, 0.2, 0.0).bypass_schedule()


@pytest.mark.parametrize("by_keyword", [False, True])
def test_mid_block_hooks_blend_each_row_by_its_timestep_until_removed(by_keyword):
    unet = TwoBlockUNet()
    hooks = webui.MidBlockHooks(unet, webui.FairSettings(True, "None", 1, False, True, 0.0, 0.5).bypass_schedule())
    x = torch.ones(3, 1, 2, 2)
    t = torch.tensor([999.0, 999.0 * 0.75, 0.0])  # progress 0, 0.25, 1: lambda 0, 0.5, 1
    out = unet(x, timesteps=t) if by_keyword else unet(x, t)
    assert [float(row.mean()) for row in out] == pytest.approx([1.0, 1.5, 2.0], abs=1e-3)
    hooks.remove()
    assert float(unet(x, t).mean()) == 2.0 and not unet._forward_pre_hooks and not unet.middle_block._forward_hooks


def test_mid_block_hooks_need_a_middle_block():
    with pytest.raises(ValueError, match="needs a UNet with a middle_block"):
        webui.MidBlockHooks(torch.nn.Linear(2, 2), webui.FairSettings(True, "None", 1, False).bypass_schedule())


def test_the_forge_modifier_blends_around_the_middle_block_only():
    schedule = webui.FairSettings(True, "None", 1, False, True, 0.0, 0.5).bypass_schedule()
    modifier = webui.forge_block_modifier(schedule, timestep_of=lambda sigmas: sigmas * 999.0)
    h_in, h_out = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    other = {"block": ("input", 3), "sigmas": torch.tensor([1.0])}
    assert modifier(h_out, "after", other) is h_out
    middle = {"block": ("middle", 0), "sigmas": torch.tensor([1.0]), "cond_or_uncond": [0, 1]}
    assert modifier(h_in, "before", middle) is h_in
    assert torch.equal(modifier(h_out, "after", middle), h_in)  # progress 0: lambda 0, the block's input
    modifier(h_in, "before", {**middle, "sigmas": torch.tensor([0.0])})
    assert torch.equal(modifier(h_out, "after", {**middle, "sigmas": torch.tensor([0.0])}), h_out)
