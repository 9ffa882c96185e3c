"""Images in, model inputs out: decoding and the preprocessing that belongs to each model."""
from __future__ import annotations

import dataclasses
import os
from typing import Literal

import numpy as np
from PIL import Image

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


def load_image(path: str | os.PathLike) -> Image.Image:
    """Opens and fully decodes an image file as RGB, or raises ValueError with the reason."""
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb(img)
    except FileNotFoundError:
        raise
    except Image.DecompressionBombError as e:
        raise ValueError(f"{path}: image too large to decode safely ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{path}: not a readable image ({e})") from None
