"""Building blocks shared by the model ports: PyTorch-exact pooling, convs, rectifiers.

All arrays are NHWC: `(B, H, W, C)`. The layers that have an XLA:CPU kernel (`cpu_kernels`)
take the model's `Kernels` when the model is built.
"""
from __future__ import annotations

import functools
from typing import Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from gfi_jax.models import cpu_kernels
from gfi_jax.models.cpu_kernels import XLA, Kernels


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


def tokens_to_grid(x: jax.Array, hw: tuple[int, int]) -> jax.Array:
    """A token sequence `(B, 1 + h·w, D)` (class token first, then the patches row by row)
    -> the patch tokens as a `(B, h, w, D)` grid, the class token dropped.

    GFI's mask basis and the CAM methods weigh the channels of a spatial map, so a
    transformer's features function returns its token layers through this (a zoo ViT does;
    a wrapped model calls it with its own grid shape). For Grad-CAM, or GFI's gradient start
    of stage 2, let the network go on from the grid (`grid_to_tokens`): a cut at a layer that
    does not feed the logits has no gradient."""
    b, n, d = x.shape
    h, w = hw
    if n != 1 + h * w:
        raise ValueError(f"tokens_to_grid: {n} tokens do not make a class token plus a {h}×{w} "
                         f"grid ({1 + h * w} tokens); pass the grid shape of the patches")
    return x[:, 1:].reshape(b, h, w, d)


def grid_to_tokens(cls: jax.Array, grid: jax.Array) -> jax.Array:
    """The class token `(B, 1, D)` and a `(B, h, w, D)` grid -> the sequence `(B, 1 + h·w, D)`
    (the inverse of `tokens_to_grid`, exact: only data moves)."""
    b, h, w, d = grid.shape
    return jnp.concatenate([cls, grid.reshape(b, h * w, d)], axis=1)


def positive_part(h: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(max(h, 0), min(h, 0)), whose sum is h exactly (x + 0 = x). Written with `where`, not
    `max`: Guided Backprop looks for max(x, 0) to find a network's ReLUs, and this view of a
    GELU network (ViT, ConvNeXt) is not one (the network itself never clips)."""
    on = h > 0
    return jnp.where(on, h, 0), jnp.where(on, 0, h)


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


def max_pool(x: jax.Array, k: int, s: int, pad: int = 0, *, kernels: Kernels = XLA) -> jax.Array:
    """`torch.nn.MaxPool2d(k, s, pad)` (floor mode): padding never wins the max. With
    `kernels.max_pool`, the masked backward of `cpu_kernels.max_pool`."""
    if kernels.max_pool:
        return cpu_kernels.max_pool(x, k, s, pad)
    return cpu_kernels.plain_max_pool(x, k, s, pad)


def conv(cin: int, cout: int, k: int, *, stride: int = 1, pad: int | str = 0, groups: int = 1,
         bias: bool = True, dtype=jnp.float32, kernels: Kernels = XLA,
         rngs: nnx.Rngs) -> nnx.Conv:
    """A conv with PyTorch's symmetric integer padding (or 'SAME', TensorFlow's rule), computed
    by `kernels`' choice: `cpu_kernels.dense_conv`, `cpu_kernels.depthwise_conv` or XLA's."""
    padding = pad if isinstance(pad, str) else ((pad, pad), (pad, pad))
    if groups == 1 and kernels.conv:
        conv_general_dilated = cpu_kernels.dense_conv
    elif groups == cin == cout and kernels.depthwise:
        conv_general_dilated = cpu_kernels.depthwise_conv
    else:
        conv_general_dilated = lax.conv_general_dilated
    return nnx.Conv(cin, cout, (k, k), strides=(stride, stride), padding=padding,
                    feature_group_count=groups, use_bias=bias, dtype=dtype,
                    param_dtype=jnp.float32, rngs=rngs, conv_general_dilated=conv_general_dilated)


def batch_norm(c: int, *, eps: float = 1e-5, dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.BatchNorm:
    """Inference-mode BatchNorm (running statistics), with PyTorch's eps by default."""
    return nnx.BatchNorm(c, use_running_average=True, epsilon=eps, dtype=dtype,
                         param_dtype=jnp.float32, rngs=rngs)


class Dense(nnx.Linear):
    """`nnx.Linear` whose result for one row never depends on the other rows of the batch
    (`cpu_kernels.matmul_per_row`: a batch equals its single runs bit for bit on CPU)."""

    def __call__(self, x: jax.Array) -> jax.Array:
        y = cpu_kernels.matmul_per_row(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        return y + self.bias[...].astype(self.dtype)


def linear(cin: int, cout: int, *, dtype=jnp.float32, rngs: nnx.Rngs) -> Dense:
    return Dense(cin, cout, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


# ----------------------------------------------------------------------------- rectifiers
# Plain functions: Guided Backprop finds every max(x, 0) in the traced program
# (`gfi_jax.jaxpr_guided`), so the models need no switchable rectifier of their own.
def relu(x: jax.Array) -> jax.Array:
    return jax.nn.relu(x)


def relu6(x: jax.Array) -> jax.Array:
    return jnp.clip(x, 0, 6.0)
