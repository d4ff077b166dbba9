"""Fair-adaptor format: kohya naming, write -> read -> apply round trips on tiny SD1.5/SDXL-shaped models, merging,
metadata, validation, soft tokens and the converter for the paper's released checkpoints."""

from __future__ import annotations

import fractions
import json

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from safetensors import safe_open

from fair_core.adaptor import (
    AdaptorError,
    FairMetadata,
    SoftTokens,
    add_soft_tokens,
    apply_adaptor,
    convert_paper_checkpoints,
    lora_prefix,
    merge_adaptor,
    read_adaptor,
    save_adaptor,
    text_encoders_by_family,
    write_adaptor,
)
from fair_core.adaptor.metadata import network_dim
from tiny_models import tiny_sd15, tiny_sdxl
from fair_core.targets import DEFAULT_SCHEMA, TargetDistribution


UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
ENCODER_ATTRIBUTES = {"sd15": {"te": "text_encoder"}, "sdxl": {"te1": "text_encoder", "te2": "text_encoder_2"}}
BUILDERS = {"sd15": tiny_sd15, "sdxl": tiny_sdxl}


def text_encoders(parts, base):
    return {family: getattr(parts, attribute) for family, attribute in ENCODER_ATTRIBUTES[base].items()}


def randomise_lora(model, seed):
    """Non-zero lora_B (peft starts it at 0), so that a lost or misplaced tensor changes the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, LoraLayer):
                for adapter in layer.lora_B:
                    for weight in (layer.lora_A[adapter].weight, layer.lora_B[adapter].weight):
                        weight.copy_(0.3 * torch.randn(weight.shape, generator=generator))


def lora_models(base, unet_config, text_config):
    parts = BUILDERS[base]()
    parts.unet.add_adapter(unet_config, adapter_name="trained")
    randomise_lora(parts.unet, 1)
    for i, encoder in enumerate(text_encoders(parts, base).values()):
        inject_adapter_in_model(text_config, encoder, adapter_name="trained")
        randomise_lora(encoder, 2 + i)
    return parts


def unet_output(parts, base):
    generator = torch.Generator().manual_seed(7)
    width, dtype = parts.unet.config.cross_attention_dim, parts.unet.dtype
    sample = torch.randn(2, 4, 16, 16, generator=generator, dtype=dtype)
    context = torch.randn(2, 77, width, generator=generator, dtype=dtype)
    extra = {}
    if base == "sdxl":
        extra["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, 32, generator=generator), "time_ids": torch.rand(2, 6, generator=generator)
        }
    with torch.no_grad():
        return parts.unet(sample, torch.tensor([10, 500]), encoder_hidden_states=context, **extra).sample


def text_outputs(parts, base):
    ids = parts.tokenizer(["a photo of a doctor", "a nurse"], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        return {family: encoder(ids).last_hidden_state for family, encoder in text_encoders(parts, base).items()}


def max_difference(a, b):
    return float((a - b).abs().max())


# Uniform rank for SD1.5; mixed ranks/alphas (per-module pattern) for SDXL, written as "Dynamic".
CONFIGS = {
    "sd15": (
        LoraConfig(r=4, lora_alpha=8, target_modules=UNET_TARGETS),
        LoraConfig(r=4, lora_alpha=8, target_modules=TEXT_TARGETS),
    ),
    "sdxl": (
        LoraConfig(r=4, lora_alpha=4, target_modules=UNET_TARGETS),
        LoraConfig(r=3, lora_alpha=6, target_modules=TEXT_TARGETS, rank_pattern={"fc1": 2}, alpha_pattern={"fc1": 5}),
    ),
}


# ------------------------------------------------------------------------------------------------- naming
def test_kohya_names_of_unet_and_text_encoder_modules():
    assert (
        lora_prefix("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
        == "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    )
    assert lora_prefix("unet", "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0") == (
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0"
    )
    # transformers 5 CLIPTextModel has no text_model level, CLIPTextModelWithProjection has: same kohya name.
    expected = "lora_te_text_model_encoder_layers_11_self_attn_q_proj"
    assert lora_prefix("te", "encoder.layers.11.self_attn.q_proj") == expected
    assert lora_prefix("te", "text_model.encoder.layers.11.self_attn.q_proj") == expected
    assert lora_prefix("te2", "text_model.encoder.layers.0.mlp.fc2") == "lora_te2_text_model_encoder_layers_0_mlp_fc2"
    with pytest.raises(AdaptorError, match="unknown model family"):
        lora_prefix("vae", "decoder.conv_in")


# --------------------------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("base", ["sd15", "sdxl"])
def test_write_read_apply_reproduces_the_peft_model(base, tmp_path):
    unet_config, text_config = CONFIGS[base]
    trained = lora_models(base, unet_config, text_config)
    path = tmp_path / "adaptor.safetensors"
    write_adaptor(
        path, unet=trained.unet, text_encoders=text_encoders(trained, base), metadata=FairMetadata(name="doctor-fair")
    )

    adaptor = read_adaptor(path, expected_base=base)
    fresh = BUILDERS[base]()
    base_unet = unet_output(fresh, base)
    apply_adaptor(adaptor, unet=fresh.unet, text_encoders=text_encoders(fresh, base))

    expected_unet, got_unet = unet_output(trained, base), unet_output(fresh, base)
    assert max_difference(expected_unet, base_unet) > 1e-3  # the LoRA matters
    assert max_difference(got_unet, expected_unet) <= 1e-6
    expected_text, got_text = text_outputs(trained, base), text_outputs(fresh, base)
    for family in expected_text:
        assert max_difference(got_text[family], expected_text[family]) <= 1e-6

    # Exactly the peft layers, one prefix per module, and nothing else in the file.
    models = {"unet": trained.unet} | text_encoders(trained, base)
    peft_prefixes = {
        lora_prefix(family, name)
        for family, model in models.items()
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer)
    }
    assert set(adaptor.lora) == peft_prefixes
    with safe_open(str(path), framework="pt") as file:
        keys, header = set(file.keys()), file.metadata()
    assert len(keys) == 3 * len(peft_prefixes)
    assert header["ss_base_model_version"] == {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0"}[base]
    assert header["fair.base_model"] == base and header["ss_output_name"] == "doctor-fair"
    assert json.loads(header["fair.format_version"]) == 1


def test_file_tensors_are_peft_lora_a_b_and_alpha_under_kohya_keys(tmp_path):
    trained = lora_models("sd15", *CONFIGS["sd15"])
    path = tmp_path / "a.safetensors"
    write_adaptor(path, unet=trained.unet, text_encoders={"te": trained.text_encoder}, metadata=FairMetadata())
    q_proj = trained.text_encoder.get_submodule("encoder.layers.1.self_attn.q_proj")
    to_out = trained.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0")
    with safe_open(str(path), framework="pt") as file:
        te = "lora_te_text_model_encoder_layers_1_self_attn_q_proj"
        unet = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_out_0"
        assert torch.equal(file.get_tensor(f"{te}.lora_down.weight"), q_proj.lora_A["trained"].weight)
        assert torch.equal(file.get_tensor(f"{te}.lora_up.weight"), q_proj.lora_B["trained"].weight)
        assert torch.equal(file.get_tensor(f"{unet}.lora_up.weight"), to_out.lora_B["trained"].weight)
        assert file.get_tensor(f"{unet}.alpha").item() == 8.0 and file.get_tensor(f"{unet}.alpha").ndim == 0
        assert file.metadata()["ss_network_dim"] == "4" and file.metadata()["ss_network_alpha"] == "8.0"


def test_dynamic_ranks_are_recorded_as_such(tmp_path):
    trained = lora_models("sdxl", *CONFIGS["sdxl"])
    path = tmp_path / "a.safetensors"
    write_adaptor(path, unet=trained.unet, text_encoders=text_encoders(trained, "sdxl"), metadata=FairMetadata())
    adaptor = read_adaptor(path)
    assert adaptor.ranks == (2, 3, 4) and adaptor.alphas == (4.0, 5.0, 6.0)
    assert adaptor.header["ss_network_dim"] == "Dynamic"
    assert adaptor.family_counts() == {"unet": 64, "te1": 12, "te2": 12}


@pytest.mark.parametrize("strength", [0.7, -1.5])
def test_merge_and_apply_at_strength_equal_peft_scale(strength, tmp_path):
    """Models in float64, so that merged (W + dW) and unmerged (Wx + dW x) agree to rounding. The file holds the
    LoRA in float32 (float64 files are refused) and float32 values are exact in float64."""
    base = "sd15"
    trained = lora_models(base, *CONFIGS[base])
    path = tmp_path / "a.safetensors"
    write_adaptor(path, unet=trained.unet, text_encoders=text_encoders(trained, base), metadata=FairMetadata())
    for model in (trained.unet, trained.text_encoder):
        model.double()
        for layer in model.modules():
            if isinstance(layer, LoraLayer):
                layer.set_scale("trained", strength)
    adaptor = read_adaptor(path)
    merged, applied = BUILDERS[base](), BUILDERS[base]()
    for model in (merged.unet, merged.text_encoder, applied.unet, applied.text_encoder):
        model.double()
    merge_adaptor(adaptor, unet=merged.unet, text_encoders=text_encoders(merged, base), strength=strength)
    apply_adaptor(adaptor, unet=applied.unet, text_encoders=text_encoders(applied, base), strength=strength)

    expected, expected_text = unet_output(trained, base), text_outputs(trained, base)["te"]
    for parts in (merged, applied):
        assert max_difference(unet_output(parts, base), expected) <= 1e-10
        assert max_difference(text_outputs(parts, base)["te"], expected_text) <= 1e-10
    assert not any(isinstance(m, LoraLayer) for m in merged.unet.modules())


def test_merge_is_w_plus_scaled_up_down(tmp_path):
    """Merging by hand from the file's own tensors: W + strength * alpha / rank * up @ down."""
    trained = lora_models("sd15", *CONFIGS["sd15"])
    path = tmp_path / "a.safetensors"
    write_adaptor(path, unet=trained.unet, metadata=FairMetadata(base_model="sd15"))
    fresh = tiny_sd15()
    name = "up_blocks.1.attentions.1.transformer_blocks.0.attn1.to_v"
    before = fresh.unet.get_submodule(name).weight.detach().clone()
    merge_adaptor(read_adaptor(path), unet=fresh.unet, strength=0.5)
    with safe_open(str(path), framework="pt") as file:
        prefix = "lora_unet_" + name.replace(".", "_")
        down, up = file.get_tensor(f"{prefix}.lora_down.weight"), file.get_tensor(f"{prefix}.lora_up.weight")
        alpha = file.get_tensor(f"{prefix}.alpha").item()
    expected = before + 0.5 * alpha / down.shape[0] * up @ down
    assert torch.allclose(fresh.unet.get_submodule(name).weight, expected, atol=1e-6)


