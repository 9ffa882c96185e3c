"""Building blocks shared by the model ports: PyTorch-exact pooling and the layer taps.

All arrays are NHWC: `(B, H, W, C)`.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax


def collect(stages: Iterator[tuple[str, jax.Array]], layers: Iterable[str]) -> dict[str, jax.Array]:
    """Runs a model's `stages` generator until every requested layer has been seen.

    Models yield `(name, activation)` after each named layer. Stopping the generator at the
    deepest requested layer means later layers are never traced at all (stage 1 of GFI runs
    the network only up to l0); under `jax.jit` unrequested intermediates are dead code.
    """
    wanted = set(layers)
    out: dict[str, jax.Array] = {}
    if not wanted:
        return out
    for name, x in stages:
        if name in wanted:
            out[name] = x
            if len(out) == len(wanted):
                break
    return out


@functools.lru_cache(maxsize=None)
def _pool_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) averaging matrix with PyTorch's adaptive bins.

    PyTorch bin i covers [floor(i*n_in/n_out), ceil((i+1)*n_in/n_out)); bins may overlap
    when n_in is not a multiple of n_out, and repeat inputs when n_in < n_out.
    """
    p = np.zeros((n_out, n_in))
    for i in range(n_out):
        lo = (i * n_in) // n_out
        hi = -((-(i + 1) * n_in) // n_out)
        p[i, lo:hi] = 1.0 / (hi - lo)
    return p


def adaptive_avg_pool(x: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
    """`torch.nn.AdaptiveAvgPool2d(out_hw)` on `(B, H, W, C)`, for any H, W.

    Written as two small matmuls with static averaging matrices: exact bins for every
    input size, and no gather. When the input already has the output size it is returned
    as is (PyTorch's identity case, bit for bit).
    """
    _, h, w, _ = x.shape
    oh, ow = out_hw
    if (h, w) == (oh, ow):
        return x
    if (oh, ow) == (1, 1):
        return jnp.mean(x, axis=(1, 2), keepdims=True)
    ph = jnp.asarray(_pool_matrix(h, oh), x.dtype)
    pw = jnp.asarray(_pool_matrix(w, ow), x.dtype)
    return jnp.einsum("ih,bhwc,jw->bijc", ph, x, pw, precision=jax.lax.Precision.HIGHEST)


def max_pool(x: jax.Array, k: int, s: int, pad: int = 0) -> jax.Array:
    """`torch.nn.MaxPool2d(k, s, pad)` (floor mode): padding never wins the max.

    On CPU (the backends in `MASKED_POOL_BACKENDS`) with a hand-written backward: XLA:CPU's
    select-and-scatter (autodiff's rule) is 60× slower than the forward (224×224×64, 2×2:
    0.67 ms forward, 41 ms gradient on this project's 2-core CPU); k² masked, strided copies
    of the cotangent do the same job.
    """
    if jax.default_backend() not in MASKED_POOL_BACKENDS:
        return _max_pool_plain(x, k, s, pad)
    return _max_pool(x, k, s, pad)


# Backends whose max pools take the masked backward (read at trace time). On GPU, XLA's
# select-and-scatter costs 8-10% of a GFI call (H200 traces, experiments/results/
# bench_gfi_gpu.md); `bench_gfi.py --masked-pool` adds the backend to measure the rule there.
MASKED_POOL_BACKENDS = {"cpu"}


def _max_pool_plain(x, k, s, pad):
    return nnx.max_pool(x, (k, k), (s, s), padding=((pad, pad), (pad, pad)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x, k, s, pad):
    return _max_pool_plain(x, k, s, pad)


def _max_pool_fwd(x, k, s, pad):
    y = _max_pool_plain(x, k, s, pad)
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


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def conv(cin: int, cout: int, k: int, *, stride: int = 1, pad: int | str = 0, groups: int = 1,
         bias: bool = True, dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.Conv:
    """A conv with PyTorch's symmetric integer padding (or 'SAME', TensorFlow's rule)."""
    padding = pad if isinstance(pad, str) else ((pad, pad), (pad, pad))
    return nnx.Conv(cin, cout, (k, k), strides=(stride, stride), padding=padding,
                    feature_group_count=groups, use_bias=bias, dtype=dtype,
                    param_dtype=jnp.float32, rngs=rngs, conv_general_dilated=conv_general_dilated)


_NHWC = ("NHWC", "HWIO", "NHWC")


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None,
                         out_sharding=None, **kwargs):
    """`lax.conv_general_dilated`, with CPU-only rules for the two kinds of conv the ports use
    (`conv` passes it to every `nnx.Conv`). Same parameters, same maths.

    Dense NHWC convs get a hand-written input gradient. Inside a loop body (GFI's `lax.scan`
    over Adam steps) XLA:CPU leaves the transposed kernel of autodiff's input-gradient conv as
    a dimension relabeling, and that conv runs outside the fast convolution library, 3× slower
    than the same gradient outside a loop (this project's 2-core CPU, jax 0.10.2: a 56×56×256
    3×3 layer through ReLU, input gradient, 43 ms alone, 143 ms per step in a scan, 42 ms with
    this rule). Here the flipped, transposed kernel is materialized (an `optimization_barrier`
    keeps XLA from folding it back), so the input gradient is an ordinary HWIO conv; bit for
    bit autodiff's numbers. A conv whose input is smaller than its kernel is padded first,
    and within `matrix_product_convs` one with few output pixels is a matrix product (see
    `_conv_plain`).

    Depthwise convs (groups = channels) run as k² shifted multiply-adds with a hand-written
    backward: XLA:CPU lowers grouped convolutions to a slow generic loop (a 112×112×96 3×3
    stride-2 layer through ReLU6, input gradient, 72 ms → 2.2 ms; GFI on Lite0 at 224²,
    reference preset, 8 images, 24.3 → 7.7 s per image). `grouped_depthwise()` turns this off.

    Accelerators, dilated and other grouped convs take `lax` unchanged.
    """
    def plain():
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                        rhs_dilation, dimension_numbers, feature_group_count,
                                        precision=precision, out_sharding=out_sharding,
                                        **kwargs)

    if (jax.default_backend() != "cpu" or kwargs or out_sharding is not None
            or any(d != 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
            or lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
            != lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)):
        return plain()
    s = tuple(window_strides)
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], s, padding)
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    if feature_group_count == 1:
        return _conv(lhs, rhs, s, pads, precision)
    if feature_group_count == lhs.shape[-1] == rhs.shape[-1] and _shifted_depthwise:
        xp = jnp.pad(lhs, ((0, 0), pads[0], pads[1], (0, 0)))
        out_hw = tuple((xp.shape[d + 1] - rhs.shape[d]) // s[d] + 1 for d in (0, 1))
        return _depthwise(xp, rhs, s, out_hw)
    return plain()


def _conv_plain(x, w, s, pads, precision, lhs_dilation=(1, 1)):
    """An NHWC conv; one with few output pixels runs as a matrix product (`_im2col`), one whose
    (dilated) input is smaller than its kernel is padded first.

    Few output pixels (within `matrix_product_convs`): XLA:CPU's convolution library is slow
    on small maps at small batches (ResNet-18's 7×7 layer4 at batch 1: a 3×3 512 → 512 conv,
    forward + input gradient, 11.8 ms, 39 GFLOP/s; as one matrix product 3.4 ms, 136
    GFLOP/s; at 14×14 the library is as fast: experiments/results/bench_layers_cpu.md).

    Smaller than its kernel: XLA:CPU runs such a conv (ResNet's 2×2 layer4 maps at 64² inputs,
    their input gradients) in a generic loop: a 2×2×512 → 512 3×3 conv, padding 1, batch 2,
    18 ms; padded explicitly (kept apart by a barrier, else XLA folds the pad back into the
    conv) it is a valid conv in the library, 0.9 ms. Larger inputs keep the conv's own
    padding, which is faster there (3×3 input: 0.9 against 2.2 ms)."""
    if lhs_dilation == (1, 1) and _few_pixels(x, w, s, pads):
        return _im2col(x, w, s, pads, precision)
    if all(x.shape[1 + d] + (x.shape[1 + d] - 1) * (lhs_dilation[d] - 1) >= w.shape[d]
           for d in (0, 1)):
        return lax.conv_general_dilated(x, w, s, pads, lhs_dilation=lhs_dilation,
                                        dimension_numbers=_NHWC, precision=precision)
    cfg = ((0, 0, 0), (*pads[0], lhs_dilation[0] - 1), (*pads[1], lhs_dilation[1] - 1), (0, 0, 0))
    xp = lax.optimization_barrier(lax.pad(x, jnp.zeros((), x.dtype), cfg))
    return lax.conv_general_dilated(xp, w, s, ((0, 0), (0, 0)), dimension_numbers=_NHWC,
                                    precision=precision)


_gemm_max_pixels = 0   # read at trace time; see `matrix_product_convs`
# Its default: 0, off. 64 made ResNet-18's gradient 27% faster at batch 1 on CPU
# (`bench_methods.py --matrix-products`), but the full test suite then crashed twice in XLA,
# reading such a program back from the persistent compilation cache (a segfault in
# `compilation_cache.get_executable_and_time`); off until that is understood.
SMALL_MAP_PIXELS = 0


@contextlib.contextmanager
def matrix_product_convs(max_pixels: int | None = None):
    """Within: CPU convs whose output has at most `max_pixels` (default `SMALL_MAP_PIXELS`)
    pixels per image run as one matrix product. With 64, ResNet's 7×7 layer4 at 224² (49) is
    a product and its 14×14 layer3 (196), where the library is as fast, stays. The
    attribution methods trace inside it (`methods.compiled`).

    Why not everywhere: the product's summation order depends on the batch size on XLA:CPU
    (last-bit differences between an image alone and in a batch), and GFI's optimization
    amplifies such differences; its batched and single runs agree bit for bit with the
    library (`tests/test_layers.py`).
    """
    global _gemm_max_pixels
    saved = _gemm_max_pixels
    _gemm_max_pixels = SMALL_MAP_PIXELS if max_pixels is None else max_pixels
    try:
        yield
    finally:
        _gemm_max_pixels = saved


def _few_pixels(x, w, s, pads) -> bool:
    out_hw = [(x.shape[1 + d] + sum(pads[d]) - w.shape[d]) // s[d] + 1 for d in (0, 1)]
    return out_hw[0] * out_hw[1] <= _gemm_max_pixels


def _im2col(x, w, s, pads, precision):
    """The conv as one product: the k² shifted, strided views of the padded input side by
    side, `(N, oh, ow, k²·C)`, times the kernel as a `(k²·C, O)` matrix."""
    kh, kw, c, n_out = w.shape
    xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    oh, ow = (xp.shape[1] - kh) // s[0] + 1, (xp.shape[2] - kw) // s[1] + 1
    cols = [xp[:, i:i + s[0] * (oh - 1) + 1:s[0], j:j + s[1] * (ow - 1) + 1:s[1], :]
            for i in range(kh) for j in range(kw)]
    cols = cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)
    return lax.dot_general(cols, w.reshape(kh * kw * c, n_out), (((3,), (0,)), ((), ())),
                           precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x, w, s, pads, precision):
    return _conv_plain(x, w, s, pads, precision)


def _conv_fwd(x, w, s, pads, precision):
    return _conv_plain(x, w, s, pads, precision), (x, w)


def _conv_bwd(s, pads, precision, res, g):
    # dx: the cotangent, dilated by the stride and padded, correlated with the flipped kernel
    # (in, out swapped). `r` covers input rows the forward's last window did not reach.
    # A conv that ran as a matrix product takes that product's own gradient: a product with
    # the same kernel matrix, no flipped copy of it.
    x, w = res
    if _few_pixels(x, w, s, pads):  # dx and dw apart, so that XLA can drop an unused dw
        dx = jax.vjp(lambda x: _im2col(x, w, s, pads, precision), x)[1](g)[0]
        dw = jax.vjp(lambda w: _im2col(x, w, s, pads, precision), w)[1](g)[0]
        return dx, dw
    wt = lax.optimization_barrier(jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2))
    tpads = []
    for d, k, (lo, hi), sd in ((1, w.shape[0], pads[0], s[0]), (2, w.shape[1], pads[1], s[1])):
        r = x.shape[d] + lo + hi - k - (g.shape[d] - 1) * sd
        tpads.append((k - 1 - lo, k - 1 - hi + r))
    dx = _conv_plain(g, wt, (1, 1), tpads, precision, lhs_dilation=s)
    dw = jax.vjp(lambda w: _conv_plain(x, w, s, pads, precision), w)[1](g)[0]  # XLA drops it
    return dx.astype(x.dtype), dw                                            # when unused


