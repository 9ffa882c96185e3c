"""Input validation shared by the metrics: bad input is a ValueError, never a silent zero."""
from __future__ import annotations

import numpy as np


def saliency_maps(saliency, name: str = "saliency") -> np.ndarray:
    """`(N, H, W)` finite float maps, or ValueError."""
    s = np.asarray(saliency)
    if s.ndim == 2:
        s = s[None]
    if s.ndim != 3 or s.shape[0] == 0 or min(s.shape[1:]) == 0:
        raise ValueError(f"{name} must be (N, H, W) maps; got shape {np.shape(saliency)}")
    if s.dtype.kind not in "fiub":
        raise ValueError(f"{name} must be numeric; got dtype {s.dtype}")
    s = s.astype(np.float64)
    if not np.isfinite(s).all():
        bad = np.flatnonzero(~np.isfinite(s).all(axis=(1, 2)))
        raise ValueError(f"{name} has NaN or Inf values in map(s) {bad[:10].tolist()}; "
                         "fix the method that produced them")
    return s


def masks(gt, shape: tuple[int, int, int], name: str = "ground truth") -> np.ndarray:
    """`(N, H, W)` boolean masks matching the maps' shape, none empty, or ValueError."""
    g = np.asarray(gt)
    if g.ndim == 2 and shape[0] == 1:
        g = g[None]
    if g.shape != shape:
        raise ValueError(f"{name} masks have shape {g.shape} but the saliency maps have {shape}; "
                         "resize one to the other (nearest for masks)")
    g = g.astype(bool)
    empty = np.flatnonzero(~g.any(axis=(1, 2)))
    if empty.size:
        raise ValueError(f"{name} is empty for map(s) {empty[:10].tolist()}; "
                         "drop those images, a metric on them is undefined")
    return g


def boxes(gt, n: int, hw: tuple[int, int]) -> list[np.ndarray]:
    """N lists of `(K, 4)` integer boxes (x0, y0, x1, y1), inclusive pixel corners, inside the
    `(H, W)` image and non-empty, or ValueError."""
    if len(gt) != n:
        raise ValueError(f"got ground-truth boxes for {len(gt)} images but {n} saliency maps")
    H, W = hw
    out = []
    for i, b in enumerate(gt):
        b = np.asarray(b, np.float64).reshape(-1, 4) if np.size(b) else np.zeros((0, 4))
        if b.shape[0] == 0:
            raise ValueError(f"image {i} has no ground-truth box; drop it, its localization "
                             "is undefined")
        x0, y0, x1, y1 = b.T
        if (x1 < x0).any() or (y1 < y0).any():
            raise ValueError(f"image {i}: boxes must be (x0, y0, x1, y1) with x0 <= x1 and "
                             f"y0 <= y1; got {b.tolist()}")
        if (x0 < 0).any() or (y0 < 0).any() or (x1 > W - 1).any() or (y1 > H - 1).any():
            raise ValueError(f"image {i}: box {b.tolist()} lies outside the {H}×{W} map "
                             "(boxes are inclusive pixel coordinates in the saliency map's "
                             "frame; rescale them with the image)")
        out.append(b)
    return out


def images_and_maps(images, saliency) -> tuple[np.ndarray, np.ndarray]:
    """`(B, H, W, C)` float32 images and their `(B, H, W)` maps, or ValueError."""
    x = np.asarray(images, np.float32)
    s = saliency_maps(saliency)
    if x.ndim != 4 or x.shape[:3] != s.shape:
        raise ValueError(f"images {x.shape} and saliency {s.shape} must be (B, H, W, C) and "
                         "(B, H, W) of the same B, H, W (upsample the maps to the images)")
    return x, s
