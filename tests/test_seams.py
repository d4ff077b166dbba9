"""The library seams the hosts call: the audit as one call, the one resolver of user inputs (bad targets refused
before any model loads, with one line), image conversion, and the module graph (no cycles; the toy world only
reached through the resolver)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fair_core.audit import audit_folder, audit_images
from fair_core.images import MAX_IMAGE_PIXELS, from_bhwc01, from_chw01, load_image
from fair_core.plots import audit_chart
from fair_core.resolve import resolve_scorer, resolve_target
from fair_core.targets import TargetError
from train_cli.main import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def toy_folder(tmp_path_factory):
    """Toy images of two occupations, one subfolder per prompt (``fair eval --images``' layout)."""
    from fair_core.toyworld import load_toy_world

    world = load_toy_world()
    root = tmp_path_factory.mktemp("images")
    for occupation in ("nurse", "firefighter"):
        prompt = world.prompt(occupation)
        images = world.generate([prompt] * 6, list(range(6)), num_steps=4)
        folder = root / prompt.replace(" ", "_")
        folder.mkdir()
        for index, pixels in enumerate(((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1)):
            Image.fromarray(pixels.numpy()).save(folder / f"{index}.png")
    return root


def test_folder_audit_equals_fair_eval_images(toy_folder, tmp_path, capsys):
    assert main(["eval", "--images", str(toy_folder), "--classifier", "toy", "--target", "colour=uniform",
                 "--out", str(tmp_path / "report")]) == 0
    written = json.loads((tmp_path / "report" / "summary.json").read_text())["summaries"][toy_folder.name]
    resolved = resolve_scorer("toy")
    result = audit_folder(toy_folder, resolved.scorer, resolve_target("colour=uniform", resolved.attributes),
                          input_size=resolved.input_size)
    assert result.summary.to_json() == written
    assert len(result.records) == 12 and result.summary.overall.num_faces == 12


def test_batch_audit_describes_shares_against_the_target_and_draws_them():
    from fair_core.toyworld import load_toy_world

    world = load_toy_world()
    images = world.generate([world.prompt("nurse")] * 8, list(range(8)), num_steps=4)
    result = audit_images(images, world.eval_scorer, batch_size=3)
    assert [r["index"] for r in result.records] == list(range(8))
    assert result.target.names == ("colour", "shape")  # uniform over the classifier's attributes by default
    text = result.describe()
    assert text.startswith("8 of 8 images with a face") and "colour: red" in text and "(target 50%)" in text
    assert np.isnan(result.boxes).all() and result.boxes.shape == (8, 4)  # a whole-image scorer has no boxes
    assert json.loads(json.dumps(result.to_json()))["summary"]["num_images"] == 8
    chart = audit_chart(result)
    assert chart.mode == "RGB" and chart.size[0] == 640


def test_audit_of_faceless_images_reports_it():
    scorer = resolve_scorer("pretrained:gender").scorer
    noise = torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(0)) * 2 - 1
    result = audit_images(noise, scorer)
    assert result.summary.overall.num_faces == 0
    assert result.describe() == "0 of 2 images with a face (face rate 0%)\nno faces: no bias figures"
    audit_chart(result)  # draws empty bars, does not raise


def test_target_typo_is_refused_with_the_classifiers_attributes():
    attributes = resolve_scorer("toy").attributes
    with pytest.raises(TargetError) as error:
        resolve_target("gendr=uniform", attributes, "--target")
    message = str(error.value)
    assert "\n" not in message and message.startswith("--target: unknown attribute 'gendr'")
    assert "colour (red/blue)" in message and "shape (round/square/triangle)" in message
    with pytest.raises(TargetError, match="empty"):
        resolve_target("  ", attributes)
    assert resolve_target(None, attributes).names == ("colour", "shape")


def test_fair_eval_refuses_a_bad_target_before_loading_a_model(tmp_path, capsys):
    # the model does not exist: reaching it would give another error, so the target must be checked first
    code = main(["eval", "--model", str(tmp_path / "no-model.safetensors"), "--prompts", "occupations-test",
                 "--classifier", "toy", "--target", "gendr=uniform", "--out", str(tmp_path / "o")])
    error = capsys.readouterr().err.strip()
    assert code == 2 and len(error.splitlines()) == 1
    assert "unknown attribute 'gendr'" in error and "colour" in error


def test_fair_train_refuses_a_bad_target_before_loading_a_model(tmp_path, capsys, monkeypatch):
    from fair_core.classifiers.pretrained import write_pretrained
    import fair_core.models

    def no_model(*_, **__):
        raise AssertionError("the model was loaded before the target was checked")

    monkeypatch.setattr(fair_core.models, "load_diffusion_parts", no_model)
    classifier = next(p for p in write_pretrained(tmp_path / "c") if p.name.startswith("gender") and p.suffix == ".safetensors")
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"")
    code = main(["train", "--set", f"model={model}", "--set", f"classifier={classifier}",
                 "--set", "target=gendr=uniform", "--set", f"output_dir={tmp_path / 'run'}"])
    error = capsys.readouterr().err.strip()
    assert code == 2 and len(error.splitlines()) == 1
    assert "target: unknown attribute 'gendr'" in error and "gender (female/male)" in error