# ------------------------------------------------------------------------------------------ wrong models
def test_sdxl_adaptor_on_sd15_models_is_rejected(tmp_path):
    trained = lora_models("sdxl", *CONFIGS["sdxl"])
    path = tmp_path / "xl.safetensors"
    write_adaptor(path, unet=trained.unet, text_encoders=text_encoders(trained, "sdxl"), metadata=FairMetadata())
    adaptor = read_adaptor(path)
    sd15 = tiny_sd15()
    with pytest.raises(AdaptorError, match=r"sdxl adaptor has LoRA for te1, te2 but no such model .*given: unet, te"):
        apply_adaptor(adaptor, unet=sd15.unet, text_encoders={"te": sd15.text_encoder})
    unet_only = read_adaptor(path)
    unet_only.lora = unet_only.lora_of_family("unet")
    with pytest.raises(AdaptorError, match="adaptor module.* match no layer of the unet model"):
        apply_adaptor(unet_only, unet=sd15.unet)
    # Modules that exist in both UNets by name still differ in shape (cross-attention width 64 vs 32).
    shared = {n for n, _ in sd15.unet.named_modules()}
    unet_only.lora = {p: w for p, w in unet_only.lora.items() if p in {lora_prefix("unet", n) for n in shared}}
    assert unet_only.lora
    with pytest.raises(AdaptorError, match="is it for another base model"):
        merge_adaptor(unet_only, unet=sd15.unet)
    with pytest.raises(AdaptorError, match="base model mismatch: the adaptor is for sdxl, not sd15"):
        read_adaptor(path, expected_base="sd15")


