"""The grid pointing game (Böhle et al. 2022, "B-cos networks"): explain one class of a 2×2
mosaic of confidently classified images of four different classes."""
from __future__ import annotations

import numpy as np

from gfi_jax.metrics import checks


def select_grids(probs, labels, n: int, min_confidence: float = 0.5, seed: int = 0) -> np.ndarray:
    """`(n, 4)` indices of images forming mosaics: each correctly classified with probability
    >= min_confidence, four different classes per mosaic, drawn at random (seeded)."""
    p, y = np.asarray(probs), np.asarray(labels)
    ok = (p.argmax(1) == y) & (p[np.arange(len(y)), y] >= min_confidence)
    pool = np.flatnonzero(ok)
    if len(np.unique(y[pool])) < 4:
        raise ValueError(f"need confidently classified images of at least 4 classes; "
                         f"{len(pool)} images of {len(np.unique(y[pool]))} classes pass "
                         f"min_confidence={min_confidence}")
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        idx = []
        for i in rng.permutation(pool):
            if y[i] not in y[idx]:
                idx.append(i)
                if len(idx) == 4:
                    break
        out.append(idx)
    return np.asarray(out, np.int64)


def mosaic(images) -> np.ndarray:
    """`(M, 4, H, W, C)` -> `(M, 2H, 2W, C)`: cells 0 1 / 2 3 (row-major)."""
    x = np.asarray(images)
    if x.ndim != 5 or x.shape[1] != 4:
        raise ValueError(f"mosaic needs (M, 4, H, W, C) images; got shape {x.shape}")
    top = np.concatenate([x[:, 0], x[:, 1]], axis=2)
    bottom = np.concatenate([x[:, 2], x[:, 3]], axis=2)
    return np.concatenate([top, bottom], axis=1)


def grid_pointing(saliency, cells) -> dict:
    """Scores for maps `(M, 2H, 2W)` of mosaics explaining the image in cell `cells` `(M,)`:
    "energy" (M,) = Σ positive saliency inside the cell / Σ positive saliency overall (Böhle's
    localization score), "hit" (M,) = the arg-max lies in the cell, and their means."""
    s = checks.saliency_maps(saliency)
    M, H2, W2 = s.shape
    if H2 % 2 or W2 % 2:
        raise ValueError(f"mosaic maps must have even sides; got {H2}×{W2}")
    c = np.asarray(cells).reshape(-1)
    if c.shape != (M,) or c.min() < 0 or c.max() > 3:
        raise ValueError(f"cells must be one index in 0..3 per map ({M}); got {np.asarray(cells)}")
    pos = np.clip(s, 0, None)
    quads = pos.reshape(M, 2, H2 // 2, 2, W2 // 2).sum(axis=(2, 4)).reshape(M, 4)
    total = quads.sum(1)
    if (total <= 0).any():
        raise ValueError(f"map(s) {np.flatnonzero(total <= 0)[:10].tolist()} have no positive "
                         "saliency: the energy fraction is undefined")
    energy = quads[np.arange(M), c] / total
    flat = s.reshape(M, -1).argmax(1)
    y, x = np.divmod(flat, W2)
    hit = (2 * (y >= H2 // 2) + (x >= W2 // 2)) == c
    return {"energy": energy, "hit": hit, "mean_energy": float(energy.mean()),
            "hit_rate": float(hit.mean())}
