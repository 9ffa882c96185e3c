"""Known-answer tests of gfi_jax.metrics, and their errors on bad input."""
from __future__ import annotations

import numpy as np
import pytest

import gfi_jax
from gfi_jax import metrics
from gfi_jax.models import LoadedModel


def _rect(h, w, y0, y1, x0, x1, n=1):
    s = np.zeros((n, h, w))
    s[:, y0:y1 + 1, x0:x1 + 1] = 1.0
    return s


# --------------------------------------------------------------------------- localization
def test_tight_boxes_known_answer():
    s = _rect(10, 10, 2, 4, 3, 6)                       # 12 pixels of 1, mean 0.12
    boxes, valid = metrics.tight_boxes(s, [0.0, 1.0, 8.0, 8.5, 10.0])
    assert valid.tolist() == [[True, True, True, False, False]]   # 8.5·0.12 > 1
    assert boxes[0, 0].tolist() == [0, 0, 9, 9]         # α = 0: every pixel survives
    assert boxes[0, 1].tolist() == [3, 2, 6, 4]
    # The tightest box spans separate blobs too.
    s2 = s.copy()
    s2[0, 8, 0] = 1.0
    assert metrics.tight_boxes(s2, [1.0])[0][0, 0].tolist() == [0, 2, 6, 8]


def test_box_iou_inclusive_pixels():
    assert metrics.box_iou([0, 0, 1, 1], [1, 1, 2, 2]) == pytest.approx(1 / 7)
    assert metrics.box_iou([0, 0, 1, 1], [2, 2, 3, 3]) == 0.0
    assert metrics.box_iou([3, 2, 6, 4], [3, 2, 6, 4]) == 1.0


def test_localization_error_per_alpha():
    s = np.concatenate([_rect(10, 10, 2, 4, 3, 6), _rect(10, 10, 2, 4, 3, 6)])
    gt = [[[3, 2, 6, 4]], [[0, 7, 2, 9], [4, 2, 6, 4]]]   # image 1: IoU 9/12 with its 2nd box
    r = metrics.localization_error(s, gt)
    assert np.allclose(r["alphas"], np.arange(0, 10.5, 0.5)) and len(r["alphas"]) == 21
    # α = 0: the whole image, IoU 12/100 and 9/100: both wrong. 0 < α <= 8: the rectangle:
    # image 0 exact, image 1 IoU 0.75. α >= 8.5: nothing survives.
    expect = np.where((r["alphas"] > 0) & (r["alphas"] <= 8), 0.0, 1.0)
    assert np.array_equal(r["error"], expect)
    assert r["iou"][1, 2] == pytest.approx(0.75)
    r = metrics.localization_error(s, gt, iou=0.8)
    assert np.array_equal(r["error"][1:17], np.full(16, 0.5))


def test_localization_bad_input():
    s = _rect(10, 10, 2, 4, 3, 6)
    with pytest.raises(ValueError, match="outside"):
        metrics.localization_error(s, [[[3, 2, 10, 4]]])
    with pytest.raises(ValueError, match="no ground-truth box"):
        metrics.localization_error(s, [[]])
    with pytest.raises(ValueError, match="2 images but 1"):
        metrics.localization_error(s, [[[0, 0, 1, 1]], [[0, 0, 1, 1]]])
    with pytest.raises(ValueError, match="x0 <= x1"):
        metrics.localization_error(s, [[[5, 0, 1, 1]]])
    bad = s.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        metrics.localization_error(bad, [[[0, 0, 1, 1]]])
    with pytest.raises(ValueError, match="non-negative"):
        metrics.localization_error(s - 0.5, [[[0, 0, 1, 1]]])


# --------------------------------------------------------------------------- pointing game
def test_pointing_game_tolerance_and_class_means():
    s = np.zeros((3, 20, 20))
    s[:, 5, 5] = 1.0                                    # arg-max at (y, x) = (5, 5)
    g = np.zeros((3, 20, 20), bool)
    g[0, 5, 15] = True                                  # 10 px away
    g[1, 5, 18] = True                                  # 13 px away
    g[2, 4:7, 4:7] = True                               # covers the point
    labels = [0, 0, 1]
    r = metrics.pointing_game(s, g, labels, tolerance=12)
    assert r["hits"].tolist() == [True, False, True]
    assert r["accuracy"] == pytest.approx(2 / 3)
    assert r["class_accuracy"] == {0: 0.5, 1: 1.0}
    assert r["mean_class_accuracy"] == pytest.approx(0.75)
    assert metrics.pointing_game(s, g, labels)["hits"].tolist() == [True, True, True]  # τ = 15
    r0 = metrics.pointing_game(s, g, labels, tolerance=0, difficult=[True, True, False])
    assert r0["hits"].tolist() == [False, False, True]
    assert r0["difficult_accuracy"] == 0.0 and r0["difficult_class_accuracy"] == {0: 0.0}


