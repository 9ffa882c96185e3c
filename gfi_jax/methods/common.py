"""Shared pieces of the attribution methods: class scores, targets, input and layer gradients.

Every method is a pure function `(features, params, images, targets, cfg) -> (B, H, W)` over
`features(params, x, layers) -> {layer: activation}` (a `LoadedModel`'s `features`), with
`targets` `(B,)` int32: a class index, or −k for "the class ranked k-th on the clean image".
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from gfi_jax.gfi import resolve_targets
from gfi_jax.models.layers import rectifiers

Features = Callable[[Any, jax.Array, Sequence[str]], dict]


def logits_fn(features: Features, params: Any, guided: bool = False) -> Callable:
    """images `(B, H, W, 3)` -> logits `(B, classes)`; `guided` uses Guided Backprop's ReLUs."""
    def f(x):
        with rectifiers(guided=guided):
            return features(params, x, ("logits",))["logits"].astype(jnp.float32)
    return f


def resolve(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """`(B,)` class indices from `(B,)` targets (−k: the k-th ranked class of `logits`)."""
    return resolve_targets(logits, targets[:, None])[:, 0]


def input_gradient(features: Features, params: Any, images: jax.Array, targets: jax.Array,
                   guided: bool = False) -> tuple[jax.Array, jax.Array]:
    """(∂ logit_t / ∂ images `(B, H, W, 3)`, resolved targets `(B,)`), one forward + backward.

    Logits of different images do not interact, so one backward of the one-hot cotangent
    gives every image's own gradient.
    """
    logits, vjp = jax.vjp(logits_fn(features, params, guided), images)
    t = resolve(logits, targets)
    (g,) = vjp(jax.nn.one_hot(t, logits.shape[1], dtype=logits.dtype))
    return g, t


def layer_gradient(features: Features, params: Any, images: jax.Array, targets: jax.Array,
                   layer: str) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(A, ∂ logit_t / ∂A, targets) for the rectified layer `layer`, A `(B, h, w, C)`.

    The port's `stages` give activations but no way to feed one back, so the gradient at an
    inner layer is taken through the rectifier tap: a first (abstract, dead-code) pass finds
    which ReLU call produces `layer`, the second adds a zero perturbation δ at that call and
    differentiates the logits with respect to δ.
    """
    seen = []
    with rectifiers(tap=lambda y: seen.append(y) or y):
        act = features(params, images, (layer,))[layer]
    k = next((i for i, y in enumerate(seen) if y is act), None)
    if k is None:
        raise ValueError(f"layer {layer!r} is not the output of a ReLU; choose a rectified "
                         "conv layer (e.g. a conv or block output, not a pooling layer)")

    def f(delta):
        calls, kept = [0], []

        def tap(y):
            calls[0] += 1
            if calls[0] - 1 == k:
                kept.append(y)
                return y + delta.astype(y.dtype)
            return y
        with rectifiers(tap=tap):
            logits = features(params, images, ("logits",))["logits"].astype(jnp.float32)
        return logits, kept[0]

    logits, vjp, a = jax.vjp(f, jnp.zeros(act.shape, jnp.float32), has_aux=True)
    t = resolve(logits, targets)
    (g,) = vjp(jax.nn.one_hot(t, logits.shape[1], dtype=logits.dtype))
    return a, g, t


def reduce_channels(g: jax.Array, how: str) -> jax.Array:
    """`(B, H, W, 3)` -> `(B, H, W)`: "max_abs" (Simonyan et al.), "sum_abs" or "sum"."""
    if how == "max_abs":
        return jnp.abs(g).max(-1)
    if how == "sum_abs":
        return jnp.abs(g).sum(-1)
    if how == "sum":
        return g.sum(-1)
    raise ValueError(f"reduce {how!r} not understood; use 'max_abs', 'sum_abs' or 'sum'")
