"""A network cut at one of its layers: the layer's activation A and the rest of the network as
a function of A, from nothing but `features(params, x, layers)`.

`features` gives activations but takes none back, so the network is traced once to a jaxpr of
(A, logits) and cut where A is computed: the part after the cut is a function of A, which can
be differentiated with respect to it (Grad-CAM's ∂logit/∂A, GFI's gradient start of stage 2).
Every equation runs once, as in a plain forward pass.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

Features = Callable[[Any, jax.Array, Sequence[str]], dict]


def split_at_layer(features: Features, params: Any, images: jax.Array, layer: str
                   ) -> tuple[jax.Array, Callable[[jax.Array], jax.Array]]:
    """(A `(B, h, w, C)`, tail: A -> float32 logits), the network cut at layer A."""
    def f(p, x):
        out = features(p, x, (layer, "logits"))
        return out[layer], out["logits"].astype(jnp.float32)

    closed = jax.make_jaxpr(f)(params, images)
    var = closed.jaxpr.outvars[0]
    if not any(v is var for e in closed.jaxpr.eqns for v in e.outvars):
        raise ValueError(f"layer {layer!r} is an input of the network, not computed by it")
    if not feeds(closed.jaxpr, var, closed.jaxpr.outvars[1]):
        raise ValueError(f"layer {layer!r} does not feed the logits, so their gradient with "
                         "respect to it is zero; choose a layer the network goes on from (for "
                         "a token grid, continue from it with gfi_jax.models.grid_to_tokens)")
    head, tail = cut_at(closed, var)
    a, *rest = jcore.jaxpr_as_fun(head)(*jax.tree.leaves((params, images)))
    return a, lambda a: jcore.jaxpr_as_fun(tail)(a, *rest)[1]


def feeds(jaxpr: jcore.Jaxpr, var, out) -> bool:
    """Whether the value `out` is computed from `var` (or is it). Structural: a view that
    only branches off the forward pass (an output-only reshape) does not feed it."""
    reached = {var}
    for e in jaxpr.eqns:
        if any(isinstance(v, jcore.Var) and v in reached for v in e.invars):
            reached.update(e.outvars)
    return isinstance(out, jcore.Var) and out in reached


def cut_at(closed: jcore.ClosedJaxpr, var) -> tuple[jcore.ClosedJaxpr, jcore.ClosedJaxpr]:
    """`closed` as two programs, cut after the equation that computes `var`.

    head: `closed`'s inputs -> (var, *live); tail: (var, *live) -> `closed`'s outputs, where
    `live` are the other values defined up to the cut (inputs included) that the tail reads.
    """
    jaxpr = closed.jaxpr
    i = next(k for k, e in enumerate(jaxpr.eqns) if any(v is var for v in e.outvars))
    defined = {*jaxpr.constvars, *jaxpr.invars, *(v for e in jaxpr.eqns[:i + 1] for v in e.outvars)}
    reads = [*(v for e in jaxpr.eqns[i + 1:] for v in e.invars), *jaxpr.outvars]
    live = list(dict.fromkeys(v for v in reads if isinstance(v, jcore.Var) and v in defined
                              and v is not var))

    def info(part, n_in, n_out):
        return jcore.DebugInfo(f"cut_at ({part})", jaxpr.debug_info.func_src_info,
                               (None,) * n_in, (None,) * n_out)
    head = jcore.Jaxpr(jaxpr.constvars, jaxpr.invars, [var, *live], jaxpr.eqns[:i + 1],
                       jaxpr.effects, info("head", len(jaxpr.invars), 1 + len(live)))
    tail = jcore.Jaxpr((), [var, *live], jaxpr.outvars, jaxpr.eqns[i + 1:], jaxpr.effects,
                       info("tail", 1 + len(live), len(jaxpr.outvars)))
    return jcore.ClosedJaxpr(head, closed.consts), jcore.ClosedJaxpr(tail, ())


def class_gradient(features: Features, params: Any, images: jax.Array, layer: str,
                   c: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(A, ∂ logit_c / ∂A, logits) for classes c `(B,)`: one forward, one backward. Logits of
    different images do not interact, so the one-hot cotangent gives each image its own."""
    a, tail = split_at_layer(features, params, images, layer)
    logits, vjp = jax.vjp(tail, a)
    (g,) = vjp(jax.nn.one_hot(c, logits.shape[1], dtype=logits.dtype))
    return a, g.astype(jnp.float32), logits
