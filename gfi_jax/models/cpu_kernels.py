"""XLA:CPU kernels for the model layers, and `Kernels`, the record of which ones a model uses.

XLA:CPU runs a few of the ports' layers far slower than their FLOPs warrant: autodiff's input
gradient of a conv inside a loop body, grouped (depthwise) convolutions, the select-and-scatter
gradient of max pooling. Each kernel here computes the same values as the XLA op it replaces,
with a hand-written backward (`jax.custom_vjp`) that XLA:CPU compiles well. The measurements
behind each choice: experiments/results/bench_layers_cpu.md ("Why the CPU kernels").

A model is built with one `Kernels` (`LoadedModel(..., kernels=)`; on CPU by default `CPU`,
elsewhere `XLA`). The record is static: it is part of the model's graphdef, hence of every
program traced from the model, so a model with other kernels compiles programs of its own.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax


@dataclasses.dataclass(frozen=True)
class Kernels:
    """Which layers run this module's kernels instead of XLA's own ops."""
    conv: bool = False        # dense NHWC convs: `dense_conv`
    depthwise: bool = False   # depthwise convs (groups = channels): `depthwise_conv`
    max_pool: bool = False    # max pools: `max_pool`'s masked backward


XLA = Kernels()
CPU = Kernels(conv=True, depthwise=True, max_pool=True)


def for_backend(backend: str) -> Kernels:
    """The default for a backend: every kernel on CPU, none elsewhere (on GPU XLA's ops are
    fast; the masked max-pool backward there: `bench_gfi.py --masked-pool`)."""
    return CPU if backend == "cpu" else XLA


# ----------------------------------------------------------------------------- products
def matmul_per_row(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """`x @ kernel` for `(B, in)` rows, each row's result independent of the other rows.

    XLA:CPU picks a different GEMM/GEMV kernel per batch size, so `x @ W` for an image alone
    and inside a batch differ in the last bits, and GFI's optimization amplifies such noise.
    The same product written as a 1×1 convolution is computed per image. Used on every
    backend (`layers.Dense`).
    """
    return lax.conv_general_dilated(x[:, None, None, :], kernel[None, None], (1, 1), "VALID",
                                    dimension_numbers=_NHWC)[:, 0, 0]


# ----------------------------------------------------------------------------- convolutions
_NHWC = ("NHWC", "HWIO", "NHWC")


def _as_lax(covers):
    """Makes `kernel(lhs, rhs, strides, pads, precision)` a drop-in `lax.conv_general_dilated`
    (what `nnx.Conv` calls), which takes XLA's own conv for whatever `covers(lhs, rhs, groups)`
    rejects and for dilated, non-NHWC or sharded convs."""
    def wrap(kernel):
        @functools.wraps(kernel)
        def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                                 rhs_dilation=None, dimension_numbers=None,
                                 feature_group_count=1, precision=None, out_sharding=None,
                                 **kwargs):
            if (kwargs or out_sharding is not None or not covers(lhs, rhs, feature_group_count)
                    or any(d != 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
                    or lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
                    != lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)):
                return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                                rhs_dilation, dimension_numbers,
                                                feature_group_count, precision=precision,
                                                out_sharding=out_sharding, **kwargs)
            s = tuple(window_strides)
            if isinstance(padding, str):
                padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], s, padding)
            pads = tuple((int(lo), int(hi)) for lo, hi in padding)
            return kernel(lhs, rhs, s, pads, precision)
        return conv_general_dilated
    return wrap


@_as_lax(covers=lambda lhs, rhs, groups: groups == 1)
def dense_conv(x, w, s, pads, precision):
    """A dense NHWC conv with a hand-written input gradient.

    Inside a loop body (GFI's `lax.scan` over Adam steps) XLA:CPU leaves the transposed kernel
    of autodiff's input-gradient conv as a dimension relabeling, and that conv runs outside the
    fast convolution library, several times slower than the same gradient outside a loop. Here
    the flipped, transposed kernel is materialized (an `optimization_barrier` keeps XLA from
    folding it back), so the input gradient is an ordinary HWIO conv; bit for bit autodiff's
    numbers. A conv whose input is smaller than its kernel is padded first (`_conv_plain`).
    """
    return _conv(x, w, s, pads, precision)


@_as_lax(covers=lambda lhs, rhs, groups: groups == lhs.shape[-1] == rhs.shape[-1])
def depthwise_conv(x, w, s, pads, precision):
    """A depthwise NHWC conv (groups = channels) as k² shifted multiply-adds with a
    hand-written backward: XLA:CPU lowers grouped convolutions to a slow generic loop. The
    values agree with the grouped convolution to round-off (another summation order)."""
    xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    out_hw = tuple((xp.shape[d + 1] - w.shape[d]) // s[d] + 1 for d in (0, 1))
    return _depthwise(xp, w, s, out_hw)


def _conv_plain(x, w, s, pads, precision, lhs_dilation=(1, 1)):
    """An NHWC conv; one whose (dilated) input is smaller than its kernel is padded first.

    XLA:CPU runs a conv smaller than its kernel (ResNet's 2×2 layer4 maps at 64² inputs,
    their input gradients) in a generic loop; padded explicitly (kept apart by a barrier,
    else XLA folds the pad back into the conv) it is a valid conv in the library. Larger
    inputs keep the conv's own padding, which is faster there."""
    if all(x.shape[1 + d] + (x.shape[1 + d] - 1) * (lhs_dilation[d] - 1) >= w.shape[d]
           for d in (0, 1)):
        return lax.conv_general_dilated(x, w, s, pads, lhs_dilation=lhs_dilation,
                                        dimension_numbers=_NHWC, precision=precision)
    cfg = ((0, 0, 0), (*pads[0], lhs_dilation[0] - 1), (*pads[1], lhs_dilation[1] - 1), (0, 0, 0))
    xp = lax.optimization_barrier(lax.pad(x, jnp.zeros((), x.dtype), cfg))
    return lax.conv_general_dilated(xp, w, s, ((0, 0), (0, 0)), dimension_numbers=_NHWC,
                                    precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x, w, s, pads, precision):
    return _conv_plain(x, w, s, pads, precision)


def _conv_fwd(x, w, s, pads, precision):
    return _conv_plain(x, w, s, pads, precision), (x, w)


def _conv_bwd(s, pads, precision, res, g):
    # dx: the cotangent, dilated by the stride and padded, correlated with the flipped kernel
    # (in, out swapped). `r` covers input rows the forward's last window did not reach.
    x, w = res
    wt = lax.optimization_barrier(jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2))
    tpads = []
    for d, k, (lo, hi), sd in ((1, w.shape[0], pads[0], s[0]), (2, w.shape[1], pads[1], s[1])):
        r = x.shape[d] + lo + hi - k - (g.shape[d] - 1) * sd
        tpads.append((k - 1 - lo, k - 1 - hi + r))
    dx = _conv_plain(g, wt, (1, 1), tpads, precision, lhs_dilation=s)
    dw = jax.vjp(lambda w: _conv_plain(x, w, s, pads, precision), w)[1](g)[0]  # XLA drops it
    return dx.astype(x.dtype), dw                                            # when unused