def test_apply_refuses_an_existing_adapter_name(tmp_path):
    trained = lora_models("sd15", *CONFIGS["sd15"])
    path = tmp_path / "a.safetensors"
    write_adaptor(path, unet=trained.unet, metadata=FairMetadata(base_model="sd15"))
    with pytest.raises(AdaptorError, match="already has a LoRA adapter named 'trained'"):
        apply_adaptor(read_adaptor(path), unet=trained.unet, adapter_name="trained")
    with pytest.raises(AdaptorError, match="adapter name 'train' clashes"):
        apply_adaptor(read_adaptor(path), unet=tiny_sd15().unet, adapter_name="train")


# ---------------------------------------------------------------------------------------------- writing
def test_unet_only_adaptor_needs_a_base_model(tmp_path):
    trained = lora_models("sd15", *CONFIGS["sd15"])
    with pytest.raises(AdaptorError, match="base_model must be set"):
        write_adaptor(tmp_path / "a.safetensors", unet=trained.unet, metadata=FairMetadata())
    assert not list(tmp_path.iterdir())


def test_write_is_atomic(tmp_path, monkeypatch):
    trained = lora_models("sd15", *CONFIGS["sd15"])
    path = tmp_path / "a.safetensors"
    write_adaptor(path, unet=trained.unet, metadata=FairMetadata(base_model="sd15", name="old"))
    original = path.read_bytes()

    def failing_save(tensors, filename, metadata):
        with open(filename, "wb") as file:
            file.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("fair_core.adaptor.writer.save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        write_adaptor(path, unet=trained.unet, metadata=FairMetadata(base_model="sd15", name="new"))
    assert path.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]


