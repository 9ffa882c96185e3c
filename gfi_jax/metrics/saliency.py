"""Salient-object detection scores (Achanta et al. 2009's adaptive threshold, F_β, MAE)."""
from __future__ import annotations

import numpy as np

from gfi_jax.metrics import checks


def salient_object(saliency, gt_masks, beta2: float = 0.3) -> dict:
    """Per map: binarize at the adaptive threshold min(2·mean, 1), then precision, recall,
    F_β = (1+β²)PR / (β²P + R) with β² = 0.3, and MAE = mean|s − gt|.

    saliency `(N, H, W)` in [0, 1] (normalize first: MAE depends on the scale); gt_masks
    `(N, H, W)` bool, none empty. An empty prediction has precision 0 (and so F 0).
    Returns per-map arrays "precision", "recall", "f", "mae" (N,) and their means "mean_*".
    """
    s = checks.saliency_maps(saliency)
    if s.min() < 0 or s.max() > 1:
        raise ValueError(f"salient-object scores need maps in [0, 1]; got range "
                         f"[{s.min():.3g}, {s.max():.3g}] (min-max normalize each map first)")
    g = checks.masks(gt_masks, s.shape)
    thr = np.minimum(2 * s.mean(axis=(1, 2)), 1.0)[:, None, None]
    pred = s >= thr
    tp = (pred & g).sum(axis=(1, 2)).astype(np.float64)
    npred = pred.sum(axis=(1, 2))
    precision = np.divide(tp, npred, out=np.zeros_like(tp), where=npred > 0)
    recall = tp / g.sum(axis=(1, 2))
    den = beta2 * precision + recall
    f = np.divide((1 + beta2) * precision * recall, den, out=np.zeros_like(tp), where=den > 0)
    mae = np.abs(s - g).mean(axis=(1, 2))
    out = {"precision": precision, "recall": recall, "f": f, "mae": mae}
    return {**out, **{f"mean_{k}": float(v.mean()) for k, v in out.items()}}
