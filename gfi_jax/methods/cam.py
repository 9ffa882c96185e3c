"""Class activation maps: Grad-CAM (Selvaraju et al. 2017) and CAM (Zhou et al. 2016).

Both weigh the channels of a layer A `(B, h, w, C)` (any layer `features` returns; usually
the last conv map) and upsample the `(h, w)` map to the input bilinearly (PyTorch's
`F.interpolate(mode="bilinear")` grid, the one Captum's `LayerAttribution.interpolate` uses).
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


def declared_layer(features: Features, method: str) -> str:
    """The layer `method` ("gradcam" or "cam") uses when its config names none: a zoo model's
    record's `cam_layer` (`LoadedModel.features` is a bound method, so its model is known),
    else a `cam_layer` attribute on `features` or its owner; ValueError when there is none."""
    owner = getattr(features, "__self__", None)
    arch = getattr(owner, "arch", None)
    if hasattr(arch, "cam_layer"):
        if method == "cam" and not arch.gap:
            raise ValueError(f"CAM needs a model that ends in global average pooling + one "
                             f"linear layer ({', '.join(GAP_MODELS)}); {arch.name} does not. "
                             "Use method='gradcam' instead")
        return arch.cam_layer
    layer = getattr(features, "cam_layer", None) or getattr(owner, "cam_layer", None)
    if layer is None:
        raise ValueError(f"{'CAM' if method == 'cam' else 'Grad-CAM'} needs a layer and this "
                         "model declares no default; name one that its features function "
                         "returns, e.g. layer='conv3'")
    return layer


@dataclasses.dataclass(frozen=True)
class GradCamConfig:
    layer: str | None = None     # None: the model's declared layer (`declared_layer`)
    relu: bool = True            # the paper's ReLU on the weighted sum


def gradcam(features: Features, params: Any, images: jax.Array, targets: jax.Array,
            cfg: GradCamConfig) -> jax.Array:
    """Grad-CAM: αc = mean over (h, w) of ∂ logit_t/∂A_c; map = ReLU(Σc αc A_c), upsampled."""
    layer = cfg.layer or declared_layer(features, "gradcam")
    a, g, _ = layer_gradient(features, params, images, targets, layer)
    alpha = g.mean(axis=(1, 2))
    cam = jnp.einsum("bhwc,bc->bhw", a.astype(jnp.float32), alpha,
                     precision=jax.lax.Precision.HIGHEST)
    if cfg.relu:
        cam = jax.nn.relu(cam)
    return upsample(cam, images.shape[1:3], align_corners=False)


@dataclasses.dataclass(frozen=True)
class CamConfig:
    layer: str | None = None     # None: the model's declared layer (`declared_layer`), for
                                 # a zoo model the map that feeds the global average pooling
    relu: bool = False           # Zhou et al. show the raw weighted sum


def cam(features: Features, params: Any, images: jax.Array, targets: jax.Array,
        cfg: CamConfig) -> jax.Array:
    """CAM: Σc w_{t,c} A_c with w the classifier weights, upsampled.

    For A → global average pooling → linear, ∂ logit_t/∂A_c(i, j) = w_{t,c}/(h·w) at every
    position, so the classifier weights are read off the layer gradient: no per-architecture
    parameter paths.
    """
    layer = cfg.layer or declared_layer(features, "cam")
    a, g, _ = layer_gradient(features, params, images, targets, layer)
    h, w = a.shape[1:3]
    weights = g.mean(axis=(1, 2)) * (h * w)
    m = jnp.einsum("bhwc,bc->bhw", a.astype(jnp.float32), weights,
                   precision=jax.lax.Precision.HIGHEST)
    if cfg.relu:
        m = jax.nn.relu(m)
    return upsample(m, images.shape[1:3], align_corners=False)
