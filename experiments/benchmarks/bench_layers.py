"""Single layers of GFI's step, forward + input gradient, in the variants under consideration.

The device traces (experiments/results/bench_gfi_gpu.md) put ResNet-18's time in its strided
convolutions, its 3-channel stem and the max pool's select-and-scatter gradient. This times
each of those alone, in the shapes of one stage-2 step, against a candidate replacement, and
checks that both compute the same values:

- max pool (ResNet's 3×3/2 on 112², VGG's 2×2/2 on 224²): autodiff's select-and-scatter
  against `cpu_kernels.max_pool`'s masked backward;
- ResNet's stem (7×7/2, 3 → 64 channels): the strided convolution against the same
  convolution on the 2×2 space-to-depth input (12 channels, a 4×4 stride-1 kernel).

`--cases resnet18-convs` times every distinct convolution of ResNet-18 at 224² instead, as the
port runs it on CPU (`cpu_kernels.dense_conv`: the library with a hand-written input
gradient), as autodiff of
`lax.conv_general_dilated`, and rewritten without the convolution library: one matrix product
over the k² shifted views side by side ("im2col"), the same per image (`lax.map`), and for
3×3 stride-1 layers Winograd's F(2×2, 3×3) (16 products of 2.25× fewer FLOPs, plus tile
transforms). Why: on CPU ResNet-18's attribution methods trail PyTorch's (issue 5), and this is
where the time goes (experiments/results/bench_methods_cpu.md).

    python -m experiments.benchmarks.bench_layers           # accelerator: batch 1024, bfloat16
    python -m experiments.benchmarks.bench_layers --batch 2 --dtype float32
    python -m experiments.benchmarks.bench_layers --cases resnet18-convs --batch 32

Prints a markdown table (ms per forward + input gradient, median of timed calls).
"""
from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from gfi_jax.models import cpu_kernels

from experiments.benchmarks.bench_gfi import time_calls

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


def conv_port(s, p):
    return lambda x, w: cpu_kernels.dense_conv(x, w, (s, s), ((p, p), (p, p)),
                                               dimension_numbers=NHWC)


def conv_autodiff(s, p):
    return lambda x, w: lax.conv_general_dilated(x, w, (s, s), ((p, p), (p, p)),
                                                 dimension_numbers=NHWC)


def im2col(x: jax.Array, w: jax.Array, s: tuple[int, int], pads) -> jax.Array:
    """The conv as one product: the k² shifted, strided views of the padded input side by
    side, `(N, oh, ow, k²·C)`, times the kernel as a `(k²·C, O)` matrix.

    Faster than XLA:CPU's convolution library on small maps at small batches (ResNet-18's
    7×7 layer4: bench_layers_cpu.md), but its summation order depends on the batch size on
    XLA:CPU, so an image alone and in a batch differ in the last bits; the port keeps the
    library."""
    kh, kw, c, n_out = w.shape
    xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    oh, ow = (xp.shape[1] - kh) // s[0] + 1, (xp.shape[2] - kw) // s[1] + 1
    cols = [xp[:, i:i + s[0] * (oh - 1) + 1:s[0], j:j + s[1] * (ow - 1) + 1:s[1], :]
            for i in range(kh) for j in range(kw)]
    cols = cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)
    return lax.dot_general(cols, w.reshape(kh * kw * c, n_out), (((3,), (0,)), ((), ())))


def conv_im2col(s, p):
    """`im2col` for the whole batch at once."""
    return lambda x, w: im2col(x, w, (s, s), ((p, p), (p, p)))


def conv_im2col_per_image(s, p):
    return lambda x, w: lax.map(lambda xi: conv_im2col(s, p)(xi[None], w)[0], x)


_WINO_BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float32)
_WINO_G = np.array([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]], np.float32)
_WINO_AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float32)


def _combine(mat: np.ndarray, xs: list) -> list:
    """[Σᵢ mat[a, i]·xs[i] for each row a], skipping the zero entries (the Winograd matrices
    are mostly 0 and ±1, so each transform is a few additions, fused by XLA)."""
    out = []
    for row in mat:
        terms = [x if c == 1 else -x if c == -1 else c * x for c, x in zip(row, xs) if c != 0]
        out.append(sum(terms[1:], terms[0]))
    return out