_conv.defvjp(_conv_fwd, _conv_bwd)


_shifted_depthwise = True      # read at trace time; see `grouped_depthwise`


@contextlib.contextmanager
def grouped_depthwise():
    """Within: depthwise convs trace as the grouped convolution on every backend, so that a
    jaxpr shows them as convolutions (how `gfi.flops` counts FLOPs)."""
    global _shifted_depthwise
    saved, _shifted_depthwise = _shifted_depthwise, False
    try:
        yield
    finally:
        _shifted_depthwise = saved


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


def batch_norm(c: int, *, eps: float = 1e-5, dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.BatchNorm:
    """Inference-mode BatchNorm (running statistics), with PyTorch's eps by default."""
    return nnx.BatchNorm(c, use_running_average=True, epsilon=eps, dtype=dtype,
                         param_dtype=jnp.float32, rngs=rngs)


class Dense(nnx.Linear):
    """`nnx.Linear` whose result for one row never depends on the other rows of the batch.

    XLA:CPU picks a different GEMM/GEMV kernel per batch size, so `x @ W` for an image alone
    and inside a batch differ in the last bits, and GFI's optimization amplifies such noise.
    The same product written as a 1×1 convolution is computed per image (checked in the
    tests: a batch equals its single runs bit for bit on CPU).
    """

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...].astype(self.dtype)
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype)[:, None, None, :], kernel[None, None], (1, 1), "VALID",
            dimension_numbers=("NHWC", "HWIO", "NHWC"))[:, 0, 0]
        return y + self.bias[...].astype(self.dtype)


