"""EfficientNet-Lite0 (the `efficientnet-lite-pytorch` reference, lukemelas key names), NHWC.

Lite differs from EfficientNet-B0: ReLU6 instead of swish, no squeeze-excitation, stem and
head widths not scaled. Convolutions use TensorFlow's "SAME" padding (asymmetric at stride 2),
which flax's `padding="SAME"` computes for any input size; BatchNorm eps is 1e-3.

Layer names: `stem`, `blocks.0` … `blocks.15` (block outputs), `head` (the 1×1 conv to 1280
channels, post-ReLU6), `avgpool`, `logits`; inside block i (i ≥ 1), `blocks.i.expand` and
`blocks.i.depthwise`: the post-ReLU6 activations of its expansion and depthwise convs
(non-negative, wide: candidate mask bases l1 finer than `head`).
"""
from __future__ import annotations

from typing import Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from gfi_jax.models.layers import (adaptive_avg_pool, batch_norm, conv, linear,
                                   relu6)

EPS = 1e-3
# (repeats, kernel, stride of the first block, expand ratio, channels in, channels out)
STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40),
          (3, 3, 2, 6, 40, 80), (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192),
          (1, 3, 1, 6, 192, 320))
NUM_BLOCKS = sum(s[0] for s in STAGES)
LAYERS = ("stem", "blocks.0.depthwise", "blocks.0",
          *(f"blocks.{i}{t}" for i in range(1, NUM_BLOCKS) for t in (".expand", ".depthwise", "")),
          "head", "avgpool", "logits")
ALIASES = {**{f"_blocks.{i}": f"blocks.{i}" for i in range(NUM_BLOCKS)},
           "_avg_pooling": "avgpool", "_fc": "logits"}


class MBConv(nnx.Module):
    """Inverted bottleneck: 1×1 expand, k×k depthwise, 1×1 project, identity skip."""

    def __init__(self, k: int, stride: int, expand: int, cin: int, cout: int, *, dtype, rngs):
        mid = cin * expand
        kw = dict(dtype=dtype, rngs=rngs)
        bn = dict(eps=EPS, **kw)
        self.expand_conv = conv(cin, mid, 1, pad="SAME", bias=False, **kw) if expand != 1 else None
        self.bn0 = batch_norm(mid, **bn) if expand != 1 else None
        self.depthwise_conv = conv(mid, mid, k, stride=stride, pad="SAME", groups=mid,
                                   bias=False, **kw)
        self.bn1 = batch_norm(mid, **bn)
        self.project_conv = conv(mid, cout, 1, pad="SAME", bias=False, **kw)
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


class EfficientNetLite0(nnx.Module):
    def __init__(self, num_classes: int = 1000, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.dtype = dtype
        kw = dict(dtype=dtype, rngs=rngs)
        self.conv_stem = conv(3, 32, 3, stride=2, pad="SAME", bias=False, **kw)
        self.bn0 = batch_norm(32, eps=EPS, **kw)
        blocks = []
        for repeats, k, stride, expand, cin, cout in STAGES:
            for r in range(repeats):
                blocks.append(MBConv(k, stride if r == 0 else 1, expand,
                                     cin if r == 0 else cout, cout, **kw))
        self.blocks = nnx.List(blocks)
        self.conv_head = conv(320, 1280, 1, pad="SAME", bias=False, **kw)
        self.bn1 = batch_norm(1280, eps=EPS, **kw)
        self.fc = linear(1280, num_classes, **kw)

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
