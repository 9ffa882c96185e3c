"""Class activation maps: Grad-CAM (Selvaraju et al. 2017) and CAM (Zhou et al. 2016).

Both weigh the channels of a rectified conv layer A `(B, h, w, C)` and upsample the `(h, w)`
map to the input bilinearly (PyTorch's `F.interpolate(mode="bilinear")` grid, the one
Captum's `LayerAttribution.interpolate` uses).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from gfi_jax.gfi import upsample
from gfi_jax.methods.common import Features, layer_gradient
from gfi_jax.models import ARCHS

# Views of the registry records: each architecture's last rectified conv map (Grad-CAM's
# usual layer and, for the global-average-pooling models, the map that CAM weighs with the
# classifier), and the models CAM applies to.
LAST_CONV = {name: a.cam_layer for name, a in ARCHS.items()}
GAP_MODELS = tuple(name for name, a in ARCHS.items() if a.gap)


@dataclasses.dataclass(frozen=True)
class GradCamConfig:
    layer: str | None = None     # None: the architecture's last conv layer (LAST_CONV)
    relu: bool = True            # the paper's ReLU on the weighted sum


def gradcam(features: Features, params: Any, images: jax.Array, targets: jax.Array,
            cfg: GradCamConfig) -> jax.Array:
    """Grad-CAM: αc = mean over (h, w) of ∂ logit_t/∂A_c; map = ReLU(Σc αc A_c), upsampled."""
    a, g, _ = layer_gradient(features, params, images, targets, cfg.layer)
    alpha = g.mean(axis=(1, 2))
    cam = jnp.einsum("bhwc,bc->bhw", a.astype(jnp.float32), alpha,
                     precision=jax.lax.Precision.HIGHEST)
    if cfg.relu:
        cam = jax.nn.relu(cam)
    return upsample(cam, images.shape[1:3], align_corners=False)


@dataclasses.dataclass(frozen=True)
class CamConfig:
    layer: str | None = None     # None: the map that feeds the global average pooling
    relu: bool = False           # Zhou et al. show the raw weighted sum


def cam(features: Features, params: Any, images: jax.Array, targets: jax.Array,
        cfg: CamConfig) -> jax.Array:
    """CAM: Σc w_{t,c} A_c with w the classifier weights, upsampled.

    For A → global average pooling → linear, ∂ logit_t/∂A_c(i, j) = w_{t,c}/(h·w) at every
    position, so the classifier weights are read off the layer gradient: no per-architecture
    parameter paths.
    """
    a, g, _ = layer_gradient(features, params, images, targets, cfg.layer)
    h, w = a.shape[1:3]
    weights = g.mean(axis=(1, 2)) * (h * w)
    m = jnp.einsum("bhwc,bc->bhw", a.astype(jnp.float32), weights,
                   precision=jax.lax.Precision.HIGHEST)
    if cfg.relu:
        m = jax.nn.relu(m)
    return upsample(m, images.shape[1:3], align_corners=False)
