"""Single layers of GFI's step, forward + input gradient, in the variants under consideration.

The device traces (experiments/results/bench_gfi_gpu.md) put ResNet-18's time in its strided
convolutions, its 3-channel stem and the max pool's select-and-scatter gradient. This times
each of those alone, in the shapes of one stage-2 step, against a candidate replacement, and
checks that both compute the same values:

- max pool (ResNet's 3×3/2 on 112², VGG's 2×2/2 on 224²): autodiff's select-and-scatter
  against `layers._max_pool`'s masked backward;
- ResNet's stem (7×7/2, 3 → 64 channels): the strided convolution against the same
  convolution on the 2×2 space-to-depth input (12 channels, a 4×4 stride-1 kernel).

    python experiments/bench_layers.py                      # accelerator: batch 1024, bfloat16
    python experiments/bench_layers.py --batch 2 --dtype float32

Prints a markdown table (ms per forward + input gradient, median of timed calls).
"""
from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bench_gfi import time_calls
from gfi_jax.models import layers

NHWC = ("NHWC", "HWIO", "NHWC")


def stem_plain(x: jax.Array, w: jax.Array) -> jax.Array:
    """(B, 224, 224, 3) ⊛ (7, 7, 3, 64), stride 2, padding 3 -> (B, 112, 112, 64)."""
    return lax.conv_general_dilated(x, w, (2, 2), ((3, 3), (3, 3)), dimension_numbers=NHWC)


def space_to_depth(x: jax.Array) -> jax.Array:
    """(B, 2H, 2W, C) -> (B, H, W, 4C), channel index (row parity, column parity, c)."""
    B, H, W, C = x.shape
    return x.reshape(B, H // 2, 2, W // 2, 2, C).transpose(0, 1, 3, 2, 4, 5).reshape(
        B, H // 2, W // 2, 4 * C)


def stem_kernel_s2d(w: jax.Array) -> jax.Array:
    """(7, 7, C, O) -> (4, 4, 4C, O): tap a = 2q + r of the stride-2 kernel is tap q of the
    stride-1 kernel on channel block r (tap 7 is zero)."""
    k, _, C, n_out = w.shape
    w8 = jnp.pad(w, ((0, 8 - k), (0, 8 - k), (0, 0), (0, 0)))
    return w8.reshape(4, 2, 4, 2, C, n_out).transpose(0, 2, 1, 3, 4, 5).reshape(
        4, 4, 4 * C, n_out)


def stem_s2d(x: jax.Array, w: jax.Array) -> jax.Array:
    """The same stem: pad by 3 (230 = 2·115), 2×2 blocks, a valid 4×4 stride-1 conv -> 112²."""
    xp = jnp.pad(x, ((0, 0), (3, 3), (3, 3), (0, 0)))
    return lax.conv_general_dilated(space_to_depth(xp), stem_kernel_s2d(w), (1, 1),
                                    ((0, 0), (0, 0)), dimension_numbers=NHWC)


def pool_plain(k, s, pad):
    return lambda x: layers._max_pool_plain(x, k, s, pad)


def pool_masked(k, s, pad):
    return lambda x: layers._max_pool(x, k, s, pad)


def fwd_bwd(f, x, *rest):
    """f(x, *rest) and its input gradient against a fixed cotangent, as one program."""
    def run(x, g, *rest):
        y, vjp = jax.vjp(lambda x: f(x, *rest), x)
        return y, vjp(g)[0]
    g = jnp.asarray(np.random.default_rng(1).standard_normal(jax.eval_shape(
        lambda x: f(x, *rest), x).shape), x.dtype)
    return jax.jit(run), (x, g, *rest)


def main() -> int:
    gpu = jax.default_backend() != "cpu"
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=1024 if gpu else 2,
                    help="images per call (a stage-2 step of GFI at batch B runs 2B)")
    ap.add_argument("--dtype", default="bfloat16" if gpu else "float32")
    ap.add_argument("--max-time", type=float, default=2.0)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    dt, B = jnp.dtype(args.dtype), args.batch

    def rand(*shape):
        return jnp.asarray(rng.standard_normal(shape), dt)

    cases = [  # (layer, input, {variant: function}, extra args)
        ("ResNet max pool 3×3/2 pad 1, 112²×64", rand(B, 112, 112, 64),
         {"select-and-scatter": pool_plain(3, 2, 1), "masked": pool_masked(3, 2, 1)}, ()),
        ("VGG max pool 2×2/2, 224²×64", rand(B, 224, 224, 64),
         {"select-and-scatter": pool_plain(2, 2, 0), "masked": pool_masked(2, 2, 0)}, ()),
        ("ResNet stem 7×7/2, 3 → 64, 224²", rand(B, 224, 224, 3),
         {"strided conv": stem_plain, "space-to-depth": stem_s2d}, (rand(7, 7, 3, 64),)),
    ]
    print(f"# Layers, forward + input gradient: {jax.devices()[0].device_kind}, batch {B}, "
          f"{args.dtype}\n")
    print(f"- command: `python experiments/bench_layers.py {' '.join(sys.argv[1:])}`\n")
    print("| layer | variant | ms | max abs diff to the first variant (output, gradient) |")
    print("|---|---|---:|---|")
    for name, x, variants, rest in cases:
        ref = None
        for vname, f in variants.items():
            fn, a = fwd_bwd(f, x, *rest)
            y, dx = fn(*a)  # also the warm-up (compile)
            ms = time_calls(lambda: jax.block_until_ready(fn(*a)), args.max_time, 3)[0] * 1e3
            if ref is None:
                ref, diff = (y, dx), "-"
            else:
                diff = ", ".join(
                    f"{float(jnp.abs(u.astype(jnp.float32) - v.astype(jnp.float32)).max()):.3g}"
                    for u, v in zip((y, dx), ref))
            print(f"| {name} | {vname} | {ms:.3f} | {diff} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
