"""Vision Transformer (torchvision's `vit_b_16`, or any `VisionTransformer` config), NHWC in.

The image is cut into p×p patches (a stride-p conv), a class token is prepended, a learned
position embedding added, then `num_layers` pre-LayerNorm encoder blocks (multi-head
self-attention, then an MLP with exact GELU) and a final LayerNorm; the head reads the class
token. The position embedding has one row per patch of `image_size`², so a model takes that
input size only (no interpolation).

Layer names: `patches` (the patch embedding as a `(B, h, w, D)` grid), `tokens` (the token
sequence entering block 0, `(B, 1 + h·w, D)`), per block `blocks.{i}.mlp` (the MLP's hidden
activation after GELU, `(B, 1 + h·w, M)`) and `blocks.{i}` (the block output, `(B, 1 + h·w, D)`),
`encoder` (after the final LayerNorm), `cls` (its class token, `(B, D)`), `logits`.

Token grids. GFI's mask basis and the CAM methods weigh the channels of a spatial map
`(B, h, w, C)`, so two views per block read the patch tokens (class token dropped) as the
h×w grid they came from (`tokens_to_grid`):
  `blocks.{i}.grid`  the block output's patch tokens `(B, h, w, D)` (Grad-CAM's layer);
  `blocks.{i}.pos`   the positive part max(GELU(·), 0) of the MLP hidden's patch tokens
                     `(B, h, w, M)`. GELU dips to −0.17, and the mask basis must be
                     non-negative (ω ≥ 0 weighs channels that are present), hence the clip.
Both views lie on the forward path: the network continues from the grid (`grid_to_tokens`),
so a cut at a view (Grad-CAM's ∂logit/∂A, GFI's gradient start of stage 2) sees the real
gradient; the values computed are unchanged.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from gfi_jax.models import torch_keys as tk
from gfi_jax.models.cpu_kernels import XLA, Kernels
from gfi_jax.models.layers import (Dense, conv, grid_to_tokens, linear, positive_part,
                                    tokens_to_grid)

EPS = 1e-6   # torchvision's LayerNorm eps for ViT


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """torchvision `VisionTransformer(image_size, patch_size, num_layers, num_heads,
    hidden_dim, mlp_dim)`; hidden_dim must divide by num_heads."""
    image_size: int = 224
    patch_size: int = 16
    num_layers: int = 12
    num_heads: int = 12
    hidden_dim: int = 768
    mlp_dim: int = 3072

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


VIT_B_16 = ViTConfig()


def layer_names(cfg: ViTConfig) -> tuple[str, ...]:
    blocks = [f"blocks.{i}{t}" for i in range(cfg.num_layers)
              for t in (".mlp", ".pos", "", ".grid")]
    return ("patches", "tokens", *blocks, "encoder", "cls", "logits")


def torch_aliases(cfg: ViTConfig) -> dict[str, str]:
    out = {"conv_proj": "patches", "encoder.ln": "encoder", "heads": "logits",
           "heads.head": "logits"}
    for i in range(cfg.num_layers):
        t = f"encoder.layers.encoder_layer_{i}"
        out |= {t: f"blocks.{i}", f"{t}.mlp.1": f"blocks.{i}.mlp"}
    return out


def torch_keys(cfg: ViTConfig) -> list[tk.Rule]:
    """torchvision's state_dict keys -> our params. The attention's fused q/k/v projection
    is `in_proj_weight` (3D, D), a Linear's layout."""
    rules = tk.conv("conv_proj", "conv_proj") + [
        ("class_token", "class_token", "copy"),
        ("encoder.pos_embedding", "pos_embedding", "copy")]
    for i in range(cfg.num_layers):
        t, f = f"encoder.layers.encoder_layer_{i}", f"blocks/{i}"
        rules += layer_norm(f"{t}.ln_1", f"{f}/ln_1") + [
            (f"{t}.self_attention.in_proj_weight", f"{f}/qkv/kernel", "linear"),
            (f"{t}.self_attention.in_proj_bias", f"{f}/qkv/bias", "copy")]
        rules += tk.linear(f"{t}.self_attention.out_proj", f"{f}/out")
        rules += layer_norm(f"{t}.ln_2", f"{f}/ln_2")
        rules += tk.linear(f"{t}.mlp.0", f"{f}/fc1") + tk.linear(f"{t}.mlp.3", f"{f}/fc2")
    return rules + layer_norm("encoder.ln", "ln") + tk.linear("heads.head", "head")


def layer_norm(t: str, f: str) -> list[tk.Rule]:
    return [(f"{t}.weight", f"{f}/scale", "copy"), (f"{t}.bias", f"{f}/bias", "copy")]


