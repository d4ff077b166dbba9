"""Sampling with gradients: adjusted direct finetuning (adjusted DFT) of Shen et al., ICLR 2024.

A diffusers UNet (epsilon prediction) and a deterministic multistep scheduler (DPM-Solver++ 2M in the
paper) generate latents from fixed noise with classifier-free guidance (CFG)::

    eps_t = eps_uncond + g * (eps_cond - eps_uncond)         # UNet called once on [uncond, cond]
    x_{t-1} = scheduler.step(eps_t, t, x_t)                   # linear in x_t and the eps history

The *adjusted* gradient of a loss L(x_0) (Shen et al. §2.2, DESIGN §4) keeps the solver's linear updates
differentiable but detaches the latent where it enters the UNet, and multiplies the gradient arriving at
each step's guided eps_t by the normalised coefficient c_t of :func:`step_coefficients`. With detached
UNet inputs x_0 is a linear function of the noise and the eps_t's, so the gradient is computed as

1. a pass with the UNet under ``no_grad`` whose guided eps_t are leaf tensors: the solver chain, only
   linear algebra, is recorded and ``L.backward()`` gives dL/deps_t for every step;
2. one vector-Jacobian product per step: the UNet is called again on the stored (detached) input with
   gradients enabled and ``backward(eps_t, c_t * dL/deps_t)`` is run at once.

Peak memory is that of one UNet call plus a few latent-sized tensors per step, whatever the number of
steps. Gradients accumulate into ``.grad`` of the UNet parameters and, through the conditioning tensors,
of whatever produced them (text-encoder LoRA, soft tokens), so micro-batches can call
:func:`adjusted_backward` repeatedly before one optimiser step.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from typing import Callable, Literal

import torch
from diffusers import SchedulerMixin, UNet2DConditionModel

LossFn = Callable[[torch.Tensor], torch.Tensor]
Predictor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
AddedCond = dict[str, tuple[torch.Tensor, torch.Tensor]]
MODES = ("adjusted", "naive")


@dataclass
class DFTResult:
    """Outcome of one :func:`adjusted_backward` call.

    Attributes:
        loss: value of ``loss_fn`` on the generated latents.
        latents: detached x_0 latents ``(N, C, H, W)`` in the dtype of the noise, in the VAE's scaled
            latent space (divide by ``vae.config.scaling_factor`` before decoding).
    """

    loss: float
    latents: torch.Tensor


@dataclass
class _GuidedUNet:
    """The CFG-combined noise prediction ``(z, t) -> eps``.

    ``cond``/``uncond``: encoder hidden states ``(N, L, D)``. ``added_cond``: SDXL's extra conditioning,
    name -> ``(cond_value, uncond_value)``, each ``(N, ...)`` (``text_embeds``, ``time_ids``).
    """

    unet: UNet2DConditionModel
    cond: torch.Tensor
    uncond: torch.Tensor
    added_cond: AddedCond
    guidance_scale: float
    autocast_dtype: torch.dtype | None

    def __call__(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``z``: UNet input ``(N, C, H, W)``; returns the guided eps ``(N, C, H, W)`` in ``z.dtype``."""
        dtype = self.unet.dtype
        # At g = 1 the guided prediction is the conditional one: skip the unconditional half of the batch.
        unguided = self.guidance_scale == 1.0
        hidden = self.cond if unguided else torch.cat([self.uncond, self.cond])
        added = {name: (c if unguided else torch.cat([u, c])).to(dtype) for name, (c, u) in self.added_cond.items()} or None
        autocast = (
            torch.autocast(z.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else contextlib.nullcontext()
        )
        with autocast:
            out = self.unet(
                (z if unguided else torch.cat([z, z])).to(dtype), t, encoder_hidden_states=hidden.to(dtype),
                added_cond_kwargs=added, return_dict=False,
            )[0]
        if unguided:
            return out.to(z.dtype)
        eps_uncond, eps_cond = out.to(z.dtype).chunk(2)
        return eps_uncond + self.guidance_scale * (eps_cond - eps_uncond)

    def conditioning(self) -> list[torch.Tensor]:
        """All conditioning tensors, in a fixed order."""
        return [self.cond, self.uncond, *(v for pair in self.added_cond.values() for v in pair)]

    def detached(self) -> _GuidedUNet:
        """A copy whose conditioning tensors are fresh leaves (requiring grad where the originals do), so
        the per-step backward passes accumulate conditioning gradients without re-entering the text encoder."""

        def leaf(x: torch.Tensor) -> torch.Tensor:
            return x.detach().requires_grad_(x.requires_grad)

        added = {name: (leaf(c), leaf(u)) for name, (c, u) in self.added_cond.items()}
        return replace(self, cond=leaf(self.cond), uncond=leaf(self.uncond), added_cond=added)


def step_coefficients(scheduler: SchedulerMixin) -> torch.Tensor:
    """Normalised per-step gradient weights of adjusted DFT for the scheduler's current timesteps.

    ``c_t = sqrt(abar_t) * sqrt(1 - abar_t) / beta_t`` with the training (1000-step DDPM) schedule values at
    each sampling step's discrete timestep t, divided by the geometric mean of c over the steps, so the
    product of the returned weights is 1.

    Args:
        scheduler: a diffusers scheduler on which ``set_timesteps`` has been called.

    Returns:
        float64 CPU tensor ``(num_steps,)``, positive, in the order of ``scheduler.timesteps``.
    """
    if getattr(scheduler, "num_inference_steps", None) is None:
        raise ValueError("step_coefficients needs the sampling timesteps: call scheduler.set_timesteps first")
    timesteps = scheduler.timesteps.detach().cpu().long()
    alpha_bar = scheduler.alphas_cumprod.detach().cpu().double()[timesteps]
    beta = scheduler.betas.detach().cpu().double()[timesteps]
    c = alpha_bar.sqrt() * (1 - alpha_bar).sqrt() / beta
    return c / c.log().mean().exp()


def sample(
    unet: UNet2DConditionModel,
    scheduler: SchedulerMixin,
    noise: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    num_steps: int,
    guidance_scale: float,
    added_cond: AddedCond | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Generate latents without gradients (the target pass of adjusted DFT).

    Args:
        unet: epsilon-predicting ``UNet2DConditionModel``.
        scheduler: deterministic diffusers scheduler (DPM-Solver++ 2M in the paper). Multistep schedulers are
            stateful, so each call steps a fresh copy built from ``scheduler.config``; the given one is
            left untouched.
        noise: standard normal ``(N, C, H, W)``; multiplied by ``scheduler.init_noise_sigma`` here, as the
            diffusers pipelines do with given latents. Its dtype is the dtype of the solver.
        cond, uncond: encoder hidden states ``(N, L, D)`` of the prompt and of the negative prompt.
        num_steps: number of sampling steps (>= 1).
        guidance_scale: CFG scale g.
        added_cond: SDXL only: name -> ``(cond_value, uncond_value)``, each ``(N, ...)``, for
            ``added_cond_kwargs`` (``text_embeds``, ``time_ids``).
        autocast_dtype: if set (``torch.bfloat16``/``torch.float16``), UNet calls run under autocast; eps is
            cast back to the noise dtype before CFG and the solver.

    Returns:
        x_0 latents ``(N, C, H, W)`` in the noise dtype (VAE-scaled latent space).
    """
    guided = _guided_unet(unet, scheduler, noise, cond, uncond, num_steps, guidance_scale, added_cond, autocast_dtype)
    scheduler = _fresh_copy(scheduler)
    with torch.no_grad():
        return _solve(scheduler, noise, num_steps, guided)


def adjusted_backward(
    unet: UNet2DConditionModel,
    scheduler: SchedulerMixin,
    noise: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    num_steps: int,
    guidance_scale: float,
    loss_fn: LossFn,
    added_cond: AddedCond | None = None,
    mode: Literal["adjusted", "naive"] = "adjusted",
    autocast_dtype: torch.dtype | None = None,
) -> DFTResult:
    """Generate latents from ``noise`` and backpropagate ``loss_fn(x_0)`` through the sampling chain.

    Arguments are those of :func:`sample`, plus:

    Args:
        loss_fn: ``x_0 latents (N, C, H, W), requiring grad -> scalar tensor``. Decoding with the VAE and
            every loss term happen inside it.
        mode: ``"adjusted"``: Shen et al.'s adjusted gradient (detached UNet inputs, per-step weights of
            :func:`step_coefficients`, memory of one UNet call). ``"naive"``: the exact gradient through the
            whole chain in one autograd graph (memory grows with the number of steps; for comparison).

    Gradients are *added* to ``.grad`` of the UNet parameters that require grad and, when ``cond``,
    ``uncond`` or ``added_cond`` tensors require grad, backpropagated into whatever produced them. Enable
    ``unet.enable_gradient_checkpointing()`` (and ``unet.train()``) beforehand to trade compute for memory.

    Returns:
        :class:`DFTResult` with the loss value and the detached latents.
    """
    trace = trace_sampling(unet, scheduler, noise, cond, uncond, num_steps, guidance_scale, added_cond, mode, autocast_dtype)
    return trace.backward(loss_fn)


def trace_sampling(
    unet: UNet2DConditionModel,
    scheduler: SchedulerMixin,
    noise: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    num_steps: int,
    guidance_scale: float,
    added_cond: AddedCond | None = None,
    mode: Literal["adjusted", "naive"] = "adjusted",
    autocast_dtype: torch.dtype | None = None,
) -> SamplingTrace:
    """Generate latents and keep what :meth:`SamplingTrace.backward` needs, for a loss known only later.

    The first half of :func:`adjusted_backward` (arguments as there): a trainer that must see the images
    of the whole batch before it can define the loss (the alignment targets) samples once with this,
    instead of a no-grad :func:`sample` followed by :func:`adjusted_backward` from the same noise.
    ``"adjusted"`` keeps the solver's linear chain and the detached UNet input of every step (a few
    latent-sized tensors per step); ``"naive"`` keeps the whole autograd graph, activations included.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    guided = _guided_unet(unet, scheduler, noise, cond, uncond, num_steps, guidance_scale, added_cond, autocast_dtype)
    if not any(p.requires_grad for p in unet.parameters()) and not any(
        c.requires_grad for c in guided.conditioning()
    ):
        raise ValueError("nothing to train: no UNet parameter and no conditioning tensor requires grad")
    trace = SamplingTrace(guided, _fresh_copy(scheduler), mode)
    predict = guided if mode == "naive" else trace.predict_as_leaf
    trace.x0 = _solve(trace.scheduler, noise, num_steps, predict)
    return trace


