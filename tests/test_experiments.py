"""Smoke tests of the experiment scripts (experiments/paper/*.py) on tiny
synthetic datasets written to tmp_path, in their standard layouts, with one random-init
ResNet-18 shared by all and GFI at 1+1 steps; plus the readers' errors on wrong layouts."""
from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from gfi_jax.metrics import box_iou
from gfi_jax.testing.random_models import flax_init_model

from experiments.paper import (adversarial, datasets, figures, imagenet_localization,
                               msra_saliency, runtime, voc07_pointing)

SIZE = 64
FAST = ["--size", str(SIZE), "--batch", "2", "--stage1-steps", "1", "--stage2-steps", "1"]


@pytest.fixture(scope="module")
def m():
    return flax_init_model("resnet18")


def image(path: Path, box, seed: int, size=(80, 64)) -> None:
    """A noise image with a bright rectangle at `box` (x0, y0, x1, y1)."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 120, (size[1], size[0], 3), dtype=np.uint8)
    x0, y0, x1, y1 = box
    a[y0:y1 + 1, x0:x1 + 1] = 230
    Image.fromarray(a).save(path)


def xml(path: Path, size, objects, one_based: bool) -> None:
    objs = "".join(
        f"<object><name>{n}</name><difficult>{int(d)}</difficult><bndbox><xmin>{x0 + one_based}"
        f"</xmin><ymin>{y0 + one_based}</ymin><xmax>{x1 + one_based}</xmax><ymax>{y1 + one_based}"
        f"</ymax></bndbox></object>" for n, (x0, y0, x1, y1), d in objects)
    path.write_text(f"<annotation><size><width>{size[0]}</width><height>{size[1]}</height>"
                    f"<depth>3</depth></size>{objs}</annotation>")


BOXES = [(2, 2, 77, 60), (10, 8, 50, 41), (0, 0, 60, 63), (30, 20, 40, 30)]


def make_imagenet(root: Path) -> Path:
    """A fake ImageNet val: val/*.JPEG, boxes/*.xml, a synset list and a blacklist."""
    (root / "val").mkdir()
    (root / "boxes").mkdir()
    wnids = ["n01440764", "n01443537"]
    for i, box in enumerate(BOXES, 1):
        stem = f"ILSVRC2012_val_{i:08d}"
        image(root / "val" / f"{stem}.JPEG", box, i)
        xml(root / "boxes" / f"{stem}.xml", (80, 64), [(wnids[i % 2], box, False)], False)
    (root / "synsets.txt").write_text("n01440764 tench, Tinca tinca\nn01443537 goldfish\n")
    (root / "blacklist.txt").write_text("4\n")
    return root


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    return make_imagenet(tmp_path_factory.mktemp("imagenet"))


def make_voc(root: Path) -> Path:
    """A fake VOCdevkit/VOC2007 with 4 trainval and 2 test images."""
    root = root / "VOC2007"
    for d in ("Annotations", "ImageSets/Main", "JPEGImages"):
        (root / d).mkdir(parents=True)
    objs = {"000001": [("dog", (5, 5, 40, 40), False), ("person", (45, 10, 70, 60), False)],
            "000002": [("cat", (20, 15, 60, 50), False)],
            "000003": [("car", (0, 30, 30, 63), True), ("dog", (35, 5, 79, 40), False)],
            "000004": [("bird", (30, 20, 50, 35), False)]}
    for n, (i, o) in enumerate(objs.items()):
        image(root / "JPEGImages" / f"{i}.jpg", o[0][1], n)
        xml(root / "Annotations" / f"{i}.xml", (80, 64), o, True)
    (root / "ImageSets/Main/trainval.txt").write_text("000001\n000002\n000003\n000004\n")
    (root / "ImageSets/Main/test.txt").write_text("000001\n000003\n")
    return root


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    return make_voc(tmp_path_factory.mktemp("voc"))


def make_msra(root: Path) -> Path:
    """A fake MSRA-B folder: 3 jpg/png pairs and one unpaired image."""
    for i in range(3):
        box = (10 + 5 * i, 10, 50, 45)
        image(root / f"0_{i}.jpg", box, i)
        g = np.zeros((64, 80), np.uint8)
        g[10:46, 10 + 5 * i:51] = 255
        Image.fromarray(g).save(root / f"0_{i}.png")
    image(root / "unpaired.jpg", (0, 0, 5, 5), 9)
    return root


@pytest.fixture(scope="module")
def msra(tmp_path_factory):
    return make_msra(tmp_path_factory.mktemp("msra"))


# ----------------------------------------------------------------------------- readers
def test_imagenet_reader(imagenet):
    items = datasets.imagenet_val(imagenet / "val", imagenet / "boxes", imagenet / "synsets.txt",
                                  imagenet / "blacklist.txt")
    assert [it.path.name for it in items] == [f"ILSVRC2012_val_{i:08d}.JPEG" for i in (1, 2, 3)]
    assert [it.label for it in items] == [1, 0, 1]
    assert items[1].objects[0].box == (10, 8, 50, 41) and items[1].size == (80, 64)
    csv_map = imagenet / "map.csv"
    csv_map.write_text("file,class_index,wnid,name\na.JPEG,7,n01440764,tench\nb.JPEG,9,n01443537,goldfish\n")
    assert [it.label for it in datasets.imagenet_val(imagenet / "val", imagenet / "boxes", csv_map)] == [9, 7, 9, 7]


def test_voc_reader(voc):
    items = datasets.voc07(voc, "trainval")
    assert len(items) == 4
    third = items[2].objects
    assert third[0] == datasets.Obj("car", (0, 30, 30, 63), True)   # 1-based XML -> 0-based
    y = datasets.voc_labels(items)
    assert y[2, datasets.VOC_CLASSES.index("car")] == 1
    assert datasets.voc_labels(items, difficult=False)[2, datasets.VOC_CLASSES.index("car")] == 0


def test_msra_reader(msra):
    pairs = datasets.msra_b(msra)
    assert [(a.name, b.name) for a, b in pairs] == [(f"0_{i}.jpg", f"0_{i}.png") for i in range(3)]


def test_wrong_layouts(tmp_path, imagenet, voc):
    with pytest.raises(ValueError, match=r"no bounding-box XML files.*ILSVRC2012_bbox_val_v3"):
        datasets.imagenet_val(imagenet / "val")
    with pytest.raises(ValueError, match=r"missing folder; expected ImageNet validation images"):
        datasets.imagenet_val(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"name 2 synsets, not all 1000.*synsets="):
        datasets.imagenet_val(imagenet / "val", imagenet / "boxes")
    (tmp_path / "boxes").mkdir()
    xml(tmp_path / "boxes" / "ILSVRC2012_val_00000099.xml", (8, 8), [("n01440764", (0, 0, 1, 1), 0)], False)
    with pytest.raises(ValueError, match=r"missing image ILSVRC2012_val_00000099.JPEG"):
        datasets.imagenet_val(imagenet / "val", tmp_path / "boxes", {"n01440764": 0})
    with pytest.raises(ValueError, match=r"Annotations: missing folder; expected a VOC2007 folder"):
        datasets.voc07(tmp_path)
    with pytest.raises(ValueError, match=r"val.txt: missing split list"):
        datasets.voc07(voc, "val")
    with pytest.raises(ValueError, match=r"no image/mask pairs; expected <stem>.jpg"):
        datasets.msra_b(imagenet / "val")


# ----------------------------------------------------------------------------- scripts
def test_imagenet_localization(m, imagenet, tmp_path):
    out = tmp_path / "loc.md"
    args = ["--data", str(imagenet / "val"), "--boxes", str(imagenet / "boxes"),
            "--synsets", str(imagenet / "synsets.txt"), "--methods", "gfi,grad",
            "--results", str(out), *FAST]
    res = imagenet_localization.main(args, model=m)
    assert res["gfi"]["correct"].shape == (4, 21)
    # α = 0 keeps every pixel: the whole-image box, a hit exactly when IoU(box, image) >= 0.5
    whole = (0, 0, SIZE - 1, SIZE - 1)
    hit = [box_iou(imagenet_localization.scale_box(b, (80, 64), SIZE), whole) >= 0.5 for b in BOXES]
    assert hit == [True, False, True, False]
    for k in ("gfi", "grad"):
        assert res[k]["correct"][:, 0].tolist() == hit
    text = out.read_text()
    assert "| gfi | 4 |" in text and "38.2" in text and "Fig. 6" in text


def test_layer_ablation(m, imagenet, tmp_path):
    out = tmp_path / "abl.md"
    res = imagenet_localization.main(
        ["--data", str(imagenet / "val"), "--boxes", str(imagenet / "boxes"), "--synsets",
         str(imagenet / "synsets.txt"), "--layers-ablation", "--l1-layers", "layer4.1.act1,layer4",
         "--limit", "2", "--results", str(out), *FAST], model=m)
    assert set(res) == {"alphas", "gfi l1=layer4.1.act1", "gfi l1=layer4"}
    assert "Table 2" in out.read_text()


def test_voc07_finetune_head(m, voc):
    items = datasets.voc07(voc, "trainval")
    pre = m.preprocessing.replace(policy="resize", size=SIZE)
    feats = voc07_pointing.features(m, [it.path for it in items], pre)
    head, trace = voc07_pointing.finetune(feats, datasets.voc_labels(items), lr=1e-2, batch=2,
                                          epochs=5)
    assert trace[-1] < trace[0]
    m20 = voc07_pointing.with_head(m, head["kernel"], head["bias"], datasets.VOC_CLASSES)
    x = np.stack([pre(Image.open(it.path)) for it in items])
    logits = np.asarray(m20(x)["logits"])
    np.testing.assert_allclose(logits, feats @ head["kernel"] + head["bias"], rtol=1e-4, atol=1e-4)
    # every other parameter is the ImageNet model's
    head_idx = voc07_pointing.head_leaves(m)
    assert len(head_idx) == 2
    for i, (a, b) in enumerate(zip(jax.tree.leaves(m.params), jax.tree.leaves(m20.params))):
        assert (a.shape != b.shape) if i in head_idx else np.array_equal(a, b)


def test_mean_average_precision():
    y = np.array([[1, 0], [0, 1], [1, 0], [0, 0]])
    s = np.array([[0.9, 0.1], [0.8, 0.7], [0.3, 0.2], [0.1, 0.9]])
    # class 0: ranks 1 and 3 are positives -> (1 + 2/3) / 2; class 1: rank 2 -> 1/2
    assert voc07_pointing.mean_average_precision(s, y) == pytest.approx(((1 + 2 / 3) / 2 + 0.5) / 2)


def test_voc07_pointing(m, voc, tmp_path):
    out = tmp_path / "voc.md"
    head = tmp_path / "head.npz"
    args = ["--data", str(voc), "--epochs", "2", "--head", str(head), "--results", str(out),
            "--methods", "center,grad,gfi", *FAST]
    res = voc07_pointing.main(args, model=m)
    assert head.is_file()
    # pairs: (000001, dog), (000001, person), (000003, car), (000003, dog)
    assert res["labels"].tolist() == [11, 14, 6, 11]
    # Center: the map's maximum is the image centre (40, 32), within 15 px of each box but
    # the car's (0..30, 30..63): distance 10 px -> a hit as well
    assert res["center"]["hits"].tolist() == [True, True, True, True]
    assert "| gfi | 4 |" in out.read_text() and "54.7" in out.read_text()
    assert 0 < res["mAP"] <= 1 and "mAP" in out.read_text()
    # the difficult car of 000003 is left out on request
    h = np.load(head)
    m20 = voc07_pointing.with_head(m, h["kernel"], h["bias"], datasets.VOC_CLASSES)
    res2 = voc07_pointing.evaluate(m20, datasets.voc07(voc, "test"), {"center": ("center", None)},
                                   SIZE, difficult=False)
    assert res2["labels"].tolist() == [11, 14, 11] and res2["center"]["hits"].all()


def test_msra_saliency(m, msra, tmp_path):
    out = tmp_path / "msra.md"
    res = msra_saliency.main(["--data", str(msra), "--results", str(out), *FAST], model=m)
    assert res["f"].shape == (3,) and np.all((res["mae"] >= 0) & (res["mae"] <= 1))
    assert "F_β" in out.read_text()


def test_adversarial(m, imagenet, tmp_path):
    out = tmp_path / "adv.png"
    img = imagenet / "val" / "ILSVRC2012_val_00000001.JPEG"
    r = adversarial.main(["--data", str(img), "--label", "3", "--epsilon", "0.03",
                          "--out", str(out), *FAST], model=m)
    pre = m.preprocessing.replace(policy="resize", size=SIZE)
    # the step is ε/std per channel (clipped to the valid range) and raises the loss
    d = (r["x_adv"] - r["x"]) * np.asarray(pre.std)
    assert np.all(np.abs(d) <= 0.03 + 1e-5) and np.mean(np.isclose(np.abs(d), 0.03, atol=1e-5)) > 0.5
    assert r["p_adv"][3] < r["p_clean"][3]
    assert Image.open(out).size[0] > 4 * SIZE
    assert "mask Pearson" in out.with_suffix(".md").read_text()


def test_figures(m, imagenet, tmp_path):
    img = imagenet / "val" / "ILSVRC2012_val_00000001.JPEG"
    f3 = figures.main(["--fig", "3", "--data", str(img), "--classes", "386,340",
                       "--out", str(tmp_path / "f3.png"), *FAST], models={"resnet18": m})
    f5 = figures.main(["--fig", "5", "--data", str(img), "--out",
                       str(tmp_path / "f5.png"), *FAST], models={"a": m, "b": m})
    assert Image.open(f3).size[0] > 4 * SIZE and Image.open(f5).size[0] > 3 * SIZE


def test_runtime(m, imagenet, tmp_path):
    out = tmp_path / "rt.md"
    res = runtime.main(["--data", str(imagenet / "val"), "--repeat", "1", "--results", str(out),
                        *FAST], models={"resnet18": m})
    assert 0 < res["resnet18"]["batch1"] and 0 < res["resnet18"]["batch2"]
    assert "6.43" in out.read_text()
