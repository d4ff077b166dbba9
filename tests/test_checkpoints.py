"""Training checkpoints (fair_core.checkpoints): a damaged latest checkpoint falls back to the one before, temp
folders of killed runs are cleaned up, and a fresh run never writes over another run's checkpoint."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from trainer_worker import make_trainer  # noqa: E402


class Killed(Exception):
    pass


def _killed_after(iterations: int):
    def stop(iteration: int, record: dict) -> None:
        if iteration + 1 > iterations:
            raise Killed

    return stop


def test_damaged_latest_checkpoint_resumes_from_the_previous_one(tmp_path, capsys):
    make_trainer(str(tmp_path / "straight"), 3, keep_checkpoints=3).fit()
    run = tmp_path / "run"
    with pytest.raises(Killed):  # killed in iteration 3, after checkpoints 1 and 2
        make_trainer(str(run), 3, keep_checkpoints=3).fit(on_iteration=_killed_after(2))
    latest = run / "checkpoints" / "iter_0000002"
    (latest / "trainable.safetensors").write_bytes(b"\x00" * 16)  # a disk error in the newest checkpoint
    stale = run / "checkpoints" / "iter_0000003.tmp-99999"
    stale.mkdir()
    make_trainer(str(run), 3, keep_checkpoints=3).fit(resume=True)
    out = capsys.readouterr().out
    assert "iter_0000002 is damaged" in out and "kept as iter_0000002.damaged" in out
    assert "resumed from" in out and "iter_0000001 (iteration 1)" in out
    assert not stale.exists(), "temp folders of killed runs are removed"
    assert (run / "checkpoints" / "iter_0000002.damaged" / "trainable.safetensors").stat().st_size == 16
    expected = load_file(tmp_path / "straight" / "fair_adaptor.safetensors")
    got = load_file(run / "fair_adaptor.safetensors")
    assert expected.keys() == got.keys()
    assert max(float((expected[k] - got[k]).abs().max()) for k in expected) <= 1e-6
    assert any(float(t.abs().max()) > 0 for k, t in got.items() if "lora_up" in k)


def test_resume_with_changed_settings_is_refused_naming_them(tmp_path):
    make_trainer(str(tmp_path), 1).fit()
    with pytest.raises(ValueError) as error:
        make_trainer(str(tmp_path), 2, learning_rate=1e-2).fit(resume=True)
    message = str(error.value)
    assert "iterations (1 -> 2)" in message and "learning_rate (0.001 -> 0.01)" in message
    make_trainer(str(tmp_path), 1, validate_every=5).fit(resume=True)  # reporting settings may change


def test_fresh_run_into_a_used_folder_is_refused_without_deleting(tmp_path):
    make_trainer(str(tmp_path), 1).fit()
    before = {p.relative_to(tmp_path): p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match="holds another run"):
        make_trainer(str(tmp_path), 1).fit()
    checkpoint_files = {p: t for p, t in before.items() if p.parts[0] == "checkpoints"}
    assert checkpoint_files and all((tmp_path / p).stat().st_mtime_ns == t for p, t in checkpoint_files.items())
    assert not list((tmp_path / "checkpoints").glob("*.tmp-*"))


def test_fair_train_refuses_a_used_folder_before_loading_anything(tmp_path, capsys):
    from train_cli.main import main

    make_trainer(str(tmp_path), 1).fit()
    code = main(["train", "--set", "model=toy", "--set", "classifier=toy", "--set", "target=colour=uniform",
                 "--set", f"output_dir={tmp_path}"])
    error = capsys.readouterr().err.strip()
    assert code == 2 and "holds another run (checkpoints up to iter_0000001)" in error and "--resume" in error
