"""ResNet-18 and ResNet-50 (torchvision's `resnet18` / `resnet50`, v1.5 strides), NHWC.

Layer names: `conv1` (stem conv+BN+ReLU), `pool1` (the stem max-pool), per block
`layer{L}.{b}.act1` (and `.act2` for bottlenecks: the inner post-ReLU activations) and
`layer{L}.{b}` (block output), `layer1` … `layer4` (each stage's last block output),
`avgpool`, `logits`.
"""
from __future__ import annotations

from typing import Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from gfi_jax.models import torch_keys as tk
from gfi_jax.models.cpu_kernels import XLA, Kernels
from gfi_jax.models.layers import adaptive_avg_pool, batch_norm, conv, linear, max_pool, relu

DEPTHS = {"resnet18": (2, 2, 2, 2), "resnet50": (3, 4, 6, 3)}
BOTTLENECK = {"resnet18": False, "resnet50": True}
WIDTHS = (64, 128, 256, 512)


def layer_names(variant: str) -> tuple[str, ...]:
    acts = ("act1", "act2") if BOTTLENECK[variant] else ("act1",)
    names = ["conv1", "pool1"]
    for L, n in enumerate(DEPTHS[variant], 1):
        for b in range(n):
            names += [f"layer{L}.{b}.{a}" for a in acts] + [f"layer{L}.{b}"]
        names.append(f"layer{L}")
    return (*names, "avgpool", "logits")


def torch_aliases(variant: str) -> dict[str, str]:
    return {"relu": "conv1", "bn1": "conv1", "maxpool": "pool1", "fc": "logits"}


def torch_keys(variant: str) -> list[tk.Rule]:
    """torchvision's state_dict keys -> our params (a stage's first block has the
    downsample shortcut, except layer1 of the basic-block nets, whose width does not change)."""
    rules = tk.conv("conv1", "conv1", bias=False) + tk.bn("bn1", "bn1")
    n_convs = 3 if BOTTLENECK[variant] else 2
    for L, n in enumerate(DEPTHS[variant]):
        for b in range(n):
            t, f = f"layer{L + 1}.{b}", f"layers/{L}/{b}"
            for c in range(1, n_convs + 1):
                rules += tk.conv(f"{t}.conv{c}", f"{f}/conv{c}", bias=False) + tk.bn(f"{t}.bn{c}", f"{f}/bn{c}")
            if b == 0 and (L > 0 or BOTTLENECK[variant]):
                rules += tk.conv(f"{t}.downsample.0", f"{f}/down_conv", bias=False)
                rules += tk.bn(f"{t}.downsample.1", f"{f}/down_bn")
    return rules + tk.linear("fc", "fc")


class Block(nnx.Module):
    """torchvision's BasicBlock (bottleneck=False) or Bottleneck (stride on the 3×3 conv)."""

    def __init__(self, cin: int, width: int, stride: int, bottleneck: bool, *, dtype, kernels,
                 rngs):
        cout = width * 4 if bottleneck else width
        kw = dict(dtype=dtype, rngs=rngs)
        ck = dict(bias=False, kernels=kernels, **kw)
        if bottleneck:
            self.conv1 = conv(cin, width, 1, **ck)
            self.conv2 = conv(width, width, 3, stride=stride, pad=1, **ck)
            self.conv3 = conv(width, cout, 1, **ck)
            self.bn3 = batch_norm(cout, **kw)
        else:
            self.conv1 = conv(cin, width, 3, stride=stride, pad=1, **ck)
            self.conv2 = conv(width, cout, 3, pad=1, **ck)
            self.conv3 = self.bn3 = None
        self.bn1 = batch_norm(width, **kw)
        self.bn2 = batch_norm(width if bottleneck else cout, **kw)
        if stride != 1 or cin != cout:
            self.down_conv = conv(cin, cout, 1, stride=stride, **ck)
            self.down_bn = batch_norm(cout, **kw)
        else:
            self.down_conv = self.down_bn = None

    def stages(self, x: jax.Array, name: str) -> Iterator[tuple[str, jax.Array]]:
        h = relu(self.bn1(self.conv1(x)))
        yield f"{name}.act1", h
        h = self.bn2(self.conv2(h))
        if self.conv3 is not None:
            h = relu(h)
            yield f"{name}.act2", h
            h = self.bn3(self.conv3(h))
        skip = x if self.down_conv is None else self.down_bn(self.down_conv(x))
        yield name, relu(h + skip)


class ResNet(nnx.Module):
    def __init__(self, variant: str = "resnet18", num_classes: int = 1000, *,
                 dtype=jnp.float32, kernels: Kernels = XLA, rngs: nnx.Rngs):
        self.variant = variant
        self.dtype = dtype
        self.kernels = kernels
        bottleneck = BOTTLENECK[variant]
        self.conv1 = conv(3, 64, 7, stride=2, pad=3, bias=False, dtype=dtype, kernels=kernels,
                          rngs=rngs)
        self.bn1 = batch_norm(64, dtype=dtype, rngs=rngs)
        blocks, cin = [], 64
        for L, (n, width) in enumerate(zip(DEPTHS[variant], WIDTHS)):
            stage = []
            for b in range(n):
                stride = 2 if (b == 0 and L > 0) else 1
                stage.append(Block(cin, width, stride, bottleneck, dtype=dtype, kernels=kernels,
                                   rngs=rngs))
                cin = width * 4 if bottleneck else width
            blocks.append(nnx.List(stage))
        self.layers = nnx.List(blocks)
        self.fc = linear(cin, num_classes, dtype=dtype, rngs=rngs)

    def stages(self, x: jax.Array) -> Iterator[tuple[str, jax.Array]]:
        """(B, H, W, 3) preprocessed images -> yields (name, activation) in forward order."""
        x = relu(self.bn1(self.conv1(x.astype(self.dtype))))
        yield "conv1", x
        x = max_pool(x, 3, 2, pad=1, kernels=self.kernels)
        yield "pool1", x
        for L, stage in enumerate(self.layers, 1):
            for b, block in enumerate(stage):
                for name, h in block.stages(x, f"layer{L}.{b}"):
                    yield name, h
                x = h
            yield f"layer{L}", x
        x = adaptive_avg_pool(x, (1, 1))
        yield "avgpool", x
        logits = self.fc(x.reshape(x.shape[0], -1))
        yield "logits", logits.astype(jnp.promote_types(self.dtype, jnp.float32))
