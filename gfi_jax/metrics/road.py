"""ROAD, RemOve And Debias (Rong, Leemann, Nguyen, Fiedler, Haghighi, Kasneci, Kasneci; ICML 2022).

Deletion with a blurred substrate leaks the removed region's shape and colour to the model,
so a map can score well by drawing edges the model reads back. ROAD removes pixels by
*noisy linear imputation* instead: every removed pixel becomes the weighted mean of its eight
neighbours (1/6 for the four direct ones, 1/12 for the diagonals, renormalized at the image
border), all removed pixels solved for at once as one sparse linear system, plus a little
Gaussian noise so that the imputed region's smoothness does not itself mark it. Pixels are
removed in two orders: MoRF (most relevant first; a faithful map makes the class
probability fall fast, lower is better) and LeRF (least relevant first; higher is better).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from gfi_jax.metrics import checks
from gfi_jax.metrics.causal import pixel_ranks

# (dy, dx) -> weight; the direct neighbours count twice the diagonal ones.
NEIGHBOURS = (((0, 1), 1 / 6), ((0, -1), 1 / 6), ((1, 0), 1 / 6), ((-1, 0), 1 / 6),
              ((1, 1), 1 / 12), ((1, -1), 1 / 12), ((-1, 1), 1 / 12), ((-1, -1), 1 / 12))
LEVELS = (0.1, 0.3, 0.5, 0.7, 0.9)   # fractions of the pixels removed


def linear_imputation(image: np.ndarray, keep: np.ndarray, noise: float = 0.0,
                      rng: np.random.Generator | None = None) -> np.ndarray:
    """`image` `(H, W, C)` with the pixels where `keep` `(H, W)` is False imputed: each one the
    weighted mean of its in-image neighbours (`NEIGHBOURS`), kept or imputed, solved jointly;
    then N(0, noise²) added to the imputed values only."""
    x = np.asarray(image, np.float64)
    keep = np.asarray(keep, bool)
    H, W, C = x.shape
    if keep.shape != (H, W):
        raise ValueError(f"keep {keep.shape} must be (H, W) = {(H, W)} of the image")
    missing = np.flatnonzero(~keep.ravel())
    if len(missing) == 0:
        return x.astype(image.dtype, copy=True)
    if len(missing) == H * W:
        raise ValueError("every pixel is to be imputed, so there is nothing to impute from; "
                         "keep at least one pixel")
    a, b = _system(x.reshape(H * W, C), keep.ravel(), missing, (H, W))
    out = x.reshape(H * W, C).copy()
    out[missing] = spla.spsolve(a, b).reshape(len(missing), C)
    if noise:
        rng = rng if rng is not None else np.random.default_rng(0)
        out[missing] += rng.normal(0.0, noise, (len(missing), C))
    return out.reshape(H, W, C).astype(image.dtype)


def _system(x: np.ndarray, keep: np.ndarray, missing: np.ndarray, hw: tuple[int, int]):
    """The sparse system A v = b for the missing pixels' values v: for each missing pixel i,
    (Σ_j w_ij) v_i − Σ_{j missing} w_ij v_j = Σ_{j kept} w_ij x_j over its in-image
    neighbours j. A is symmetric and positive definite when every connected hole touches a
    kept pixel."""
    H, W = hw
    n = len(missing)
    var = np.full(H * W, -1)
    var[missing] = np.arange(n)
    ys, xs = np.divmod(missing, W)
    diag, rhs = np.zeros(n), np.zeros((n, x.shape[1]))
    rows, cols, vals = [np.arange(n)], [np.arange(n)], []
    for (dy, dx), w in NEIGHBOURS:
        y2, x2 = ys + dy, xs + dx
        inside = (y2 >= 0) & (y2 < H) & (x2 >= 0) & (x2 < W)
        i, j = np.flatnonzero(inside), (y2 * W + x2)[inside]
        diag[i] += w
        known = keep[j]
        np.add.at(rhs, i[known], w * x[j[known]])
        rows.append(i[~known])
        cols.append(var[j[~known]])
        vals.append(np.full(int((~known).sum()), -w))
    a = sp.csc_matrix((np.concatenate([diag, *vals]), (np.concatenate(rows),
                                                       np.concatenate(cols))), shape=(n, n))
    return a, rhs


def road(model: Callable, images, saliency, targets, order: str = "morf",
         levels=LEVELS, noise: float = 0.01, seed=0) -> dict:
    """ROAD curves for a batch.

    model: images `(B, H, W, 3)` -> class probabilities `(B, classes)` (jit it yourself);
    images `(B, H, W, 3)` preprocessed; saliency `(B, H, W)`; targets `(B,)`. At each level
    p the ⌈p·H·W⌉ most (MoRF) or least (LeRF) salient pixels (ties: row-major order) are
    imputed (`linear_imputation`, noise σ `noise` in the model's input units) and the model
    scores the target. `seed`: an int, or one int per image, so an image's noise does not
    depend on the batch it comes in. Returns {"curves" (B, L), "score"
    (B,): the mean over levels, "levels"}.
    """
    if order not in ("morf", "lerf"):
        raise ValueError(f"order {order!r} not understood; use 'morf' or 'lerf'")
    x, s = checks.images_and_maps(images, saliency)
    levels = tuple(float(p) for p in levels)
    if not levels or min(levels) < 0 or max(levels) >= 1:
        raise ValueError(f"levels must be fractions in [0, 1); got {levels}")
    B, H, W = s.shape
    t = np.asarray(targets).reshape(-1)
    if t.shape != (B,):
        raise ValueError(f"targets must be one class per image ({B}); got shape {t.shape}")
    seeds = np.broadcast_to(np.asarray(seed, np.int64), (B,))
    rank = pixel_ranks(s if order == "morf" else -s)
    curves = np.empty((B, len(levels)))
    for k, p in enumerate(levels):
        n = int(np.ceil(p * H * W))
        batch = np.stack([linear_imputation(x[b], rank[b] >= n, noise,
                                            np.random.default_rng([int(seeds[b]), k]))
                          for b in range(B)])
        curves[:, k] = np.asarray(model(batch))[np.arange(B), t]
    return {"curves": curves, "score": curves.mean(1), "levels": levels}

