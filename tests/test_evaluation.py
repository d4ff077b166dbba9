"""fair eval on the toy world: stable seeds, resume, clear errors."""

import json
import subprocess
import sys

import pytest

from fair_core.evaluation import prompt_slug
from fair_core.prompts import stable_seed
from train_cli.main import main

DOCTOR = prompt_slug("A photo of a doctor")


def run(prompts, out, extra=()):
    return main(["eval", "--model", "toy", "--classifier", "toy", "--prompts", str(prompts), "--images-per-prompt", "3",
                 "--steps", "4", "--batch-size", "2", "--out", str(out), *extra])


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("A photo of a doctor\nA photo of a nurse\n")
    return path


def test_seed_is_stable_seed_of_prompt_index_and_base(prompt_file, tmp_path):
    assert run(prompt_file, tmp_path / "a") == 0
    rows = (tmp_path / "a" / "images.csv").read_text().splitlines()[1:]
    assert rows[1].split(",")[3] == str(stable_seed("A photo of a doctor", 1, 0))


def test_other_process_gives_byte_identical_csv_and_resume_gives_same_summary(prompt_file, tmp_path):
    assert run(prompt_file, tmp_path / "a") == 0
    code = (f"from train_cli.main import main; import torch; torch.set_num_threads(1); raise SystemExit(main(['eval','--model','toy',"
            f"'--classifier','toy','--prompts',{str(prompt_file)!r},'--images-per-prompt','3','--steps','4',"
            f"'--batch-size','2','--out',{str(tmp_path / 'b')!r}]))")
    subprocess.run([sys.executable, "-c", code], check=True, env={"PYTHONHASHSEED": "123", "PATH": "/usr/bin"}, cwd=".")
    assert (tmp_path / "a" / "images.csv").read_bytes() == (tmp_path / "b" / "images.csv").read_bytes()

    # interrupted run: keep the first 2 cached images plus a half-written line
    cache = tmp_path / "b" / "cache" / "base.jsonl"
    lines = cache.read_text().splitlines()
    cache.write_text("\n".join(lines[:2]) + "\n" + lines[2][:20])
    (tmp_path / "b" / "summary.json").unlink()
    assert run(prompt_file, tmp_path / "b") == 0
    assert json.loads((tmp_path / "b" / "summary.json").read_text()) == json.loads((tmp_path / "a" / "summary.json").read_text())
    records = [l for l in cache.read_text().splitlines() if l.startswith("{") and l.endswith("}")]
    assert len(records) == 6  # 2 kept + 4 regenerated, the finished ones not redone


def test_bad_inputs_give_one_line_errors(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    assert run(empty, tmp_path / "o") == 2
    assert "has no prompts" in capsys.readouterr().err
    assert run(tmp_path / "missing.txt", tmp_path / "o") == 2
    assert "neither a built-in set" in capsys.readouterr().err


def test_rerun_with_other_settings_is_refused(prompt_file, tmp_path, capsys):
    assert run(prompt_file, tmp_path / "a") == 0
    assert run(prompt_file, tmp_path / "a", ["--seed", "1"]) == 2
    assert "other settings (differs in: settings.seed (0 -> 1))" in capsys.readouterr().err


def test_report_has_tables_grids_and_per_prompt_changes(prompt_file, tmp_path):
    out = tmp_path / "r"
    assert run(prompt_file, out, ["--grid-images", "2", "--images", str(make_folder(tmp_path / "folder"))]) == 0
    page = (out / "report.html").read_text()
    for text in ("Overall", "Paired change", "Per prompt", "A photo of a doctor", "folder − base", f"grids/{DOCTOR}.png"):
        assert text in page
    from PIL import Image

    grid = Image.open(out / "grids" / f"{DOCTOR}.png")
    assert grid.height > 2 * 16  # one row per variant (base, folder)
    assert sorted(p.name for p in (out / "images" / "base" / DOCTOR).iterdir()) == ["0.png", "1.png"]


def make_folder(root):
    """Three images per prompt in odd formats: grey 16-bit, RGBA at 40 px, a palette image, and one broken file."""
    import numpy as np
    from PIL import Image

    for prompt in ("A photo of a doctor", "A photo of a nurse"):
        sub = root / prompt.replace(" ", "_")
        sub.mkdir(parents=True)
        Image.fromarray(np.full((16, 16), 40000, np.uint16)).save(sub / "0.png")
        Image.new("RGBA", (40, 40), (200, 30, 30, 255)).save(sub / "1.png")
        Image.new("RGB", (16, 16), (30, 30, 200)).convert("P").save(sub / "2.png")
    (root / "A_photo_of_a_nurse" / "3.png").write_bytes(b"not an image")
    return root


def test_image_folder_is_converted_and_reported_not_crashed(tmp_path, capsys):
    folder = make_folder(tmp_path / "gen")
    assert main(["eval", "--images", str(folder), "--classifier", "toy", "--out", str(tmp_path / "o")]) == 0
    output = capsys.readouterr().out
    assert "6 image(s) converted to RGB" in output and "2 image(s) resized" in output
    assert "1 image(s) unreadable, skipped: A_photo_of_a_nurse/3.png" in output
    rows = (tmp_path / "o" / "images.csv").read_text().splitlines()
    assert len(rows) == 1 + 6


def test_classifier_without_metadata_is_a_clear_error(tmp_path, capsys):
    from safetensors.torch import save_file
    import torch

    path = tmp_path / "bare.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    folder = make_folder(tmp_path / "gen")
    assert main(["eval", "--images", str(folder), "--classifier", str(path), "--out", str(tmp_path / "o")]) == 2
    error = capsys.readouterr().err
    assert "bare.safetensors" in error and "Traceback" not in error


def test_adaptor_for_another_base_is_a_clear_error(prompt_file, tmp_path, capsys):
    from peft import LoraConfig, inject_adapter_in_model

    from fair_core.adaptor import FairMetadata, write_adaptor
    from tiny_models import tiny_sd15

    parts = tiny_sd15()
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["q_proj"]), parts.text_encoder, adapter_name="trained")
    path = tmp_path / "sd15_adaptor.safetensors"
    write_adaptor(path, text_encoders={"te": parts.text_encoder}, metadata=FairMetadata())
    assert run(prompt_file, tmp_path / "o", ["--adaptor", str(path)]) == 2
    assert "base model mismatch: the adaptor is for sd15, not toy" in capsys.readouterr().err
