"""Prompt encoding, LoRA injection and soft prompt tokens on tiny SD1.5/SDXL-shaped models."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from peft.tuners.lora import LoraLayer

from fair_core.conditioning import Conditioning, encode_prompts
from fair_core.models import DiffusionParts
from tiny_models import tiny_sd15, tiny_sdxl
from fair_core.soft_prompt import SoftPrompt
from fair_core.trainable import adapters_disabled, add_text_encoder_lora, add_unet_lora

PROMPTS = ["a photo of a doctor", "a nurse", "portrait of a " + "very " * 120 + "tall person"]  # last one truncated


@pytest.fixture
def sd15() -> DiffusionParts:
    return DiffusionParts(**vars(tiny_sd15()), base="sd15")


@pytest.fixture
def sdxl() -> DiffusionParts:
    return DiffusionParts(**vars(tiny_sdxl()), base="sdxl")


def ids(tokenizer, prompts):
    return tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def randomize_lora_up(*models):
    """LoRA starts as a no-op (up = 0); give it a visible effect, as training would."""
    torch.manual_seed(1)
    for model in models:
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.5)


# ---------------------------------------------------------------- plain encoding

def test_sd15_conditioning_is_last_hidden_state_of_prompt_and_empty_string(sd15):
    c = encode_prompts(sd15, PROMPTS)
    with torch.no_grad():
        want = sd15.text_encoder(ids(sd15.tokenizer, PROMPTS)).last_hidden_state
        empty = sd15.text_encoder(ids(sd15.tokenizer, [""])).last_hidden_state
    assert c.cond.shape == c.uncond.shape == (3, 77, 32)
    torch.testing.assert_close(c.cond, want)
    for row in c.uncond:
        torch.testing.assert_close(row, empty[0])
    assert c.added_cond is None and "added_cond_kwargs" not in c.cfg_unet_kwargs()


def test_sdxl_conditioning_concatenates_penultimate_states_and_adds_pooled_and_time_ids(sdxl):
    c = encode_prompts(sdxl, PROMPTS[:2], image_size=(1024, 768))
    with torch.no_grad():
        first = sdxl.text_encoder(ids(sdxl.tokenizer, PROMPTS[:2]), output_hidden_states=True)
        second = sdxl.text_encoder_2(ids(sdxl.tokenizer_2, PROMPTS[:2]), output_hidden_states=True)
        empty = sdxl.text_encoder_2(ids(sdxl.tokenizer_2, [""]))
    assert c.cond.shape == c.uncond.shape == (2, 77, 64)
    torch.testing.assert_close(c.cond[..., :32], first.hidden_states[-2])
    torch.testing.assert_close(c.cond[..., 32:], second.hidden_states[-2])
    assert not torch.allclose(c.cond[..., :32], first.last_hidden_state)
    torch.testing.assert_close(c.added_cond["text_embeds"][0], second.text_embeds)
    torch.testing.assert_close(c.added_cond["text_embeds"][1], empty.text_embeds.expand(2, -1))
    for time_ids in c.added_cond["time_ids"]:
        assert time_ids.tolist() == [[1024, 768, 0, 0, 1024, 768]] * 2
    assert encode_prompts(sdxl, ["a"]).added_cond["time_ids"][0].tolist() == [[32, 32, 0, 0, 32, 32]]

    kwargs = c.cfg_unet_kwargs()
    assert kwargs["encoder_hidden_states"].shape == (4, 77, 64)
    assert kwargs["added_cond_kwargs"]["text_embeds"].shape == (4, 32)
    torch.testing.assert_close(kwargs["added_cond_kwargs"]["text_embeds"][:2], c.added_cond["text_embeds"][1])
    with torch.no_grad():
        eps = sdxl.unet(torch.randn(4, 4, 16, 16), 500, **kwargs).sample
    assert eps.shape == (4, 4, 16, 16)


def test_conditioning_rows_select_a_micro_batch(sdxl):
    c = encode_prompts(sdxl, PROMPTS)
    part = c[1:3]
    assert isinstance(part, Conditioning) and len(part) == 2
    torch.testing.assert_close(part.cond, c.cond[1:3])
    torch.testing.assert_close(part.added_cond["text_embeds"][0], c.added_cond["text_embeds"][0][1:3])
    assert c[2].cond.shape == (1, 77, 64) and c[[0, 2]].added_cond["time_ids"][1].shape == (2, 6)


def test_toy_pixel_space_model_is_encoded_like_sd15(sd15):
    toy = DiffusionParts(sd15.unet, None, sd15.text_encoder, sd15.tokenizer, sd15.scheduler, base="toy")
    assert toy.image_size == (16, 16)
    torch.testing.assert_close(encode_prompts(toy, ["a"]).cond, encode_prompts(sd15, ["a"]).cond)


def test_bad_prompts_are_refused(sd15):
    for prompts in ("a photo", [], ["ok", 3]):
        with pytest.raises(ValueError, match="non-empty list of strings"):
            encode_prompts(sd15, prompts)


# ---------------------------------------------------------------- soft prompt

def carrying(parts: DiffusionParts, soft: SoftPrompt) -> DiffusionParts:
    """The same models carrying ``soft`` (the parts fixtures are shared)."""
    return dataclasses.replace(parts, soft_prompt=soft)


def textual_inversion_reference(parts: DiffusionParts, soft: SoftPrompt, prompts: list[str]):
    """The paper's way: K new tokens in the tokenizer, their rows appended to the embedding matrix, the token
    strings written before the prompt with no space. Returns each encoder's output."""
    outputs = []
    for tokenizer, encoder, rows in zip(parts.tokenizers, parts.text_encoders, soft.embeddings):
        tokenizer, encoder = copy.deepcopy(tokenizer), copy.deepcopy(encoder)
        names = [f"<common-token{i + 1}>" for i in range(soft.num_tokens)]
        tokenizer.add_tokens(names)
        table = encoder.get_input_embeddings()
        table.weight = torch.nn.Parameter(torch.cat([table.weight, rows.detach()]))
        assert tokenizer.convert_tokens_to_ids(names) == list(range(len(table.weight) - len(names), len(table.weight)))
        with torch.no_grad():
            outputs.append(encoder(ids(tokenizer, ["".join(names) + p for p in prompts]), output_hidden_states=True))
    return outputs


