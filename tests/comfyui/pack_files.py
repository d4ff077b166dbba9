"""What the real-ComfyUI tests put in ComfyUI's model folders and post to it, made with fair_core; and the timings
the layer reports at the end of the run. Plain module (not a conftest) so the tests can import it."""

from __future__ import annotations

import json
import time

import torch
from torch import nn

import harness
from fair_core.adaptor import FairMetadata, LoraWeights, SoftTokens, lora_prefix
from fair_core.adaptor.container import FairAdaptor
from fair_core.targets import TargetDistribution

TIMINGS: dict[str, float] = {}
ADAPTOR = "nurse_fair.safetensors"
TOKEN = "fairtok"
CHECKPOINT = "random_sd15.safetensors"
FACE_IMAGE = "astronaut.png"  # scikit-image's sample photo (NASA, public domain): one real face, for the audit


def sd15_adaptor(rank: int = 4, alpha: float = 2.0, vectors: int = 3, seed: int = 0) -> FairAdaptor:
    """A fair adaptor for the full-size SD1.5 layout: LoRA on every layer the trainer targets (UNet attention
    q/k/v/out, text-encoder q/k/v/out/fc1/fc2: 200 modules) with random weights, and one soft token of
    ``vectors`` vectors. Module names come from fair_core's SD1.5 architecture built on the meta device."""
    from fair_core.models import random_parts
    from fair_core.trainable import TEXT_ENCODER_TARGETS, UNET_TARGETS

    parts = random_parts("sd15", device="meta")
    generator = torch.Generator().manual_seed(seed)
    lora = {}
    families = (("unet", parts.unet, UNET_TARGETS), ("te", parts.text_encoder, TEXT_ENCODER_TARGETS))
    for family, model, targets in families:
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
                down = torch.randn(rank, module.in_features, generator=generator) * 0.05
                up = torch.randn(module.out_features, rank, generator=generator) * 0.05
                lora[lora_prefix(family, name)] = LoraWeights(down, up, alpha)
    tokens = [SoftTokens(TOKEN, {"te": torch.randn(vectors, 768, generator=generator) * 0.3})]
    metadata = FairMetadata(base_model="sd15", name="nurse_fair", target=TargetDistribution.parse("gender=uniform"))
    return FairAdaptor(metadata=metadata, lora=lora, tokens=tokens)


def sdxl_adaptor() -> FairAdaptor:
    """A small adaptor that says it is for SDXL (two text-encoder modules): the base check's counter-example."""
    lora = {lora_prefix(family, "text_model.encoder.layers.0.self_attn.q_proj"):
            LoraWeights(torch.zeros(2, width), torch.zeros(width, 2), 2.0)
            for family, width in (("te1", 768), ("te2", 1280))}
    metadata = FairMetadata(base_model="sdxl", name="xl_fair", target=TargetDistribution.parse("gender=uniform"))
    return FairAdaptor(metadata=metadata, lora=lora)


def timed_run(client, name: str, prompt: dict, timeout: float = 900.0) -> dict:
    """Run ``prompt`` to the end and record its wall time under ``name``."""
    started = time.monotonic()
    entry = client.run(prompt, timeout)
    TIMINGS[name] = time.monotonic() - started
    return entry


def load_workflow(name: str) -> dict:
    return json.loads((harness.REPO / "example_workflows" / name).read_text())
