"""Mid-Block Bypass (experimental): a model patch in the style of ComfyUI's FreeU node; the maths is
fair_core.midblock."""

from __future__ import annotations

from fair_core.midblock import BRANCHES, SCHEDULES, BypassSchedule, blend, row_weights


class MidBlockBypass:
    DESCRIPTION = ("EXPERIMENTAL, untuned. Partially bypasses the UNet mid-block early in sampling, after the v1 "
                   "preprint of Hakemi et al. 2025 (reconstructed: h_in + lambda * (mid(h_in) - h_in)); lambda "
                   "goes from lambda_min back to 1 between start_percent and end_percent of the denoising "
                   "('reverse': from 1 down to lambda_min and stays). Audit the result with Bias Audit on the "
                   "same seeds. UNet models (SD1.x/SD2.x/SDXL) only; a ControlNet's mid residual is scaled too.")
    CATEGORY = "fairness"
    FUNCTION = "patch"
    RETURN_TYPES = ("MODEL",)
    EXPERIMENTAL = True

    @classmethod
    def INPUT_TYPES(cls):
        unit = {"min": 0.0, "max": 1.0, "step": 0.01}
        return {"required": {"model": ("MODEL",), "lambda_min": ("FLOAT", {"default": 0.5, **unit}),
                             "start_percent": ("FLOAT", {"default": 0.0, **unit}),
                             "end_percent": ("FLOAT", {"default": 0.3, **unit}),
                             "schedule": (list(SCHEDULES),), "apply_to": (list(BRANCHES),),
                             "match_std": ("BOOLEAN", {"default": False})}}

    def patch(self, model, lambda_min, start_percent, end_percent, schedule, apply_to, match_std):
        rule = BypassSchedule(lambda_min, start_percent, end_percent, schedule)
        unet = model.get_model_object("diffusion_model")
        sampling = model.get_model_object("model_sampling")
        if getattr(unet, "middle_block", None) is None or not hasattr(unet, "input_blocks"):
            raise ValueError(f"Mid-Block Bypass needs a UNet with a mid-block (SD1.x/SD2.x/SDXL); this model's "
                             f"diffusion model is {type(unet).__name__}")
        if not hasattr(sampling, "sigmas"):
            raise ValueError(f"Mid-Block Bypass needs discrete timesteps; this model samples with "
                             f"{type(sampling).__name__}")
        last, steps, kept = ("input", len(unet.input_blocks) - 1), len(sampling.sigmas), {}

        def keep_input(h, options):  # the tensor entering the mid-block
            if options.get("block") == last:
                kept["h"] = h
            return h

        def mixed(h, options):
            lam = row_weights(rule, sampling.timestep(options["sigmas"]), h.shape[0],
                              options.get("cond_or_uncond", []), apply_to, steps)
            return blend(kept.pop("h"), h, lam, match_std)

        def after_middle(args):  # newer ComfyUI: called right after the mid-block
            return {**args, "h": mixed(args["h"], args["transformer_options"])}

        def first_output(h, skip, options):  # older ComfyUI: h entering output block 0 is the mid-block's output
            return (mixed(h, options) if options.get("block") == ("output", 0) else h), skip

        patched = model.clone()
        patched.set_model_input_block_patch_after_skip(keep_input)
        if hasattr(patched, "set_model_middle_block_after_patch"):
            patched.set_model_middle_block_after_patch(after_middle)
        else:
            patched.set_model_output_block_patch(first_output)
        return (patched,)