def winograd(x: jax.Array, w: jax.Array, p: int) -> jax.Array:
    """3×3 stride-1 conv as Winograd F(2×2, 3×3): 4×4 input tiles (stride 2) transformed by
    Bᵀ·d·B, 16 products with G·w·Gᵀ, 2×2 output tiles by Aᵀ·M·A."""
    n, h, wd, _ = x.shape
    oh, ow = h + 2 * p - 2, wd + 2 * p - 2
    th, tw = -(-oh // 2), -(-ow // 2)
    xp = jnp.pad(x, ((0, 0), (p, p + 2 * th - oh), (p, p + 2 * tw - ow), (0, 0)))
    d = [[xp[:, i:i + 2 * th - 1:2, j:j + 2 * tw - 1:2] for j in range(4)] for i in range(4)]
    rows = [_combine(_WINO_BT, [d[i][j] for i in range(4)]) for j in range(4)]  # [j][a]
    v = jnp.stack([jnp.stack(_combine(_WINO_BT, [rows[j][a] for j in range(4)]))
                   for a in range(4)])                                # (4, 4, N, th, tw, C)
    u = jnp.einsum("ai,ijco,bj->abco", jnp.asarray(_WINO_G, w.dtype), w,
                   jnp.asarray(_WINO_G, w.dtype))
    m = jnp.einsum("abnhwc,abco->abnhwo", v, u)
    cols = [_combine(_WINO_AT, [m[a, b] for a in range(4)]) for b in range(4)]  # [b][p]
    y = [_combine(_WINO_AT, [cols[b][p] for b in range(4)]) for p in range(2)]  # [p][q]
    y = jnp.stack([jnp.stack(yp, axis=3) for yp in y], axis=2)  # (N, th, 2, tw, 2, O)
    return y.reshape(n, 2 * th, 2 * tw, -1)[:, :oh, :ow]


def conv_winograd(s, p):
    return lambda x, w: winograd(x, w, p)


# ResNet-18 at 224²: (name, input H = W, C in, C out, kernel, stride, padding, how many)
RESNET18_CONVS = [
    ("stem", 224, 3, 64, 7, 2, 3, 1),
    ("layer1 3×3", 56, 64, 64, 3, 1, 1, 4),
    ("layer2.0 3×3/2", 56, 64, 128, 3, 2, 1, 1),
    ("layer2 downsample 1×1/2", 56, 64, 128, 1, 2, 0, 1),
    ("layer2 3×3", 28, 128, 128, 3, 1, 1, 3),
    ("layer3.0 3×3/2", 28, 128, 256, 3, 2, 1, 1),
    ("layer3 downsample 1×1/2", 28, 128, 256, 1, 2, 0, 1),
    ("layer3 3×3", 14, 256, 256, 3, 1, 1, 3),
    ("layer4.0 3×3/2", 14, 256, 512, 3, 2, 1, 1),
    ("layer4 downsample 1×1/2", 14, 256, 512, 1, 2, 0, 1),
    ("layer4 3×3", 7, 512, 512, 3, 1, 1, 3),
]


def pool_plain(k, s, pad):
    return lambda x: cpu_kernels.plain_max_pool(x, k, s, pad)


def pool_masked(k, s, pad):
    return lambda x: cpu_kernels.max_pool(x, k, s, pad)


def fwd_bwd(f, x, *rest):
    """f(x, *rest) and its input gradient against a fixed cotangent, as one program."""
    def run(x, g, *rest):
        y, vjp = jax.vjp(lambda x: f(x, *rest), x)
        return y, vjp(g)[0]
    g = jnp.asarray(np.random.default_rng(1).standard_normal(jax.eval_shape(
        lambda x: f(x, *rest), x).shape), x.dtype)
    return jax.jit(run), (x, g, *rest)


def flops(w: jax.Array, y: jax.Array) -> float:
    """Direct-convolution FLOPs of forward + input gradient: 2 · 2·outputs·k²·C_in (the
    rate column's yardstick, also for the variants that do fewer)."""
    return 2 * 2 * y.size * w.shape[0] * w.shape[1] * w.shape[2]


def main() -> int:
    gpu = jax.default_backend() != "cpu"
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=1024 if gpu else 2,
                    help="images per call (a stage-2 step of GFI at batch B runs 2B)")
    ap.add_argument("--dtype", default="bfloat16" if gpu else "float32")
    ap.add_argument("--max-time", type=float, default=2.0)
    ap.add_argument("--cases", choices=("gpu-suspects", "resnet18-convs"), default="gpu-suspects",
                    help="the layers the GPU traces blamed (default), or every ResNet-18 conv")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    dt, B = jnp.dtype(args.dtype), args.batch

    def rand(*shape):
        return jnp.asarray(rng.standard_normal(shape), dt)

    cases = [  # (layer, input, {variant: function}, extra args)
        (f"{name} ×{count}, {h}²×{cin} → {cout}", rand(B, h, h, cin),
         {"port": conv_port(s, p), "autodiff (library)": conv_autodiff(s, p),
          "im2col": conv_im2col(s, p), "im2col per image": conv_im2col_per_image(s, p),
          **({"Winograd F(2×2,3×3)": conv_winograd(s, p)} if (k, s) == (3, 1) else {})},
         (rand(k, k, cin, cout) / np.sqrt(k * k * cin),))
        for name, h, cin, cout, k, s, p, count in RESNET18_CONVS
    ] if args.cases == "resnet18-convs" else [
        ("ResNet max pool 3×3/2 pad 1, 112²×64", rand(B, 112, 112, 64),
         {"select-and-scatter": pool_plain(3, 2, 1), "masked": pool_masked(3, 2, 1)}, ()),
        ("VGG max pool 2×2/2, 224²×64", rand(B, 224, 224, 64),
         {"select-and-scatter": pool_plain(2, 2, 0), "masked": pool_masked(2, 2, 0)}, ()),
        ("ResNet stem 7×7/2, 3 → 64, 224²", rand(B, 224, 224, 3),
         {"strided conv": stem_plain, "space-to-depth": stem_s2d}, (rand(7, 7, 3, 64),)),
    ]
    print(f"# Layers, forward + input gradient: {jax.devices()[0].device_kind}, batch {B}, "
          f"{args.dtype}\n")
    print(f"- command: `python -m experiments.benchmarks.bench_layers {' '.join(sys.argv[1:])}`\n")
    print("| layer | variant | ms | GFLOP/s | max abs diff to the first variant "
          "(output, gradient) |")
    print("|---|---|---:|---:|---|")
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
            rate = (f"{flops(rest[0], y) / ms / 1e6:.0f}"
                    if rest and rest[0].ndim == 4 else "-")
            print(f"| {name} | {vname} | {ms:.3f} | {rate} | {diff} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
