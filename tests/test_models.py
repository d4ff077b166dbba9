"""Loading SD1.5 / SDXL from diffusers directories and original-format single files, offline.

The single-file checkpoints are written here from diffusers models by an independent diffusers -> LDM
key mapping (the inverse of what diffusers' single-file loader reads), so a round trip that reproduces
every tensor exactly shows that the loader reads the original layout.
"""

from __future__ import annotations

import json
import resource
import shutil
import time
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from fair_core.models import (CONFIG_DIR, DiffusionParts, clip_tokenizer, detect_checkpoint_base, load_diffusion_parts,
                              random_parts, sd_dpm_solver)
from tiny_models import byte_level_tokenizer, tiny_sd15, tiny_text_config, tiny_vae

# ---------------------------------------------------------------- diffusers -> original (LDM) key names

_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename(state: dict, modules: dict[str, str], inner: dict[str, str]) -> dict:
    """Rename keys by their longest module prefix in ``modules``, then their first sub-module name by ``inner``."""
    out = {}
    for key, value in state.items():
        prefix = max((m for m in modules if key.startswith(m + ".")), key=len)
        rest = key[len(prefix) + 1 :]
        for old, new in inner.items():
            if rest.startswith(old + "."):
                rest = new + rest[len(old) :]
        out[modules[prefix] + "." + rest] = value
    return out


