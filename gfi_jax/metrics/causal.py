"""Deletion and insertion (Petsiuk et al. 2018): how fast the class probability falls as the
most salient pixels are removed, or rises as they are put back."""
from __future__ import annotations

from typing import Callable

import jax
import numpy as np

from gfi_jax.gfi import gaussian_blur
from gfi_jax.metrics import checks


def make_substrate(images: np.ndarray, kind: str, blur_sigma: float = 5.0) -> np.ndarray:
    """What removed pixels become: "zero" (0 in the model's input space, e.g. the mean colour
    after normalization) or "blur" (a Gaussian blur of the image, σ in pixels)."""
    if kind == "zero":
        return np.zeros_like(images)
    if kind == "blur":
        return np.asarray(jax.jit(gaussian_blur, static_argnums=1)(images, blur_sigma))
    raise ValueError(f"substrate {kind!r} not understood; use 'blur' or 'zero'")


def pixel_ranks(s: np.ndarray) -> np.ndarray:
    """`(B, H, W)` rank of each pixel by decreasing value (0: the largest; ties row-major)."""
    B, H, W = s.shape
    order = np.argsort(-s.reshape(B, -1), axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(H * W)[None].repeat(B, 0), axis=1)
    return rank.reshape(B, H, W)


def auc(curves: np.ndarray) -> np.ndarray:
    """Trapezoid area under `(N, n+1)` curves sampled evenly on [0, 1]."""
    c = np.asarray(curves, np.float64)
    return (c.sum(-1) - (c[..., 0] + c[..., -1]) / 2) / (c.shape[-1] - 1)


def deletion_insertion(model: Callable, images, saliency, targets=None, mode: str = "deletion",
                       substrate: str = "blur", steps: int = 112,
                       blur_sigma: float = 5.0) -> dict:
    """Deletion or insertion curves and AUCs for a batch.

    model: images `(B, H, W, 3)` -> class probabilities `(B, classes)` (jit it yourself).
    images `(B, H, W, 3)` preprocessed; saliency `(B, H, W)`; targets `(B,)` ints or None
    (each image's top class). Pixels are ranked by decreasing saliency (ties: row-major
    order); at step k of `steps`, the first ⌈k·H·W/steps⌉ are replaced by the substrate
    (deletion) or copied from the image onto the substrate (insertion). The model sees one
    batch of B images per step. Returns {"curves" (B, steps+1), "auc" (B,), "mean_auc"}.
    """
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode {mode!r} not understood; use 'deletion' or 'insertion'")
    x, s = checks.images_and_maps(images, saliency)
    if steps < 1:
        raise ValueError(f"steps must be >= 1; got {steps}")
    B, H, W = s.shape
    base = make_substrate(x, substrate, blur_sigma)
    start, end = (x, base) if mode == "deletion" else (base, x)
    rank = pixel_ranks(s)[..., None]
    if targets is None:
        targets = np.asarray(model(x)).argmax(1)
    t = np.asarray(targets).reshape(-1)
    if t.shape != (B,):
        raise ValueError(f"targets must be one class per image ({B}); got shape {t.shape}")
    curves = np.empty((B, steps + 1))
    for k in range(steps + 1):
        n = -(-k * H * W // steps)
        probs = np.asarray(model(np.where(rank < n, end, start)))
        curves[:, k] = probs[np.arange(B), t]
    a = auc(curves)
    return {"curves": curves, "auc": a, "mean_auc": float(a.mean())}