def test_pointing_game_bad_input():
    s = np.ones((2, 8, 8))
    g = np.ones((2, 8, 8), bool)
    with pytest.raises(ValueError, match="shape"):
        metrics.pointing_game(s, g[:, :4], [0, 1])
    g[1] = False
    with pytest.raises(ValueError, match="empty"):
        metrics.pointing_game(s, g, [0, 1])
    with pytest.raises(ValueError, match="labels"):
        metrics.pointing_game(s, np.ones((2, 8, 8), bool), [0])


# --------------------------------------------------------------------------- salient objects
def test_salient_object_known_answer():
    s = _rect(10, 10, 0, 4, 0, 9)                       # top half (50 px), mean 0.5
    g = _rect(10, 10, 0, 4, 0, 4).astype(bool)          # top-left quarter (25 px)
    r = metrics.salient_object(s, g)
    assert r["precision"][0] == 0.5 and r["recall"][0] == 1.0
    assert r["f"][0] == pytest.approx(1.3 * 0.5 / (0.3 * 0.5 + 1.0))
    assert r["mae"][0] == pytest.approx(0.25)
    # A low-contrast map: threshold 2·mean = 0.4 keeps only the 0.8 pixels.
    s2 = np.full((1, 10, 10), 0.1)
    s2[0, :5, :5] = 0.8
    r2 = metrics.salient_object(s2, g)
    assert r2["precision"][0] == 1.0 and r2["recall"][0] == 1.0 and r2["f"][0] == 1.0


def test_salient_object_bad_input():
    g = _rect(10, 10, 0, 4, 0, 4).astype(bool)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        metrics.salient_object(_rect(10, 10, 0, 4, 0, 9) * 3, g)
    with pytest.raises(ValueError, match="empty"):
        metrics.salient_object(_rect(10, 10, 0, 4, 0, 9), np.zeros_like(g))


# --------------------------------------------------------------------------- deletion/insertion
def _mean_red(x):
    """A toy 'model': P(class 0) = mean of channel 0, P(class 1) = the rest."""
    p0 = np.asarray(x)[..., 0].mean(axis=(1, 2))
    return np.stack([p0, 1 - p0], 1)


def test_deletion_insertion_known_answer():
    x = np.zeros((2, 4, 4, 3), np.float32)
    x[:, :, :2, 0] = 1.0                                # left half red: P0 = 0.5
    good = np.zeros((2, 4, 4))
    good[:, :, :2] = 1.0
    good[1] = 1 - good[1]                               # image 1: the wrong half first
    d = metrics.deletion_insertion(_mean_red, x, good, targets=[0, 0], mode="deletion",
                                   substrate="zero", steps=4)
    assert np.allclose(d["curves"], [[0.5, 0.25, 0, 0, 0], [0.5, 0.5, 0.5, 0.25, 0]])
    assert np.allclose(d["auc"], [0.125, 0.375])
    i = metrics.deletion_insertion(_mean_red, x, good, targets=[0, 0], mode="insertion",
                                   substrate="zero", steps=4)
    assert np.allclose(i["curves"], [[0, 0.25, 0.5, 0.5, 0.5], [0, 0, 0, 0.25, 0.5]])
    assert np.allclose(i["auc"], [0.375, 0.125])


def test_deletion_blur_substrate_ends_at_the_blurred_image():
    x = np.random.default_rng(0).normal(size=(1, 16, 16, 3)).astype(np.float32)
    s = np.random.default_rng(1).random((1, 16, 16))
    d = metrics.deletion_insertion(_mean_red, x, s, targets=[0], steps=5, blur_sigma=2.0)
    blurred = metrics.make_substrate(x, "blur", 2.0)
    assert d["curves"][0, 0] == pytest.approx(_mean_red(x)[0, 0])
    assert d["curves"][0, -1] == pytest.approx(_mean_red(blurred)[0, 0])
    assert not np.allclose(blurred, x)


def test_deletion_bad_input():
    x = np.zeros((1, 4, 4, 3), np.float32)
    with pytest.raises(ValueError, match="same B, H, W"):
        metrics.deletion_insertion(_mean_red, x, np.ones((1, 8, 8)))
    with pytest.raises(ValueError, match="substrate"):
        metrics.deletion_insertion(_mean_red, x, np.ones((1, 4, 4)), substrate="noise")