class LayerNorm(nnx.Module):
    """`torch.nn.LayerNorm` over the last axis: two-pass variance, as PyTorch computes it.

    Not `nnx.LayerNorm`: its default one-pass variance is clipped with max(0, ·), which
    Guided Backprop's rectifier search would take for a ReLU of the network."""

    def __init__(self, d: int, *, dtype):
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((d,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((d,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        y = (x - mean) * lax.rsqrt(var + EPS)
        return y * self.scale[...].astype(self.dtype) + self.bias[...].astype(self.dtype)


class TokenDense(Dense):
    """A Linear on `(B, N, in)` tokens, each image's result independent of the batch (the
    product as a 1×1 convolution over an N-wide row, as `layers.Dense` does per row)."""

    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel[...].astype(self.dtype)
        y = lax.conv_general_dilated(x.astype(self.dtype)[:, None], k[None, None], (1, 1),
                                     "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))[:, 0]
        return y + self.bias[...].astype(self.dtype)


def token_linear(cin: int, cout: int, *, dtype, rngs: nnx.Rngs) -> TokenDense:
    return TokenDense(cin, cout, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


class Block(nnx.Module):
    """torchvision's EncoderBlock: x + MHA(LN₁ x), then + MLP(LN₂ ·) with exact GELU."""

    def __init__(self, cfg: ViTConfig, *, dtype, rngs):
        d, kw = cfg.hidden_dim, dict(dtype=dtype, rngs=rngs)
        self.heads = cfg.num_heads
        self.ln_1 = LayerNorm(d, dtype=dtype)
        self.qkv = token_linear(d, 3 * d, **kw)
        self.out = token_linear(d, d, **kw)
        self.ln_2 = LayerNorm(d, dtype=dtype)
        self.fc1 = token_linear(d, cfg.mlp_dim, **kw)
        self.fc2 = token_linear(cfg.mlp_dim, d, **kw)

    def attention(self, x: jax.Array) -> jax.Array:
        b, n, d = x.shape
        q, k, v = jnp.split(self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads), 3, 2)
        q, k, v = (a[:, :, 0].transpose(0, 2, 1, 3) for a in (q, k, v))   # (B, heads, N, dh)
        s = jnp.einsum("bhqd,bhkd->bhqk", q * (d // self.heads) ** -0.5, k)
        o = jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, axis=-1), v)
        return self.out(o.transpose(0, 2, 1, 3).reshape(b, n, d))

    def taps(self, x: jax.Array, hw: tuple[int, int]) -> Iterator[tuple[str, jax.Array]]:
        """Yields (".mlp", ·), (".pos", ·), ("", block output), (".grid", ·), then ("next",
        the block output rebuilt from its grid): what the next block reads, so that the grid
        view feeds the rest of the network."""
        x = x + self.attention(self.ln_1(x))
        h = jax.nn.gelu(self.fc1(self.ln_2(x)), approximate=False)
        yield ".mlp", h
        pos, neg = positive_part(h)
        grid = tokens_to_grid(pos, hw)
        yield ".pos", grid
        x = x + self.fc2(grid_to_tokens(pos[:, :1], grid) + neg)   # = fc2(h), from the grid
        yield "", x
        grid = tokens_to_grid(x, hw)
        yield ".grid", grid
        yield "next", grid_to_tokens(x[:, :1], grid)               # = x, from the grid


class ViT(nnx.Module):
    def __init__(self, cfg: ViTConfig = VIT_B_16, num_classes: int = 1000, *,
                 dtype=jnp.float32, kernels: Kernels = XLA, rngs: nnx.Rngs):
        if cfg.hidden_dim % cfg.num_heads:
            raise ValueError(f"ViT hidden_dim {cfg.hidden_dim} must divide by num_heads "
                             f"{cfg.num_heads}; choose another head count")
        self.cfg, self.dtype = cfg, dtype
        d, kw = cfg.hidden_dim, dict(dtype=dtype, rngs=rngs)
        self.conv_proj = conv(3, d, cfg.patch_size, stride=cfg.patch_size, kernels=kernels, **kw)
        self.class_token = nnx.Param(jnp.zeros((1, 1, d), jnp.float32))
        self.pos_embedding = nnx.Param(
            jax.random.normal(rngs.params(), (1, 1 + cfg.grid ** 2, d), jnp.float32) * 0.02)
        self.blocks = nnx.List([Block(cfg, **kw) for _ in range(cfg.num_layers)])
        self.ln = LayerNorm(d, dtype=dtype)
        self.head = linear(d, num_classes, **kw)

    def check_size(self, x: jax.Array) -> None:
        s = self.cfg.image_size
        if tuple(x.shape[1:3]) != (s, s):
            raise ValueError(f"this ViT takes {s}×{s} images only (its position embedding is "
                             f"fixed); got {x.shape[1]}×{x.shape[2]}: resize or crop to {s}")

    def stages(self, x: jax.Array) -> Iterator[tuple[str, jax.Array]]:
        """(B, H, W, 3) preprocessed images -> yields (name, activation) in forward order."""
        self.check_size(x)
        p = self.conv_proj(x.astype(self.dtype))
        yield "patches", p
        b, h, w, d = p.shape
        cls = jnp.broadcast_to(self.class_token[...].astype(self.dtype), (b, 1, d))
        x = grid_to_tokens(cls, p) + self.pos_embedding[...].astype(self.dtype)
        yield "tokens", x
        for i, block in enumerate(self.blocks):
            for tap, a in block.taps(x, (h, w)):
                if tap == "next":
                    x = a
                else:
                    yield f"blocks.{i}{tap}", a
        x = self.ln(x)
        yield "encoder", x
        yield "cls", x[:, 0]
        logits = self.head(x[:, 0])
        yield "logits", logits.astype(jnp.promote_types(self.dtype, jnp.float32))
