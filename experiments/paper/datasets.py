"""Readers for the datasets of the paper's experiments, in their standard layouts.

- `imagenet_val(images, boxes, synsets)`: ILSVRC2012 validation images with the bounding-box
  XML files (one PASCAL-style XML per image, `ILSVRC2012_bbox_val_v3.tgz`).
- `voc07(root, split)`: PASCAL VOC2007 (`Annotations/`, `ImageSets/Main/<split>.txt`,
  `JPEGImages/`), each object with its `difficult` flag.
- `msra_b(root)`: MSRA-B image / ground-truth mask pairs.

Every reader returns plain records (paths, sizes, boxes) and reads no pixels; a wrong layout
is a one-line ValueError naming what is missing and what is expected. Boxes are inclusive
0-based pixel corners (x0, y0, x1, y1) in the original image.
"""
from __future__ import annotations

import csv
import dataclasses
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

IMAGE_EXTS = (".jpeg", ".jpg", ".png", ".bmp")

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
               "sheep", "sofa", "train", "tvmonitor")


@dataclasses.dataclass(frozen=True)
class Obj:
    name: str                                   # synset (ImageNet) or class name (VOC)
    box: tuple[int, int, int, int]              # (x0, y0, x1, y1) inclusive, 0-based
    difficult: bool = False


@dataclasses.dataclass(frozen=True)
class Item:
    path: Path
    size: tuple[int, int]                       # (width, height) as the XML states
    objects: tuple[Obj, ...]
    label: int = -1                             # ImageNet: the class index of its synset


def _need_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise ValueError(f"{path}: missing folder; expected {what}")
    return path