# --------------------------------------------------------------------------- grid pointing game
def test_mosaic_and_grid_pointing():
    imgs = np.arange(4)[None, :, None, None, None] * np.ones((1, 4, 3, 5, 1))
    grid = metrics.mosaic(imgs)
    assert grid.shape == (1, 6, 10, 1)
    assert grid[0, 0, 0, 0] == 0 and grid[0, 0, 9, 0] == 1
    assert grid[0, 5, 0, 0] == 2 and grid[0, 5, 9, 0] == 3
    s = np.zeros((2, 6, 10))
    s[0, 3:, :5] = 1.0                                  # all energy in cell 2
    s[1, :3, :5] = 1.0                                  # half in cell 0 …
    s[1, :3, 5:] = 1.0                                  # … half in cell 1
    s[1, 4, 7] = -5.0                                   # negative saliency does not count
    r = metrics.grid_pointing(s, [2, 0])
    assert np.allclose(r["energy"], [1.0, 0.5]) and r["hit"].tolist() == [True, True]
    assert metrics.grid_pointing(s, [3, 1])["hit"].tolist() == [False, False]
    with pytest.raises(ValueError, match="no positive"):
        metrics.grid_pointing(-np.ones((1, 6, 10)), [0])


def test_select_grids_four_confident_classes():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(6), 5)
    probs = np.full((30, 6), 0.02)
    probs[np.arange(30), labels] = 0.9
    probs[labels == 5, 5] = 0.3                         # class 5 never confident
    idx = metrics.select_grids(probs, labels, 20, seed=int(rng.integers(100)))
    assert idx.shape == (20, 4)
    assert all(len(set(labels[i])) == 4 for i in idx)
    assert not np.isin(labels[idx], [5]).any()
    with pytest.raises(ValueError, match="4 classes"):
        metrics.select_grids(probs, labels, 1, min_confidence=0.95)


# --------------------------------------------------------------------------- randomization
def test_rankdata_and_spearman():
    assert metrics.rankdata(np.array([10.0, 20.0, 20.0, 5.0])).tolist() == [1.0, 2.5, 2.5, 0.0]
    x = np.random.default_rng(0).normal(size=(2, 5, 6))
    assert np.allclose(metrics.spearman(x, x ** 3), 1.0)
    assert np.allclose(metrics.spearman(x, -x), -1.0)
    scipy_stats = pytest.importorskip("scipy.stats")
    y = np.round(np.random.default_rng(1).normal(size=(2, 5, 6)), 1)   # with ties
    ref = [scipy_stats.spearmanr(a.ravel(), b.ravel())[0] for a, b in zip(x, y)]
    assert np.allclose(metrics.spearman(x, y), ref)
    assert np.isnan(metrics.spearman(x, np.ones_like(x))).all()   # undefined, not 0


def test_layer_groups_in_forward_order():
    arch = gfi_jax.get_arch("vgg16")
    m = LoadedModel(arch, arch.split()[1], classes=gfi_jax.imagenet_classes())  # shapes only
    names = [n for n, _ in metrics.layer_groups(m, np.zeros((1, 32, 32, 3), np.float32))]
    assert names == [f"convs.{i}" for i in range(13)] + ["fc6", "fc7", "fc8"]


def test_cascading_randomization(random_resnet18):
    resnet = random_resnet18
    x = np.random.default_rng(0).normal(size=(2, 48, 48, 3)).astype(np.float32)
    r = metrics.cascading_randomization(resnet, x, "grad")
    assert r["layers"][0] == "fc" and r["layers"][-1] == "conv1"
    assert r["spearman"].shape == (len(r["layers"]), 2)
    assert (r["spearman"][-1] < 0.9).all()              # every weight redrawn: a new map
    # Explaining after every 3rd unit only: the same cumulative randomization, fewer rows.
    s = metrics.cascading_randomization(resnet, x, "grad", every=3)
    keep = [i for i in range(len(r["layers"])) if (i + 1) % 3 == 0 or i + 1 == len(r["layers"])]
    assert s["layers"] == [r["layers"][i] for i in keep]
    np.testing.assert_allclose(s["spearman"], r["spearman"][keep], rtol=1e-6)
    # The Center baseline ignores the model: its maps never change.
    c = metrics.cascading_randomization(resnet, x, "center")
    assert np.allclose(c["spearman"], 1.0)
