"""fair demo's report folder: a rerun replaces only what the demo wrote, every attribute gets a chart, and the figures
say which CPU kernels made them."""

from __future__ import annotations

import json

import pytest
import torch

from fair_core.toyworld.demo import DEMO_MARKER, DemoSettings, run_demo


def test_a_training_folder_the_demo_did_not_write_is_refused_and_kept(tmp_path):
    foreign = tmp_path / "training"
    foreign.mkdir()
    (foreign / "my_notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="was not written by fair demo"):
        run_demo(DemoSettings(output_dir=str(tmp_path)), log=lambda *_: None)
    assert (foreign / "my_notes.txt").read_text() == "keep me"


def test_rerun_replaces_its_own_training_folder_and_records_the_machine(tmp_path):
    settings = DemoSettings(iterations=1, images_per_prompt=4, eval_images_per_prompt=2, eval_steps=2,
                            output_dir=str(tmp_path), threads=1)
    threads = torch.get_num_threads()
    try:
        run_demo(settings, log=lambda *_: None)
        (tmp_path / "training" / "left_over.txt").write_text("from the first run")
        figures = run_demo(settings, log=lambda *_: None)
    finally:
        torch.set_num_threads(threads)  # the setting is process-wide; the rest of the suite keeps its threads
    assert (tmp_path / "training" / DEMO_MARKER).is_file()
    assert not (tmp_path / "training" / "left_over.txt").exists()
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert (tmp_path / "chart_colour.png").is_file()
    assert (tmp_path / "chart_shape.png").is_file(), "the untargeted attribute's drift gets a chart of every class"
    assert 0 <= saved["attributes"]["colour"]["distance_before_tv"] <= 1
    machine = saved["machine"]
    assert machine == figures["machine"] and machine["threads"] == 1
    assert machine["cpu_capability"] in {"DEFAULT", "AVX2", "AVX512", "NO AVX", "VSX", "ZVECTOR", "SVE256"}
