"""AlexNet (torchvision's `alexnet`, the one-GPU variant), NHWC.

Layer names: `conv1` … `conv5` (post-ReLU), `pool1`, `pool2`, `pool5`, `avgpool`,
`fc6`, `fc7` (post-ReLU), `logits`.
"""
from __future__ import annotations

from typing import Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from gfi_jax.models import torch_keys as tk
from gfi_jax.models.cpu_kernels import XLA, Kernels
from gfi_jax.models.layers import adaptive_avg_pool, conv, linear, max_pool, relu

LAYERS = ("conv1", "pool1", "conv2", "pool2", "conv3", "conv4", "conv5", "pool5",
          "avgpool", "fc6", "fc7", "logits")

# torchvision module paths -> our names (ReLUs are in place: conv and ReLU share a tensor).
ALIASES = {
    "features.0": "conv1", "features.1": "conv1", "features.2": "pool1",
    "features.3": "conv2", "features.4": "conv2", "features.5": "pool2",
    "features.6": "conv3", "features.7": "conv3", "features.8": "conv4", "features.9": "conv4",
    "features.10": "conv5", "features.11": "conv5", "features.12": "pool5",
    "classifier.0": "avgpool",  # dropout on the flattened avgpool output
    "classifier.1": "fc6", "classifier.2": "fc6", "classifier.3": "fc6",
    "classifier.4": "fc7", "classifier.5": "fc7", "classifier.6": "logits", "fc8": "logits",
}

# (cin, cout, kernel, stride, pad) of torchvision's five convs.
_CONVS = ((3, 64, 11, 4, 2), (64, 192, 5, 1, 2), (192, 384, 3, 1, 1),
          (384, 256, 3, 1, 1), (256, 256, 3, 1, 1))


def torch_keys() -> list[tk.Rule]:
    """torchvision's state_dict keys -> our params (`classifier.0` and `.3` are dropouts)."""
    rules = [r for i, idx in enumerate((0, 3, 6, 8, 10)) for r in tk.conv(f"features.{idx}", f"convs/{i}")]
    return (rules + tk.linear("classifier.1", "fc6", "fc_chw") + tk.linear("classifier.4", "fc7")
            + tk.linear("classifier.6", "fc8"))


class AlexNet(nnx.Module):
    def __init__(self, num_classes: int = 1000, *, dtype=jnp.float32, kernels: Kernels = XLA,
                 rngs: nnx.Rngs):
        self.dtype = dtype
        self.kernels = kernels
        self.convs = nnx.List([conv(ci, co, k, stride=s, pad=p, dtype=dtype, kernels=kernels,
                                    rngs=rngs) for ci, co, k, s, p in _CONVS])
        self.fc6 = linear(256 * 6 * 6, 4096, dtype=dtype, rngs=rngs)
        self.fc7 = linear(4096, 4096, dtype=dtype, rngs=rngs)
        self.fc8 = linear(4096, num_classes, dtype=dtype, rngs=rngs)

    def stages(self, x: jax.Array) -> Iterator[tuple[str, jax.Array]]:
        """(B, H, W, 3) preprocessed images -> yields (name, activation) in forward order."""
        x = x.astype(self.dtype)
        for i in range(5):
            x = relu(self.convs[i](x))
            yield f"conv{i + 1}", x
            if i in (0, 1, 4):
                x = max_pool(x, 3, 2, kernels=self.kernels)
                yield {0: "pool1", 1: "pool2", 4: "pool5"}[i], x
        x = adaptive_avg_pool(x, (6, 6))
        yield "avgpool", x
        x = x.reshape(x.shape[0], -1)  # H·W·C order; the converter reorders fc6 to match
        x = relu(self.fc6(x))
        yield "fc6", x
        x = relu(self.fc7(x))
        yield "fc7", x
        yield "logits", self.fc8(x).astype(jnp.promote_types(self.dtype, jnp.float32))
