"""Weakly supervised localization (the GFI paper's protocol, Sec. 4.2) and pointing games."""
from __future__ import annotations

from collections import defaultdict

import numpy as np

from gfi_jax.metrics import checks

ALPHAS = np.arange(0, 10.01, 0.5)   # 0:0.5:10


def tight_boxes(saliency, alphas=ALPHAS) -> tuple[np.ndarray, np.ndarray]:
    """The tightest box around all pixels with saliency >= α·mean(saliency), per map and α.

    Returns (boxes `(N, A, 4)` int (x0, y0, x1, y1) inclusive, valid `(N, A)` bool: False
    where no pixel survives). A row holds a surviving pixel iff its maximum does, so only
    row and column maxima are compared with the thresholds.
    """
    s = checks.saliency_maps(saliency)
    if s.min() < 0:
        raise ValueError("localization thresholds at α·mean, which needs non-negative maps; "
                         "pass |saliency| (or clip at 0) for signed methods")
    thr = s.mean(axis=(1, 2))[:, None] * np.asarray(alphas, np.float64)[None]   # (N, A)
    rows = s.max(axis=2)[:, None, :] >= thr[..., None]                           # (N, A, H)
    cols = s.max(axis=1)[:, None, :] >= thr[..., None]                           # (N, A, W)
    valid = rows.any(-1)
    H, W = s.shape[1:]
    y0, y1 = rows.argmax(-1), H - 1 - rows[..., ::-1].argmax(-1)
    x0, x1 = cols.argmax(-1), W - 1 - cols[..., ::-1].argmax(-1)
    return np.stack([x0, y0, x1, y1], -1), valid


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of inclusive-pixel boxes `(..., 4)` (broadcasting)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    iw = np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]) + 1
    ih = np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]) + 1
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    area = lambda c: (c[..., 2] - c[..., 0] + 1) * (c[..., 3] - c[..., 1] + 1)  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def localization_error(saliency, gt_boxes, alphas=ALPHAS, iou: float = 0.5) -> dict:
    """Weakly supervised localization error per α.

    saliency `(N, H, W)`; gt_boxes: N sequences of (x0, y0, x1, y1) inclusive pixel boxes in
    the maps' frame. An image is localized at α when its box has IoU >= `iou` with any of its
    ground-truth boxes (no surviving pixel: not localized). Returns {"alphas" (A,),
    "error" (A,) fraction not localized, "correct" (N, A) bool, "iou" (N, A) best IoU}.
    """
    s = checks.saliency_maps(saliency)
    gts = checks.boxes(gt_boxes, s.shape[0], s.shape[1:])
    pred, valid = tight_boxes(s, alphas)
    k = max(len(g) for g in gts)
    gt = np.full((len(gts), k, 4), np.nan)
    for i, g in enumerate(gts):
        gt[i, :len(g)] = g
    ious = box_iou(pred[:, :, None, :], gt[:, None, :, :])              # (N, A, K), NaN pads
    best = np.where(valid, np.nanmax(ious, axis=-1), 0.0)
    correct = valid & (best >= iou)
    return {"alphas": np.asarray(alphas, np.float64), "error": 1.0 - correct.mean(0),
            "correct": correct, "iou": best}


def pointing_game(saliency, gt_masks, labels, tolerance: int = 15, difficult=None) -> dict:
    """Pointing game (Zhang et al. 2016; TorchRay's protocol).

    A hit when the arg-max of the map (the first in row-major order on ties) lies within
    `tolerance` pixels (Euclidean; 0: on the mask itself) of the object's mask. One row per
    (image, class) pair: saliency `(N, H, W)`, gt_masks `(N, H, W)` bool, labels `(N,)`.
    difficult: optional `(N,)` bool, the subset also scored on its own.

    Returns {"hits" (N,) bool, "accuracy" overall, "class_accuracy" {label: acc},
    "mean_class_accuracy" (the paper's number)} and the same keys prefixed "difficult_".
    """
    s = checks.saliency_maps(saliency)
    g = checks.masks(gt_masks, s.shape)
    labels = np.asarray(labels)
    if labels.shape != (s.shape[0],):
        raise ValueError(f"labels must be one per map ({s.shape[0]}); got shape {labels.shape}")
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0 pixels; got {tolerance}")
    N, H, W = s.shape
    flat = s.reshape(N, -1).argmax(1)
    py, px = np.divmod(flat, W)
    yy, xx = np.arange(H)[None, :, None], np.arange(W)[None, None, :]
    near = (yy - py[:, None, None]) ** 2 + (xx - px[:, None, None]) ** 2 <= tolerance ** 2
    hits = (near & g).any(axis=(1, 2))
    out = {"hits": hits, **_accuracies(hits, labels)}
    if difficult is not None:
        d = np.asarray(difficult, bool)
        if d.shape != (N,):
            raise ValueError(f"difficult must be one bool per map ({N}); got shape {d.shape}")
        if not d.any():
            raise ValueError("difficult flags no map; pass difficult=None instead")
        out.update({f"difficult_{k}": v for k, v in _accuracies(hits[d], labels[d]).items()})
    return out


def _accuracies(hits: np.ndarray, labels: np.ndarray) -> dict:
    per = defaultdict(list)
    for h, c in zip(hits.tolist(), labels.tolist()):
        per[c].append(h)
    cls = {c: float(np.mean(v)) for c, v in sorted(per.items())}
    return {"accuracy": float(hits.mean()), "class_accuracy": cls,
            "mean_class_accuracy": float(np.mean(list(cls.values())))}