def linear(cin: int, cout: int, *, dtype=jnp.float32, rngs: nnx.Rngs) -> Dense:
    return Dense(cin, cout, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


# ----------------------------------------------------------------------------- rectifiers
# The models call `relu` / `relu6` from here so that attribution methods can change them at
# trace time: `with rectifiers(guided=True)` swaps in Guided Backprop's backward rule, and
# `with rectifiers(tap=f)` passes every rectified output through `f` (how a method reads the
# gradient at an inner layer). The switch is read while tracing, so jit a function that
# enters the context inside itself; outside any context the models are unchanged.
_guided = False
_tap = None


@contextlib.contextmanager
def rectifiers(guided: bool = False, tap=None):
    """Within: `relu`/`relu6` use the guided backward rule and/or pass outputs through `tap`."""
    global _guided, _tap
    saved = _guided, _tap
    _guided, _tap = guided, tap
    try:
        yield
    finally:
        _guided, _tap = saved


def _clip_guided(x: jax.Array, hi: float | None) -> jax.Array:
    @jax.custom_vjp
    def f(x):
        return jnp.clip(x, 0, hi)

    def fwd(x):
        return f(x), x

    def bwd(x, g):
        # Guided Backprop (Springenberg et al. 2015): pass the gradient only where the input
        # was in the linear range *and* the incoming gradient is positive.
        inside = (x > 0) if hi is None else (x > 0) & (x < hi)
        return (jnp.where(inside & (g > 0), g, jnp.zeros_like(g)),)

    f.defvjp(fwd, bwd)
    return f(x)


def _rectify(x: jax.Array, hi: float | None) -> jax.Array:
    y = _clip_guided(x, hi) if _guided else (nnx.relu(x) if hi is None else jnp.clip(x, 0, hi))
    return y if _tap is None else _tap(y)


def relu(x: jax.Array) -> jax.Array:
    return _rectify(x, None)


def relu6(x: jax.Array) -> jax.Array:
    return _rectify(x, 6.0)
