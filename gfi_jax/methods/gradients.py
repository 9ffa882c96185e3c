"""Gradient methods: Grad, Guided Backprop, SmoothGrad, Integrated Gradients.

All differentiate the target's logit (pre-softmax score), as Captum does for a model that
returns logits. `(B, H, W)` maps come from the `(B, H, W, 3)` input gradient by `reduce`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from gfi_jax.methods.common import Features, input_gradient, logits_fn, reduce_channels, resolve

Reduce = Literal["max_abs", "sum_abs", "sum"]


def weighted_gradients(features: Features, params: Any, point, weights: np.ndarray,
                       targets: jax.Array, chunk: int) -> jax.Array:
    """Σ_k w_k ∂ logit_t/∂x at x = point(k) `(B, H, W, 3)`, for k < len(weights).

    `chunk` points go through the network together as one batch of chunk·B images (a bigger
    batch is faster per image on every backend), chunks one after another (bounded memory).
    """
    n = len(weights)
    c = max(d for d in range(1, min(chunk, n) + 1) if n % d == 0)
    w = jnp.asarray(weights, jnp.float32).reshape(n // c, c)
    t = jnp.tile(targets, c)

    def body(i, acc):
        xs = jax.vmap(point)(i * c + jnp.arange(c))                   # (c, B, H, W, 3)
        g, _ = input_gradient(features, params, xs.reshape(-1, *xs.shape[2:]), t)
        return acc + jnp.tensordot(w[i], g.reshape(xs.shape), axes=1)
    zero = jnp.zeros(jax.eval_shape(point, 0).shape, jnp.float32)
    return jax.lax.fori_loop(0, n // c, body, zero)


@dataclasses.dataclass(frozen=True)
class GradConfig:
    reduce: Reduce = "max_abs"   # Simonyan et al. 2014: max over channels of |∂y/∂x|


def grad(features: Features, params: Any, images: jax.Array, targets: jax.Array,
         cfg: GradConfig) -> jax.Array:
    """Vanilla gradient (Simonyan et al. 2014): reduce(∂ logit_t / ∂x) `(B, H, W)`."""
    g, _ = input_gradient(features, params, images, targets)
    return reduce_channels(g, cfg.reduce)


@dataclasses.dataclass(frozen=True)
class GuidedBackpropConfig:
    reduce: Reduce = "max_abs"


def guided_backprop(features: Features, params: Any, images: jax.Array, targets: jax.Array,
                    cfg: GuidedBackpropConfig) -> jax.Array:
    """Guided Backprop (Springenberg et al. 2015): the gradient with every ReLU's backward
    passing only positive gradients where its input was positive."""
    g, _ = input_gradient(features, params, images, targets, guided=True)
    return reduce_channels(g, cfg.reduce)


@dataclasses.dataclass(frozen=True)
class SmoothGradConfig:
    samples: int = 50
    noise: float = 0.15          # σ as a fraction of each image's value range (max − min)
    seed: int = 0
    reduce: Reduce = "max_abs"
    chunk: int = 10              # noisy copies per forward pass (memory: chunk·B images)


def noise_samples(cfg: SmoothGradConfig, shape: tuple[int, ...]) -> jax.Array:
    """`(samples, H, W, 3)` standard normal draws, the same for every image of a batch (so an
    image's map does not depend on its batch)."""
    return jax.random.normal(jax.random.PRNGKey(cfg.seed), (cfg.samples, *shape), jnp.float32)


def smoothgrad(features: Features, params: Any, images: jax.Array, targets: jax.Array,
               cfg: SmoothGradConfig) -> jax.Array:
    """SmoothGrad (Smilkov et al. 2017): reduce(mean_i ∂ logit_t/∂x at x + σ εᵢ).

    The target is resolved on the clean image.
    """
    t = resolve(logits_fn(features, params)(images), targets)
    sigma = cfg.noise * (images.max(axis=(1, 2, 3)) - images.min(axis=(1, 2, 3)))
    eps = noise_samples(cfg, images.shape[1:])
    point = lambda i: images + sigma[:, None, None, None] * eps[i]  # noqa: E731
    total = weighted_gradients(features, params, point, np.full(cfg.samples, 1.0 / cfg.samples),
                               t, cfg.chunk)
    return reduce_channels(total, cfg.reduce)


@dataclasses.dataclass(frozen=True)
class IntegratedGradientsConfig:
    steps: int = 50
    rule: Literal["gausslegendre", "riemann_left", "riemann_right", "riemann_middle",
                  "riemann_trapezoid"] = "gausslegendre"   # Captum's default `method`
    baseline: float = 0.0        # a constant image in preprocessed space (0: the mean colour)
    reduce: Reduce = "sum"
    chunk: int = 10              # interpolation points per forward pass (chunk·B images)


def quadrature(rule: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(α_k, w_k) with Σ_k w_k f(α_k) ≈ ∫₀¹ f(α) dα."""
    if rule == "gausslegendre":
        x, w = np.polynomial.legendre.leggauss(n)
        return (x + 1) / 2, w / 2
    if rule == "riemann_trapezoid":
        # Weights 1/(n−1), ends halved: they sum to 1. (Captum 0.9 uses 1/n here, a
        # (n−1)/n-scaled integral; its left/right/middle rules agree with ours.)
        if n < 2:
            raise ValueError("riemann_trapezoid needs steps >= 2")
        w = np.full(n, 1.0 / (n - 1))
        w[[0, -1]] /= 2
        return np.linspace(0, 1, n), w
    offset = {"riemann_left": 0.0, "riemann_right": 1.0, "riemann_middle": 0.5}.get(rule)
    if offset is None:
        raise ValueError(f"integration rule {rule!r} not understood; use gausslegendre, "
                         "riemann_left, riemann_right, riemann_middle or riemann_trapezoid")
    return (np.arange(n) + offset) / n, np.full(n, 1.0 / n)


def integrated_gradients(features: Features, params: Any, images: jax.Array, targets: jax.Array,
                         cfg: IntegratedGradientsConfig) -> jax.Array:
    """Integrated Gradients (Sundararajan et al. 2017):
    reduce((x − x̄) ⊙ Σ_k w_k ∂ logit_t/∂x at x̄ + α_k (x − x̄)), target resolved on x."""
    t = resolve(logits_fn(features, params)(images), targets)
    alphas, weights = quadrature(cfg.rule, cfg.steps)
    alphas = jnp.asarray(alphas, jnp.float32)
    base = jnp.full_like(images, cfg.baseline)
    point = lambda k: base + alphas[k] * (images - base)  # noqa: E731
    total = weighted_gradients(features, params, point, weights, t, cfg.chunk)
    return reduce_channels((images - base) * total, cfg.reduce)
