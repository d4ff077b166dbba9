"""fair eval with inputs users really give it: folders without a face, prompts whose names collide, an output that
cannot be written. Each ends in a report or one line, never a traceback."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from fair_core.evaluation import prompt_slug
from train_cli.main import main


def _noise_folder(root, prompts=("a_noise",), count=3):
    rng = np.random.default_rng(0)
    for prompt in prompts:
        (root / prompt).mkdir(parents=True)
        for i in range(count):
            Image.fromarray((rng.random((96, 96, 3)) * 255).astype(np.uint8)).save(root / prompt / f"{i}.png")
    return root


def test_folder_without_faces_is_reported_and_exits_0(tmp_path, capsys):
    folder = _noise_folder(tmp_path / "noise")
    assert main(["eval", "--images", str(folder), "--classifier", "pretrained:gender", "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "noise  no faces in 3 images: no bias figures" in out
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())["summaries"]["noise"]["overall"]
    assert summary["num_faces"] == 0 and summary["face_rate"]["estimate"] == 0
    assert (tmp_path / "o" / "report.html").is_file()


def test_prompts_differing_only_in_non_ascii_letters_get_their_own_grids(tmp_path):
    prompts = ["a photo of a café owner", "a photo of a cafè owner", "A photo of a cafe owner"]
    assert len({prompt_slug(p) for p in prompts}) == 3
    assert main(["eval", "--images", str(_noise_folder(tmp_path / "gen", prompts, 2)), "--classifier", "toy",
                 "--out", str(tmp_path / "o")]) == 0
    assert len(list((tmp_path / "o" / "grids").glob("*.png"))) == 3


def test_an_output_that_is_a_file_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "report"
    blocker.write_text("someone's file")
    code = main(["eval", "--images", str(_noise_folder(tmp_path / "gen")), "--classifier", "toy", "--out", str(blocker)])
    error = capsys.readouterr().err.strip()
    assert code == 1 and len(error.splitlines()) == 1 and error.startswith(f"error: {blocker}")
    assert blocker.read_text() == "someone's file"


def test_rerun_into_a_report_folder_leaves_no_stale_grid(tmp_path):
    out = tmp_path / "o"
    assert main(["eval", "--images", str(_noise_folder(tmp_path / "one", ("a_cat", "a_dog"), 2)), "--classifier", "toy",
                 "--out", str(out)]) == 0
    (out / "grids" / "my_own.png").write_bytes(b"not ours")
    assert len(list((out / "grids").glob("*.png"))) == 3
    assert main(["eval", "--images", str(_noise_folder(tmp_path / "two", ("a_dog",), 2)), "--classifier", "toy",
                 "--out", str(out)]) == 0
    names = sorted(p.name for p in (out / "grids").glob("*.png"))
    assert names == sorted(["my_own.png", f"{prompt_slug('a dog')}.png"])


def test_files_left_out_of_a_folder_audit_are_counted_and_big_images_shrunk(tmp_path, capsys):
    from fair_core.audit import MAX_AUDIT_SIDE, audit_folder
    from fair_core.resolve import resolve_scorer

    folder = _noise_folder(tmp_path / "gen", ("a_cat",), 2)
    Image.new("RGB", (8, 8)).save(folder / "a_cat" / "animated.gif")
    (folder / "a_cat" / "nested").mkdir()
    (folder / "notes.txt").write_text("not a prompt folder")
    Image.new("RGB", (MAX_AUDIT_SIDE * 2, 64)).save(folder / "a_cat" / "wide.png")
    result = audit_folder(folder, resolve_scorer("pretrained:gender").scorer)
    assert len(result.records) == 3
    assert any(n.startswith("1 image(s) resized: a_cat/wide.png") for n in result.notes)  # only the wide one
    ignored = next(n for n in result.notes if n.startswith("3 image(s) not read"))
    assert all(name in ignored for name in ("a_cat/animated.gif", "a_cat/nested", "notes.txt"))


def test_fair_eval_uses_the_prompt_encoding_the_adaptors_were_trained_with(tmp_path):
    import pytest
    import torch

    from fair_core.adaptor import FairAdaptor, FairMetadata, LoraWeights, save_adaptor
    from fair_core.evaluation import choose_prompt_encoding

    def adaptor(name, encoding):
        lora = {"lora_te_text_model_encoder_layers_0_mlp_fc1": LoraWeights(torch.zeros(2, 4), torch.zeros(4, 2), 2.0)}
        args = {"prompt_encoding": encoding} if encoding else {}
        return save_adaptor(FairAdaptor(FairMetadata(base_model="sd15", name=name, training_args=args), lora),
                            tmp_path / f"{name}.safetensors")

    paper, host, unrecorded = adaptor("paper", "paper"), adaptor("host", "host"), adaptor("old", None)
    assert choose_prompt_encoding("auto", [paper]) == "paper"  # e.g. a converted released checkpoint
    assert choose_prompt_encoding("auto", [unrecorded]) == choose_prompt_encoding("auto", []) == "host"
    assert choose_prompt_encoding("host", [paper]) == "host"
    with pytest.raises(ValueError, match="different prompt encodings .*paper.safetensors: paper.*--prompt-encoding"):
        choose_prompt_encoding("auto", [paper, host])


def test_a_broken_target_file_is_named(tmp_path, capsys):
    bad = tmp_path / "target.json"
    bad.write_text("{ not json")
    assert main(["eval", "--images", str(_noise_folder(tmp_path / "gen")), "--classifier", "toy",
                 "--target", str(bad), "--out", str(tmp_path / "o")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"error: --target: {bad}: not valid JSON") and len(error.splitlines()) == 1


def test_a_full_disk_at_any_writer_is_one_line(tmp_path, capsys, monkeypatch):
    import errno

    import fair_core.eval_report

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "o" / "report.html"))

    monkeypatch.setattr(fair_core.eval_report, "write_report", full)
    code = main(["eval", "--images", str(_noise_folder(tmp_path / "gen")), "--classifier", "toy", "--out", str(tmp_path / "o")])
    error = capsys.readouterr().err.strip()
    assert code == 1 and error == f"error: {tmp_path / 'o' / 'report.html'}: No space left on device"


def test_an_unwritable_report_folder_is_one_line(tmp_path, capsys):
    import os

    if os.geteuid() == 0:  # root writes anywhere: make the folder a path through a file instead
        (tmp_path / "plain").write_text("")
        out = tmp_path / "plain" / "report"
    else:
        (tmp_path / "locked").mkdir(mode=0o500)
        out = tmp_path / "locked" / "report"
    code = main(["eval", "--images", str(_noise_folder(tmp_path / "gen")), "--classifier", "toy", "--out", str(out)])
    error = capsys.readouterr().err.strip()
    assert code in (1, 2) and len(error.splitlines()) == 1 and str(tmp_path) in error and "Traceback" not in error


def test_a_decompression_bomb_in_a_folder_is_skipped_and_listed(tmp_path):
    from fair_core.audit import audit_folder
    from fair_core.images import MAX_IMAGE_PIXELS
    from fair_core.resolve import resolve_scorer

    folder = _noise_folder(tmp_path / "gen", ("a_cat",), 2)
    side = int(MAX_IMAGE_PIXELS ** 0.5) + 1
    Image.new("1", (side, side)).save(folder / "a_cat" / "bomb.png")
    result = audit_folder(folder, resolve_scorer("pretrained:gender").scorer)
    assert len(result.records) == 2
    assert "1 image(s) unreadable, skipped: a_cat/bomb.png" in result.notes
