"""Typed validation of the training config: every wrong-typed or out-of-range field is named with the expected type
and the value, before any model loads; a device the machine does not have is refused, never ignored."""

from __future__ import annotations

import pytest
import torch

from fair_core.train_config import TrainConfig
from fair_core.trainer import make_accelerator
from train_cli.main import main


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"iterations": 1.5}, "iterations must be an integer, got 1.5 (float)"),
        ({"output_dir": None}, "output_dir must be a string, got None (NoneType)"),
        ({"images_per_prompt": True}, "images_per_prompt must be an integer, got True (bool)"),
        ({"learning_rate": "fast"}, "learning_rate must be a number, got 'fast' (str)"),
        ({"learning_rate": float("nan")}, "learning_rate must be a finite number"),
        ({"learning_rate": -1e-4}, "learning_rate must be positive"),
        ({"gradient_checkpointing": "yes"}, "gradient_checkpointing must be true or false, got 'yes'"),
        ({"trainable": [1]}, "trainable must be a list of strings"),
        ({"val_max_prompts": "4"}, "val_max_prompts must be an integer or empty (null), got '4' (str)"),
        ({"device": "gpu"}, "device must be cpu, cuda or cuda:N"),
    ],
)
def test_wrong_types_name_field_type_and_value(values, message):
    with pytest.raises(ValueError) as error:
        TrainConfig(**values)
    assert message in str(error.value)


def test_yaml_number_strings_are_numbers():
    """YAML 1.1 (PyYAML) reads 1e-4 as the string '1e-4'."""
    assert TrainConfig(learning_rate="1e-4").learning_rate == pytest.approx(1e-4)


def test_cuda_without_a_gpu_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device: cuda asked for, but this torch .* sees no CUDA GPU"):
        make_accelerator(TrainConfig(device="cuda", log_with=None))


def test_fair_train_names_the_field_in_one_line(tmp_path, capsys):
    code = main(["train", "--set", "learning_rate=quick", "--set", f"output_dir={tmp_path}"])
    error = capsys.readouterr().err.strip()
    assert code == 2 and error == "error: learning_rate must be a number, got 'quick' (str)"


def test_example_configs_load_and_name_files_our_commands_write():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "examples"
    configs = {path.name: TrainConfig.from_yaml(path) for path in sorted(root.glob("*.yaml"))}
    assert len(configs) == 3
    # `fair classifier pretrained -o classifiers` writes gender-dlib.safetensors (write_pretrained's names)
    assert configs["sd15_single_24gb.yaml"].classifier == "classifiers/gender-dlib.safetensors"
