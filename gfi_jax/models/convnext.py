"""ConvNeXt-Tiny (torchvision's `convnext_tiny`), NHWC.

Stem: a 4×4 stride-4 conv, then LayerNorm. Four stages of ConvNeXt blocks (depths 3, 3, 9, 3;
widths 96, 192, 384, 768); stages 2-4 open with a downsample (LayerNorm, 2×2 stride-2 conv).
A block: 7×7 depthwise conv, LayerNorm, Linear to 4·C, GELU (exact, erf), Linear back to C,
times the per-channel layer scale, plus the input. Stochastic depth is the identity at
inference and is left out. Every LayerNorm normalizes the channels of each pixel (eps 1e-6):
torchvision's LayerNorm2d permutes to channels-last for it, which NHWC already is. The head:
global average pool, LayerNorm, Linear.

Layer names: `stem`; per stage L (1-4) `stage{L}.down` (L ≥ 2: the downsample's output),
per block `stage{L}.{b}.gelu` (the 4·C-wide post-GELU activation, ≥ −0.17: the only
nonlinearity), `stage{L}.{b}.pos` (its positive part max(GELU, 0), a map ≥ 0 as GFI's mask
basis must be; the block reads pos + neg, which is the GELU exactly, so gradients at `.pos`
flow through the network) and `stage{L}.{b}` (block output, signed), `stage{L}` (the stage's last block output); `avgpool`, `norm` (the head's LayerNorm
of the pooled vector), `logits`.
"""
from __future__ import annotations

from typing import Iterator

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from gfi_jax.models import cpu_kernels
from gfi_jax.models import torch_keys as tk
from gfi_jax.models.cpu_kernels import XLA, Kernels
from gfi_jax.models.layers import adaptive_avg_pool, conv, linear, positive_part

EPS = 1e-6
DEPTHS = {"convnext_tiny": (3, 3, 9, 3)}
WIDTHS = {"convnext_tiny": (96, 192, 384, 768)}
_NHWC = ("NHWC", "HWIO", "NHWC")


def layer_names(variant: str) -> tuple[str, ...]:
    names = ["stem"]
    for L, n in enumerate(DEPTHS[variant], 1):
        if L > 1:
            names.append(f"stage{L}.down")
        for b in range(n):
            names += [f"stage{L}.{b}.gelu", f"stage{L}.{b}.pos", f"stage{L}.{b}"]
        names.append(f"stage{L}")
    return (*names, "avgpool", "norm", "logits")


def torch_aliases(variant: str) -> dict[str, str]:
    """torchvision's module paths: `features.{2L−1}` is stage L, `features.{2L−2}` its
    downsample, `block.4` a block's GELU."""
    out = {"features.0": "stem", "avgpool": "avgpool", "classifier.0": "norm",
           "classifier": "logits", "classifier.2": "logits"}
    for L, n in enumerate(DEPTHS[variant], 1):
        f = f"features.{2 * L - 1}"
        out[f] = f"stage{L}"
        if L > 1:
            out[f"features.{2 * L - 2}"] = f"stage{L}.down"
        for b in range(n):
            out[f"{f}.{b}"] = f"stage{L}.{b}"
            out[f"{f}.{b}.block.4"] = f"stage{L}.{b}.gelu"
    return out


def _ln(t: str, f: str) -> list[tk.Rule]:
    return [(f"{t}.weight", f"{f}/scale", "copy"), (f"{t}.bias", f"{f}/bias", "copy")]


def torch_keys(variant: str) -> list[tk.Rule]:
    """torchvision's state_dict keys -> our params. `layer_scale` keeps torchvision's
    (C, 1, 1) shape here, so the plain copy rule carries it (`Block` flattens it)."""
    rules = tk.conv("features.0.0", "stem_conv") + _ln("features.0.1", "stem_norm")
    for s, n in enumerate(DEPTHS[variant]):
        if s > 0:
            t = f"features.{2 * s}"
            rules += _ln(f"{t}.0", f"downs/{s - 1}/norm") + tk.conv(f"{t}.1", f"downs/{s - 1}/conv")
        for b in range(n):
            t, f = f"features.{2 * s + 1}.{b}", f"blocks/{s}/{b}"
            rules += [(f"{t}.layer_scale", f"{f}/layer_scale", "copy")]
            rules += tk.conv(f"{t}.block.0", f"{f}/dwconv") + _ln(f"{t}.block.2", f"{f}/norm")
            rules += tk.linear(f"{t}.block.3", f"{f}/pwconv1") + tk.linear(f"{t}.block.5", f"{f}/pwconv2")
    return rules + _ln("classifier.0", "norm") + tk.linear("classifier.2", "fc")


