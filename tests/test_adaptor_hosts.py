"""The host view of an adaptor file (fair_core.adaptor.hosts): header-only listing, LoRA-only tensors, token vectors
per encoder, prompt words and the base check, on files the trainer and the writer produced."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).parent))
from trainer_worker import make_trainer  # noqa: E402

from fair_core.adaptor import (AdaptorError, FairMetadata, SoftTokens, check_base, list_adaptors, lora_state_dict,
                               prompt_words, read_adaptor, read_adaptor_header, save_adaptor, soft_token_vectors)
from fair_core.adaptor.container import FairAdaptor, LoraWeights
from fair_core.adaptor.hosts import TOKEN_PLACEMENT
from fair_core.targets import TargetDistribution


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-iteration run training text-encoder LoRA, UNet LoRA and 2 soft tokens; (trainer, adaptor path)."""
    out = tmp_path_factory.mktemp("run")
    trainer = make_trainer(str(out), 2, trainable=["text_encoder", "unet", "tokens"], num_tokens=2)
    result = trainer.fit()
    return trainer, result.adaptor_path


def _file_tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as file:
        return {key: file.get_tensor(key) for key in file.keys()}


def test_lora_view_is_the_files_lora_tensors_without_tokens(trained):
    _, path = trained
    on_disk = _file_tensors(path)
    view = lora_state_dict(read_adaptor(path))
    assert not any(key.startswith("bundle_emb.") for key in view)
    expected = {key: tensor for key, tensor in on_disk.items() if not key.startswith("bundle_emb.")}
    assert view.keys() == expected.keys() and len(view) > 0
    assert all(torch.equal(view[key], expected[key]) for key in view)
    assert any(key.startswith("bundle_emb.") for key in on_disk), "the run trained tokens: the test would be vacuous"


def test_token_vectors_are_the_ones_the_trainer_optimised(trained):
    trainer, path = trained
    vectors = soft_token_vectors(read_adaptor(path))
    assert list(vectors) == ["clip_l"]
    # the export writes the EMA weights; the soft prompt's parameters are the trainer's last ones
    exported = trainer.ema.shadow_params[-1].detach().cpu().float()
    assert vectors["clip_l"].shape == (2, 32)
    assert torch.equal(vectors["clip_l"], exported)
    assert not torch.equal(exported, trainer.parameters[-1].detach().cpu()), "EMA and raw weights must differ here"
    assert "BOS" in TOKEN_PLACEMENT and "positive" in TOKEN_PLACEMENT


def test_header_read_never_touches_tensor_bytes(trained, tmp_path):
    _, path = trained
    full = read_adaptor_header(path)
    data = path.read_bytes()
    header_length = int.from_bytes(data[:8], "little")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: 8 + header_length + 3])  # the tensor data is gone
    with pytest.raises(AdaptorError):
        read_adaptor(cut)
    header = read_adaptor_header(cut)
    assert header == type(full)(**{**vars(full), "path": cut})
    assert header.is_fair and header.base_model == "sd15" and header.name == "fair_adaptor"
    assert [a.name for a in header.attributes] == ["gender"]
    assert header.target == TargetDistribution.parse("gender=uniform")
    assert header.ranks == (4,)
    assert header.modules == read_adaptor(path).family_counts()
    assert [(t.name, t.num_vectors, t.widths) for t in header.tokens] == [("fair_adaptor", 2, {"te": 32})]
    assert "gender" in header.label() and "sd15" in header.label()


def _adaptor(base: str, tokens: dict[str, int]) -> FairAdaptor:
    generator = torch.Generator().manual_seed(0)
    lora = {"lora_unet_mid_block_attentions_0_proj": LoraWeights(torch.randn(2, 8, generator=generator),
                                                                 torch.randn(8, 2, generator=generator), 2.0)}
    vectors = {family: torch.randn(3, width, generator=generator) for family, width in tokens.items()}
    tokens = [SoftTokens("fairtok", vectors)] if vectors else []
    return FairAdaptor(FairMetadata(base_model=base, name=f"{base}_fair"), lora, tokens)


def test_sdxl_token_vectors_per_host_encoder_and_prompt_words():
    adaptor = _adaptor("sdxl", {"te1": 768, "te2": 1280})
    vectors = soft_token_vectors(adaptor)
    assert {name: tuple(v.shape) for name, v in vectors.items()} == {"clip_l": (3, 768), "clip_g": (3, 1280)}
    assert torch.equal(vectors["clip_g"], adaptor.tokens[0].vectors["te2"])
    assert prompt_words(adaptor) == "fairtok"
    assert prompt_words(_adaptor("sd15", {})) == "" and soft_token_vectors(_adaptor("sd15", {})) == {}