@pytest.mark.parametrize("model", ["sd15", "sdxl"])
def test_soft_prompt_equals_textual_inversion_tokens_after_bos(model, request):
    parts = request.getfixturevalue(model)
    soft = SoftPrompt.initialise(parts, num_tokens=5, seed=0)
    for p in soft.embeddings:
        p.data += torch.randn_like(p)  # trained-looking vectors, not vocabulary rows
    c = encode_prompts(carrying(parts, soft), PROMPTS)
    reference = textual_inversion_reference(parts, soft, PROMPTS)
    if model == "sd15":
        torch.testing.assert_close(c.cond, reference[0].last_hidden_state)
    else:
        torch.testing.assert_close(c.cond, torch.cat([r.hidden_states[-2] for r in reference], dim=-1))
        # pooled output is read at EOS, which the prefix shifts by K positions
        torch.testing.assert_close(c.added_cond["text_embeds"][0], reference[1].text_embeds)
    plain = encode_prompts(carrying(parts, soft), PROMPTS, with_soft_prompt=False)
    assert torch.equal(plain.cond, encode_prompts(parts, PROMPTS).cond)
    assert torch.equal(c.uncond, plain.uncond)
    assert not torch.allclose(c.cond, plain.cond)


def test_gradients_reach_soft_tokens_and_nothing_else(sdxl):
    soft = SoftPrompt.initialise(sdxl, num_tokens=3)
    sdxl.text_encoder.requires_grad_(False)
    sdxl.text_encoder_2.requires_grad_(False)
    c = encode_prompts(carrying(sdxl, soft), PROMPTS[:2])
    assert not c.uncond.requires_grad
    (c.cond.square().sum() + c.added_cond["text_embeds"][0].square().sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in soft.embeddings)
    assert all(p.grad is None for e in sdxl.text_encoders for p in e.parameters())


