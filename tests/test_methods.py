"""The attribution methods: registry and interface, defining properties of each method,
and clear errors. (Agreement with Captum is in test_captum.py.)"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gfi_jax
from gfi_jax.gfi import upsample
from gfi_jax.methods import (METHODS, RiseConfig, MeaningfulPerturbationConfig, SmoothGradConfig,
                             attribute)
from gfi_jax.methods.gradients import noise_samples, quadrature
from gfi_jax.methods.perturbation import meaningful_perturbation, rise, rise_masks
from gfi_jax.models import LoadedModel
from gfi_jax.jaxpr_guided import guided
from gfi_jax.models.layers import relu, relu6

SIZE = 48   # ResNet-18's layer4 is 2×2 here: CAM maps are not constant


@pytest.fixture(scope="module")
def m(random_resnet18):  # conftest.py's, shared with test_metrics.py
    return random_resnet18


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(0).normal(size=(2, SIZE, SIZE, 3)).astype(np.float32)


CHEAP = {"smoothgrad": dict(samples=3), "integrated_gradients": dict(steps=4),
         "rise": dict(masks=20, chunk=10), "meaningful_perturbation": dict(steps=3, size=8),
         "gfi": dict(stage1_steps=2, stage2_steps=2)}


def test_registry_names():
    assert list(METHODS) == ["grad", "guided_backprop", "smoothgrad", "integrated_gradients",
                             "gradcam", "cam", "rise", "meaningful_perturbation", "center", "gfi"]
    assert gfi_jax.METHODS is METHODS and gfi_jax.attribute is attribute


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_gives_finite_maps(m, x, name):
    s = attribute(m, x, name, **CHEAP.get(name, {}))
    assert s.shape == (2, SIZE, SIZE) and s.dtype == np.float32
    assert np.isfinite(s).all() and np.ptp(s) > 0


def test_targets_top1_int_and_per_image(m, x):
    top1 = np.asarray(m(x)["logits"]).argmax(1)
    assert np.array_equal(attribute(m, x, "grad"), attribute(m, x, "grad", targets=top1))
    a = attribute(m, x, "grad", targets=7)
    assert np.array_equal(a, attribute(m, x, "grad", targets=[7, 7]))
    assert not np.array_equal(a, attribute(m, x, "grad", targets=[7, 8]))
    # Batched maps are each image's own.
    one = attribute(m, x[1:], "grad", targets=[8])
    assert np.allclose(one[0], attribute(m, x, "grad", targets=[7, 8])[1], rtol=1e-5, atol=1e-7)


def test_guided_rectifiers_backward_rule():
    """Springenberg et al.'s rule at the zoo's own rectifiers, elementwise: the gradient
    passes only where the input is in the linear range and the incoming gradient is > 0."""
    z = jnp.array([-1.0, 0.5, 2.0, 7.0, 3.0])
    w = jnp.array([1.0, 1.0, -1.0, 1.0, 2.0])      # incoming gradient, one negative
    g = jax.grad(lambda v: (w * guided(relu)(v)).sum())(z)
    g6 = jax.grad(lambda v: (w * guided(relu6)(v)).sum())(z)
    assert g.tolist() == [0.0, 1.0, 0.0, 1.0, 2.0]
    assert g6.tolist() == [0.0, 1.0, 0.0, 0.0, 2.0]     # 7 > 6: outside ReLU6's linear range
    plain = jax.grad(lambda v: (w * relu(v)).sum())(z)  # not rewritten: the usual rule
    assert plain.tolist() == [0.0, 1.0, -1.0, 1.0, 2.0]


def test_smoothgrad_zero_noise_is_grad(m, x):
    sg = attribute(m, x, "smoothgrad", samples=3, noise=0.0, reduce="sum", targets=[1, 2])
    g = attribute(m, x, "grad", reduce="sum", targets=[1, 2])
    assert np.allclose(sg, g, rtol=1e-5, atol=1e-6 * np.abs(g).max())


def test_smoothgrad_is_the_mean_over_its_noise_samples(m, x):
    cfg = SmoothGradConfig(samples=3, noise=0.2, reduce="sum")
    eps = np.asarray(noise_samples(cfg, x.shape[1:]))
    sigma = 0.2 * (x.max(axis=(1, 2, 3)) - x.min(axis=(1, 2, 3)))
    direct = np.mean([attribute(m, x + sigma[:, None, None, None] * e, "grad", reduce="sum",
                                targets=[1, 2]) for e in eps], axis=0)
    sg = attribute(m, x, "smoothgrad", targets=[1, 2], samples=3, noise=0.2, reduce="sum")
    assert np.allclose(sg, direct, rtol=1e-4, atol=1e-5 * np.abs(direct).max())


def test_quadrature_rules():
    for rule, exact_degree in [("gausslegendre", 7), ("riemann_trapezoid", 1),
                               ("riemann_middle", 1)]:
        a, w = quadrature(rule, 4)
        assert np.sum(w * a ** exact_degree) == pytest.approx(1 / (exact_degree + 1))
    a, w = quadrature("riemann_right", 4)
    assert a.tolist() == [0.25, 0.5, 0.75, 1.0] and np.allclose(w, 0.25)
    with pytest.raises(ValueError, match="rule"):
        quadrature("simpson", 4)


def test_integrated_gradients_completeness(m, x):
    """Σ IG ≈ logit(x) − logit(baseline) (Sundararajan et al.'s axiom), to quadrature error."""
    ig = attribute(m, x, "integrated_gradients", targets=[3, 4], steps=64, reduce="sum")
    logits = np.asarray(m(x)["logits"])[[0, 1], [3, 4]]
    base = np.asarray(m(np.zeros_like(x))["logits"])[[0, 1], [3, 4]]
    assert np.allclose(ig.sum(axis=(1, 2)), logits - base, rtol=0.02,
                       atol=0.02 * np.abs(logits - base).max())


def test_cam_is_classifier_weighted_map(m, x):
    t = np.array([3, 9])
    a = np.asarray(m(x, layers=("layer4",))["layer4"])
    w = np.asarray(m.params["fc"]["kernel"][...])                      # (512, 1000)
    low = np.einsum("bhwc,cb->bhw", a, w[:, t])
    want = np.asarray(upsample(jnp.asarray(low), (SIZE, SIZE), align_corners=False))
    got = attribute(m, x, "cam", targets=t)
    assert np.allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    # Grad-CAM at the same layer is ReLU(CAM)/(h·w) for a GAP + linear head.
    gc = attribute(m, x, "gradcam", targets=t)
    h, w_ = a.shape[1:3]
    low_gc = np.maximum(low, 0) / (h * w_)
    want_gc = np.asarray(upsample(jnp.asarray(low_gc), (SIZE, SIZE), align_corners=False))
    assert np.allclose(gc, want_gc, rtol=1e-4, atol=1e-5 * np.abs(want_gc).max())


def test_cam_and_gradcam_layer_errors(m, x):
    arch = gfi_jax.get_arch("vgg16")
    vgg = LoadedModel(arch, arch.split()[1], classes=gfi_jax.imagenet_classes())  # shapes only
    with pytest.raises(ValueError, match="global average pooling"):
        attribute(vgg, x, "cam")
    with pytest.raises(ValueError, match="feeds the average pooling"):
        attribute(m, x, "cam", layer="layer3")
    with pytest.raises(ValueError, match="has no layer"):
        attribute(m, x, "gradcam", layer="conv9")
    for layer in ("layer3", "pool1"):   # a named inner layer; any layer, ReLU or not
        s = attribute(m, x, "gradcam", layer=layer)
        assert s.shape == (2, SIZE, SIZE) and np.isfinite(s).all()


def _toy_features(region: np.ndarray, gain: float):
    """A stand-in model: logit 0 = gain · mean of channel 0 over `region`, others 0."""
    r = jnp.asarray(region, jnp.float32)

    def features(params, images, layers):
        z = gain * jnp.einsum("bhw,hw->b", images[..., 0], r) / r.sum()
        return {"logits": jnp.stack([z, jnp.zeros_like(z), jnp.zeros_like(z)], 1)}
    return features


def test_rise_known_answers():
    region = np.zeros((SIZE, SIZE))
    region[:12, :12] = 1
    images = jnp.ones((1, SIZE, SIZE, 3))
    cfg = RiseConfig(masks=60, chunk=20, cells=4, p=0.5)
    # A model blind to the image: P = 1/3 whatever is masked, so the map is Σ Mᵢ /(3·N·p).
    flat = rise(_toy_features(region, 0.0), None, images, jnp.array([0]), cfg)
    key = jax.random.PRNGKey(cfg.seed)
    ms = jnp.concatenate([rise_masks(cfg, jax.random.fold_in(key, i), 20, (SIZE, SIZE))
                          for i in range(3)])
    assert np.allclose(flat[0], ms.sum(0) / (3 * 60 * 0.5), rtol=1e-5)
    assert 0.0 <= float(ms.min()) and float(ms.max()) <= 1.0
    assert abs(float(ms.mean()) - 0.5) < 0.1
    # A model that looks only at the top-left region: the map is higher there.
    s = np.asarray(rise(_toy_features(region, 5.0), None, images, jnp.array([0]), cfg))[0]
    assert s[region == 1].mean() > s[region == 0].mean() + 0.05


def test_rise_forward_batches_do_not_change_the_map():
    """`batch` only splits the masked images into smaller forward passes: the same map at
    every divisor of chunk, and a clear error at a non-divisor."""
    region = np.zeros((SIZE, SIZE))
    region[4:16, 10:24] = 1
    images = jnp.asarray(np.random.default_rng(0).uniform(0, 1, (2, SIZE, SIZE, 3)), jnp.float32)
    f = _toy_features(region, 5.0)
    maps = [np.asarray(rise(f, None, images, jnp.array([0, 0]),
                            RiseConfig(masks=40, chunk=20, cells=4, batch=b))) for b in (20, 5, 1)]
    assert np.abs(maps[0]).max() > 0
    for m in maps[1:]:
        np.testing.assert_allclose(m, maps[0], rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="must divide chunk"):
        rise(f, None, images, jnp.array([0, 0]), RiseConfig(masks=40, chunk=20, batch=3))


def test_meaningful_perturbation_deletes_the_evidence():
    region = np.zeros((SIZE, SIZE))
    region[8:20, 8:20] = 1
    images = jnp.asarray(np.broadcast_to(region[None, :, :, None], (1, SIZE, SIZE, 3)) * 2.0,
                         jnp.float32)
    cfg = MeaningfulPerturbationConfig(steps=60, size=8, blur_sigma=4.0)
    s = np.asarray(meaningful_perturbation(_toy_features(region, 4.0), None, images,
                                           jnp.array([0]), cfg))[0]
    assert 0.0 <= s.min() and s.max() <= 1.0
    assert s[region == 1].mean() > s[region == 0].mean()
    assert region[np.unravel_index(s.argmax(), s.shape)] == 1


def test_center_is_a_centered_gaussian(m, x):
    s = attribute(m, np.zeros((1, 33, 35, 3), np.float32), "center", sigma=0.25)[0]
    assert s[16, 17] == pytest.approx(1.0) and np.unravel_index(s.argmax(), s.shape) == (16, 17)
    assert np.allclose(s, s[::-1]) and np.allclose(s, s[:, ::-1])
    assert s[16, 17 + 8] == pytest.approx(np.exp(-0.5 * (8 / (0.25 * 33)) ** 2), rel=1e-5)


def test_gfi_is_explain(m, x):
    kw = dict(stage1_steps=2, stage2_steps=2)
    assert np.array_equal(attribute(m, x, "gfi", targets=[1, 2], **kw),
                          gfi_jax.explain(m, x, [1, 2], preset=gfi_jax.preset(**kw)).mask)


def test_bad_input(m, x):
    with pytest.raises(ValueError, match="unknown method"):
        attribute(m, x, "lime")
    with pytest.raises(ValueError, match="unknown option"):
        attribute(m, x, "grad", steps=3)
    with pytest.raises(ValueError, match="outside the model"):
        attribute(m, x, "grad", targets=1000)
    with pytest.raises(ValueError, match="one per image"):
        attribute(m, x, "grad", targets=[1, 2, 3])
    with pytest.raises(ValueError, match="one target per image"):
        attribute(m, x, "grad", targets="top2")
    bad = x.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        attribute(m, bad, "grad")
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
        attribute(m, x[0], "grad")