@dataclass
class SamplingTrace:
    """One sampling run kept for a single later backward pass (see :func:`trace_sampling`).

    Attributes:
        x0: x_0 latents ``(N, C, H, W)`` with their autograd history; :attr:`latents` is the detached view.
    """

    guided: _GuidedUNet
    scheduler: SchedulerMixin
    mode: str
    x0: torch.Tensor | None = None
    unet_inputs: list[torch.Tensor] = field(default_factory=list)
    eps_leaves: list[torch.Tensor] = field(default_factory=list)

    @property
    def latents(self) -> torch.Tensor:
        """Detached x_0 latents ``(N, C, H, W)``, as :func:`sample` returns them."""
        return self.x0.detach()

    def predict_as_leaf(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The guided eps under no_grad as a leaf requiring grad; the (detached) UNet input is kept."""
        z = z.detach()
        with torch.no_grad():
            eps = self.guided(z, t)
        self.unet_inputs.append(z)
        self.eps_leaves.append(eps.requires_grad_())
        return eps

    def backward(self, loss_fn: LossFn) -> DFTResult:
        """Backpropagate ``loss_fn(x_0)`` (see :func:`adjusted_backward`); a trace is used once."""
        if self.x0 is None:
            raise RuntimeError("this SamplingTrace was already used for a backward pass")
        x0, self.x0 = self.x0, None
        loss = _scalar_loss(loss_fn, x0)
        loss.backward()  # adjusted: dL/deps_t through the solver's linear updates only (and loss_fn's own parameters)
        if self.mode == "naive":
            return DFTResult(loss.item(), x0.detach())
        if any(eps.grad is None for eps in self.eps_leaves):
            raise ValueError("loss_fn's result does not depend on the latents it was given")
        weights = step_coefficients(self.scheduler).to(x0.device)
        per_step = self.guided.detached()
        for z, t, eps, weight in zip(self.unet_inputs, self.scheduler.timesteps, self.eps_leaves, weights):
            torch.autograd.backward(per_step(z, t), eps.grad * weight.to(eps.dtype))
        _backward_conditioning(self.guided.conditioning(), per_step.conditioning())
        self.unet_inputs, self.eps_leaves = [], []
        return DFTResult(loss.item(), x0.detach())


def _backward_conditioning(originals: list[torch.Tensor], leaves: list[torch.Tensor]) -> None:
    """Send the conditioning gradients summed over the per-step VJPs into the graph that made them."""
    pairs = [(orig, leaf.grad) for orig, leaf in zip(originals, leaves) if leaf.grad is not None]
    if pairs:
        tensors, grads = zip(*pairs)
        torch.autograd.backward(list(tensors), list(grads))


def _solve(scheduler: SchedulerMixin, noise: torch.Tensor, num_steps: int, predict: Predictor) -> torch.Tensor:
    """Run the sampling chain from ``noise``; ``predict(unet_input, t) -> eps``. Returns x_0."""
    scheduler.set_timesteps(num_steps, device=noise.device)
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        eps = predict(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(eps, t, x, return_dict=False)[0]
    return x


def _fresh_copy(scheduler: SchedulerMixin) -> SchedulerMixin:
    """Same configuration, no state: the copy (and the autograd history its solver keeps) dies with the call."""
    return type(scheduler).from_config(scheduler.config)


def _scalar_loss(loss_fn: LossFn, x0: torch.Tensor) -> torch.Tensor:
    loss = loss_fn(x0)
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"loss_fn must return a scalar (0-dim) tensor, got {shape}")
    if not loss.requires_grad:
        raise ValueError("loss_fn's result does not depend on the latents it was given (it has no gradient)")
    return loss


def _guided_unet(
    unet: UNet2DConditionModel,
    scheduler: SchedulerMixin,
    noise: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    num_steps: int,
    guidance_scale: float,
    added_cond: AddedCond | None,
    autocast_dtype: torch.dtype | None,
) -> _GuidedUNet:
    """Validate the shared arguments and bundle the guided noise prediction."""
    _check_scheduler(scheduler)
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    if noise.ndim != 4:
        raise ValueError(f"noise must have shape (N, C, H, W), got {tuple(noise.shape)}")
    if not noise.is_floating_point():
        raise ValueError(f"noise must be a floating-point tensor, got {noise.dtype}")
    n = noise.shape[0]
    for name, h in (("cond", cond), ("uncond", uncond)):
        if h.ndim != 3 or h.shape[0] != n:
            raise ValueError(f"{name} must have shape (N={n}, L, D), got {tuple(h.shape)}")
    if cond.shape != uncond.shape:
        raise ValueError(f"cond and uncond must have the same shape, got {tuple(cond.shape)} and {tuple(uncond.shape)}")
    added_cond = dict(added_cond or {})
    for name, pair in added_cond.items():
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise ValueError(f"added_cond[{name!r}] must be a (cond_value, uncond_value) pair")
        if pair[0].shape != pair[1].shape or pair[0].shape[0] != n:
            raise ValueError(
                f"added_cond[{name!r}] halves must both have batch size {n} and equal shapes, "
                f"got {tuple(pair[0].shape)} and {tuple(pair[1].shape)}"
            )
    return _GuidedUNet(unet, cond, uncond, added_cond, float(guidance_scale), autocast_dtype)


def _check_scheduler(scheduler: SchedulerMixin) -> None:
    config = scheduler.config
    if not (hasattr(scheduler, "alphas_cumprod") and hasattr(scheduler, "betas")):
        raise ValueError(f"{type(scheduler).__name__} has no DDPM schedule (alphas_cumprod/betas)")
    if config.get("prediction_type", "epsilon") != "epsilon":
        raise ValueError(f"adjusted DFT needs an epsilon-prediction model, scheduler has {config.prediction_type!r}")
    if str(config.get("algorithm_type", "")).startswith("sde"):
        raise ValueError(
            f"scheduler algorithm {config.algorithm_type!r} is stochastic; the target and gradient passes "
            "must follow the same trajectory (use 'dpmsolver++')"
        )
