"""EfficientNet-Lite0, -Lite1 and -Lite2 (the `efficientnet-lite-pytorch` reference, lukemelas
key names), NHWC.

Lite differs from EfficientNet-B0: ReLU6 instead of swish, no squeeze-excitation, stem and
head widths not scaled. Convolutions use TensorFlow's "SAME" padding (asymmetric at stride 2),
which flax's `padding="SAME"` computes for any input size; BatchNorm eps is 1e-3.

Layer names: `stem`, `blocks.0` … `blocks.{n-1}` (block outputs; n = 16 for Lite0, 21 for
Lite1 and Lite2), `head` (the 1×1 conv to 1280 channels, post-ReLU6), `avgpool`, `logits`;
inside block i (i ≥ 1), `blocks.i.expand` and `blocks.i.depthwise`: the post-ReLU6
activations of its expansion and depthwise convs (non-negative, wide: candidate mask bases l1
finer than `head`). Block indices shift with depth: Lite0's `blocks.11` (the first 192-channel
block) is Lite1's and Lite2's `blocks.15`.
"""
from __future__ import annotations

from typing import Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from gfi_jax.models import torch_keys as tk
from gfi_jax.models.cpu_kernels import XLA, Kernels
from gfi_jax.models.layers import (adaptive_avg_pool, batch_norm, conv, linear,
                                   relu6)

EPS = 1e-3
# Per variant: (repeats, kernel, stride of the first block, expand ratio, channels in, channels
# out) of each stage. Lite1 and Lite2 are Lite0 scaled by TF's efficientnet_lite_builder
# (width, depth) = (1.0, 1.1) and (1.1, 1.2): widths rounded to multiples of 8, the inner
# stages' repeats rounded up, and, unlike EfficientNet-B*, the stem (32), the head (1280) and
# the first and last stages' repeats kept.
STAGES = {
    "efficientnet_lite0": ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40),
                           (3, 3, 2, 6, 40, 80), (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192),
                           (1, 3, 1, 6, 192, 320)),
    "efficientnet_lite1": ((1, 3, 1, 1, 32, 16), (3, 3, 2, 6, 16, 24), (3, 5, 2, 6, 24, 40),
                           (4, 3, 2, 6, 40, 80), (4, 5, 1, 6, 80, 112), (5, 5, 2, 6, 112, 192),
                           (1, 3, 1, 6, 192, 320)),
    "efficientnet_lite2": ((1, 3, 1, 1, 32, 16), (3, 3, 2, 6, 16, 24), (3, 5, 2, 6, 24, 48),
                           (4, 3, 2, 6, 48, 88), (4, 5, 1, 6, 88, 120), (5, 5, 2, 6, 120, 208),
                           (1, 3, 1, 6, 208, 352)),
}
STEM, HEAD = 32, 1280


def blocks(variant: str) -> list[tuple[int, int, int, int, int]]:
    """(kernel, stride, expand, cin, cout) of every block: a stage's first block strides and
    changes width, its repeats keep both."""
    return [(k, stride if r == 0 else 1, expand, cin if r == 0 else cout, cout)
            for repeats, k, stride, expand, cin, cout in STAGES[variant] for r in range(repeats)]


def layer_names(variant: str) -> tuple[str, ...]:
    taps = [(".expand", ".depthwise", "") if b[2] != 1 else (".depthwise", "") for b in blocks(variant)]
    return ("stem", *(f"blocks.{i}{t}" for i, ts in enumerate(taps) for t in ts),
            "head", "avgpool", "logits")


def torch_aliases(variant: str) -> dict[str, str]:
    return {**{f"_blocks.{i}": f"blocks.{i}" for i in range(len(blocks(variant)))},
            "_avg_pooling": "avgpool", "_fc": "logits"}


