"""The benchmark's data: the ImageNet sample photographs, their tune/test split, and the items.

The split is by class and fixed here: class index ≡ 0 (mod 4) is **tune**, ≡ 2 (mod 4) is
**test** (the collection holds the even classes only, one image each, so every image is in
exactly one split, 250 each). Every setting is chosen on tune; test is for final presets.

Items have stable ids, so scores stored under one run size are found again under another:
an image item is the file's stem; a grid item names its four images and the explained cell.
"""
from __future__ import annotations

import csv
import dataclasses
import sys
from pathlib import Path

import jax
import numpy as np

from gfi_jax import metrics

SPLITS = {"tune": 0, "test": 2}   # class index mod 4
SPLIT_RULE = "class index ≡ 0 (mod 4): tune; ≡ 2 (mod 4): test"


def split_of(class_index: int) -> str | None:
    """'tune', 'test', or None for classes in neither (odd ones, absent from the collection)."""
    return next((k for k, r in SPLITS.items() if class_index % 4 == r), None)


@dataclasses.dataclass(frozen=True)
class Dataset:
    x: np.ndarray          # (N, size, size, 3) model inputs
    labels: np.ndarray     # (N,) class indices
    names: tuple[str, ...]
    probs: np.ndarray      # (N, classes) the model's softmax on each image alone

    def indices(self, split: str) -> np.ndarray:
        if split not in SPLITS:
            raise ValueError(f"split {split!r} not understood; use one of {list(SPLITS)}")
        return np.flatnonzero(self.labels % 4 == SPLITS[split])


@dataclasses.dataclass(frozen=True)
class GridItem:
    id: str
    images: tuple[int, ...]   # 4 dataset indices, cells 0 1 / 2 3
    cell: int
    target: int


@dataclasses.dataclass(frozen=True)
class ImageItem:
    id: str
    index: int
    target: int


def load(model, folder: Path, size: int | None = None) -> Dataset:
    """Every image of `folder` (with labels.csv) preprocessed for `model` at `size` (default:
    the model's own input size)."""
    labels_csv = folder / "labels.csv"
    if not labels_csv.is_file():
        raise SystemExit(f"error: {labels_csv} not found; --data must be the imagenet-samples "
                         "folder (files plus labels.csv: file, class_index, wnid, name)")
    with open(labels_csv) as f:
        rows = list(csv.DictReader(f))
    pre = model.preprocessing
    if size is not None:
        pre = pre.replace(size=size, resize=round(pre.resize * size / pre.size))
    x = np.stack([model.preprocess(folder / r["file"], pre) for r in rows]).astype(np.float32)
    f = jax.jit(lambda z: jax.nn.softmax(model.features(model.params, z, ("logits",))["logits"]))
    probs = np.concatenate([np.asarray(f(x[i:i + 32])) for i in range(0, len(x), 32)])
    return Dataset(x, np.array([int(r["class_index"]) for r in rows]),
                   tuple(r["file"] for r in rows), probs)


def grid_items(ds: Dataset, split: str, n: int, seed: int,
               min_confidence: float = 0.5) -> list[GridItem]:
    """`n` mosaics of four confidently classified images of four classes of `split`, one cell
    explained. The first k items are the same for every n >= k."""
    if n == 0:
        return []
    pool = ds.indices(split)
    idx = pool[metrics.select_grids(ds.probs[pool], ds.labels[pool], n,
                                    min_confidence=min_confidence, seed=seed)]
    cells = np.random.default_rng(seed + 1).integers(0, 4, n)
    return [GridItem("+".join(Path(ds.names[i]).stem for i in four) + f"@{c}",
                     tuple(int(i) for i in four), int(c), int(ds.labels[four[c]]))
            for four, c in zip(idx, cells)]


def image_items(ds: Dataset, split: str, n: int, seed: int) -> list[ImageItem]:
    """`n` correctly classified images of `split`, drawn at random (seeded), in that order."""
    pool = ds.indices(split)
    ok = pool[ds.probs[pool].argmax(1) == ds.labels[pool]]
    if len(ok) < n:
        print(f"warning: only {len(ok)} correctly classified {split} images; using all",
              file=sys.stderr)
    sel = np.random.default_rng(seed).permutation(ok)[:n]
    return [ImageItem(Path(ds.names[i]).stem, int(i), int(ds.labels[i])) for i in sel]


def mosaics(ds: Dataset, items: list[GridItem]) -> np.ndarray:
    """`(n, H, W, 3)`: each cell its image shrunk 2× (box filter), so a mosaic has the
    model's input size."""
    B, H, W, C = ds.x.shape
    idx = np.array([it.images for it in items])
    small = ds.x[idx.ravel()].reshape(-1, H // 2, 2, W // 2, 2, C).mean(axis=(2, 4))
    return metrics.mosaic(small.reshape(len(items), 4, H // 2, W // 2, C)).astype(np.float32)
