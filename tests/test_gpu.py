"""CUDA correctness: the adjusted gradient, mixed precision, and `fair train` / `fair eval` on a GPU.

Marked ``gpu``: deselected by default and skipped without CUDA (`./run.sh test -m gpu` on a GPU machine).
References are computed on the CPU in float64.
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig

from fair_core import dft
from fair_core.adaptor import read_adaptor
from tiny_models import tiny_sd15
from train_cli.main import main

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

GUIDANCE = 7.5
LORA = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)


@pytest.fixture(autouse=True)
def exact_float32():
    """fp32 means fp32 here: no TF32 in matmuls or convolutions (restored afterwards)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _adjusted_gradient(device: str, dtype: torch.dtype, autocast_dtype: torch.dtype | None, seed: int) -> torch.Tensor:
    """Flat UNet-LoRA gradient of one 6-step adjusted DFT pass of tiny SD1.5 (inputs drawn from ``seed``)."""
    torch.manual_seed(0)
    parts = tiny_sd15()
    parts.unet.add_adapter(LORA)
    parts.unet.to(device, dtype).eval()
    generator = torch.Generator().manual_seed(seed)
    noise, cond, uncond = (torch.randn(*shape, generator=generator, dtype=torch.float64)
                           for shape in ((2, 4, 16, 16), (2, 8, 32), (2, 8, 32)))
    weight = torch.randn(2, 4, 16, 16, generator=generator, dtype=torch.float64)
    noise, cond, uncond, weight = (t.to(device, dtype) for t in (noise, cond, uncond, weight))

    def loss_fn(x0: torch.Tensor) -> torch.Tensor:
        return (torch.tanh(x0.to(dtype)) * weight).sum()

    dft.adjusted_backward(parts.unet, parts.scheduler, noise, cond, uncond, 6, GUIDANCE, loss_fn,
                          autocast_dtype=autocast_dtype)
    params = [p for p in parts.unet.parameters() if p.requires_grad]
    return torch.cat([p.grad.flatten() for p in params]).double().cpu()


def _relative_error(got: torch.Tensor, reference: torch.Tensor) -> float:
    return float((got - reference).norm() / reference.norm())


@pytest.mark.parametrize("seed", [1, 2])
def test_adjusted_gradient_on_cuda_matches_cpu_float64(seed):
    reference = _adjusted_gradient("cpu", torch.float64, None, seed)
    assert reference.norm() > 0
    assert _relative_error(_adjusted_gradient("cuda", torch.float32, None, seed), reference) < 1e-4
    # bf16 autocast keeps ~3 significant digits per operation; through 6 guided steps (CFG 7.5 multiplies the
    # cond - uncond difference) of a random-weight UNet the gradient's direction survives, not its digits:
    # on the CPU, bf16 autocast measured relative error 0.22 / 0.26 and cosine 0.975 / 0.970 for seeds 1 / 2.
    bf16 = _adjusted_gradient("cuda", torch.float32, torch.bfloat16, seed)
    assert torch.isfinite(bf16).all()
    assert torch.nn.functional.cosine_similarity(bf16, reference, dim=0) > 0.95


def test_trace_backward_on_cuda_equals_adjusted_backward():
    torch.manual_seed(0)
    parts = tiny_sd15()
    parts.unet.add_adapter(LORA)
    parts.unet.to("cuda").eval()
    params = [p for p in parts.unet.parameters() if p.requires_grad]
    generator = torch.Generator("cuda").manual_seed(3)
    noise, cond, uncond = (torch.randn(*s, device="cuda", generator=generator) for s in ((2, 4, 16, 16), (2, 8, 32), (2, 8, 32)))

    def loss_fn(x0: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x0).square().sum()

    args = (parts.unet, parts.scheduler, noise, cond, uncond, 5, GUIDANCE)
    dft.adjusted_backward(*args, loss_fn)
    direct = [p.grad.clone() for p in params]
    parts.unet.zero_grad(set_to_none=True)
    dft.trace_sampling(*args).backward(loss_fn)
    for a, b in zip(direct, (p.grad for p in params)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("precision", ["no", "bf16", "fp16"])
def test_toy_training_and_audit_on_cuda(tmp_path, precision):
    """`fair train` on the GPU (the toy config with mixed precision and checkpointing), then `fair eval` of
    its adaptor on the GPU: every step taken, the adaptor loads, the audit scores every image."""
    out = tmp_path / "run"
    code = main(["train", "--config", "examples/toy_smoke.yaml", "--set", f"output_dir={out}", "--set", "device=cuda",
                 "--set", f"mixed_precision={precision}", "--set", "gradient_checkpointing=true",
                 "--set", "iterations=3", "--set", "checkpoint_every=1"])
    assert code == 0
    adaptor = read_adaptor(out / "fair_adaptor.safetensors", expected_base="toy")
    assert adaptor.family_counts().get("te", 0) > 0
    state = json.loads((out / "checkpoints" / "iter_0000003" / "state.json").read_text())["train_state"]
    assert state["skipped_steps"] == 0 and state["iteration"] == 3
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a librarian\na photo of a plumber\n")
    code = main(["eval", "--model", "toy", "--adaptor", str(out / "fair_adaptor.safetensors"), "--prompts", str(prompts),
                 "--classifier", "toy", "--images-per-prompt", "8", "--steps", "6", "--target", "colour=uniform",
                 "--device", "cuda", "--out", str(tmp_path / "eval")])
    assert code == 0
    audit = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert audit["summaries"]