def test_soft_prompt_starts_from_distinct_vocabulary_rows(sdxl):
    soft = SoftPrompt.initialise(sdxl, num_tokens=5, seed=3)
    assert [tuple(p.shape) for p in soft.embeddings] == [(5, 32), (5, 32)]
    assert all(p.dtype == torch.float32 and p.requires_grad for p in soft.embeddings)
    found = []
    for p, encoder in zip(soft.embeddings, sdxl.text_encoders):
        table = encoder.get_input_embeddings().weight
        found.append([int((table == row).all(dim=1).nonzero()) for row in p])
    assert found[0] == found[1] and len(set(found[0])) == 5  # same tokens in both encoders
    assert not set(found[0]) & set(sdxl.tokenizer.all_special_ids)


def test_soft_prompt_errors(sd15, sdxl):
    with pytest.raises(ValueError, match="for 1 text encoder"):
        encode_prompts(carrying(sdxl, SoftPrompt.initialise(sd15)), ["a"])
    with pytest.raises(ValueError, match="width 8 does not match"):
        encode_prompts(carrying(sd15, SoftPrompt([torch.zeros(5, 8)])), ["a"])
    with pytest.raises(ValueError, match="do not fit"):
        encode_prompts(carrying(sd15, SoftPrompt([torch.zeros(76, 32)])), ["a"])
    with pytest.raises(ValueError, match="disagree"):
        SoftPrompt([torch.zeros(5, 32), torch.zeros(4, 32)])
    with pytest.raises(ValueError, match="num_tokens"):
        SoftPrompt.initialise(sd15, num_tokens=0)


# ---------------------------------------------------------------- LoRA

def test_text_encoder_lora_keeps_module_paths_and_trains_only_lora(sd15):
    with torch.no_grad():
        before = encode_prompts(sd15, PROMPTS[:1]).cond
    params = add_text_encoder_lora(sd15.text_encoder, rank=4, alpha=4)
    trainable = {n: p for n, p in sd15.text_encoder.named_parameters() if p.requires_grad}
    assert len(params) == len(trainable) == 2 * 6 * 2  # 2 layers x q,k,v,out,fc1,fc2 x (A, B)
    # per layer: 4 square 32x32 maps 4*(4*32 + 32*4), fc1 32->37 (4*32 + 37*4), fc2 37->32 (4*37 + 32*4)
    assert sum(p.numel() for p in params) == 2 * (4 * 256 + 276 + 276)
    assert "encoder.layers.1.mlp.fc2.lora_B.default.weight" in trainable
    assert "encoder.layers.0.self_attn.q_proj.lora_A.default.weight" in trainable
    assert all("lora_" in n for n in trainable)
    a = trainable["encoder.layers.0.self_attn.q_proj.lora_A.default.weight"]
    assert a.shape == (4, 32) and trainable["encoder.layers.0.self_attn.q_proj.lora_B.default.weight"].abs().sum() == 0
    with torch.no_grad():
        assert torch.equal(encode_prompts(sd15, PROMPTS[:1]).cond, before)  # up = 0: no change yet


def test_unet_lora_covers_self_and_cross_attention_and_only_it_gets_gradients(sd15):
    params = add_unet_lora(sd15.unet, rank=4, alpha=4)
    wrapped = [n for n, m in sd15.unet.named_modules() if isinstance(m, LoraLayer)]
    # tiny UNet: 1 transformer block down, 1 mid, 2 up; each attn1 + attn2; each to_q, to_k, to_v, to_out.0
    assert len(wrapped) == 4 * 2 * 4 and len(params) == 2 * len(wrapped)
    assert "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0" in wrapped
    assert "up_blocks.1.attentions.1.transformer_blocks.0.attn1.to_k" in wrapped
    randomize_lora_up(sd15.unet)
    c = encode_prompts(sd15, PROMPTS[:1])
    sd15.unet(torch.randn(2, 4, 16, 16), 500, **c.cfg_unet_kwargs()).sample.square().mean().backward()
    lora_ids = {id(p) for p in params}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert all(p.grad is None for p in sd15.unet.parameters() if id(p) not in lora_ids)


