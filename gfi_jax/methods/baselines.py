"""The trivial baseline (Center) and GFI itself in the methods registry."""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from gfi_jax.methods.common import Features


@dataclasses.dataclass(frozen=True)
class CenterConfig:
    sigma: float = 0.25          # standard deviation as a fraction of min(H, W)


def center(features: Features, params: Any, images: jax.Array, targets: jax.Array,
           cfg: CenterConfig) -> jax.Array:
    """A centered isotropic Gaussian, the same for every image: the "no model" baseline that
    every localization score should beat."""
    B, H, W, _ = images.shape
    s = cfg.sigma * min(H, W)
    y = (jnp.arange(H, dtype=jnp.float32) - (H - 1) / 2) ** 2
    x = (jnp.arange(W, dtype=jnp.float32) - (W - 1) / 2) ** 2
    g = jnp.exp(-(y[:, None] + x[None, :]) / (2 * s * s))
    return jnp.broadcast_to(g, (B, H, W))


@dataclasses.dataclass(frozen=True)
class GfiConfig:
    preset: str | None = None          # None: the model's default (gfi.default_preset)
    overrides: tuple[tuple[str, Any], ...] = ()   # gfi.Config fields, e.g. (("l1", "conv5_3"),)