def torch_keys(variant: str) -> list[tk.Rule]:
    """The reference's state_dict keys -> our params (no `_expand_conv` where expand is 1)."""
    rules = tk.conv("_conv_stem", "conv_stem", bias=False) + tk.bn("_bn0", "bn0")
    for i, (_, _, expand, _, _) in enumerate(blocks(variant)):
        t, f = f"_blocks.{i}", f"blocks/{i}"
        if expand != 1:
            rules += tk.conv(f"{t}._expand_conv", f"{f}/expand_conv", bias=False) + tk.bn(f"{t}._bn0", f"{f}/bn0")
        rules += tk.conv(f"{t}._depthwise_conv", f"{f}/depthwise_conv", bias=False) + tk.bn(f"{t}._bn1", f"{f}/bn1")
        rules += tk.conv(f"{t}._project_conv", f"{f}/project_conv", bias=False) + tk.bn(f"{t}._bn2", f"{f}/bn2")
    return rules + tk.conv("_conv_head", "conv_head", bias=False) + tk.bn("_bn1", "bn1") + tk.linear("_fc", "fc")


class MBConv(nnx.Module):
    """Inverted bottleneck: 1×1 expand, k×k depthwise, 1×1 project, identity skip."""

    def __init__(self, k: int, stride: int, expand: int, cin: int, cout: int, *, dtype,
                 kernels, rngs):
        mid = cin * expand
        kw = dict(dtype=dtype, rngs=rngs)
        bn = dict(eps=EPS, **kw)
        ck = dict(pad="SAME", bias=False, kernels=kernels, **kw)
        self.expand_conv = conv(cin, mid, 1, **ck) if expand != 1 else None
        self.bn0 = batch_norm(mid, **bn) if expand != 1 else None
        self.depthwise_conv = conv(mid, mid, k, stride=stride, groups=mid, **ck)
        self.bn1 = batch_norm(mid, **bn)
        self.project_conv = conv(mid, cout, 1, **ck)
        self.bn2 = batch_norm(cout, **bn)
        self.skip = stride == 1 and cin == cout

    def taps(self, x: jax.Array) -> Iterator[tuple[str, jax.Array]]:
        """Yields (".expand", ·), (".depthwise", ·) and ("", block output)."""
        h = x
        if self.expand_conv is not None:
            h = relu6(self.bn0(self.expand_conv(x)))
            yield ".expand", h
        h = relu6(self.bn1(self.depthwise_conv(h)))
        yield ".depthwise", h
        h = self.bn2(self.project_conv(h))
        yield "", h + x if self.skip else h


class EfficientNetLite(nnx.Module):
    def __init__(self, variant: str, num_classes: int = 1000, *, dtype=jnp.float32,
                 kernels: Kernels = XLA, rngs: nnx.Rngs):
        self.dtype = dtype
        kw = dict(dtype=dtype, rngs=rngs)
        ck = dict(pad="SAME", bias=False, kernels=kernels, **kw)
        self.conv_stem = conv(3, STEM, 3, stride=2, **ck)
        self.bn0 = batch_norm(STEM, eps=EPS, **kw)
        self.blocks = nnx.List([MBConv(*b, kernels=kernels, **kw) for b in blocks(variant)])
        cin = STAGES[variant][-1][-1]
        self.conv_head = conv(cin, HEAD, 1, **ck)
        self.bn1 = batch_norm(HEAD, eps=EPS, **kw)
        self.fc = linear(HEAD, num_classes, **kw)

    def stages(self, x: jax.Array) -> Iterator[tuple[str, jax.Array]]:
        """(B, H, W, 3) preprocessed images -> yields (name, activation) in forward order."""
        x = relu6(self.bn0(self.conv_stem(x.astype(self.dtype))))
        yield "stem", x
        for i, block in enumerate(self.blocks):
            for tap, x in block.taps(x):
                yield f"blocks.{i}{tap}", x
        x = relu6(self.bn1(self.conv_head(x)))
        yield "head", x
        x = adaptive_avg_pool(x, (1, 1))
        yield "avgpool", x
        logits = self.fc(x.reshape(x.shape[0], -1))
        yield "logits", logits.astype(jnp.promote_types(self.dtype, jnp.float32))