def test_the_content_hash_follows_the_tensors_not_the_old_header(tmp_path):
    """A re-saved adaptor gets the hash of its new tensors; a third party's stale sshs_legacy_hash is not copied."""
    trained = lora_models("sd15", *CONFIGS["sd15"])
    path = tmp_path / "a.safetensors"
    write_adaptor(path, unet=trained.unet, metadata=FairMetadata(base_model="sd15"))
    adaptor = read_adaptor(path)
    adaptor.metadata.extra["sshs_legacy_hash"] = "deadbeef"
    weights = next(iter(adaptor.lora.values()))
    weights.up = weights.up + 1.0
    save_adaptor(adaptor, tmp_path / "b.safetensors")
    again = read_adaptor(tmp_path / "b.safetensors")  # verifies the new hash
    assert again.header["sshs_model_hash"] != adaptor.header["sshs_model_hash"]
    assert "sshs_legacy_hash" not in again.header


def test_writer_refuses_float64_and_integer_tensors(tmp_path):
    """Loaders apply only float LoRA tensors faithfully: float64, integer and bool weights are refused on writing."""
    trained = lora_models("sd15", *CONFIGS["sd15"])
    with pytest.raises(AdaptorError, match=r"lora_down.weight has dtype float64; .* must be floating point: F16"):
        write_adaptor(tmp_path / "a.safetensors", unet=trained.unet, metadata=FairMetadata(base_model="sd15"),
                      dtype=torch.float64)
    assert not list(tmp_path.iterdir())


def test_writer_refuses_non_finite_weights(tmp_path):
    trained = lora_models("sd15", *CONFIGS["sd15"])
    layer = trained.unet.get_submodule("mid_block.attentions.0.transformer_blocks.0.attn1.to_k")
    with torch.no_grad():
        layer.lora_B["trained"].weight[0, 0] = float("nan")
    with pytest.raises(AdaptorError, match=r"lora_unet_mid_block_.*attn1_to_k.lora_up.weight has non-finite values"):
        write_adaptor(tmp_path / "a.safetensors", unet=trained.unet, metadata=FairMetadata(base_model="sd15"))
    assert not list(tmp_path.iterdir())


def test_rslora_alpha_is_written_as_the_equivalent_kohya_alpha(tmp_path):
    base = "sd15"
    config = LoraConfig(r=4, lora_alpha=3, use_rslora=True, target_modules=UNET_TARGETS)
    trained = lora_models(base, config, CONFIGS[base][1])
    path = tmp_path / "a.safetensors"
    write_adaptor(path, unet=trained.unet, text_encoders=text_encoders(trained, base), metadata=FairMetadata())
    adaptor = read_adaptor(path)
    assert adaptor.lora_of_family("unet")[
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q"
    ].alpha == pytest.approx(3 * 2.0)  # alpha / sqrt(r) == alpha' / r
    fresh = tiny_sd15()
    apply_adaptor(adaptor, unet=fresh.unet, text_encoders=text_encoders(fresh, base))
    assert max_difference(unet_output(fresh, base), unet_output(trained, base)) <= 1e-6


