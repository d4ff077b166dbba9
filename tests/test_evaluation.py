"""fair eval on the toy world: stable seeds, resume, clear errors."""

import json
import subprocess
import sys

import pytest

from fair_core.prompts import stable_seed
from train_cli.main import main



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
