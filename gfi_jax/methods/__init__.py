"""Attribution methods behind one interface, for comparing explanations at scale.

>>> sal = gfi_jax.attribute(m, images, method="integrated_gradients", steps=32)   # (B, H, W)

Each method is a frozen config dataclass plus a pure function
`(features, params, images (B, H, W, 3), targets (B,), cfg) -> (B, H, W)`; `attribute`
validates the inputs, resolves model-dependent defaults, and runs the function jitted once
per (model, config) and input shape. `gfi` goes through `gfi_jax.explain`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import numpy as np

from gfi_jax import gfi as _gfi
from gfi_jax.methods.baselines import CenterConfig, GfiConfig, center
from gfi_jax.methods.cam import GAP_MODELS, CamConfig, GradCamConfig, cam, gradcam
from gfi_jax.methods.gradients import (GradConfig, GuidedBackpropConfig, IntegratedGradientsConfig,
                                       SmoothGradConfig, grad, guided_backprop,
                                       integrated_gradients, smoothgrad)
from gfi_jax.methods.perturbation import (MeaningfulPerturbationConfig, RiseConfig,
                                          meaningful_perturbation, rise)


@dataclasses.dataclass(frozen=True)
class Method:
    """A registered method: its config class and pure function."""
    name: str
    config: type
    fn: Callable | None            # None: runs through its own front end (gfi)
    description: str


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("grad", GradConfig, grad, "vanilla gradient (Simonyan et al. 2014)"),
    Method("guided_backprop", GuidedBackpropConfig, guided_backprop,
           "Guided Backprop (Springenberg et al. 2015)"),
    Method("smoothgrad", SmoothGradConfig, smoothgrad, "SmoothGrad (Smilkov et al. 2017)"),
    Method("integrated_gradients", IntegratedGradientsConfig, integrated_gradients,
           "Integrated Gradients (Sundararajan et al. 2017)"),
    Method("gradcam", GradCamConfig, gradcam, "Grad-CAM (Selvaraju et al. 2017)"),
    Method("cam", CamConfig, cam, "CAM (Zhou et al. 2016), global-average-pooling models"),
    Method("rise", RiseConfig, rise, "RISE (Petsiuk et al. 2018)"),
    Method("meaningful_perturbation", MeaningfulPerturbationConfig, meaningful_perturbation,
           "Meaningful Perturbation / Mask (Fong & Vedaldi 2017)"),
    Method("center", CenterConfig, center, "centered Gaussian (trivial baseline)"),
    Method("gfi", GfiConfig, None, "Guided Feature Inversion (Du et al. 2018)"),
)}


def make_config(method: str, model=None, **config) -> Any:
    """The method's config with `config` fields set and model-dependent defaults resolved."""
    meth = get_method(method)
    if meth.name == "gfi":
        return GfiConfig(config.pop("preset", None), tuple(sorted(config.items())))
    fields = {f.name for f in dataclasses.fields(meth.config)}
    unknown = set(config) - fields
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)} for method {meth.name!r}; "
                         f"options: {', '.join(sorted(fields)) or 'none'}")
    cfg = meth.config(**config)
    if meth.name in ("gradcam", "cam") and model is not None:
        cfg = _resolve_layer(meth.name, model, cfg)
    return cfg


def _resolve_layer(name: str, model, cfg):
    # The record itself, not the LAST_CONV / GAP_MODELS views: a record added after import
    # (a test's small ViT) has no entry in them.
    arch, last = model.arch.name, model.arch.cam_layer
    if name == "cam":
        if not model.arch.gap:
            raise ValueError(f"CAM needs a model that ends in global average pooling + one "
                             f"linear layer ({', '.join(GAP_MODELS)}); {arch} does not. "
                             "Use method='gradcam' instead")
        layer = model.arch.resolve(cfg.layer or last)
        if layer != last:
            raise ValueError(f"CAM weighs the map that feeds the average pooling, "
                             f"{last!r} for {arch}; got layer {cfg.layer!r}")
    else:
        layer = model.arch.resolve(cfg.layer or last)
    return dataclasses.replace(cfg, layer=layer)


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}") from None


@functools.lru_cache(maxsize=64)
def compiled(name: str, features: Callable, cfg: Any) -> Callable:
    """The jitted `(params, images, targets) -> (B, H, W)` of one method, model and config.

    `features` stands for the model and its layer kernels (`LoadedModel.kernels`, fixed in
    its graphdef), so a model with other kernels is another key."""
    return jax.jit(functools.partial(METHODS[name].fn, features, cfg=cfg))


def targets_array(targets, batch: int, num_classes: int) -> np.ndarray:
    """None | "top1" | "rankK" | int | one int per image -> `(B,)` int32 (−k: k-th ranked)."""
    t = _gfi._targets_array(targets, batch, num_classes)
    if t.shape[1] != 1:
        raise ValueError(f"attribute explains one target per image; got {targets!r} "
                         "(call it once per target instead)")
    return t[:, 0]


def attribute(m, images, method: str = "gfi", targets=None, **config) -> np.ndarray:
    """Saliency `(B, H, W)` float32 of `method` for preprocessed `images` `(B, H, W, 3)`.

    m: a `gfi_jax.LoadedModel`. targets: None or "top1" (each image's top class), "rankK",
    one class index for all images, or one per image. config: the method's options (see
    `METHODS[method].config`), e.g. `steps=32` for integrated_gradients; for "gfi" a
    `preset` name and any `gfi_jax.Config` field.
    """
    meth = get_method(method)
    images = np.asarray(images, np.float32)
    m.check_images(images)
    if not np.isfinite(images).all():
        raise ValueError("images contain NaN or Inf pixels; check the decoding and preprocessing")
    cfg = make_config(meth.name, m, **config)
    t = targets_array(targets, images.shape[0], len(m.classes))
    if meth.name == "gfi":
        gcfg = _gfi.preset(cfg.preset, arch=m.arch.name, **dict(cfg.overrides))
        return _gfi.explain(m, images, targets, preset=gcfg).mask
    out = compiled(meth.name, m.features, cfg)(m.params, images, t)
    return np.asarray(jax.device_get(out), np.float32)


__all__ = ["METHODS", "Method", "attribute", "compiled", "get_method", "make_config",
           "targets_array", "CamConfig", "CenterConfig", "GfiConfig", "GradCamConfig",
           "GradConfig", "GuidedBackpropConfig", "IntegratedGradientsConfig",
           "MeaningfulPerturbationConfig", "RiseConfig", "SmoothGradConfig"]