# --------------------------------------------------------------------------------------------- metadata
def test_fair_metadata_round_trips_through_the_header():
    target = TargetDistribution.parse("gender=female:0.25,male:0.75;race=uniform")
    metadata = FairMetadata(
        base_model="sdxl",
        name="nurse-fair",
        sd_model_name="sd_xl_base_1.0.safetensors",
        target=target,
        classifier={"name": "fairface-onnx", "sha256": "ab" * 32},
        training_args={"lr": 5e-5, "rank": 50},
        eval={"bias_before": 0.8, "bias_after": 0.1},
        date="2024-05-01T00:00:00+00:00",
        extra={"modelspec.author": "someone"},
    )
    header = metadata.to_metadata()
    assert all(isinstance(value, str) for value in header.values())
    assert header["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert json.loads(header["fair.attributes"]) == [DEFAULT_SCHEMA[n].to_json() for n in ("gender", "race")]
    back = FairMetadata.from_metadata(header)
    assert back.target.to_json() == target.to_json()
    assert back.attributes == (DEFAULT_SCHEMA["gender"], DEFAULT_SCHEMA["race"])
    for field in ("base_model", "name", "sd_model_name", "classifier", "training_args", "eval", "date", "extra"):
        assert getattr(back, field) == getattr(metadata, field), field


@pytest.mark.parametrize(
    "header, message",
    [
        ({"fair.base_model": "sd15", "ss_base_model_version": "sdxl_base_v1-0"}, "disagrees about the base model"),
        ({"ss_base_model_version": "sd_v2"}, "unsupported base model ss_base_model_version='sd_v2'"),
        ({"fair.attributes": "[{"}, "metadata fair.attributes is not valid JSON"),
        ({"fair.format_version": "2"}, "unsupported fair.format_version '2'"),
        ({"fair.classifier": '{"name": "x"}'}, 'metadata fair.classifier must be an object {"name": string, '
                                               '"sha256": string}, got {"name": "x"}'),
        ({"fair.classifier": "null"}, "metadata fair.classifier must be an object .*, got null$"),
        ({"fair.classifier": '{"name": "x", "sha256": 5}'}, "got 5 at fair.classifier.sha256$"),
        ({"fair.eval": "5"}, "metadata fair.eval must be a JSON object, got 5$"),
        ({"fair.training_args": "[]"}, "metadata fair.training_args must be a JSON object, got \\[\\]$"),
        ({"fair.attributes": '[{"name": "g", "classes": [1, 2]}]'},
         "got \\[1, 2\\] at fair.attributes\\[0\\].classes$"),
        ({"fair.attributes": "null"}, "metadata fair.attributes must be a list of .*, got null$"),
        ({"fair.target_distribution": '"uniform"'},
         'metadata fair.target_distribution must be an object .*, got "uniform"$'),
        ({"fair.tokens": "7"}, "metadata fair.tokens must be a list of .*, got 7$"),
    ],
)
def test_bad_metadata_is_named(header, message):
    """Wrong-typed fair.* values: one line naming the key, the expected type and the value."""
    with pytest.raises(AdaptorError, match=message):
        FairMetadata.from_metadata(header)


@pytest.mark.parametrize(
    "value, rank", [("8", 8), ("Dynamic", None), ("None", None), ("", None), ("²", "'Dynamic', got \"²\""),
                    ("4.0", "got \"4.0\""), ("-1", "got \"-1\""), ("\u0664", "got \"\u0664\"")],
)
def test_network_dim_is_a_whole_number_or_dynamic(value, rank):
    """``'²'.isdigit()`` is True but ``int('²')`` fails: the rank is parsed with one clear message."""
    if isinstance(rank, str):
        with pytest.raises(AdaptorError, match=f"^metadata ss_network_dim must be a whole number .*{rank}$"):
            network_dim({"ss_network_dim": value})
    else:
        assert network_dim({"ss_network_dim": value}) == rank


def test_base_model_inferred_from_key_families_without_metadata(tmp_path):
    from safetensors.torch import save_file

    prefix = "lora_te2_text_model_encoder_layers_0_mlp_fc1"
    path = tmp_path / "kohya.safetensors"
    save_file({f"{prefix}.lora_down.weight": torch.ones(2, 32), f"{prefix}.lora_up.weight": torch.ones(37, 2)}, path)
    adaptor = read_adaptor(path)
    assert adaptor.base_model == "sdxl"
    assert adaptor.lora[prefix].alpha == 2.0  # no alpha tensor: scale 1, as kohya/ComfyUI read it


# ------------------------------------------------------------------------------------------- soft tokens
@pytest.mark.parametrize("base", ["sd15", "sdxl"])
def test_soft_tokens_round_trip_and_land_in_the_embedding_table(base, tmp_path):
    families = list(ENCODER_ATTRIBUTES[base])
    vectors = {family: torch.randn(5, 32) for family in families}
    path = tmp_path / "tokens.safetensors"
    write_adaptor(path, tokens=[SoftTokens("fairtoken", vectors)], metadata=FairMetadata(base_model=base))
    with safe_open(str(path), framework="pt") as file:
        expected_keys = {"sd15": {"bundle_emb.fairtoken.string_to_param.*"},
                         "sdxl": {"bundle_emb.fairtoken.clip_l", "bundle_emb.fairtoken.clip_g"}}[base]
        assert set(file.keys()) == expected_keys
        assert "ss_network_dim" not in file.metadata()
    (tokens,) = read_adaptor(path, expected_base=base).tokens
    assert tokens.name == "fairtoken" and tokens.num_vectors == 5
    for family in families:
        assert torch.equal(tokens.vectors[family], vectors[family])

    parts = BUILDERS[base]()
    tokenizers = {"te": parts.tokenizer, "te1": parts.tokenizer, "te2": parts.tokenizer_2}
    prompts = add_soft_tokens([tokens], tokenizers, text_encoders(parts, base))
    assert prompts == {"fairtoken": "fairtoken fairtoken_1 fairtoken_2 fairtoken_3 fairtoken_4"}
    for family, encoder in text_encoders(parts, base).items():
        ids = tokenizers[family](prompts["fairtoken"] + "a doctor").input_ids
        new_ids = ids[1:6]
        assert new_ids == tokenizers[family].convert_tokens_to_ids(prompts["fairtoken"].split())
        assert min(new_ids) >= 516  # appended after the tiny vocabulary
        assert torch.equal(encoder.get_input_embeddings().weight[new_ids], vectors[family])


def test_text_encoders_are_keyed_by_the_adaptor_families_of_the_base():
    from fair_core.models import DiffusionParts

    sdxl = DiffusionParts(**vars(tiny_sdxl()), base="sdxl")
    assert text_encoders_by_family(sdxl) == {"te1": sdxl.text_encoder, "te2": sdxl.text_encoder_2}
    sd15 = DiffusionParts(**vars(tiny_sd15()), base="sd15")
    assert text_encoders_by_family(sd15) == {"te": sd15.text_encoder}
    with pytest.raises(AdaptorError, match="'sd15' model with 2 text encoder"):
        text_encoders_by_family(DiffusionParts(**vars(tiny_sdxl()), base="sd15"))


def test_sdxl_tokens_need_both_encoders(tmp_path):
    adaptor_tokens = [SoftTokens("fairtoken", {"te1": torch.zeros(5, 32)})]
    with pytest.raises(AdaptorError, match="a sdxl adaptor needs exactly \\['te1', 'te2'\\]"):
        write_adaptor(tmp_path / "a.safetensors", tokens=adaptor_tokens, metadata=FairMetadata(base_model="sdxl"))


# ---------------------------------------------------------------------------------- paper's checkpoints
RANK = 4


def paper_state_dicts(parts, seed=3):
    """The paper's naming, built by hand on the tiny SD1.5 model: (text encoder dict, U-Net dict, prefix dict)."""
    generator = torch.Generator().manual_seed(seed)

    def pair(layer):
        return (0.2 * torch.randn(RANK, layer.in_features, generator=generator),
                0.2 * torch.randn(layer.out_features, RANK, generator=generator))

    text = {}
    for layer_index in range(parts.text_encoder.config.num_hidden_layers):
        for module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                       "mlp.fc1", "mlp.fc2"):
            name = f"text_model.encoder.layers.{layer_index}.{module}"
            down, up = pair(parts.text_encoder.get_submodule(name.removeprefix("text_model.")))
            text[f"{name}.lora_linear_layer.down.weight"], text[f"{name}.lora_linear_layer.up.weight"] = down, up
    unet = {}
    for name, module in parts.unet.named_modules():
        if name.endswith(("attn1", "attn2")):
            for projection in ("to_q", "to_k", "to_v", "to_out"):
                layer = module.to_out[0] if projection == "to_out" else getattr(module, projection)
                down, up = pair(layer)
                unet[f"{name}.processor.{projection}_lora.down.weight"] = down
                unet[f"{name}.processor.{projection}_lora.up.weight"] = up
    width = parts.text_encoder.config.hidden_size
    prefix = {
        "token_embedding.weight": torch.randn(6, width, generator=generator),
        "position_embedding.weight": parts.text_encoder.get_input_embeddings().weight.new_zeros(77, width),
        "position_ids": torch.arange(77).unsqueeze(0),
    }
    return text, unet, prefix


