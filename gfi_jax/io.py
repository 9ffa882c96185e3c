"""Images in, model inputs out: decoding and the preprocessing that belongs to each model."""
from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How a model wants its input: `(rgb/255 - mean) / std` after a resize policy.

    policy "crop": resize the shorter side to `resize` (PIL bilinear, as torchvision's
    `Resize(int)`), then center-crop `size`×`size` (torchvision's `CenterCrop` rounding).
    policy "resize": resize straight to `size`×`size` (the paper's text; aspect not kept).
    """
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    size: int = 224
    resize: int = 256
    policy: Literal["crop", "resize"] = "crop"

    def replace(self, **kw) -> "Preprocessing":
        """A copy with fields changed: `pre.replace(resize=224)`."""
        return dataclasses.replace(self, **kw)

    def resize_image(self, img: Image.Image) -> Image.Image:
        """PIL RGB image -> `size`×`size` PIL image, by this policy."""
        if self.policy == "resize":
            return img.resize((self.size, self.size), Image.BILINEAR)
        if self.policy != "crop":
            raise ValueError(f"unknown resize policy {self.policy!r}; use 'crop' or 'resize'")
        w, h = img.size
        if w <= h:
            nw, nh = self.resize, int(self.resize * h / w)
        else:
            nw, nh = int(self.resize * w / h), self.resize
        img = img.resize((nw, nh), Image.BILINEAR)
        top = int(round((nh - self.size) / 2.0))
        left = int(round((nw - self.size) / 2.0))
        return img.crop((left, top, left + self.size, top + self.size))

    def normalize(self, rgb: np.ndarray) -> np.ndarray:
        """uint8 `(..., H, W, 3)` -> float32 model input."""
        x = rgb.astype(np.float32) / np.float32(255.0)
        return (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)

    def __call__(self, img: Image.Image) -> np.ndarray:
        """PIL image -> `(size, size, 3)` float32 model input."""
        return self.normalize(np.asarray(self.resize_image(to_rgb(img))))


# EfficientNet-Lite's TF-style normalization (x*255 - 127) / 128, written as mean/std.
TF_LITE = Preprocessing(mean=(127 / 255,) * 3, std=(128 / 255,) * 3)
TORCHVISION = Preprocessing()


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode (L, LA, P, RGBA, CMYK, I;16, …) -> 8-bit RGB; alpha is dropped."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grayscale: scale to 8 bits instead of PIL's clipping conversion.
        a = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    return img.convert("RGB")


def blurred_background(img: Image.Image, preprocessing: Preprocessing,
                       radius: float = 11.0) -> np.ndarray:
    """The released code's background p: PIL's GaussianBlur(radius) of the full-resolution
    image, *then* the same resize/crop/normalization as the input. Pass the result (stacked)
    as `explain(..., background=p)`; by default p is blurred on device instead."""
    from PIL import ImageFilter
    return preprocessing(to_rgb(img).filter(ImageFilter.GaussianBlur(radius)))


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                    ".pgm", ".pbm", ".jfif")


def load_image(path: str | os.PathLike) -> Image.Image:
    """Opens and fully decodes an image file as 8-bit RGB, or raises ValueError.

    The error message is one line that starts with the path and names the problem: no such
    file, a folder, an empty file, not an image, a truncated or corrupt file, or an image
    over PIL's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`). Any PIL mode is
    converted (CMYK, grayscale, RGBA, palette, 16-bit), see `to_rgb`.
    """
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{path}: no such file")
    if p.is_dir():
        raise ValueError(f"{path}: is a folder, not an image file")
    try:
        size = p.stat().st_size
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror or e})") from None
    if size == 0:
        raise ValueError(f"{path}: empty file (0 bytes)")
    try:
        # Over the limit PIL only warns (it raises at twice the limit); refuse both.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(p) as img:
                img.load()
                return to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ValueError(f"{path}: image too large to decode safely (over PIL's limit of "
                         f"{Image.MAX_IMAGE_PIXELS} pixels; raise PIL.Image.MAX_IMAGE_PIXELS "
                         "if you trust the file)") from None
    except UnidentifiedImageError:
        raise ValueError(f"{path}: not an image (unrecognized format)") from None
    except PermissionError:
        raise ValueError(f"{path}: permission denied") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise ValueError(f"{path}: corrupt or truncated image ({reason})") from None
