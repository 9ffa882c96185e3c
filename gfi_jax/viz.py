"""Pictures of explanations in the style of the paper's figures: numpy + PIL only.

A figure row is the input, the mask as a jet heatmap blended over it, and the masked image
Φ = x⊙m + p⊙(1−m) (what the model is asked to recognise), each panel captioned.

>>> img = m.preprocessing.resize_image(io.load_image("cat.jpg"))   # what the model saw
>>> viz.figure(img, e.mask[0], caption="tabby 0.71").save("cat.png")
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from gfi_jax.files import atomic_writer

# Matplotlib's "jet" as piecewise-linear (position, value) knots per channel.
_JET = {
    0: ((0.0, 0.0), (0.35, 0.0), (0.66, 1.0), (0.89, 1.0), (1.0, 0.5)),
    1: ((0.0, 0.0), (0.125, 0.0), (0.375, 1.0), (0.64, 1.0), (0.91, 0.0), (1.0, 0.0)),
    2: ((0.0, 0.5), (0.11, 1.0), (0.34, 1.0), (0.65, 0.0), (1.0, 0.0)),
}


def jet(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] `(...)` -> jet colours `(..., 3)` uint8 (blue = 0, red = 1)."""
    v = np.clip(np.nan_to_num(np.asarray(values, np.float32)), 0.0, 1.0)
    rgb = [np.interp(v, [k[0] for k in _JET[c]], [k[1] for k in _JET[c]]) for c in range(3)]
    return (np.stack(rgb, -1) * 255.0 + 0.5).astype(np.uint8)


def as_rgb(image) -> np.ndarray:
    """PIL image or array -> `(H, W, 3)` uint8 RGB."""
    if isinstance(image, Image.Image):
        from gfi_jax.io import to_rgb
        return np.asarray(to_rgb(image))
    a = np.asarray(image)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, -1)
    if a.dtype != np.uint8:
        a = np.clip(a, 0, 255).astype(np.uint8)
    return a[..., :3]


def fit_mask(mask: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """A mask `(h, w)` in [0, 1], bilinearly resized to `hw` if needed -> float32 `(H, W)`."""
    m = np.clip(np.nan_to_num(np.asarray(mask, np.float32)), 0.0, 1.0)
    if m.shape != tuple(hw):
        m = np.asarray(Image.fromarray(m, "F").resize((hw[1], hw[0]), Image.BILINEAR))
    return np.clip(m, 0.0, 1.0)


def heatmap(image, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The mask's jet colours blended over the image: `(H, W, 3)` uint8."""
    x = as_rgb(image).astype(np.float32)
    h = jet(fit_mask(mask, x.shape[:2])).astype(np.float32)
    return (x * (1.0 - alpha) + h * alpha + 0.5).astype(np.uint8)


def gaussian_blur(image, sigma: float = 11.0) -> np.ndarray:
    """Separable Gaussian blur with extended edges and the kernel cut at 3σ, as the GFI
    engine blurs its background p: `(H, W, 3)` uint8 -> `(H, W, 3)` float32."""
    x = as_rgb(image).astype(np.float32)
    r = max(int(np.ceil(3 * sigma)), 1)
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k = (k / k.sum()).astype(np.float32)
    h, w = x.shape[:2]
    x = np.pad(x, ((r, r), (r, r), (0, 0)), mode="edge")
    x = sum(k[i] * x[i:i + h] for i in range(2 * r + 1))
    return sum(k[i] * x[:, i:i + w] for i in range(2 * r + 1))


def masked(image, mask: np.ndarray, background=None, sigma: float = 11.0) -> np.ndarray:
    """Φ = x⊙m + p⊙(1−m) in RGB `(H, W, 3)` uint8; p defaults to the blurred image."""
    x = as_rgb(image).astype(np.float32)
    p = gaussian_blur(x, sigma) if background is None else np.asarray(background, np.float32)
    m = fit_mask(mask, x.shape[:2])[..., None]
    return np.clip(x * m + p * (1.0 - m) + 0.5, 0, 255).astype(np.uint8)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def grid(rows: Sequence[Sequence[np.ndarray]], captions: Sequence[Sequence[str]] | None = None,
         titles: Sequence[str] | None = None, pad: int = 4) -> Image.Image:
    """Panels `(H, W, 3)` uint8 laid out in rows on white, a caption under each panel and an
    optional title line above each row. Panels of a row may differ in size."""
    font = _font(13)
    line = 18
    cap_h = line if captions else 0
    title_h = line if titles else 0
    row_h = [title_h + max(p.shape[0] for p in r) + cap_h for r in rows]
    width = max(sum(p.shape[1] + pad for p in r) for r in rows) + pad
    canvas = Image.new("RGB", (width, sum(h + pad for h in row_h) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    y = pad
    for i, r in enumerate(rows):
        if titles:
            draw.text((pad, y + 1), _fit(draw, titles[i], font, width - 2 * pad), fill="black",
                      font=font)
        x = pad
        for j, panel in enumerate(r):
            canvas.paste(Image.fromarray(as_rgb(panel)), (x, y + title_h))
            if captions:
                text = _fit(draw, captions[i][j], font, panel.shape[1])
                draw.text((x, y + title_h + panel.shape[0] + 2), text, fill="black", font=font)
            x += panel.shape[1] + pad
        y += row_h[i] + pad
    return canvas


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """`text` shortened with "…" so it fits `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def figure(image, mask: np.ndarray, background=None, caption: str = "",
           others: dict[str, np.ndarray] | None = None, title: str | None = None) -> Image.Image:
    """One explanation as the paper draws it: input | heatmap over the input | Φ.

    image: what the model saw (PIL or `(H, W, 3)` uint8); mask `(H, W)` in [0, 1];
    background: p in RGB `(H, W, 3)` (default: the image blurred with σ = 11 px);
    caption: text under the heatmap (e.g. "tabby 0.71"); others: more methods' masks,
    drawn as extra heatmap panels after Φ (the `--method all` comparison).
    """
    x = as_rgb(image)
    panels = [x, heatmap(x, mask), masked(x, mask, background)]
    caps = ["input", caption or "mask", "masked: x*m + p*(1-m)"]
    for name, m in (others or {}).items():
        panels.append(heatmap(x, normalize(m)))
        caps.append(name)
    return grid([panels], [caps], [title] if title else None)


def normalize(a: np.ndarray) -> np.ndarray:
    """A saliency map min–max scaled into [0, 1] (a flat map -> 0; NaN -> 0), float32."""
    a = np.nan_to_num(np.asarray(a, np.float32))
    lo, hi = float(a.min()) if a.size else 0.0, float(a.max()) if a.size else 0.0
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def save_png(path: str | os.PathLike, image: Image.Image, palette: bool = False) -> Path:
    """Writes a PNG atomically (temporary name in the same folder, then rename).
    palette=True quantizes to 256 colours (small files for figures that get committed)."""
    path = Path(path)
    if palette:
        image = image.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    with atomic_writer(path) as f:
        image.save(f, format="PNG", optimize=palette)  # optimize: much slower, a little smaller
    return path
