"""ROAD (gfi_jax.metrics.road) against answers known in closed form."""
import numpy as np
import pytest

from gfi_jax.metrics import linear_imputation, road


def test_keeps_every_kept_pixel_and_fills_nothing_when_all_kept():
    x = np.random.default_rng(0).normal(size=(9, 7, 3)).astype(np.float32)
    np.testing.assert_array_equal(linear_imputation(x, np.ones((9, 7), bool)), x)
    keep = np.random.default_rng(1).random((9, 7)) > 0.5
    out = linear_imputation(x, keep, noise=0.3)
    np.testing.assert_array_equal(out[keep], x[keep])


def test_single_interior_pixel_is_the_weighted_mean_of_its_eight_neighbours():
    x = np.random.default_rng(2).normal(size=(5, 5, 2))
    keep = np.ones((5, 5), bool)
    keep[2, 2] = False
    direct = x[1, 2] + x[3, 2] + x[2, 1] + x[2, 3]
    diagonal = x[1, 1] + x[1, 3] + x[3, 1] + x[3, 3]
    np.testing.assert_allclose(linear_imputation(x, keep)[2, 2], direct / 6 + diagonal / 12,
                               rtol=1e-12)


def test_corner_pixel_renormalizes_over_its_three_neighbours():
    x = np.random.default_rng(3).normal(size=(4, 4, 1))
    keep = np.ones((4, 4), bool)
    keep[0, 0] = False
    want = (x[0, 1] / 6 + x[1, 0] / 6 + x[1, 1] / 12) / (5 / 12)
    np.testing.assert_allclose(linear_imputation(x, keep)[0, 0], want, rtol=1e-12)


def test_a_linear_ramp_is_imputed_exactly_in_an_interior_hole():
    # The stencil is symmetric, so every affine function satisfies its mean-value equation:
    # the joint solution over a hole that does not touch the border is the ramp itself.
    yy, xx = np.mgrid[0:20, 0:24]
    x = np.stack([0.3 * yy - 0.2 * xx + 1.0, 0.05 * xx + 2.0], -1)
    keep = np.ones((20, 24), bool)
    keep[4:15, 3:19] = False
    np.testing.assert_allclose(linear_imputation(x, keep), x, atol=1e-9)


def test_noise_goes_to_imputed_pixels_only_with_the_given_scale():
    x = np.zeros((64, 64, 3))
    keep = np.ones((64, 64), bool)
    keep[8:56, 8:56] = False
    out = linear_imputation(x, keep, noise=0.05, rng=np.random.default_rng(0))
    assert np.all(out[keep] == 0)
    assert abs(out[~keep].std() - 0.05) < 0.002 and abs(out[~keep].mean()) < 0.002


def test_all_pixels_removed_is_an_error():
    with pytest.raises(ValueError, match="keep at least one pixel"):
        linear_imputation(np.zeros((3, 3, 1)), np.zeros((3, 3), bool))


def _region_model(region):
    """A 'classifier' whose class-0 probability is the mean brightness of `region` (in [0, 1])
    and class 1 gets the rest."""
    def f(images):
        p = np.clip(images[:, region[0], region[1], :].mean(axis=(1, 2, 3)), 0, 1)
        return np.stack([p, 1 - p], 1)
    return f


def test_morf_falls_and_lerf_holds_for_a_map_on_the_evidence():
    # A bright square on black: the class score is the square's brightness. A map that ranks
    # the square first removes the evidence under MoRF (imputed from black surroundings) and
    # keeps it under LeRF; the reversed map does the opposite.
    x = np.zeros((1, 32, 32, 3), np.float32)
    region = (slice(12, 20), slice(12, 20))
    x[0, 12:20, 12:20] = 1.0
    on = np.zeros((1, 32, 32))
    on[0, 12:20, 12:20] = 1.0
    model = _region_model(region)
    levels = (0.1, 0.5, 0.9)
    good_morf = road(model, x, on, [0], "morf", levels, noise=0)["curves"][0]
    good_lerf = road(model, x, on, [0], "lerf", levels, noise=0)["curves"][0]
    bad_morf = road(model, x, -on, [0], "morf", levels, noise=0)["curves"][0]
    # 10% of 1024 pixels is 103 > the square's 64: MoRF imputes the whole square from black.
    np.testing.assert_allclose(good_morf, 0, atol=1e-9)
    np.testing.assert_allclose(good_lerf, 1, atol=1e-9)    # the square is never touched
    np.testing.assert_allclose(bad_morf, 1, atol=1e-9)     # the square is removed last


def test_road_removes_the_stated_number_of_pixels_and_checks_its_input():
    seen = []
    x = np.random.default_rng(0).normal(size=(2, 10, 10, 3)).astype(np.float32)
    s = np.random.default_rng(1).random((2, 10, 10))

    def model(z):
        seen.append(int((z != x).any(-1).sum(axis=(1, 2))[0]))
        return np.full((len(z), 3), 1 / 3)
    out = road(model, x, s, [0, 2], "morf", (0.25, 0.5), noise=0.1)
    assert seen == [25, 50] and out["curves"].shape == (2, 2)
    np.testing.assert_allclose(out["score"], 1 / 3)
    with pytest.raises(ValueError, match="order"):
        road(model, x, s, [0, 1], "both")
    with pytest.raises(ValueError, match="levels"):
        road(model, x, s, [0, 1], "lerf", (0.5, 1.0))
    with pytest.raises(ValueError, match="one class per image"):
        road(model, x, s, [0], "lerf")
