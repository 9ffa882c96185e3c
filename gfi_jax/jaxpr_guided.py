"""Guided Backprop for any JAX function: its traced program re-run with every rectifier's
backward replaced by Springenberg et al.'s guided rule.

A model may rectify with `jax.nn.relu`, `flax.linen.relu`, `jnp.maximum(x, 0)`, `jax.nn.relu6`
or `jnp.clip(x, 0, …)`; in a jaxpr all of them are a `max` equation with one operand known
to be zero (a literal 0, an all-zero constant, or a broadcast / cast / reshape of one), often
inside `jit`, `custom_jvp_call` or `custom_vjp_call` sub-programs. `guided(fn)` traces `fn`,
walks its jaxpr and evaluates every equation as traced, except that each such `max` gets the
backward g · (x > 0) · (g > 0). A sub-program holding no rectifier is bound unchanged, so its
own custom derivative rules (e.g. `cpu_kernels`' convolution backward) still apply.
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jcore

# Primitives whose output is zero when their (first) operand is: the ways a 0 reaches a `max`.
_KEEPS_ZERO = {"broadcast_in_dim", "convert_element_type", "reshape", "squeeze",
               "expand_dims", "copy", "copy_p", "transpose"}
# Call-like primitives: one sub-program whose inputs are the equation's inputs, in order.
_CALLS = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
          "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr",
          "custom_vjp_call_jaxpr": "fun_jaxpr", "remat2": "jaxpr", "checkpoint": "jaxpr"}

NO_RECTIFIER = ("guided_backprop found no rectifier, max(x, 0), in the model (looked for "
                "jax.nn.relu, flax.linen.relu, jnp.maximum(x, 0), relu6 and clip(x, 0, …)); "
                "Guided Backprop only differs from the gradient on a ReLU network: use "
                "method='grad' for this model")


def guided(fn: Callable, require: bool = True) -> Callable:
    """`fn` (arrays and pytrees of arrays in and out) computing the same values, whose
    derivatives take the guided rule at every rectifier. `require`: ValueError (NO_RECTIFIER)
    when `fn` has none, rather than silently returning the plain gradient."""
    @functools.wraps(fn)
    def run(*args):
        closed, shapes = jax.make_jaxpr(fn, return_shape=True)(*args)
        if require and not contains_rectifier(closed.jaxpr, closed.consts):
            raise ValueError(NO_RECTIFIER)
        out = evaluate(closed.jaxpr, closed.consts, jax.tree.leaves(args))
        return jax.tree.unflatten(jax.tree.structure(shapes), out)
    return run


# ----------------------------------------------------------------------------- analysis
def _all_zero(value) -> bool:
    """Whether a constant is concretely all zeros (never true of a tracer: value unknown)."""
    if isinstance(value, jax.core.Tracer):
        return False
    a = np.asarray(value)
    return a.size > 0 and np.issubdtype(a.dtype, np.number) and not a.any()


def _is_zero(atom, zeros: set) -> bool:
    if isinstance(atom, jcore.Literal):
        return _all_zero(atom.val)
    return atom in zeros


def zero_vars(jaxpr: jcore.Jaxpr, consts: Sequence, zero_in: Sequence[bool]) -> set:
    """The variables of `jaxpr` known to be all zeros, given which inputs are."""
    zeros = {v for v, c in zip(jaxpr.constvars, consts) if _all_zero(c)}
    zeros |= {v for v, z in zip(jaxpr.invars, zero_in) if z}
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in _KEEPS_ZERO and _is_zero(eqn.invars[0], zeros):
            zeros.add(eqn.outvars[0])
    return zeros


def rectified_operand(eqn, zeros: set) -> int | None:
    """For a rectifier `max(x, 0)` / `max(0, x)` on floats, the index of x; else None."""
    if eqn.primitive.name != "max" or not jnp.issubdtype(eqn.outvars[0].aval.dtype, jnp.inexact):
        return None
    a, b = (_is_zero(v, zeros) for v in eqn.invars)
    if a != b:
        return 1 if a else 0
    return None


def sub_programs(eqn, zeros: set) -> list[tuple[jcore.Jaxpr, Sequence, list[bool]]]:
    """(jaxpr, consts, which inputs are zero) of each sub-program of `eqn`. Loop-carried
    inputs are never taken as zero: their first value being 0 says nothing of later ones."""
    name, p = eqn.primitive.name, eqn.params
    z = [_is_zero(v, zeros) for v in eqn.invars]
    if name in _CALLS and _CALLS[name] in p:
        return [(*_open(p[_CALLS[name]]), z)]
    if name == "scan":
        n_c, carry = p["num_consts"], [False] * p["num_carry"]
        return [(*_open(p["jaxpr"]), z[:n_c] + carry + z[n_c + len(carry):])]
    if name == "cond":
        return [(*_open(br), z[1:]) for br in p["branches"]]
    if name == "while":
        nc, nb = p["cond_nconsts"], p["body_nconsts"]
        carry = [False] * (len(z) - nc - nb)
        return [(*_open(p["cond_jaxpr"]), z[:nc] + carry),
                (*_open(p["body_jaxpr"]), z[nc:nc + nb] + carry)]
    # Any other higher-order primitive: its programs, with no knowledge of their inputs.
    return [(*_open(j), [False] * len(_open(j)[0].invars)) for j in jcore.jaxprs_in_params(p)]


def _open(j) -> tuple[jcore.Jaxpr, Sequence]:
    return (j.jaxpr, j.consts) if isinstance(j, jcore.ClosedJaxpr) else (j, ())


def contains_rectifier(jaxpr: jcore.Jaxpr, consts: Sequence = (),
                       zero_in: Sequence[bool] = ()) -> bool:
    """Whether `jaxpr` or any program nested in it has a rectifier."""
    zeros = zero_vars(jaxpr, consts, zero_in)
    return any(rectified_operand(e, zeros) is not None
               or any(contains_rectifier(*s) for s in sub_programs(e, zeros))
               for e in jaxpr.eqns)


# ----------------------------------------------------------------------------- evaluation
@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _guided_max(a, b, side: int):
    """max(a, b) where operand `side` is the rectified x and the other is zero."""
    return lax.max_p.bind(a, b)


def _guided_max_fwd(a, b, side):
    return lax.max_p.bind(a, b), (a, b)


def _guided_max_bwd(side, res, g):
    # Guided Backprop (Springenberg et al. 2015): pass the gradient only where the input was
    # positive *and* the incoming gradient is positive. The zero operand gets none.
    x = res[side]
    gx = jnp.where((x > 0) & (g > 0), g, jnp.zeros_like(g))
    other = jnp.zeros_like(res[1 - side])
    return (gx, other) if side == 0 else (other, gx)


_guided_max.defvjp(_guided_max_fwd, _guided_max_bwd)


def evaluate(jaxpr: jcore.Jaxpr, consts: Sequence, args: Sequence,
             zero_in: Sequence[bool] = ()) -> list:
    """`jaxpr`'s outputs on `args`, each rectifier with the guided backward (see the module)."""
    env: dict = {}
    read = lambda v: v.val if isinstance(v, jcore.Literal) else env[v]  # noqa: E731
    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    zeros = zero_vars(jaxpr, consts, zero_in)
    for eqn in jaxpr.eqns:
        vals = [read(v) for v in eqn.invars]
        side = rectified_operand(eqn, zeros)
        subs = sub_programs(eqn, zeros)
        if side is not None:
            out = [_guided_max(*vals, side)]
        elif any(contains_rectifier(*s) for s in subs):
            out = _rewrite(eqn, vals, subs)
        else:
            out = eqn.primitive.bind(*vals, **eqn.primitive.get_bind_params(eqn.params))
            out = out if eqn.primitive.multiple_results else [out]
        env.update(zip(eqn.outvars, out))
    return [read(v) for v in jaxpr.outvars]