def layer_norm(c: int, *, dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """Channels-last LayerNorm, eps 1e-6. The two-pass variance: closer to PyTorch's than
    E[x²]−E[x]², exact 0 on a flat pixel, and no `max(var, 0)` clip, which Guided Backprop's
    program walk would take for a ReLU (`jaxpr_guided`)."""
    return nnx.LayerNorm(c, epsilon=EPS, use_fast_variance=False, dtype=dtype,
                         param_dtype=jnp.float32, rngs=rngs)


class Pointwise(nnx.Module):
    """PyTorch's `nn.Linear` over the channels of every pixel, computed as a 1×1 conv, so that
    on CPU it takes `cpu_kernels.dense_conv`'s fast input gradient inside GFI's loop.
    Kernel (in, out). Not batch-invariant to the last bit (XLA:CPU blocks the product by the
    batch size); GFI's sequential mode runs each image alone, so its results are."""

    def __init__(self, cin: int, cout: int, *, dtype, kernels: Kernels, rngs: nnx.Rngs):
        self.kernel = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (cin, cout)))
        self.bias = nnx.Param(jnp.zeros((cout,), jnp.float32))
        self.dtype = dtype
        self.fast = kernels.conv

    def __call__(self, x: jax.Array) -> jax.Array:
        op = cpu_kernels.dense_conv if self.fast else lax.conv_general_dilated
        k = self.kernel[...].astype(self.dtype)[None, None]
        y = op(x.astype(self.dtype), k, (1, 1), "VALID", dimension_numbers=_NHWC)
        return y + self.bias[...].astype(self.dtype)


class Block(nnx.Module):
    """torchvision's CNBlock: x + γ · Linear(GELU(Linear(LN(dwconv7×7(x)))))."""

    def __init__(self, c: int, *, dtype, kernels: Kernels, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, rngs=rngs)
        self.dwconv = conv(c, c, 7, pad=3, groups=c, kernels=kernels, **kw)
        self.norm = layer_norm(c, **kw)
        self.pwconv1 = Pointwise(c, 4 * c, kernels=kernels, **kw)
        self.pwconv2 = Pointwise(4 * c, c, kernels=kernels, **kw)
        # torchvision's shape and init value (1e-6: a fresh block starts near the identity).
        self.layer_scale = nnx.Param(jnp.full((c, 1, 1), 1e-6, jnp.float32))

    def taps(self, x: jax.Array) -> Iterator[tuple[str, jax.Array]]:
        """Yields (".gelu", the hidden activation), (".pos", its positive part) and ("",
        block output), which reads the positive part (so `.pos` feeds the logits)."""
        h = jax.nn.gelu(self.pwconv1(self.norm(self.dwconv(x))), approximate=False)
        yield ".gelu", h
        pos, neg = positive_part(h)
        yield ".pos", pos
        gamma = self.layer_scale[...].reshape(-1).astype(x.dtype)
        yield "", x + gamma * self.pwconv2(pos + neg)   # pos + neg = h exactly


class Downsample(nnx.Module):
    """LayerNorm, then a 2×2 stride-2 conv to the next stage's width."""

    def __init__(self, cin: int, cout: int, *, dtype, kernels: Kernels, rngs: nnx.Rngs):
        self.norm = layer_norm(cin, dtype=dtype, rngs=rngs)
        self.conv = conv(cin, cout, 2, stride=2, kernels=kernels, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(self.norm(x))


class ConvNeXt(nnx.Module):
    def __init__(self, variant: str = "convnext_tiny", num_classes: int = 1000, *,
                 dtype=jnp.float32, kernels: Kernels = XLA, rngs: nnx.Rngs):
        self.dtype = dtype
        widths = WIDTHS[variant]
        kw = dict(dtype=dtype, rngs=rngs)
        self.stem_conv = conv(3, widths[0], 4, stride=4, kernels=kernels, **kw)
        self.stem_norm = layer_norm(widths[0], **kw)
        self.downs = nnx.List([Downsample(a, b, kernels=kernels, **kw)
                               for a, b in zip(widths, widths[1:])])
        self.blocks = nnx.List([nnx.List([Block(c, kernels=kernels, **kw) for _ in range(n)])
                                for c, n in zip(widths, DEPTHS[variant])])
        self.norm = layer_norm(widths[-1], **kw)
        self.fc = linear(widths[-1], num_classes, **kw)

    def _body(self, x: jax.Array) -> Iterator[tuple[str, jax.Array]]:
        for L, blocks in enumerate(self.blocks, 1):
            if L > 1:
                x = self.downs[L - 2](x)
                yield f"stage{L}.down", x
            for b, block in enumerate(blocks):
                for tap, h in block.taps(x):
                    yield f"stage{L}.{b}{tap}", h
                x = h
            yield f"stage{L}", x

    def stages(self, x: jax.Array) -> Iterator[tuple[str, jax.Array]]:
        """(B, H, W, 3) preprocessed images -> yields (name, activation) in forward order."""
        x = self.stem_norm(self.stem_conv(x.astype(self.dtype)))
        yield "stem", x
        for name, x in self._body(x):
            yield name, x
        x = adaptive_avg_pool(x, (1, 1))
        yield "avgpool", x
        x = self.norm(x)
        yield "norm", x
        logits = self.fc(x.reshape(x.shape[0], -1))
        yield "logits", logits.astype(jnp.promote_types(self.dtype, jnp.float32))
