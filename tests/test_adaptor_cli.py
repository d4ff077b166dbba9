"""`fair adaptor inspect` / `convert-paper`: valid files are described, bad ones get one `error:` line and exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from safetensors.torch import save_file

from fair_core.adaptor import FairMetadata, read_adaptor, write_adaptor
from fair_core.targets import TargetDistribution
from tiny_models import tiny_sd15, tiny_sdxl
from train_cli.main import main

REPO = Path(__file__).resolve().parents[1]
UNET_PREFIX = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q"


@pytest.fixture(scope="module")
def adaptor_files(tmp_path_factory):
    """A valid SD1.5 adaptor (UNet + text encoder, with target and classifier) and a valid SDXL one (UNet only)."""
    folder = tmp_path_factory.mktemp("adaptors")
    sd15 = tiny_sd15()
    sd15.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj", "fc1"]),
                            sd15.text_encoder)
    metadata = FairMetadata(
        name="fair-sd15", target=TargetDistribution.parse("gender=female:0.5,male:0.5"),
        classifier={"name": "tiny-classifier", "sha256": "0123456789abcdef" * 4},
    )
    write_adaptor(
        folder / "sd15.safetensors", unet=sd15.unet, text_encoders={"te": sd15.text_encoder}, metadata=metadata
    )
    sdxl = tiny_sdxl()
    sdxl.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q"]))
    write_adaptor(folder / "sdxl.safetensors", unet=sdxl.unet, metadata=FairMetadata(base_model="sdxl"))
    return folder


def run_cli(capsys, *argv):
    code = main(["adaptor", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def lora_tensors(down_shape=(4, 32), up_shape=(32, 4), fill=0.1):
    return {
        f"{UNET_PREFIX}.lora_down.weight": torch.full(down_shape, fill),
        f"{UNET_PREFIX}.lora_up.weight": torch.full(up_shape, fill),
        f"{UNET_PREFIX}.alpha": torch.tensor(4.0),
    }


def test_inspect_describes_a_valid_adaptor(adaptor_files, capsys):
    code, out, err = run_cli(capsys, "inspect", adaptor_files / "sd15.safetensors", "--base", "sd15")
    assert code == 0 and err == ""
    assert "base model:  sd15" in out
    assert "rank:        4 (alpha 4)" in out
    assert "modules:     unet 32, te 8" in out
    assert "attributes:  gender (female, male)" in out
    assert "target:      gender: female 50%, male 50%" in out
    assert "classifier:  tiny-classifier (sha256 0123456789ab)" in out
    assert "  ss_base_model_version: sd_v1" in out

    code, out, _ = run_cli(capsys, "inspect", adaptor_files / "sdxl.safetensors", "--json")
    summary = json.loads(out)
    assert code == 0
    assert summary["base_model"] == "sdxl" and summary["modules"] == {"unet": 16} and summary["ranks"] == [2]
    assert summary["metadata"]["ss_base_model_version"] == "sdxl_base_v1-0"


def _truncated(folder: Path, adaptors: Path) -> Path:
    data = (adaptors / "sd15.safetensors").read_bytes()
    (folder / "truncated.safetensors").write_bytes(data[: len(data) - 100])
    return folder / "truncated.safetensors"


def _not_safetensors(folder: Path, adaptors: Path) -> Path:
    torch.save({"a": torch.ones(3)}, folder / "pickle.safetensors")
    return folder / "pickle.safetensors"


def _saved(name: str, tensors: dict, metadata: dict | None = None):
    def build(folder: Path, adaptors: Path) -> Path:
        save_file(tensors, str(folder / name), metadata=metadata)
        return folder / name

    return build


INVALID = {
    "truncated": (_truncated, [], "truncated or damaged safetensors file"),
    "not safetensors": (_not_safetensors, [], "not a safetensors file"),
    "NaN values": (
        _saved("nan.safetensors", lora_tensors() | {f"{UNET_PREFIX}.lora_up.weight": torch.full((32, 4), float("nan"))},
               {"ss_base_model_version": "sd_v1"}),
        [], f"tensor {UNET_PREFIX}.lora_up.weight has non-finite values (NaN or Inf)",
    ),
    "rank mismatch between up and down": (
        _saved("rank.safetensors", lora_tensors(up_shape=(32, 8))), [], "shapes inconsistent with one rank",
    ),
    "rank differs from ss_network_dim": (
        _saved("dim.safetensors", lora_tensors(), {"ss_network_dim": "8"}), [],
        "shapes inconsistent with ss_network_dim=8",
    ),
    "sdxl adaptor given --base sd15": (
        lambda folder, adaptors: adaptors / "sdxl.safetensors", ["--base", "sd15"],
        "base model mismatch: the adaptor is for sdxl, not sd15",
    ),
    "unknown key family": (
        _saved("unknown.safetensors", lora_tensors() | {"model.diffusion_model.out.weight": torch.ones(2)}), [],
        "unknown key family: 'model.diffusion_model.out.weight'",
    ),
    "missing up/down pair": (
        _saved("pair.safetensors", {f"{UNET_PREFIX}.lora_down.weight": torch.ones(4, 32)}), [],
        f"LoRA module {UNET_PREFIX} has no lora_up.weight (only lora_down.weight)",
    ),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_inspect_rejects_invalid_files_with_one_line(case, adaptor_files, tmp_path, capsys):
    build, extra, message = INVALID[case]
    path = build(tmp_path, adaptor_files)
    code, out, err = run_cli(capsys, "inspect", path, *extra)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert message in err


def test_inspect_in_a_real_process_prints_no_traceback(adaptor_files, tmp_path):
    path = _truncated(tmp_path, adaptor_files)
    env = os.environ | {"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "train_cli", "adaptor", "inspect", str(path)],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=300,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: truncated.safetensors: truncated or damaged safetensors file")
    assert result.stderr.count("\n") == 1


def test_convert_paper_writes_a_valid_sd15_adaptor(tmp_path, capsys):
    generator = torch.Generator().manual_seed(0)
    down, up = torch.randn(4, 32, generator=generator), torch.randn(37, 4, generator=generator)
    attn_down, attn_up = torch.randn(4, 32, generator=generator), torch.randn(32, 4, generator=generator)
    tokens = torch.randn(6, 32, generator=generator)
    torch.save({
        "text_model.encoder.layers.1.mlp.fc1.lora_linear_layer.down.weight": down,
        "text_model.encoder.layers.1.mlp.fc1.lora_linear_layer.up.weight": up,
    }, tmp_path / "text_encoder_lora_EMA.pth")
    attention = "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
    torch.save({
        f"{attention}.processor.to_out_lora.down.weight": attn_down,
        f"{attention}.processor.to_out_lora.up.weight": attn_up,
    }, tmp_path / "unet_lora_EMA.pth")
    torch.save({"token_embedding.weight": tokens, "position_embedding.weight": torch.zeros(77, 32),
                "position_ids": torch.arange(77)[None]}, tmp_path / "prefix_embedding_EMA.pth")
    out_path = tmp_path / "out" / "exp1.safetensors"

    code, out, err = run_cli(
        capsys, "convert-paper", tmp_path / "text_encoder_lora_EMA.pth", tmp_path / "unet_lora_EMA.pth",
        tmp_path / "prefix_embedding_EMA.pth", "-o", out_path, "--target", "gender=uniform",
    )
    assert code == 0, err
    assert out.strip() == f"wrote {out_path}: unet 1, te 1; tokens: fairtoken (5 vectors; te width 32)"
    adaptor = read_adaptor(out_path, expected_base="sd15")
    te = adaptor.lora["lora_te_text_model_encoder_layers_1_mlp_fc1"]
    unet = adaptor.lora[f"lora_unet_{attention.replace('.', '_')}_to_out_0"]
    assert torch.equal(te.down, down) and torch.equal(te.up, up) and te.alpha == 4.0
    assert torch.equal(unet.down, attn_down) and torch.equal(unet.up, attn_up) and unet.alpha == 4.0
    assert torch.equal(adaptor.tokens[0].vectors["te"], tokens[1:])
    assert adaptor.metadata.name == "exp1" and adaptor.metadata.attributes[0].name == "gender"

    code, _, err = run_cli(capsys, "convert-paper", tmp_path / "missing.pth", "-o", tmp_path / "x.safetensors")
    assert code == 2 and err == f"error: {tmp_path / 'missing.pth'}: no such file\n"


def _paper_files(folder: Path) -> list[Path]:
    """A minimal released-checkpoint set: one text-encoder LoRA layer and the soft tokens."""
    generator = torch.Generator().manual_seed(1)
    torch.save({
        "text_model.encoder.layers.0.mlp.fc1.lora_linear_layer.down.weight": torch.randn(4, 32, generator=generator),
        "text_model.encoder.layers.0.mlp.fc1.lora_linear_layer.up.weight": torch.randn(37, 4, generator=generator),
    }, folder / "text_encoder_lora_EMA.pth")
    torch.save({"token_embedding.weight": torch.randn(6, 32, generator=generator)}, folder / "prefix_embedding_EMA.pth")
    return [folder / "text_encoder_lora_EMA.pth", folder / "prefix_embedding_EMA.pth"]


@pytest.mark.parametrize("alias", ["same path", "relative path", "symlink", "hard link"])
def test_convert_paper_never_overwrites_its_input(alias, tmp_path, capsys, monkeypatch):
    """`convert-paper X.pth -o X.pth` (or another name for the same file) is refused and X.pth is kept."""
    sources = _paper_files(tmp_path)
    before = sources[0].read_bytes()
    output = {
        "same path": sources[0],
        "relative path": Path("sub") / ".." / sources[0].name,
        "symlink": tmp_path / "link.safetensors",
        "hard link": tmp_path / "hard.safetensors",
    }[alias]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    if alias == "symlink":
        output.symlink_to(sources[0])
    elif alias == "hard link":
        os.link(sources[0], output)
    code, out, err = run_cli(capsys, "convert-paper", *sources, "-o", output)
    assert code == 2 and out == ""
    assert err.startswith("error: refusing to write ") and err.count("\n") == 1, err
    assert "outputs never overwrite inputs" in err
    assert sources[0].read_bytes() == before


def test_inspect_notes_a_missing_hash_and_verifies_a_present_one(adaptor_files, tmp_path, capsys):
    code, out, _ = run_cli(capsys, "inspect", adaptor_files / "sd15.safetensors")
    assert code == 0 and "checksum:    sha256 " in out and "(sshs_model_hash; tensor data verified)" in out
    save_file(lora_tensors(), str(tmp_path / "plain.safetensors"), metadata={"ss_base_model_version": "sd_v1"})
    code, out, err = run_cli(capsys, "inspect", tmp_path / "plain.safetensors")
    assert code == 0 and err == ""
    assert "checksum:    none (note: written without sshs_model_hash" in out


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.bool, torch.float64])
def test_inspect_refuses_an_alpha_that_is_not_float(dtype, tmp_path, capsys):
    """Integer (and float64) alphas are refused like any non-float tensor, naming the key and the dtype."""
    tensors = lora_tensors() | {f"{UNET_PREFIX}.alpha": torch.tensor(4).to(dtype)}
    save_file(tensors, str(tmp_path / "alpha.safetensors"))
    code, _, err = run_cli(capsys, "inspect", tmp_path / "alpha.safetensors")
    assert code == 2
    assert err == (f"error: tensor {UNET_PREFIX}.alpha has dtype {str(dtype).removeprefix('torch.')}; LoRA, alpha "
                   "and soft-token tensors must be floating point: F16, BF16, F32\n")


def test_ss_network_dim_that_is_not_a_number_is_named(tmp_path, capsys):
    save_file(lora_tensors(), str(tmp_path / "dim.safetensors"), metadata={"ss_network_dim": "²"})
    code, _, err = run_cli(capsys, "inspect", tmp_path / "dim.safetensors")
    assert code == 2
    assert err == "error: metadata ss_network_dim must be a whole number (the LoRA rank) or 'Dynamic', got \"²\"\n"