def _rewrite(eqn, vals: list, subs: list) -> list:
    """A higher-order equation with rectifiers inside, re-run with its programs evaluated by
    `evaluate`. A call is inlined: a custom derivative rule around a rectifier gives way to
    the guided rule (that is what Guided Backprop asks of the rectifier)."""
    name, p = eqn.primitive.name, eqn.params
    run = lambda s, *xs: evaluate(s[0], s[1], xs, s[2])  # noqa: E731
    if name in _CALLS:
        return run(subs[0], *vals)
    if name == "scan":
        n_c, n_carry = p["num_consts"], p["num_carry"]
        consts, init, xs = vals[:n_c], vals[n_c:n_c + n_carry], vals[n_c + n_carry:]

        def body(carry, x):
            out = run(subs[0], *consts, *carry, *x)
            return out[:n_carry], out[n_carry:]
        carry, ys = lax.scan(body, init, xs, length=p["length"], reverse=p["reverse"],
                             unroll=p["unroll"])
        return [*carry, *ys]
    if name == "cond":
        branches = [functools.partial(run, s) for s in subs]
        return lax.switch(vals[0], branches, *vals[1:])
    if name == "while":
        nc, nb = p["cond_nconsts"], p["body_nconsts"]
        cc, bc, init = vals[:nc], vals[nc:nc + nb], vals[nc + nb:]
        return lax.while_loop(lambda c: run(subs[0], *cc, *c)[0],
                              lambda c: run(subs[1], *bc, *c), init)
    raise ValueError(f"guided_backprop cannot rewrite the rectifiers inside a {name!r} "
                     "equation; move the ReLUs out of it, or use method='grad'")