_conv.defvjp(_conv_fwd, _conv_bwd)


def _taps(xp: jax.Array, kernel: jax.Array, s: tuple[int, int], out_hw: tuple[int, int]):
    """Σ_ij xp[s·o + (i, j)] · kernel[i, j]: a depthwise correlation of a padded input."""
    (kh, kw), (oh, ow) = kernel.shape[:2], out_hw
    y = None
    for i in range(kh):
        for j in range(kw):
            tap = xp[:, i:i + s[0] * (oh - 1) + 1:s[0], j:j + s[1] * (ow - 1) + 1:s[1], :]
            y = tap * kernel[i, j, 0] if y is None else y + tap * kernel[i, j, 0]
    return y


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise(xp, kernel, s, out_hw):
    return _taps(xp, kernel, s, out_hw)


def _depthwise_fwd(xp, kernel, s, out_hw):
    return _taps(xp, kernel, s, out_hw), (xp, kernel)


def _depthwise_bwd(s, out_hw, res, g):
    # Why by hand: autodiff of the taps gives k² padded copies of g, and XLA fuses the
    # producer of g (e.g. ReLU6's mask, which recomputes the k² forward taps) into each of
    # them: k⁴ work. Here g is materialized once (the barrier) and the input gradient is one
    # correlation of the dilated, padded g with the flipped kernel (a transposed conv).
    xp, kernel = res
    g = jax.lax.optimization_barrier(g)
    (kh, kw), (Hp, Wp), (oh, ow) = kernel.shape[:2], xp.shape[1:3], out_hw
    Lh, Lw = s[0] * (oh - 1) + 1, s[1] * (ow - 1) + 1
    gd = jax.lax.pad(g, jnp.zeros((), g.dtype), ((0, 0, 0), (kh - 1, Hp - Lh, s[0] - 1),
                                                  (kw - 1, Wp - Lw, s[1] - 1), (0, 0, 0)))
    dxp = _taps(gd, kernel[::-1, ::-1], (1, 1), (Hp, Wp))
    dk = jnp.stack([jnp.stack([
        jnp.einsum("nhwc,nhwc->c", xp[:, i:i + Lh:s[0], j:j + Lw:s[1], :], g)
        for j in range(kw)]) for i in range(kh)])[:, :, None, :]
    return dxp, dk.astype(kernel.dtype)


_depthwise.defvjp(_depthwise_fwd, _depthwise_bwd)


# ----------------------------------------------------------------------------- max pooling
def plain_max_pool(x: jax.Array, k: int, s: int, pad: int = 0) -> jax.Array:
    """XLA's max pool (`reduce_window`; autodiff's backward is select-and-scatter)."""
    return nnx.max_pool(x, (k, k), (s, s), padding=((pad, pad), (pad, pad)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool(x: jax.Array, k: int, s: int, pad: int = 0) -> jax.Array:
    """`plain_max_pool` with a masked backward: XLA:CPU's select-and-scatter is far slower than
    the forward; k² masked, strided copies of the cotangent do the same job."""
    return plain_max_pool(x, k, s, pad)


def _max_pool_fwd(x, k, s, pad):
    y = plain_max_pool(x, k, s, pad)
    return y, (x, y)


def _max_pool_bwd(k, s, pad, res, g):
    # Each output's cotangent goes to the first input of its window (row-major) that equals
    # the max: select-and-scatter's rule with its `>=` select, so ties resolve the same way.
    x, y = res
    xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=-jnp.inf)
    (Hp, Wp), (oh, ow) = xp.shape[1:3], y.shape[1:3]
    Lh, Lw = s * (oh - 1) + 1, s * (ow - 1) + 1
    taken = jnp.zeros(y.shape, bool)
    dxp = jnp.zeros(xp.shape, g.dtype)
    zero = jnp.zeros((), g.dtype)
    for i in range(k):
        for j in range(k):
            hit = (xp[:, i:i + Lh:s, j:j + Lw:s, :] == y) & ~taken
            taken = taken | hit
            dxp = dxp + lax.pad(jnp.where(hit, g, zero), zero,
                                ((0, 0, 0), (i, Hp - i - Lh, s - 1), (j, Wp - j - Lw, s - 1),
                                 (0, 0, 0)))
    return (dxp[:, pad:Hp - pad, pad:Wp - pad, :],)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)