def test_host_and_comfy_image_layouts_round_trip():
    batch = torch.rand(2, 5, 7, 3)
    images = from_bhwc01(batch)
    assert images.shape == (2, 3, 5, 7) and images.min() >= -1 and images.max() <= 1
    torch.testing.assert_close(images, batch.permute(0, 3, 1, 2) * 2 - 1)
    alpha = torch.cat([torch.zeros(1, 2, 2, 3), torch.zeros(1, 2, 2, 1)], dim=-1)  # transparent black
    assert torch.equal(from_bhwc01(alpha), torch.ones(1, 3, 2, 2))  # over white
    with pytest.raises(ValueError, match=r"\(B, H, W, 1/3/4\)"):
        from_bhwc01(torch.zeros(2, 3, 8, 8))
    a1111 = from_chw01([torch.zeros(3, 4, 4), torch.ones(3, 4, 4)])  # A1111's batch: (3, H, W) in [0, 1] each
    assert a1111.shape == (2, 3, 4, 4) and float(a1111[0].max()) == -1.0 and float(a1111[1].min()) == 1.0


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    side = int(MAX_IMAGE_PIXELS ** 0.5) + 1
    path = tmp_path / "bomb.png"
    Image.new("1", (side, side)).save(path)  # a 1-bit image compresses to almost nothing
    with pytest.raises(ValueError, match="over the 64,000,000-pixel limit") as error:
        load_image(path)
    assert "bomb.png" in str(error.value)


def _fair_core_modules() -> list[str]:
    return sorted(".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                  for p in (ROOT / "fair_core").rglob("*.py"))


def test_every_module_imports_on_its_own():
    """A module that only imports after another one (an import cycle, or a hidden dependency) fails here."""
    code = ("import importlib, sys\n"
            "for name in sys.argv[1:]:\n"
            "    for loaded in [m for m in sys.modules if m.startswith('fair_core')]: del sys.modules[loaded]\n"
            "    importlib.import_module(name)\n")
    subprocess.run([sys.executable, "-c", code, *_fair_core_modules()], check=True, cwd=ROOT)


def test_only_the_resolver_reaches_into_the_toy_world():
    allowed = {ROOT / "fair_core" / "resolve.py"}
    offenders = []
    for path in (ROOT / "fair_core").rglob("*.py"):
        if "toyworld" in path.relative_to(ROOT).parts or path in allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.startswith("fair_core.toyworld")]
    assert offenders == []


def test_an_explicit_device_reaches_torch_classifiers(tmp_path):
    """Under multi-GPU training each rank passes its own ``cuda:N``: it must not be rounded to ``cuda`` (the
    meta device stands in for one here; ``auto`` on a machine without CUDA is the CPU)."""
    from fair_core.classifiers.pretrained import write_pretrained
    from fair_core.classifiers.runtime import torch_device

    gender = next(p for p in write_pretrained(tmp_path) if p.name == "gender-dlib.safetensors")
    for spec in (str(gender), "pretrained:gender"):
        classifier = resolve_scorer(spec, "meta", training=True).scorer.classifiers[0]
        assert next(classifier.parameters()).device.type == "meta"
    if not torch.cuda.is_available():
        assert torch_device("auto") == "cpu"
