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
from gfi_jax.jaxpr_cut import split_at_layer
from gfi_jax.jaxpr_guided import guided as guided_program

Features = Callable[[Any, jax.Array, Sequence[str]], dict]


def logits_fn(features: Features, params: Any, guided: bool = False) -> Callable:
    """images `(B, H, W, 3)` -> logits `(B, classes)`; `guided`: with Guided Backprop's
    backward at every rectifier of the traced program (`jaxpr_guided`), whatever ReLU the
    model calls (ValueError if it has none)."""
    def f(p, x):
        return features(p, x, ("logits",))["logits"].astype(jnp.float32)
    # params go in as arguments of the rewritten program, so its constants never hold tracers.
    g = guided_program(f) if guided else f
    return lambda x: g(params, x)


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
    """(A, ∂ logit_t / ∂A, targets) for the layer `layer`, A `(B, h, w, C)`: the network cut
    at A (`jaxpr_cut.split_at_layer`), one forward and one backward."""
    a, tail = split_at_layer(features, params, images, layer)
    logits, vjp = jax.vjp(tail, a)
    t = resolve(logits, targets)
    (g,) = vjp(jax.nn.one_hot(t, logits.shape[1], dtype=logits.dtype))
    return a, g.astype(jnp.float32), t


def reduce_channels(g: jax.Array, how: str) -> jax.Array:
    """`(B, H, W, 3)` -> `(B, H, W)`: "max_abs" (Simonyan et al.), "sum_abs" or "sum"."""
    if how == "max_abs":
        return jnp.abs(g).max(-1)
    if how == "sum_abs":
        return jnp.abs(g).sum(-1)
    if how == "sum":
        return g.sum(-1)
    raise ValueError(f"reduce {how!r} not understood; use 'max_abs', 'sum_abs' or 'sum'")
