"""Test-only ComfyUI node pack: reports facts about the REAL nodes' outputs to /history (``ui.fair_probe``).

Linked into the test server's ``custom_nodes`` beside the Fair Adaptors pack; never shipped. Each probe is an
output node whose inputs come from the nodes under test (Load Fair Adaptor, Fair Text Encode, Mid-Block Bypass)
and from ComfyUI's stock nodes (LoraLoader, CLIPTextEncode, KSampler), and sends back numbers, not tensors.
"""

import torch

import comfy.model_management
import comfy.utils


def _patched_weights(patcher):
    """{weight key: patched weight} for the keys ``patcher`` patches, read with its own patch/unpatch."""
    keys = sorted(patcher.patches)
    patcher.patch_model()
    try:
        return {key: comfy.utils.get_attr(patcher.model, key).detach().float().clone() for key in keys}
    finally:
        patcher.unpatch_model()


def _compare_patchers(a, b):
    comfy.model_management.unload_all_models()  # nobody else holds these weights patched
    weights_a = _patched_weights(a)
    weights_b = _patched_weights(b)
    base = {key: comfy.utils.get_attr(a.model, key).detach().float() for key in weights_a}
    same_keys = sorted(weights_a) == sorted(weights_b)
    return {
        "keys_a": len(weights_a), "keys_b": len(weights_b), "same_keys": same_keys,
        "max_diff": max((float((weights_a[k] - weights_b[k]).abs().max()) for k in weights_a if k in weights_b),
                        default=float("nan")),
        "max_delta": max((float((weights_a[k] - base[k]).abs().max()) for k in weights_a), default=0.0),
    }


class FairProbePatchedWeights:
    CATEGORY = "fair_probe"
    FUNCTION = "probe"
    OUTPUT_NODE = True
    RETURN_TYPES = ()

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model_a": ("MODEL",), "model_b": ("MODEL",), "clip_a": ("CLIP",), "clip_b": ("CLIP",)}}

    def probe(self, model_a, model_b, clip_a, clip_b):
        report = {"model": _compare_patchers(model_a, model_b),
                  "clip": _compare_patchers(clip_a.patcher, clip_b.patcher)}
        return {"ui": {"fair_probe": [report]}, "result": ()}


class FairProbeConditioning:
    CATEGORY = "fair_probe"
    FUNCTION = "probe"
    OUTPUT_NODE = True
    RETURN_TYPES = ()

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"a": ("CONDITIONING",), "b": ("CONDITIONING",), "label": ("STRING", {"default": ""})}}

    def probe(self, a, b, label):
        (cond_a, extra_a), (cond_b, extra_b) = a[0], b[0]
        report = {"label": label, "shape_a": list(cond_a.shape), "shape_b": list(cond_b.shape)}
        if cond_a.shape == cond_b.shape:
            report["max_diff"] = float((cond_a.float() - cond_b.float()).abs().max())
            report["max_abs"] = float(cond_a.float().abs().max())
        pooled_a, pooled_b = extra_a.get("pooled_output"), extra_b.get("pooled_output")
        if pooled_a is not None and pooled_b is not None:
            report["pooled_diff"] = float((pooled_a.float() - pooled_b.float()).abs().max())
        return {"ui": {"fair_probe": [report]}, "result": ()}


class FairProbeLatents:
    CATEGORY = "fair_probe"
    FUNCTION = "probe"
    OUTPUT_NODE = True
    RETURN_TYPES = ()

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"a": ("LATENT",), "b": ("LATENT",), "label": ("STRING", {"default": ""})}}

    def probe(self, a, b, label):
        diff = float((a["samples"].float() - b["samples"].float()).abs().max())
        finite = bool(torch.isfinite(a["samples"]).all() and torch.isfinite(b["samples"]).all())
        return {"ui": {"fair_probe": [{"label": label, "max_diff": diff, "finite": finite}]}, "result": ()}


class FairProbeNotUNet:
    """A real ModelPatcher clone whose diffusion model is swapped (ComfyUI's own object patch) for a module that is
    not a UNet: what Mid-Block Bypass sees when given a DiT-style model."""

    CATEGORY = "fair_probe"
    FUNCTION = "swap"
    RETURN_TYPES = ("MODEL",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}}

    def swap(self, model):
        swapped = model.clone()
        swapped.add_object_patch("diffusion_model", torch.nn.Identity())
        return (swapped,)


NODE_CLASS_MAPPINGS = {cls.__name__: cls for cls in (FairProbePatchedWeights, FairProbeConditioning,
                                                     FairProbeLatents, FairProbeNotUNet)}
NODE_DISPLAY_NAME_MAPPINGS = {name: name for name in NODE_CLASS_MAPPINGS}