def parse_xml(path: Path, one_based: bool) -> tuple[tuple[int, int], tuple[Obj, ...]]:
    """A PASCAL-style annotation -> ((width, height), objects); boxes clipped to the image."""
    try:
        root = ET.parse(path).getroot()
        w, h = int(root.findtext("size/width")), int(root.findtext("size/height"))
        objs = []
        for o in root.iter("object"):
            b = o.find("bndbox")
            x0, y0, x1, y1 = (int(float(b.findtext(k))) - one_based
                              for k in ("xmin", "ymin", "xmax", "ymax"))
            objs.append(Obj(o.findtext("name").strip(),
                            (max(x0, 0), max(y0, 0), min(x1, w - 1), min(y1, h - 1)),
                            o.findtext("difficult", "0").strip() == "1"))
    except (ET.ParseError, AttributeError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not a PASCAL-style annotation (<size><width>, <height>, "
                         f"<object><name>, <bndbox><xmin>…): {e}") from None
    return (w, h), tuple(objs)


# ----------------------------------------------------------------------------- ImageNet
def read_synsets(path: str | Path) -> dict[str, int]:
    """wnid -> class index from `LOC_synset_mapping.txt` / `synsets.txt` (one wnid per line,
    first word, in class-index order) or a CSV with columns `wnid` and `class_index`."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{p}: no such synset mapping; expected LOC_synset_mapping.txt "
                         "(wnid per line in class order) or a CSV with wnid,class_index")
    text = p.read_text()
    first = text.splitlines()[0] if text.strip() else ""
    if "wnid" in first and "class_index" in first:
        return {r["wnid"]: int(r["class_index"]) for r in csv.DictReader(text.splitlines())}
    wnids = [line.split()[0].strip(",") for line in text.splitlines() if line.strip()]
    if not all(w.startswith("n") and w[1:].isdigit() for w in wnids):
        raise ValueError(f"{p}: lines must start with a WordNet id such as n01440764")
    return {w: i for i, w in enumerate(wnids)}


def imagenet_val(images: str | Path, boxes: str | Path | None = None,
                 synsets: Mapping[str, int] | str | Path | None = None,
                 blacklist: str | Path | None = None, limit: int | None = None) -> list[Item]:
    """ImageNet validation images with their boxes and class index.

    images: folder of `ILSVRC2012_val_XXXXXXXX.JPEG`; boxes: folder of the matching
    `ILSVRC2012_val_XXXXXXXX.xml` (default: the images folder). synsets: wnid -> index (a dict
    or a file for `read_synsets`); None works only when the XMLs name all 1000 synsets
    (then sorted wnid order is the standard class order). blacklist: the devkit's
    `ILSVRC2014_clsloc_validation_blacklist.txt` (1-based image numbers to drop).
    """
    img_dir = _need_dir(Path(images), "ImageNet validation images (ILSVRC2012_val_*.JPEG)")
    box_dir = _need_dir(Path(boxes) if boxes else img_dir,
                        "ImageNet bounding-box XMLs (ILSVRC2012_bbox_val_v3: one XML per image)")
    xmls = sorted(box_dir.glob("*.xml"))
    if not xmls:
        raise ValueError(f"{box_dir}: no bounding-box XML files (*.xml); expected one "
                         "PASCAL-style XML per image, as in ILSVRC2012_bbox_val_v3.tgz")
    drop = set()
    if blacklist:
        drop = {int(s) for s in Path(blacklist).read_text().split()}
    files = {p.stem: p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_EXTS}
    parsed = []
    for x in xmls:
        if x.stem not in files:
            raise ValueError(f"{img_dir}: missing image {x.stem}.JPEG for annotation {x.name}; "
                             "images and XMLs must share their file stem")
        num = x.stem.rsplit("_", 1)[-1]
        if num.isdigit() and int(num) in drop:
            continue
        parsed.append((files[x.stem], *parse_xml(x, one_based=False)))
        if limit and len(parsed) >= limit:
            break
    if synsets is None:
        names = sorted({o.name for _, _, objs in parsed for o in objs})
        if len(names) != 1000:
            raise ValueError(f"the XMLs name {len(names)} synsets, not all 1000, so the class "
                             "order is unknown; pass synsets= (LOC_synset_mapping.txt)")
        synsets = {w: i for i, w in enumerate(names)}
    elif not isinstance(synsets, Mapping):
        synsets = read_synsets(synsets)
    out = []
    for path, size, objs in parsed:
        if not objs:
            raise ValueError(f"{path.stem}.xml: no <object>; every validation image has a box")
        wnid = objs[0].name
        if wnid not in synsets:
            raise ValueError(f"{path.stem}.xml: synset {wnid} is not in the synset mapping")
        out.append(Item(path, size, tuple(o for o in objs if o.name == wnid), synsets[wnid]))
    return out


# ----------------------------------------------------------------------------- VOC2007
def voc07(root: str | Path, split: str = "test", limit: int | None = None) -> list[Item]:
    """PASCAL VOC2007 `split` (train, val, trainval, test) under `root` (…/VOCdevkit/VOC2007)."""
    root = Path(root)
    expect = "a VOC2007 folder with Annotations/, ImageSets/Main/ and JPEGImages/"
    ann = _need_dir(root / "Annotations", expect)
    jpg = _need_dir(root / "JPEGImages", expect)
    lst = root / "ImageSets" / "Main" / f"{split}.txt"
    if not lst.is_file():
        raise ValueError(f"{lst}: missing split list; expected {expect} holding {split}.txt "
                         "(one image id per line)")
    ids = lst.read_text().split()
    if limit:
        ids = ids[:limit]
    out = []
    for i in ids:
        if not (ann / f"{i}.xml").is_file():
            raise ValueError(f"{ann / (i + '.xml')}: missing annotation for image {i} of {split}")
        if not (jpg / f"{i}.jpg").is_file():
            raise ValueError(f"{jpg / (i + '.jpg')}: missing image {i} of {split}")
        size, objs = parse_xml(ann / f"{i}.xml", one_based=True)
        bad = {o.name for o in objs} - set(VOC_CLASSES)
        if bad:
            raise ValueError(f"{ann / (i + '.xml')}: unknown class(es) {sorted(bad)}; "
                             f"VOC classes: {', '.join(VOC_CLASSES)}")
        out.append(Item(jpg / f"{i}.jpg", size, objs))
    return out


def voc_labels(items: Sequence[Item], difficult: bool = True) -> np.ndarray:
    """`(N, 20)` float32 multi-hot labels; difficult=False ignores difficult-only objects."""
    y = np.zeros((len(items), len(VOC_CLASSES)), np.float32)
    for n, it in enumerate(items):
        for o in it.objects:
            if difficult or not o.difficult:
                y[n, VOC_CLASSES.index(o.name)] = 1
    return y


# ----------------------------------------------------------------------------- MSRA-B
def msra_b(root: str | Path, names: str | Path | None = None) -> list[tuple[Path, Path]]:
    """(image, mask) pairs: `<stem>.jpg` with its `<stem>.png` ground truth in the same folder
    (the MSRA-B release), or in `images/` and `masks/` (also `imgs/`, `gt/`). names: an
    optional list file of image names to keep (e.g. the 2000-image test split)."""
    root = _need_dir(Path(root), "MSRA-B: <stem>.jpg images with <stem>.png masks")
    img_dir = next((root / d for d in ("images", "imgs", "Imgs") if (root / d).is_dir()), root)
    gt_dir = next((root / d for d in ("masks", "gt", "GT") if (root / d).is_dir()), root)
    imgs = {p.stem: p for p in img_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg")}
    gts = {p.stem: p for p in gt_dir.iterdir() if p.suffix.lower() in (".png", ".bmp")}
    stems = sorted(imgs.keys() & gts.keys())
    if names:
        keep = {Path(s).stem for s in Path(names).read_text().split()}
        stems = [s for s in stems if s in keep]
    if not stems:
        raise ValueError(f"{root}: no image/mask pairs; expected <stem>.jpg images with "
                         f"<stem>.png ground-truth masks in one folder or in images/ and masks/ "
                         f"(found {len(imgs)} .jpg and {len(gts)} .png/.bmp)")
    return [(imgs[s], gts[s]) for s in stems]