def test_text_encoder_lora_changes_uncond_too_and_can_be_switched_off(sdxl):
    with torch.no_grad():
        original = encode_prompts(sdxl, PROMPTS[:2])
    params = add_text_encoder_lora(sdxl.text_encoder, rank=4, alpha=4)
    params += add_text_encoder_lora(sdxl.text_encoder_2, rank=4, alpha=4)
    randomize_lora_up(*sdxl.text_encoders)
    c = encode_prompts(sdxl, PROMPTS[:2])
    assert not torch.allclose(c.uncond, original.uncond) and not torch.allclose(c.cond, original.cond)
    with torch.no_grad(), adapters_disabled(*sdxl.text_encoders):
        off = encode_prompts(sdxl, PROMPTS[:2])
    torch.testing.assert_close(off.cond, original.cond)
    torch.testing.assert_close(off.added_cond["text_embeds"][0], original.added_cond["text_embeds"][0])
    assert all(p.requires_grad for p in params)  # switched back on
    c.uncond.square().sum().backward()  # the unconditional branch alone trains the LoRA ...
    lora = dict(sdxl.text_encoder.named_parameters())
    assert lora["encoder.layers.0.self_attn.q_proj.lora_A.default.weight"].grad.abs().sum() > 0
    # ... except in CLIP-L's last layer: SDXL reads its penultimate hidden states only
    assert lora["encoder.layers.1.self_attn.q_proj.lora_A.default.weight"].grad is None


def test_lora_on_a_half_precision_model_is_fp32(sd15):
    sd15.text_encoder.half()
    params = add_text_encoder_lora(sd15.text_encoder, rank=2, alpha=2)
    assert {p.dtype for p in params} == {torch.float32}
    assert sd15.text_encoder.encoder.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.float16


def test_lora_errors(sd15):
    with pytest.raises(ValueError, match="rank"):
        add_unet_lora(sd15.unet, rank=0)
    with pytest.raises(ValueError, match="alpha"):
        add_unet_lora(sd15.unet, rank=4, alpha=0)
    with pytest.raises(ValueError, match="not found"):
        add_text_encoder_lora(sd15.text_encoder, rank=4, target_modules=("to_q",))


# ---------------------------------------------------------------- the paper's tokenisation

OCCUPATIONS = ["A photo of the face of a senator, a person", "A photo of the face of a cardiologist, a person"]


@pytest.mark.parametrize("prompts", [OCCUPATIONS[:1] * 3, OCCUPATIONS, ["a nurse", "a photo of a doctor"]])
def test_paper_encoding_is_the_official_short_context_with_a_masked_empty_prompt(sd15, prompts):
    """The official generate_image_*: tokenizer(prompts, padding=True) and "" padded to that length, both
    passed with their attention masks."""
    tokenizer, encoder = sd15.tokenizer, sd15.text_encoder
    official = tokenizer(prompts, return_tensors="pt", padding=True)
    length = official.input_ids.shape[1]
    empty = tokenizer([""] * len(prompts), padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    assert length == max(len(tokenizer(p).input_ids) for p in prompts) < 77
    assert empty.attention_mask[0].tolist() == [1, 1] + [0] * (length - 2)  # BOS, EOS, then masked padding
    with torch.no_grad():
        want = encoder(official.input_ids, official.attention_mask)[0]
        want_empty = encoder(empty.input_ids, empty.attention_mask)[0]
        c = encode_prompts(sd15, prompts, encoding="paper")
    assert c.cond.shape == c.uncond.shape == (len(prompts), length, 32)
    torch.testing.assert_close(c.cond, want)
    torch.testing.assert_close(c.uncond, want_empty)
    host = encode_prompts(sd15, prompts)
    assert host.cond.shape[1] == 77 and not torch.allclose(host.uncond[:, :length], c.uncond)
    assert encode_prompts(sd15, PROMPTS, encoding="paper").cond.shape[1] == 77  # longer prompts are truncated


def test_paper_encoding_keeps_soft_tokens_in_the_short_context(sd15):
    soft = SoftPrompt.initialise(sd15, 3, seed=0)
    parts = carrying(sd15, soft)
    c = encode_prompts(parts, OCCUPATIONS[:1], encoding="paper")
    plain = encode_prompts(parts, OCCUPATIONS[:1], encoding="paper", with_soft_prompt=False)
    assert c.cond.shape[1] == plain.cond.shape[1] + 3 == c.uncond.shape[1]
    torch.testing.assert_close(c.uncond[:, : plain.uncond.shape[1]][:, :2], plain.uncond[:, :2])  # BOS, EOS: causal
    with pytest.raises(ValueError, match="prompt encoding"):
        encode_prompts(sd15, OCCUPATIONS, encoding="comfy")