def merge_paper_by_hand(parts, text, unet):
    """W += up @ down for every pair, located from the paper's key names alone."""
    with torch.no_grad():
        for state, model, marker in ((text, parts.text_encoder, ".lora_linear_layer."), (unet, parts.unet, "_lora.")):
            for key in [k for k in state if k.endswith("down.weight")]:
                module_name = key.split(marker)[0].removeprefix("text_model.")
                if marker == "_lora.":
                    attention, projection = module_name.split(".processor.")
                    module_name = f"{attention}.{'to_out.0' if projection == 'to_out' else projection}"
                weight = model.get_submodule(module_name).weight
                weight += state[key.replace("down.weight", "up.weight")] @ state[key]


def test_converted_paper_checkpoint_gives_the_same_outputs_as_merging_by_hand(tmp_path):
    text, unet, prefix = paper_state_dicts(tiny_sd15())
    paths = []
    files = {"text_encoder_lora_EMA.pth": text, "unet_lora_EMA.pth": unet, "prefix_embedding_EMA.pth": prefix}
    for name, state in files.items():
        torch.save(state, tmp_path / name)
        paths.append(tmp_path / name)
    adaptor = convert_paper_checkpoints(paths, name="paper-exp1", target=TargetDistribution.parse("gender=uniform"))
    out = save_adaptor(adaptor, tmp_path / "paper.safetensors")
    converted = read_adaptor(out, expected_base="sd15")
    assert converted.family_counts() == {"unet": 32, "te": 12}
    assert converted.ranks == (RANK,) and converted.alphas == (float(RANK),)
    assert converted.metadata.target.to_json() == TargetDistribution.parse("gender=uniform").to_json()
    assert converted.metadata.prompt_encoding == "paper"  # so fair eval evaluates it the way it was trained

    by_hand, applied, merged = tiny_sd15(), tiny_sd15(), tiny_sd15()
    merge_paper_by_hand(by_hand, text, unet)
    apply_adaptor(converted, unet=applied.unet, text_encoders={"te": applied.text_encoder})
    merge_adaptor(converted, unet=merged.unet, text_encoders={"te": merged.text_encoder})
    expected_unet, expected_text = unet_output(by_hand, "sd15"), text_outputs(by_hand, "sd15")["te"]
    assert max_difference(expected_unet, unet_output(tiny_sd15(), "sd15")) > 1e-3
    for parts in (applied, merged):
        assert max_difference(unet_output(parts, "sd15"), expected_unet) <= 1e-5
        assert max_difference(text_outputs(parts, "sd15")["te"], expected_text) <= 1e-5

    (tokens,) = converted.tokens
    assert tokens.name == "fairtoken" and torch.equal(tokens.vectors["te"], prefix["token_embedding.weight"][1:])


def test_paper_converter_rejects_what_it_does_not_know(tmp_path):
    text, _, _ = paper_state_dicts(tiny_sd15())
    torch.save(text | {"text_model.final_layer_norm.weight": torch.ones(32)}, tmp_path / "extra.pth")
    with pytest.raises(AdaptorError, match="keys not in the paper's LoRA naming: 'text_model.final_layer_norm.weight'"):
        convert_paper_checkpoints([tmp_path / "extra.pth"])

    torch.save(text, tmp_path / "te.pth")
    torch.save(text, tmp_path / "te_EMA.pth")
    with pytest.raises(AdaptorError, match="pass the EMA or the non-EMA file, not both"):
        convert_paper_checkpoints([tmp_path / "te.pth", tmp_path / "te_EMA.pth"])

    # weights_only=True refuses arbitrary pickled objects.
    torch.save({"x": fractions.Fraction(1, 3)}, tmp_path / "pickled.pth")
    with pytest.raises(AdaptorError, match="pickled.pth: not a loadable torch checkpoint"):
        convert_paper_checkpoints([tmp_path / "pickled.pth"])
