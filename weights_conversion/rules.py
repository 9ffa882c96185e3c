"""PyTorch state_dict keys -> Flax param keys, one rule list per architecture.

A rule is `(torch key, flax key, kind)`; flax keys are the "/"-joined nnx state paths of the
ports in `gfi_jax.models`. Kinds say how the array changes layout:
  conv    OIHW -> HWIO (depthwise (C,1,k,k) -> (k,k,1,C) by the same transpose)
  linear  (out, in) -> (in, out)
  copy    unchanged (biases, BatchNorm scale/bias/statistics)
  fc_chw  a Linear after PyTorch's C·H·W flatten, re-ordered for our H·W·C flatten
"""
from __future__ import annotations

import numpy as np

from gfi_jax.models import efficientnet_lite, resnet, vgg

Rule = tuple[str, str, str]

# The classifier's last weight: its first dimension is the number of classes.
HEAD = {"vgg16": "classifier.6.weight", "vgg19": "classifier.6.weight",
        "alexnet": "classifier.6.weight", "resnet18": "fc.weight", "resnet50": "fc.weight",
        "efficientnet_lite0": "_fc.weight"}
# (C, H, W) of the tensor PyTorch flattens before the first classifier layer.
FC_CHW = {"vgg16": (512, 7, 7), "vgg19": (512, 7, 7), "alexnet": (256, 6, 6)}


def _conv(t: str, f: str, bias: bool = True) -> list[Rule]:
    return [(f"{t}.weight", f"{f}/kernel", "conv")] + ([(f"{t}.bias", f"{f}/bias", "copy")] if bias else [])


def _linear(t: str, f: str, kind: str = "linear") -> list[Rule]:
    return [(f"{t}.weight", f"{f}/kernel", kind), (f"{t}.bias", f"{f}/bias", "copy")]


def _bn(t: str, f: str) -> list[Rule]:
    return [(f"{t}.weight", f"{f}/scale", "copy"), (f"{t}.bias", f"{f}/bias", "copy"),
            (f"{t}.running_mean", f"{f}/mean", "copy"), (f"{t}.running_var", f"{f}/var", "copy")]


def _vgg_like(conv_indices: list[int], fc_indices: tuple[int, int, int]) -> list[Rule]:
    """VGG and AlexNet: convs in `features`, three Linears in `classifier`."""
    rules = [r for i, idx in enumerate(conv_indices) for r in _conv(f"features.{idx}", f"convs/{i}")]
    fc6, fc7, fc8 = (f"classifier.{i}" for i in fc_indices)
    return rules + _linear(fc6, "fc6", "fc_chw") + _linear(fc7, "fc7") + _linear(fc8, "fc8")


def _vgg(variant: str) -> list[Rule]:
    # Module indices of the convs in torchvision's `features` (conv, ReLU, …, pool per block).
    idx, conv_indices = 0, []
    for n in vgg.BLOCKS[variant]:
        conv_indices += list(range(idx, idx + 2 * n, 2))
        idx += 2 * n + 1
    return _vgg_like(conv_indices, (0, 3, 6))


def _resnet(variant: str) -> list[Rule]:
    rules = _conv("conv1", "conv1", bias=False) + _bn("bn1", "bn1")
    n_convs = 3 if resnet.BOTTLENECK[variant] else 2
    for L, n in enumerate(resnet.DEPTHS[variant]):
        for b in range(n):
            t, f = f"layer{L + 1}.{b}", f"layers/{L}/{b}"
            for c in range(1, n_convs + 1):
                rules += _conv(f"{t}.conv{c}", f"{f}/conv{c}", bias=False) + _bn(f"{t}.bn{c}", f"{f}/bn{c}")
            if b == 0 and (L > 0 or resnet.BOTTLENECK[variant]):
                rules += _conv(f"{t}.downsample.0", f"{f}/down_conv", bias=False)
                rules += _bn(f"{t}.downsample.1", f"{f}/down_bn")
    return rules + _linear("fc", "fc")


def _efficientnet_lite0() -> list[Rule]:
    rules = _conv("_conv_stem", "conv_stem", bias=False) + _bn("_bn0", "bn0")
    i = 0
    for repeats, _, _, expand, _, _ in efficientnet_lite.STAGES:
        for _ in range(repeats):
            t, f = f"_blocks.{i}", f"blocks/{i}"
            if expand != 1:
                rules += _conv(f"{t}._expand_conv", f"{f}/expand_conv", bias=False) + _bn(f"{t}._bn0", f"{f}/bn0")
            rules += _conv(f"{t}._depthwise_conv", f"{f}/depthwise_conv", bias=False) + _bn(f"{t}._bn1", f"{f}/bn1")
            rules += _conv(f"{t}._project_conv", f"{f}/project_conv", bias=False) + _bn(f"{t}._bn2", f"{f}/bn2")
            i += 1
    return rules + _conv("_conv_head", "conv_head", bias=False) + _bn("_bn1", "bn1") + _linear("_fc", "fc")


def rules(arch: str) -> list[Rule]:
    if arch in vgg.BLOCKS:
        return _vgg(arch)
    if arch == "alexnet":
        return _vgg_like([0, 3, 6, 8, 10], (1, 4, 6))
    if arch in resnet.DEPTHS:
        return _resnet(arch)
    if arch == "efficientnet_lite0":
        return _efficientnet_lite0()
    raise ValueError(f"no conversion rules for {arch!r}")


def to_flax(kind: str, a: np.ndarray, chw: tuple[int, int, int] | None = None) -> np.ndarray:
    """One PyTorch array -> the Flax layout of `kind`."""
    if kind == "conv":
        return a.transpose(2, 3, 1, 0)
    if kind == "linear":
        return a.T
    if kind == "fc_chw":
        c, h, w = chw
        return a.reshape(a.shape[0], c, h, w).transpose(2, 3, 1, 0).reshape(c * h * w, a.shape[0])
    return a


def torch_shape(kind: str, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The PyTorch shape that `to_flax(kind, ·)` turns into `flax_shape`."""
    if kind == "conv":
        h, w, i, o = flax_shape
        return (o, i, h, w)
    if kind in ("linear", "fc_chw"):
        return tuple(reversed(flax_shape))
    return tuple(flax_shape)
