"""VGG-16 and VGG-19 (torchvision's `vgg16` / `vgg19`, no batch norm), NHWC.

Layer names follow the paper: `conv1_1` … `conv5_4` (post-ReLU), `pool1` … `pool5`,
`avgpool`, `fc6`, `fc7` (post-ReLU), `logits`.
"""
from __future__ import annotations

from typing import Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from gfi_jax.models import torch_keys as tk
from gfi_jax.models.cpu_kernels import XLA, Kernels
from gfi_jax.models.layers import adaptive_avg_pool, conv, linear, max_pool, relu

# Convs per block (torchvision configs "D" and "E").
BLOCKS = {"vgg16": (2, 2, 3, 3, 3), "vgg19": (2, 2, 4, 4, 4)}
WIDTHS = (64, 128, 256, 512, 512)


def layer_names(variant: str) -> tuple[str, ...]:
    names = []
    for b, n in enumerate(BLOCKS[variant], 1):
        names += [f"conv{b}_{j}" for j in range(1, n + 1)] + [f"pool{b}"]
    return (*names, "avgpool", "fc6", "fc7", "logits")


def torch_aliases(variant: str) -> dict[str, str]:
    """torchvision module paths -> our names.

    torchvision's ReLUs are in-place, so a hook on `features.34` (conv5_4's Conv2d) sees the
    same tensor as one on `features.35` (its ReLU) once the forward is done: both map to the
    post-ReLU activation.
    """
    aliases, idx = {}, 0
    for b, n in enumerate(BLOCKS[variant], 1):
        for j in range(1, n + 1):
            aliases[f"features.{idx}"] = aliases[f"features.{idx + 1}"] = f"conv{b}_{j}"
            idx += 2
        aliases[f"features.{idx}"] = f"pool{b}"
        idx += 1
    for i, name in enumerate(("fc6", "fc6", "fc6", "fc7", "fc7", "fc7", "logits")):
        aliases[f"classifier.{i}"] = name
    aliases["fc8"] = "logits"
    return aliases


def torch_keys(variant: str) -> list[tk.Rule]:
    """torchvision's state_dict keys -> our params: the i-th conv is `features.idx`, where
    idx skips each conv's ReLU and each block's pool; three Linears in `classifier`."""
    rules, idx, i = [], 0, 0
    for n in BLOCKS[variant]:
        for _ in range(n):
            rules += tk.conv(f"features.{idx}", f"convs/{i}")
            idx, i = idx + 2, i + 1
        idx += 1
    return (rules + tk.linear("classifier.0", "fc6", "fc_chw") + tk.linear("classifier.3", "fc7")
            + tk.linear("classifier.6", "fc8"))


class VGG(nnx.Module):
    def __init__(self, variant: str = "vgg19", num_classes: int = 1000, *,
                 dtype=jnp.float32, kernels: Kernels = XLA, rngs: nnx.Rngs):
        self.variant = variant
        self.dtype = dtype
        self.kernels = kernels
        convs, cin = [], 3
        for n, width in zip(BLOCKS[variant], WIDTHS):
            for _ in range(n):
                convs.append(conv(cin, width, 3, pad=1, dtype=dtype, kernels=kernels, rngs=rngs))
                cin = width
        self.convs = nnx.List(convs)
        self.fc6 = linear(512 * 7 * 7, 4096, dtype=dtype, rngs=rngs)
        self.fc7 = linear(4096, 4096, dtype=dtype, rngs=rngs)
        self.fc8 = linear(4096, num_classes, dtype=dtype, rngs=rngs)

    def stages(self, x: jax.Array) -> Iterator[tuple[str, jax.Array]]:
        """(B, H, W, 3) preprocessed images -> yields (name, activation) in forward order."""
        x = x.astype(self.dtype)
        i = 0
        for b, n in enumerate(BLOCKS[self.variant], 1):
            for j in range(1, n + 1):
                x = relu(self.convs[i](x))
                i += 1
                yield f"conv{b}_{j}", x
            x = max_pool(x, 2, 2, kernels=self.kernels)
            yield f"pool{b}", x
        x = adaptive_avg_pool(x, (7, 7))
        yield "avgpool", x
        x = x.reshape(x.shape[0], -1)  # H·W·C order; the converter reorders fc6 to match
        x = relu(self.fc6(x))
        yield "fc6", x
        x = relu(self.fc7(x))
        yield "fc7", x
        yield "logits", self.fc8(x).astype(jnp.promote_types(self.dtype, jnp.float32))