def unet_to_ldm(unet: UNet2DConditionModel) -> dict:
    cfg, n = unet.config, len(unet.config.block_out_channels)
    per = cfg.layers_per_block + 1
    modules = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
               "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
               "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
               "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
               "mid_block.resnets.1": "middle_block.2"}
    for i in range(n):
        for j in range(cfg.layers_per_block):
            modules[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{1 + i * per + j}.0"
            modules[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{1 + i * per + j}.1"
        modules[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{(i + 1) * per}.0.op"
        for j in range(per):
            modules[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{i * per + j}.0"
            modules[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{i * per + j}.1"
        slot = 2 if "CrossAttn" in cfg.up_block_types[i] else 1
        modules[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{i * per + per - 1}.{slot}.conv"
    state = _rename(unet.state_dict(), modules, _UNET_RESNET)
    return {"model.diffusion_model." + k: v for k, v in state.items()}


def vae_to_ldm(vae: AutoencoderKL) -> dict:
    n = len(vae.config.block_out_channels)
    modules = {m: m for m in ("encoder.conv_in", "encoder.conv_out", "decoder.conv_in", "decoder.conv_out",
                              "quant_conv", "post_quant_conv")}
    for coder in ("encoder", "decoder"):
        modules[f"{coder}.conv_norm_out"] = f"{coder}.norm_out"
        modules[f"{coder}.mid_block.attentions.0"] = f"{coder}.mid.attn_1"
        for k in range(2):
            modules[f"{coder}.mid_block.resnets.{k}"] = f"{coder}.mid.block_{k + 1}"
    for i in range(n):
        for j in range(vae.config.layers_per_block + 1):
            modules[f"encoder.down_blocks.{i}.resnets.{j}"] = f"encoder.down.{i}.block.{j}"
            modules[f"decoder.up_blocks.{i}.resnets.{j}"] = f"decoder.up.{n - 1 - i}.block.{j}"
        modules[f"encoder.down_blocks.{i}.downsamplers.0"] = f"encoder.down.{i}.downsample"
        modules[f"decoder.up_blocks.{i}.upsamplers.0"] = f"decoder.up.{n - 1 - i}.upsample"
    state = _rename(vae.state_dict(), modules, {"conv_shortcut": "nin_shortcut", **_VAE_ATTENTION})
    # LDM's VAE attention projections are 1x1 convolutions.
    state = {k: v[:, :, None, None] if ".attn_1." in k and v.ndim == 2 else v for k, v in state.items()}
    return {"first_stage_model." + k: v for k, v in state.items()}


def clip_to_ldm(text_encoder: CLIPTextModel, prefix: str) -> dict:
    return {prefix + "text_model." + k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}


def open_clip_to_ldm(text_encoder: CLIPTextModelWithProjection, prefix: str) -> dict:
    state = text_encoder.state_dict()
    out = {"token_embedding.weight": state.pop("text_model.embeddings.token_embedding.weight"),
           "positional_embedding": state.pop("text_model.embeddings.position_embedding.weight"),
           "ln_final.weight": state.pop("text_model.final_layer_norm.weight"),
           "ln_final.bias": state.pop("text_model.final_layer_norm.bias"),
           "text_projection": state.pop("text_projection.weight").T.contiguous()}
    for i in range(text_encoder.config.num_hidden_layers):
        src, dst = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[dst + "attn.in_proj_" + kind] = torch.cat([state.pop(f"{src}self_attn.{p}_proj.{kind}") for p in "qkv"])
            for old, new in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                             ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                out[f"{dst}{new}.{kind}"] = state.pop(f"{src}{old}.{kind}")
    assert not state, f"unmapped OpenCLIP tensors: {list(state)}"
    return {prefix + k: v for k, v in out.items()}


def to_ldm_checkpoint(parts) -> dict:
    if parts.text_encoder_2 is None:
        text = clip_to_ldm(parts.text_encoder, "cond_stage_model.transformer.")
    else:
        text = {**clip_to_ldm(parts.text_encoder, "conditioner.embedders.0.transformer."),
                **open_clip_to_ldm(parts.text_encoder_2, "conditioner.embedders.1.model.")}
    return {**unet_to_ldm(parts.unet), **vae_to_ldm(parts.vae), **text}


# ---------------------------------------------------------------- fixtures

def tiny_sdxl_distinct_widths(seed: int = 0):
    """SDXL-shaped with encoder widths 32 and 48: diffusers tells CLIP-L from OpenCLIP-G by width."""
    torch.manual_seed(seed)
    tokenizer = byte_level_tokenizer()
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), cross_attention_dim=80, attention_head_dim=(2, 4),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=48 + 6 * 8, norm_num_groups=32,
    )
    return DiffusionParts(
        unet, tiny_vae(), CLIPTextModel(tiny_text_config(tokenizer)), tokenizer, sd_dpm_solver(),
        CLIPTextModelWithProjection(tiny_text_config(tokenizer, hidden_size=48, projection_dim=48)),
        byte_level_tokenizer(), base="sdxl",
    )


def write_config_dir(parts: DiffusionParts, base: str, folder: Path) -> Path:
    """A diffusers config directory (no weights) describing ``parts``, with the shipped model_index.json."""
    folder.mkdir(parents=True)
    shutil.copy(CONFIG_DIR / base / "model_index.json", folder / "model_index.json")
    parts.unet.save_config(folder / "unet")
    parts.vae.save_config(folder / "vae")
    parts.scheduler.save_config(folder / "scheduler")
    for name in ("text_encoder", "text_encoder_2"):
        if getattr(parts, name) is not None:
            getattr(parts, name).config.save_pretrained(folder / name)
    for name in ("tokenizer", "tokenizer_2"):
        if getattr(parts, name) is not None:
            getattr(parts, name).save_pretrained(folder / name)
    return folder


def assert_same_weights(loaded: torch.nn.Module, original: torch.nn.Module) -> None:
    want, got = original.state_dict(), loaded.state_dict()
    assert set(got) == set(want)
    for key, value in want.items():
        assert torch.equal(got[key], value), key


@pytest.fixture(scope="module")
def sd15_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd15")
    parts = DiffusionParts(**vars(tiny_sd15()), base="sd15")
    # bookkeeping tensors that A1111-era SD1 files carry besides the weights; the loader must ignore them
    extras = {"alphas_cumprod": torch.rand(1000), "model_ema.decay": torch.tensor(0.9999),
              "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77.0)[None] - 1e-3}
    save_file({**to_ldm_checkpoint(parts), **extras}, root / "tiny_sd15.safetensors")
    return parts, root / "tiny_sd15.safetensors", write_config_dir(parts, "sd15", root / "config")


@pytest.fixture(scope="module")
def sdxl_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl")
    parts = tiny_sdxl_distinct_widths()
    save_file(to_ldm_checkpoint(parts), root / "tiny_sdxl.safetensors")
    return parts, root / "tiny_sdxl.safetensors", write_config_dir(parts, "sdxl", root / "config")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# ---------------------------------------------------------------- tokenizer

def test_clip_tokenizer_gives_openai_clip_ids():
    tok = clip_tokenizer()
    assert len(tok) == 49408
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    padded = tok("a cat", padding="max_length", max_length=77).input_ids
    assert padded[:4] == [49406, 320, 2368, 49407] and set(padded[4:]) == {49407} and len(padded) == 77


def test_sdxl_second_tokenizer_pads_with_exclamation_mark():
    padded = clip_tokenizer(pad_token="!")("a cat", padding="max_length", max_length=8).input_ids
    assert padded == [49406, 320, 2368, 49407, 0, 0, 0, 0]


# ---------------------------------------------------------------- shipped configs

@pytest.mark.parametrize("base, unet_params, text_params", [
    ("sd15", 859_520_964, [123_060_480]),
    ("sdxl", 2_567_463_684, [123_060_480, 694_659_840]),
])
def test_shipped_configs_build_the_published_architectures(base, unet_params, text_params):
    """Parameter counts of the released SD1.5 / SDXL base models (built on the meta device, no weights)."""
    parts = random_parts(base, "meta")
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(parts.unet) == unet_params
    assert count(parts.vae) == 83_653_863
    assert [count(e) for e in parts.text_encoders] == text_params
    assert parts.base == base and len(parts.tokenizers) == len(text_params)
    assert parts.scheduler.config.algorithm_type == "dpmsolver++" and parts.scheduler.config.solver_order == 2


# ---------------------------------------------------------------- single-file checkpoints

def test_tiny_sd15_single_file_loads_every_tensor(sd15_checkpoint):
    original, path, config = sd15_checkpoint
    parts = load_diffusion_parts(path, config=config)
    assert parts.base == "sd15" and parts.text_encoder_2 is None
    for name in ("unet", "vae", "text_encoder"):
        assert_same_weights(getattr(parts, name), getattr(original, name))
    assert parts.tokenizer("a photo").input_ids == original.tokenizer("a photo").input_ids
    assert parts.scheduler.config.algorithm_type == "dpmsolver++" and parts.scheduler.config.solver_order == 2


def test_tiny_sdxl_single_file_loads_both_text_encoders(sdxl_checkpoint):
    original, path, config = sdxl_checkpoint
    parts = load_diffusion_parts(path, config=config, dtype=torch.float16)
    assert parts.base == "sdxl"
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert next(getattr(parts, name).parameters()).dtype == torch.float16
        assert_same_weights(getattr(parts, name), getattr(original, name).half())


def test_checkpoint_layout_is_detected(sd15_checkpoint, sdxl_checkpoint):
    assert detect_checkpoint_base(to_ldm_checkpoint(sd15_checkpoint[0])) == "sd15"
    assert detect_checkpoint_base(to_ldm_checkpoint(sdxl_checkpoint[0])) == "sdxl"


def test_wrong_base_is_refused(sdxl_checkpoint):
    with pytest.raises(ValueError, match="sdxl checkpoint but base='sd15'"):
        load_diffusion_parts(sdxl_checkpoint[1], base="sd15", config=sdxl_checkpoint[2])


@pytest.mark.parametrize("keys, message", [
    ({"lora_unet_down_blocks_0_attn1_to_q.lora_down.weight"}, "LoRA"),
    ({"cond_stage_model.model.token_embedding.weight", "model.diffusion_model.out.2.weight"}, "2.x"),
    ({"conditioner.embedders.0.model.text_projection"}, "refiner"),
    ({"down_blocks.0.resnets.0.conv1.weight"}, "diffusers key names"),
    ({"foo.weight"}, "unknown key layout"),
    ({"model.diffusion_model.out.2.weight", "cond_stage_model.transformer.text_model.x"}, r"vae \(first_stage_model"),
])
def test_foreign_layouts_are_named(keys, message):
    with pytest.raises(ValueError, match=message):
        detect_checkpoint_base(keys)


def test_bad_files_give_clear_errors(tmp_path):
    garbage = tmp_path / "model.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_diffusion_parts(garbage)
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"x")
    with pytest.raises(ValueError, match="only .safetensors"):
        load_diffusion_parts(ckpt)
    with pytest.raises(ValueError, match="model not found"):
        load_diffusion_parts(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="no model_index.json"):
        load_diffusion_parts(tmp_path)


@pytest.mark.parametrize("missing", ["model.diffusion_model.out.2.weight",
                                     "cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc2.bias"])
def test_incomplete_checkpoint_is_refused(sd15_checkpoint, tmp_path, missing):
    original, _, config = sd15_checkpoint
    state = to_ldm_checkpoint(original)
    del state[missing]
    save_file(state, tmp_path / "partial.safetensors")
    with pytest.raises(ValueError, match="weights are incomplete"):
        load_diffusion_parts(tmp_path / "partial.safetensors", config=config)


def test_inpainting_checkpoint_is_refused(sd15_checkpoint, tmp_path):
    original, _, config = sd15_checkpoint
    state = to_ldm_checkpoint(original)
    weight = state["model.diffusion_model.input_blocks.0.0.weight"]
    state["model.diffusion_model.input_blocks.0.0.weight"] = torch.cat([weight, weight, weight[:, :1]], dim=1)
    save_file(state, tmp_path / "inpaint.safetensors")
    with pytest.raises(ValueError, match="9 input channels"):
        load_diffusion_parts(tmp_path / "inpaint.safetensors", config=config)


# ---------------------------------------------------------------- diffusers directories

def test_diffusers_directory_round_trip(tmp_path):
    original = tiny_sd15()
    StableDiffusionPipeline(
        vae=original.vae, text_encoder=original.text_encoder, tokenizer=original.tokenizer, unet=original.unet,
        scheduler=original.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(tmp_path)
    parts = load_diffusion_parts(tmp_path)
    assert parts.base == "sd15"
    for name in ("unet", "vae", "text_encoder"):
        assert_same_weights(getattr(parts, name), getattr(original, name))
    assert parts.tokenizer("a photo").input_ids == original.tokenizer("a photo").input_ids
    assert isinstance(parts.scheduler, type(original.scheduler))
    assert parts.scheduler.config.beta_schedule == "scaled_linear"


def test_sdxl_directory_round_trip_and_base_check(tmp_path):
    original = tiny_sdxl_distinct_widths()
    StableDiffusionXLPipeline(
        vae=original.vae, text_encoder=original.text_encoder, text_encoder_2=original.text_encoder_2,
        tokenizer=original.tokenizer, tokenizer_2=original.tokenizer_2, unet=original.unet,
        scheduler=original.scheduler,
    ).save_pretrained(tmp_path)
    parts = load_diffusion_parts(tmp_path)
    assert parts.base == "sdxl" and parts.image_size == (32, 32)
    assert_same_weights(parts.text_encoder_2, original.text_encoder_2)
    with pytest.raises(ValueError, match="SDXL model but base='sd15'"):
        load_diffusion_parts(tmp_path, base="sd15")


def test_directory_missing_a_component_is_named(tmp_path):
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "text_encoder": ["transformers", "CLIPTextModel"], "scheduler": ["diffusers", "DPMSolverMultistepScheduler"]}
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="lists no tokenizer"):
        load_diffusion_parts(tmp_path)


# ---------------------------------------------------------------- full size (acceptance item, minutes on CPU)

@pytest.mark.slow
def test_full_size_sd15_single_file_loads_offline(tmp_path):
    """A ComfyUI-style SD1.5 checkpoint (random weights, original key names, fp16) loads with the shipped
    configs and tokenizer only."""
    torch.manual_seed(0)
    folder = CONFIG_DIR / "sd15"
    state = {}
    for build, convert in (
        (lambda: UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet")), unet_to_ldm),
        (lambda: AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae")), vae_to_ldm),
        (lambda: CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder")),
         lambda m: clip_to_ldm(m, "cond_stage_model.transformer.")),
    ):
        state.update(convert(build().half()))
    assert len(state) == 686 + 248 + 196
    unet_in = "model.diffusion_model.input_blocks.0.0.weight"
    vae_q = "first_stage_model.encoder.mid.attn_1.q.weight"
    fc2 = "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight"
    for known in (unet_in, vae_q, fc2,
                  "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
                  "model.diffusion_model.output_blocks.11.0.skip_connection.weight",
                  "model.diffusion_model.middle_block.1.proj_out.weight",
                  "first_stage_model.decoder.up.1.block.0.nin_shortcut.weight"):
        assert known in state, known
    expected = {key: state[key].clone() for key in (unet_in, vae_q, fc2)}
    path = tmp_path / "sd15-random.safetensors"
    save_file(state, path)
    del state

    start = time.perf_counter()
    parts = load_diffusion_parts(path)
    seconds = time.perf_counter() - start
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"full SD1.5 single file: load {seconds:.1f} s, peak RSS of the test process {peak_gib:.2f} GiB")
    assert parts.base == "sd15"
    assert sum(p.numel() for p in parts.unet.parameters()) == 859_520_964
    assert torch.equal(parts.unet.conv_in.weight.half(), expected[unet_in])
    assert torch.equal(parts.vae.encoder.mid_block.attentions[0].to_q.weight.half(), expected[vae_q][:, :, 0, 0])
    assert torch.equal(parts.text_encoder.encoder.layers[11].mlp.fc2.weight.half(), expected[fc2])
    assert parts.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