def test_listing_keeps_fair_adaptors_and_reports_broken_files(tmp_path):
    save_adaptor(_adaptor("sd15", {"te": 768}), tmp_path / "a.safetensors")
    (tmp_path / "sub").mkdir()
    save_adaptor(_adaptor("sdxl", {"te1": 768, "te2": 1280}), tmp_path / "sub" / "b.safetensors")
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    (tmp_path / "notes.txt").write_text("not an adaptor")
    headers, problems = list_adaptors([tmp_path, tmp_path / "missing"])
    assert [(h.path.name, h.base_model) for h in headers] == [("a.safetensors", "sd15"), ("b.safetensors", "sdxl")]
    assert len(problems) == 1 and problems[0].startswith("broken.safetensors: ") and "\n" not in problems[0]


def test_base_check_names_both_bases():
    with pytest.raises(AdaptorError, match="'sdxl_fair' is for sdxl, the loaded model is sd15"):
        check_base(_adaptor("sdxl", {"te1": 768, "te2": 1280}), "sd15")
    check_base(_adaptor("sd15", {}), "sd15")


HOST_MODULES = ("fair_core.adaptor", "fair_core.adaptor.hosts", "fair_core.adaptor.writer", "fair_core.audit",
                "fair_core.resolve", "fair_core.images", "fair_core.plots", "fair_core.midblock", "fair_core.webui",
                "fair_core.host_helpers", "fair_core.faces")


def test_host_side_modules_import_without_training_libraries():
    """ComfyUI/A1111 bring their own torch but maybe not peft/diffusers/transformers/accelerate (installing them
    under a host's pinned versions can fail): nothing the nodes and the A1111 script import may need them."""
    code = (f"import sys; import {', '.join(HOST_MODULES)}; "
            "print(sorted(m for m in ('peft', 'diffusers', 'accelerate', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.stdout.strip() == "[]"


def test_toy_adaptors_claim_no_kohya_base_and_the_trained_resolution_is_recorded(tmp_path):
    adaptor = _adaptor("sd15", {})
    adaptor.metadata.resolution = 64
    save_adaptor(adaptor, tmp_path / "small.safetensors")
    read_back = read_adaptor(tmp_path / "small.safetensors")
    assert read_back.header["modelspec.resolution"] == "64x64" and read_back.metadata.resolution == 64
    toy = _adaptor("toy", {})
    save_adaptor(toy, tmp_path / "toy.safetensors")
    header = read_adaptor(tmp_path / "toy.safetensors").header
    assert header["ss_base_model_version"] == "fair_toyworld" and header["modelspec.resolution"] == "32x32"
    assert read_adaptor_header(tmp_path / "toy.safetensors").base_model == "toy"


def test_tokens_come_back_in_the_order_they_were_written(tmp_path):
    generator = torch.Generator().manual_seed(1)
    names = ["zeta", "alpha", "mid"]  # safetensors sorts keys: the file's own order would be alpha, mid, zeta
    tokens = [SoftTokens(n, {"te": torch.randn(i + 1, 768, generator=generator)}) for i, n in enumerate(names)]
    adaptor = FairAdaptor(FairMetadata(base_model="sd15", name="order"), {}, tokens)
    save_adaptor(adaptor, tmp_path / "order.safetensors")
    read_back = read_adaptor(tmp_path / "order.safetensors")
    assert [t.name for t in read_back.tokens] == names
    assert prompt_words(read_back) == "zeta alpha mid"
    assert torch.equal(soft_token_vectors(read_back)["clip_l"], torch.cat([t.vectors["te"] for t in tokens]))
    assert [t.name for t in read_adaptor_header(tmp_path / "order.safetensors").tokens] == names


@pytest.mark.parametrize("length", [1152, 1408])
def test_a_header_whose_length_bytes_look_like_a_pickle_mark_still_reads(tmp_path, length):
    """Header lengths 640, 896, 1152 and 1408 start with b"\\x80\\x02".."\\x80\\x05", the first bytes of a pickle (a
    valid SDXL adaptor hit this); this adaptor's smallest header is over 896 bytes."""
    adaptor = _adaptor("sd15", {})
    adaptor.metadata.date = "2026-12-04T00:00:00+00:00"  # a fixed date: the header length depends only on the pad
    path = tmp_path / "pad.safetensors"

    def header_length(pad: int) -> int:
        adaptor.metadata.extra = {"pad": "x" * pad}
        return int.from_bytes(save_adaptor(adaptor, path).read_bytes()[:8], "little")

    guess = length - header_length(0)
    pad = next(p for p in range(max(0, guess - 8), guess + 8) if header_length(p) == length)
    assert path.read_bytes()[:2] == length.to_bytes(8, "little")[:2] and path.read_bytes()[0] == 0x80
    assert read_adaptor(path).metadata.extra["pad"] == "x" * pad


def test_header_listing_names_what_a_path_is_and_refuses_keys_with_a_newline(tmp_path):
    (tmp_path / "folder.safetensors").mkdir()
    with pytest.raises(AdaptorError, match="directory"):
        read_adaptor_header(tmp_path / "folder.safetensors")
    from safetensors.torch import save_file

    save_file({"lora_unet_x.alpha\n": torch.ones(())}, str(tmp_path / "newline.safetensors"))
    with pytest.raises(AdaptorError, match="unknown key"):
        read_adaptor_header(tmp_path / "newline.safetensors")
