"""The GFI engine: batching, projection, schedules, target handling, compilation, bad input."""
from __future__ import annotations

import dataclasses
import re
import typing

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gfi_jax
from gfi_jax import gfi as G
from gfi_jax.models import LoadedModel
from gfi_jax.testing.random_models import flax_init_model as random_model

SHORT = dict(stage1_steps=3, stage2_steps=4)



@pytest.fixture(scope="module")
def resnet():
    return random_model("resnet18")


@pytest.fixture(scope="module")
def images():
    return np.random.RandomState(0).randn(4, 64, 64, 3).astype(np.float32)


@pytest.mark.parametrize("name", ["reference", "paper"])
def test_batch_equals_single_runs_bit_for_bit(resnet, images, name):
    cfg = gfi_jax.preset(name, **SHORT)
    batch = gfi_jax.explain(resnet, images, preset=cfg)
    for i in range(len(images)):
        alone = gfi_jax.explain(resnet, images[i:i + 1], preset=cfg)
        for field in ("omega", "mask", "mask_l1", "loss_trace", "target", "score", "score_masked"):
            np.testing.assert_array_equal(getattr(batch, field)[i:i + 1], getattr(alone, field),
                                          err_msg=f"{field} of image {i}")


def test_outputs_shapes_ranges_and_projection(resnet, images):
    cfg = gfi_jax.preset("reference", trace_omega=True, omega_init=0.2, omega_max=0.15, **SHORT)
    e = gfi_jax.explain(resnet, images, preset=cfg)
    n, steps = len(images), cfg.stage1_steps + cfg.stage2_steps
    assert e.mask.shape == (n, 64, 64) and e.mask_l1.shape == (n, 2, 2)
    assert e.omega.shape == (n, 512) and e.loss_trace.shape == (n, steps)
    assert e.omega_trace.shape == (n, steps, 512)
    # The projection holds after every single step, at both bounds.
    hi = np.float32(0.15)
    assert (e.omega_trace >= 0).all() and (e.omega_trace <= hi).all()
    assert (e.omega_trace == hi).any()  # the upper bound was reached, and held
    for m in (e.mask, e.mask_l1):
        assert np.isfinite(m).all() and m.min() >= 0 and m.max() <= 1
    assert np.isfinite(e.loss_trace).all()
    np.testing.assert_array_equal(e.omega, e.omega_trace[:, -1])


def test_stage1_runs_once_per_image_and_is_shared_across_targets(resnet, images):
    cfg = gfi_jax.preset("reference", **SHORT)
    two = gfi_jax.explain(resnet, images, targets="top2", preset=cfg)
    one = gfi_jax.explain(resnet, images, targets="top1", preset=cfg)
    s1 = cfg.stage1_steps
    logits = np.asarray(resnet(images)["logits"])
    ranked = np.argsort(-logits, axis=1, kind="stable")[:, :2]
    np.testing.assert_array_equal(two.target.reshape(-1, 2), ranked)
    np.testing.assert_array_equal(two.image_index, np.repeat(np.arange(len(images)), 2))
    trace = two.loss_trace.reshape(len(images), 2, -1)
    np.testing.assert_array_equal(trace[:, 0, :s1], trace[:, 1, :s1])
    np.testing.assert_array_equal(trace[:, 0], one.loss_trace)
    np.testing.assert_array_equal(two.omega[::2], one.omega)
    # On CPU (sequential) each (image, target) is bit for bit its single-target explanation.
    if jax.default_backend() == "cpu":
        for field in ("mask", "score_masked", "score_background"):
            np.testing.assert_array_equal(getattr(two, field)[::2], getattr(one, field), field)
    # Explicit (B, K) targets and the k-th ranked class.
    explicit = gfi_jax.explain(resnet, images, targets=ranked, preset=cfg)
    np.testing.assert_array_equal(explicit.omega, two.omega)
    second = gfi_jax.explain(resnet, images, targets="rank2", preset=cfg)
    np.testing.assert_array_equal(second.target, ranked[:, 1])


def test_scores_match_the_model(resnet, images):
    e = gfi_jax.explain(resnet, images, targets=[1, 2, 3, 4], preset=gfi_jax.preset(**SHORT))
    logits = np.asarray(resnet(images)["logits"], np.float64)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    np.testing.assert_allclose(e.score, p[np.arange(4), [1, 2, 3, 4]], rtol=1e-4)
    sig = gfi_jax.explain(resnet, images, targets=[1, 2, 3, 4],
                          preset=gfi_jax.preset(score="sigmoid", **SHORT))
    np.testing.assert_allclose(sig.score, 1 / (1 + np.exp(-logits[np.arange(4), [1, 2, 3, 4]])),
                               rtol=1e-4)


@pytest.mark.parametrize("log_keep,log_suppress,area", [
    (False, False, 0.0), (True, False, 0.0), (True, True, 0.0), (False, False, 3.0),
    (True, True, 2.0)])
def test_stage2_loss_terms(resnet, images, log_keep, log_suppress, area):
    # lr = 0: ω stays at its start, so the first stage-2 loss is made of the returned scores
    # and the returned mask.
    cfg = gfi_jax.preset(stage1_steps=1, stage2_steps=1, lr=0.0, log_keep=log_keep,
                         log_suppress=log_suppress, area=area)
    e = gfi_jax.explain(resnet, images[:2], targets=[1, 2], preset=cfg)
    keep = np.log(e.score_masked) if log_keep else e.score_masked
    drop = np.log(e.score_background) if log_suppress else e.score_background
    expect = (-keep + cfg.lam * drop + cfg.delta * (e.omega ** 2).sum(1)
              + area * e.mask.mean(axis=(1, 2)))
    np.testing.assert_allclose(e.loss_trace[:, 1], expect, rtol=1e-5)


def test_area_term_shrinks_the_mask(resnet, images):
    """The normalized mask does not change with the scale of ω, so only the area term can
    make it smaller: with it, stage 2 ends with a smaller mean mask than without."""
    base = gfi_jax.preset(stage1_steps=3, stage2_steps=20, lr=0.05)
    a0 = gfi_jax.explain(resnet, images, preset=base).mask.mean(axis=(1, 2))
    a1 = gfi_jax.explain(resnet, images, preset=dataclasses.replace(base, area=5.0))
    assert (a1.mask.mean(axis=(1, 2)) < a0).all(), (a1.mask.mean(axis=(1, 2)), a0)


def test_area_term_known_answers():
    """Without a target: the mean of m. With a target area a: 0 for a binary mask that covers
    exactly a of the pixels wherever they are; 1 − a for an all-ones mask; a for all zeros."""
    rng = np.random.default_rng(0)
    m = rng.uniform(size=(3, 10, 10)).astype(np.float32)
    np.testing.assert_allclose(G.area_term(jnp.asarray(m), None), m.mean(axis=(1, 2)), rtol=1e-6)
    binary = np.zeros((2, 10, 10), np.float32)
    binary[0].flat[rng.permutation(100)[:20]] = 1.0           # scattered 20 %
    binary[1, :4, :5] = 1.0                                    # a 20 % block
    np.testing.assert_array_equal(G.area_term(jnp.asarray(binary), 0.2), [0.0, 0.0])
    ones, zeros = np.ones((1, 10, 10), np.float32), np.zeros((1, 10, 10), np.float32)
    np.testing.assert_allclose(G.area_term(jnp.asarray(ones), 0.2), [0.8], rtol=1e-6)
    np.testing.assert_allclose(G.area_term(jnp.asarray(zeros), 0.2), [0.2], rtol=1e-6)
    sorted_m = np.sort(m.reshape(3, -1), axis=1) - (np.arange(100) >= 80)
    np.testing.assert_allclose(G.area_term(jnp.asarray(m), 0.2),
                               (sorted_m ** 2).mean(axis=1), rtol=1e-5)


def test_stage2_loss_with_a_target_area(resnet, images):
    # lr = 0, as in test_stage2_loss_terms: the first stage-2 loss from the returned mask.
    cfg = gfi_jax.preset(stage1_steps=1, stage2_steps=1, lr=0.0, area=2.0, target_area=0.3)
    e = gfi_jax.explain(resnet, images[:2], targets=[1, 2], preset=cfg)
    flat = np.sort(e.mask.reshape(2, -1), axis=1)
    step = np.arange(flat.shape[1]) >= round(0.7 * flat.shape[1])
    expect = (-e.score_masked + cfg.lam * e.score_background + cfg.delta * (e.omega ** 2).sum(1)
              + 2.0 * ((flat - step) ** 2).mean(axis=1))
    np.testing.assert_allclose(e.loss_trace[:, 1], expect, rtol=1e-5)


def test_target_area_sets_the_mask_size(resnet, images):
    """A small target area ends stage 2 with a smaller mask than a large one, from the same
    stage 1 (the term pulls the mask's area both ways, unlike mean(m))."""
    base = gfi_jax.preset(stage1_steps=3, stage2_steps=20, lr=0.05, area=20.0)
    small = gfi_jax.explain(resnet, images, preset=dataclasses.replace(base, target_area=0.1))
    large = gfi_jax.explain(resnet, images, preset=dataclasses.replace(base, target_area=0.9))
    a_small, a_large = small.mask.mean(axis=(1, 2)), large.mask.mean(axis=(1, 2))
    assert (a_small < a_large).all(), (a_small, a_large)


def test_restart_starts():
    """Restart 0 is the paper's constant start; the others scale each channel by a U(½, 3/2)
    draw, different per restart and per seed, the same for every image."""
    cfg = gfi_jax.preset()
    np.testing.assert_array_equal(G.restart_start(cfg, jnp.int32(0), 5), np.ones(5))
    u1, u2 = (np.asarray(G.restart_start(cfg, jnp.int32(r), 500)) for r in (1, 2))
    assert (u1 >= 0.5).all() and (u1 < 1.5).all() and abs(u1.mean() - 1) < 0.05
    assert not np.allclose(u1, u2)
    other = np.asarray(G.restart_start(dataclasses.replace(cfg, seed=1), jnp.int32(1), 500))
    assert not np.allclose(u1, other)


def test_best_restart_picks_the_lowest_last_loss_per_row():
    loss = np.array([[[5, 3.0], [5, 1.0]], [[5, 2.0], [5, 4.0]]])   # (R=2, N=2, steps=2)
    runs = {"loss_trace": loss, "mask": np.arange(2 * 2 * 3).reshape(2, 2, 3)}
    best = G.best_restart({k: jnp.asarray(v) for k, v in runs.items()})
    np.testing.assert_array_equal(best["loss_trace"][:, -1], [2.0, 1.0])
    np.testing.assert_array_equal(best["mask"], [runs["mask"][1, 0], runs["mask"][0, 1]])


def test_restarts_keep_the_lowest_loss_and_the_batch_independence(resnet, images):
    """With R restarts each row's last stage-2 loss is at most that of the single constant
    start (restart 0 is that start), an image's answer is the same alone as in its batch,
    and at least one of these rows found a lower loss elsewhere (else restarts did nothing)."""
    base = gfi_jax.preset(stage1_steps=3, stage2_steps=6, lr=0.05)
    one = gfi_jax.explain(resnet, images, preset=base)
    cfg = dataclasses.replace(base, restarts=3)
    three = gfi_jax.explain(resnet, images, preset=cfg)
    l1, l3 = one.loss_trace[:, -1], three.loss_trace[:, -1]
    assert (l3 <= l1 + 1e-5 * np.abs(l1)).all(), (l3, l1)
    assert (l3 < l1 - 1e-4 * np.abs(l1)).any(), (l3, l1)
    alone = gfi_jax.explain(resnet, images[:1], preset=cfg)
    np.testing.assert_allclose(alone.mask[0], three.mask[0], atol=1e-5)
    flops1 = G.flops(resnet, base, (64, 64), compile=False)
    flops3 = G.flops(resnet, cfg, (64, 64), compile=False)
    assert flops3["analytic"] == 3 * flops1["analytic"]
    np.testing.assert_allclose(flops3["xla"], 3 * flops1["xla"], rtol=1e-9)


def test_basis_from_two_layers(resnet, images):
    """l1 = "a+b": ω weighs both layers' channels, the coarser map resized to the finer grid
    (bilinear; with align_corners=False, jax.image.resize's grid)."""
    acts = resnet(images, layers=("layer3", "layer4"))
    f = G.basis([acts["layer3"], acts["layer4"]], align_corners=False)
    assert f.shape == (4, 4, 4, 256 + 512)
    np.testing.assert_array_equal(f[..., :256], acts["layer3"])
    up = jax.image.resize(acts["layer4"], (4, 4, 4, 512), "bilinear", antialias=False)
    np.testing.assert_allclose(f[..., 256:], up, rtol=1e-5, atol=1e-6)
    cfg = gfi_jax.preset(l1="layer3+layer4", **SHORT)
    e = gfi_jax.explain(resnet, images, preset=cfg)
    assert e.config.l1 == "layer3+layer4"
    assert e.omega.shape == (4, 768) and e.mask_l1.shape == (4, 4, 4)
    assert np.isfinite(e.mask).all() and e.mask.min() >= 0 and e.mask.max() <= 1
    with pytest.raises(ValueError, match="no layer 'layer9'"):
        gfi_jax.explain(resnet, images, preset=gfi_jax.preset(l1="layer4+layer9", **SHORT))


def test_default_preset_per_architecture(resnet, images):
    assert gfi_jax.gfi.default_preset("efficientnet_lite0") == "detached_lite0"
    assert gfi_jax.gfi.default_preset("resnet18") == "reference"
    assert gfi_jax.preset("contrastive") == dataclasses.replace(
        gfi_jax.preset("reference"), name="contrastive", log_keep=True)
    assert gfi_jax.preset("contrastive_lite0") == dataclasses.replace(
        gfi_jax.preset("contrastive"), name="contrastive_lite0", l1="head+blocks.11.expand",
        combine="product")
    assert gfi_jax.preset("detached_lite0") == dataclasses.replace(
        gfi_jax.preset("contrastive_lite0"), name="detached_lite0", norm_grad="detach", area=1.0)
    assert gfi_jax.preset(None, arch="efficientnet_lite0") == gfi_jax.preset("detached_lite0")
    assert gfi_jax.preset(None, arch="vgg19", gamma=1.0) == gfi_jax.preset("reference", gamma=1.0)
    assert gfi_jax.preset("paper", arch="efficientnet_lite0").name == "paper"  # a name wins
    e = gfi_jax.explain(resnet, images[:1])
    assert e.config.name == "reference" and not e.config.log_keep


def test_step_size_schedules():
    paper = G.lr_trace(gfi_jax.preset("paper"))
    expected = [1e-2] * 11 + [1e-2 * 0.5 ** (t // 10) for t in range(71)]
    np.testing.assert_allclose(paper, expected, rtol=1e-6)
    ref = G.lr_trace(gfi_jax.preset("reference"))
    np.testing.assert_allclose(ref, [1e-2 * 0.5 ** (s // 10) for s in range(80)], rtol=1e-6)
    assert ref[11] == pytest.approx(5e-3)  # stage 2 of the released code starts at 5e-3


def test_projection_lower_bound():
    # The paper keeps ω >= 0; `omega_min=None` drops that bound (a setting tried on the offline
    # benchmark). A gradient that pushes ω down for 50 steps crosses 0 only without the bound.
    omega = jnp.full((1, 4), 0.1)
    for lo, below_zero in ((0.0, False), (None, True)):
        cfg = gfi_jax.preset("reference", omega_min=lo)
        opt = G.optimizer(cfg, optax.constant_schedule(cfg.lr))
        w, state = omega, opt.init(omega)
        for _ in range(50):
            u, state = opt.update(jnp.ones_like(w), state, w)
            w = optax.apply_updates(w, u)
        assert bool((w < 0).all()) == below_zero, (lo, w)
        if not below_zero:
            assert float(w.min()) == 0.0


def test_presets_and_overrides():
    p = gfi_jax.preset("reference", l0="head", l1="head")
    assert (p.l0, p.l1, p.gamma, p.stage2_steps) == ("head", "head", 5.0, 69)
    q = gfi_jax.preset("paper")
    assert (q.gamma, q.delta, q.lam, q.stage1_steps, q.stage2_steps) == (10.0, 1.0, 1.0, 11, 71)
    assert q.omega_init == 0.1 and q.lr == 1e-2 and q.omega_max is None
    with pytest.raises(ValueError, match="unknown preset"):
        gfi_jax.preset("fast")
    with pytest.raises(ValueError, match="unknown config field"):
        gfi_jax.preset("paper", gama=3)


@pytest.mark.parametrize("field, value, message", [
    ("normalize", "bogus", "one of 'minmax', 'max'"),
    ("stage1_penalty", "l3", "one of 'l1', 'l2sq'"),
    ("background", "nope", "one of 'blur', 'mean', 'noise'"),
    ("combine", "mean", "one of 'sum', 'product'"),
    ("norm_grad", "soft", "one of 'exact', 'detach'"),
    ("stage1_steps", -1, ">= 0"),
    ("stage2_steps", 2.5, "an int"),
    ("lr", -1e-3, ">= 0"),
    ("lr_every", 0, ">= 1"),
    ("lr_decay", 0.0, "> 0"),
    ("adam_eps", 0.0, "> 0"),
    ("blur_sigma", -2.0, "> 0"),
    ("gamma", -1.0, ">= 0"),
    ("lam", -1, ">= 0"),
    ("delta", -0.5, ">= 0"),
    ("area", -1.0, ">= 0"),
    ("target_area", 1.5, "must be in (0, 1)"),
    ("restarts", 0, ">= 1"),
    ("target_area", 0.2, "with area > 0 as its weight"),
    ("omega_init", float("nan"), "a finite number"),
    ("omega_max", float("inf"), "a finite number or None"),
    ("omega_min", "0", "a finite number or None"),
    ("log_keep", "yes", "True or False"),
    ("seed", 1.5, "an int"),
    ("l1", 3, "str or None"),
])
def test_config_rejects_bad_values(field, value, message):
    # One line that names the field, the bad value and what the field takes.
    with pytest.raises(ValueError, match=rf"^Config\.{field}={re.escape(repr(value))}: "
                                         rf"[^\n]*{re.escape(message)}[^\n]*$"):
        gfi_jax.preset("reference", **{field: value})


def test_config_validation_follows_the_annotations():
    """Every choice of every Literal field is accepted, anything else is not; the presets and
    the edge values of the ranges pass."""
    literals = {name: typing.get_args(tp) for name, tp in typing.get_type_hints(G.Config).items()
                if typing.get_origin(tp) is typing.Literal}
    assert {"combine", "inversion_error", "normalize", "background", "score"} <= set(literals)
    for name, choices in literals.items():
        for choice in choices:
            assert getattr(G.Config(**{name: choice}), name) == choice
        with pytest.raises(ValueError, match=f"Config.{name}='other': expected one of"):
            G.Config(**{name: "other"})
    for cfg in G.PRESETS.values():
        assert dataclasses.replace(cfg) == cfg
    G.Config(lr=0.0, stage1_steps=0, stage2_steps=0, gamma=0, omega_min=None, omega_max=None,
             omega_init=-1.0, lr_decay=np.float32(2.0), lr_every=np.int64(1), log_keep=np.bool_(1))
    G.Config(omega_min=0.5, omega_max=0.5)
    with pytest.raises(ValueError, match=r"omega_min=1.0 > omega_max=0.5"):
        gfi_jax.preset("reference", omega_min=1.0, omega_max=0.5)


def test_layer_defaults_follow_the_preset(resnet, images):
    ref = gfi_jax.explain(resnet, images[:1], preset=gfi_jax.preset(**SHORT))
    assert (ref.config.l0, ref.config.l1) == ("layer4", "layer4")  # released code: one layer
    pap = gfi_jax.explain(resnet, images[:1], preset=gfi_jax.preset("paper", **SHORT))
    assert (pap.config.l0, pap.config.l1) == ("layer4", "layer4.1.act1")  # Sec. 4.1.1
    alias = gfi_jax.explain(resnet, images[:1], preset=gfi_jax.preset(l0="layer4.1", **SHORT))
    np.testing.assert_array_equal(alias.omega, ref.omega)


def test_second_call_with_new_images_does_not_recompile(resnet, images):
    cfg = gfi_jax.preset("reference", stage1_steps=2, stage2_steps=2)  # used by no other test
    sequential = jax.default_backend() == "cpu"  # explain's default
    fn = G.compiled(resnet.features, gfi_jax.explain(resnet, images, preset=cfg).config, sequential)
    before = fn._cache_size()
    gfi_jax.explain(resnet, images[::-1] * 0.5, preset=cfg)
    gfi_jax.explain(resnet, images + 1.0, targets=[5, 6, 7, 8], preset=cfg)
    assert fn._cache_size() == before == 1


def test_backgrounds(resnet, images):
    cfg = gfi_jax.preset(**SHORT)
    p = np.zeros_like(images)
    explicit = gfi_jax.explain(resnet, images, preset=cfg, background=p)
    # For ImageNet mean/std models the mean colour is 0 after normalization.
    mean = gfi_jax.explain(resnet, images, preset=gfi_jax.preset(background="mean", **SHORT))
    np.testing.assert_allclose(mean.omega, explicit.omega, rtol=1e-5, atol=1e-7)
    noise = gfi_jax.explain(resnet, images, preset=gfi_jax.preset(background="noise", **SHORT))
    assert np.isfinite(noise.mask).all()
    blurred = np.asarray(G.gaussian_blur(images, 11.0))
    assert blurred.std() < images.std() / 3
    np.testing.assert_allclose(blurred.mean(), images.mean(), atol=0.05)
    with pytest.raises(ValueError, match="background must have"):
        gfi_jax.explain(resnet, images, preset=cfg, background=p[:2])


def test_degenerate_inputs_never_give_nan(images):
    base = random_model("resnet18")
    zero = LoadedModel(base.arch, jax.tree.map(lambda a: a * 0, base.params), classes=base.classes)
    for model, x in ((zero, images), (random_model("resnet18"), np.full_like(images, 0.7))):
        for name in ("reference", "paper"):
            e = gfi_jax.explain(model, x, preset=gfi_jax.preset(name, trace_omega=True, **SHORT))
            for field in ("mask", "mask_l1", "omega", "loss_trace", "omega_trace", "score_masked"):
                assert np.isfinite(getattr(e, field)).all(), (name, field)
            assert e.mask.min() >= 0 and e.mask.max() <= 1


def test_omega_driven_to_zero_gives_zero_mask_not_nan():
    f1 = np.random.RandomState(0).rand(2, 3, 3, 8).astype(np.float32)
    for how in ("minmax", "max"):
        cfg = gfi_jax.preset(normalize=how)
        m = np.asarray(G.mask(np.zeros((2, 8), np.float32), f1, (12, 12), cfg))
        assert np.isfinite(m).all() and (m == 0).all()


def test_interpolation_matches_pytorch():
    torch = pytest.importorskip("torch")
    m = np.random.RandomState(1).rand(2, 5, 7).astype(np.float32)
    for ac in (True, False):
        ref = torch.nn.functional.interpolate(torch.from_numpy(m)[:, None], size=(23, 31),
                                              mode="bilinear", align_corners=ac)[:, 0].numpy()
        np.testing.assert_allclose(np.asarray(G.upsample(m, (23, 31), ac)), ref, atol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    (dict(images=np.zeros((64, 64, 3), np.float32)), r"\(B, H, W, 3\)"),
    (dict(images=np.zeros((1, 64, 64, 4), np.float32)), r"\(B, H, W, 3\)"),
    (dict(images=np.zeros((1, 16, 16, 3), np.float32)), "at least 32"),
    (dict(images=np.full((1, 64, 64, 3), np.nan, np.float32)), "NaN"),
    (dict(targets=[1000]), "outside the model's 1000 classes"),
    (dict(targets=[-3]), "outside"),
    (dict(targets="top0"), "not understood"),
    (dict(targets=[1, 2]), "one per image"),
    (dict(preset=gfi_jax.preset(l1="conv9")), "no layer 'conv9'.*valid layers: conv1"),
    (dict(preset=gfi_jax.preset(l0="nope")), "no layer 'nope'"),
    (dict(preset=gfi_jax.preset(l1="logits")), "l1 must be a convolutional layer"),
    (dict(preset=gfi_jax.preset(l1="avgpool")), None),  # a 1×1 map upsamples to a constant
])
def test_bad_input_fails_before_compiling(resnet, monkeypatch, kwargs, message):
    args = dict(images=np.zeros((1, 64, 64, 3), np.float32), targets=None,
                preset=gfi_jax.preset(**SHORT))
    args.update(kwargs)
    if message is None:
        e = gfi_jax.explain(resnet, **args)
        assert np.isfinite(e.mask).all()
        return
    monkeypatch.setattr(G, "compiled", lambda *a: pytest.fail("compiled before validating"))
    with pytest.raises(ValueError, match=message):
        gfi_jax.explain(resnet, **args)


def _no_logits(params, x, layers):
    return {"conv1": x[..., :1]}


@pytest.mark.parametrize("change, message", [
    (dict(cfg=dict(l0=None)), "cfg.l0 and cfg.l1 are unset"),
    (dict(images=np.zeros((64, 64, 3), np.float32)), r"images must be \(B, H, W, C\)"),
    (dict(targets=np.zeros((1,), np.int32)), r"targets: expected \(1, K\) ints"),
    (dict(targets=np.zeros((1, 1), np.float32)), "targets must be integers"),
    (dict(targets=np.full((1, 1), 1000, np.int32)), "outside the model's 1000 classes"),
    (dict(targets=np.full((1, 1), -1001, np.int32)), "target class -1001 is outside"),
    (dict(images=np.full((1, 64, 64, 3), np.inf, np.float32)), "NaN or Inf"),
    (dict(background=np.zeros((1, 32, 32, 3), np.float32)), "background must have"),
    (dict(cfg=dict(l1="conv9")), "fails for x of shape"),
    (dict(cfg=dict(l1="logits")), "l1 must be a layer with a spatial map"),
    (dict(features=_no_logits, cfg=dict(l0="conv1", l1="conv1")), r"returned no \['logits'\]"),
])
def test_the_pure_program_checks_its_inputs_before_compiling(resnet, change, message):
    cfg = dataclasses.replace(gfi_jax.preset(**SHORT),
                              **({"l0": "layer3", "l1": "layer4"} | change.get("cfg", {})))
    program = G.Program(change.get("features", resnet.features), cfg,
                        jitted=lambda *a: pytest.fail("ran before validating"))
    with pytest.raises(ValueError, match=message):
        program(resnet.params, change.get("images", np.zeros((1, 64, 64, 3), np.float32)),
                change.get("targets", np.full((1, 1), -1, np.int32)), change.get("background"))


def test_bfloat16_keeps_optimizer_state_in_float32(images):
    model = random_model("resnet18").astype("bfloat16")
    e = gfi_jax.explain(model, images[:2], preset=gfi_jax.preset(**SHORT))
    assert e.omega.dtype == np.float32 and e.mask.dtype == np.float32
    assert np.isfinite(e.mask).all()


def test_host_side_background_is_a_blur_of_the_original(resnet):
    from PIL import Image
    from gfi_jax import io
    rgb = (np.random.RandomState(0).rand(300, 400, 3) * 255).astype(np.uint8)
    img = Image.fromarray(rgb)
    p = io.blurred_background(img, resnet.preprocessing)
    x = resnet.preprocess(img)
    assert p.shape == x.shape == (224, 224, 3)
    assert p.std(axis=(0, 1)).max() < x.std(axis=(0, 1)).min() / 5  # per colour channel
    e = gfi_jax.explain(resnet, x[None], preset=gfi_jax.preset(**SHORT), background=p[None])
    assert np.isfinite(e.mask).all()


def test_flops_no_waste_and_xla_agrees_with_the_analytic_count():
    """Stage 1 runs only to l0; per explanation XLA's count is within 15% of forward +
    input-gradient FLOPs over all steps (no parameter gradients, no forwards thrown away)."""
    model = random_model("efficientnet_lite0")
    full = G.flops(model, gfi_jax.preset(), (224, 224))
    assert 0.85 <= full["xla"] / full["analytic"] <= 1.15, full
    early = G.flops(model, gfi_jax.preset(l0="blocks.5", l1="head"), (224, 224))
    assert early["forward_to_l0"] < 0.4 * full["forward_to_l0"]
    assert early["xla_stage1_step"] < 0.6 * full["xla_stage1_step"], (early, full)
    assert abs(early["xla_stage2_step"] / full["xla_stage2_step"] - 1) < 0.05


def test_product_of_two_layer_masks(resnet, images):
    """combine="product": each layer's map Σωf is upsampled and normalized alone, and the
    mask is their normalized product (ω unchanged at lr 0, so it is ω_init everywhere)."""
    cfg = gfi_jax.preset(l1="layer3+layer4", combine="product", stage1_steps=1,
                         stage2_steps=1, lr=0.0)
    e = gfi_jax.explain(resnet, images[:2], preset=cfg)
    acts = resnet(images[:2], layers=("layer3", "layer4"))

    def up_norm(a):  # (N, h, w, C) -> (N, 64, 64), the reference grid: align_corners=True
        m = a.sum(-1).astype(np.float64) * cfg.omega_init
        uh = G.interp_matrix(m.shape[1], 64, True, "float64")
        uw = G.interp_matrix(m.shape[2], 64, True, "float64")
        m = np.einsum("Hh,nhw,Ww->nHW", uh, m, uw)
        m = m - m.min(axis=(1, 2), keepdims=True)
        return m / m.max(axis=(1, 2), keepdims=True)

    expect = up_norm(np.asarray(acts["layer3"])) * up_norm(np.asarray(acts["layer4"]))
    expect = (expect - expect.min(axis=(1, 2), keepdims=True)) / expect.max(axis=(1, 2),
                                                                            keepdims=True)
    np.testing.assert_allclose(e.mask, expect, atol=1e-5)
    summed = gfi_jax.explain(resnet, images[:2], preset=dataclasses.replace(cfg, combine="sum"))
    assert not np.allclose(summed.mask, e.mask, atol=1e-3)


@pytest.mark.parametrize("how", ["max", "minmax"])
def test_normalization_gradients(how):
    """norm_grad changes the gradient through min and max, never the values.
    "detach": d/dm of Σ w·(m − lo)/den is w/den at every pixel. "exact": the arg-min and
    arg-max pixels also carry min's and max's own gradient, and only they differ; the exact
    gradient is orthogonal to m (the result is invariant to the map's scale), the detached
    one is not."""
    m = jnp.asarray(np.random.RandomState(3).rand(2, 5, 6).astype(np.float32)) + 0.5
    w = jnp.asarray(np.random.RandomState(4).randn(2, 5, 6).astype(np.float32))
    lo = m.min(axis=(1, 2), keepdims=True)
    den = m.max(axis=(1, 2), keepdims=True) - (lo if how == "minmax" else 0)

    def grad(kind):
        return jax.grad(lambda a: (G.normalize(a, how, grad=kind) * w).sum())(m)

    np.testing.assert_array_equal(G.normalize(m, how, grad="detach"), G.normalize(m, how))
    np.testing.assert_allclose(grad("detach"), w / den, rtol=1e-6)
    differ = ~np.isclose(grad("exact"), w / den, rtol=1e-4)
    extreme = (m == m.max(axis=(1, 2), keepdims=True)) | (m == lo)
    assert differ.any(axis=(1, 2)).all() and not (differ & ~extreme).any()
    radial = (grad("exact") * m).sum(axis=(1, 2))
    assert np.abs(radial).max() < 1e-5 * np.abs(w).sum(), radial
    assert np.abs((grad("detach") * m).sum(axis=(1, 2))).min() > 1e-2
    with pytest.raises(ValueError, match="norm_grad"):
        G.normalize(m, how, grad="soft")


def _toy_problem(cfg, c):
    """l1 = relu(x) (3 channels), logits = mean over the grid of l1 · w: ∂logit_c/∂l1 is
    w[:, c] / (H·W) at every pixel, so Grad-CAM's α_c is w[:, c] / (H·W)."""
    w = jnp.asarray([[1.0, -2.0, 0.5], [3.0, 1.0, -1.0], [-1.0, 0.0, 2.0]], jnp.float32)

    def features(params, x, names):
        h = gfi_jax.models.layers.relu(x)
        out = {"h": h, "logits": jnp.einsum("nhwc,ck->nk", h, params) / (x.shape[1] * x.shape[2])}
        return {n: out[n] for n in names}

    x = jnp.asarray(np.random.RandomState(0).rand(2, 4, 4, 3), jnp.float32)
    cfg = dataclasses.replace(cfg, l0="h", l1="h")
    return G.Problem(features, w, x, x * 0, features(w, x, ("h",))["h"], (3,), cfg), w


@pytest.mark.parametrize("init", ["gradient", "gated"])
def test_stage2_start_is_the_positive_class_gradient_scaled(init):
    cfg = gfi_jax.preset("reference", stage2_init=init, omega_init=0.1)
    c = jnp.array([0, 2])
    problem, w = _toy_problem(cfg, c)
    omega1 = jnp.asarray([[1.0, 2.0, 4.0], [1.0, 1.0, 1.0]], jnp.float32)
    start = np.asarray(G.stage2_start(problem, c, omega1))
    alpha = np.maximum(np.asarray(w)[:, [0, 2]].T, 0)          # (N, C): the positive part
    if init == "gated":
        alpha = alpha * np.asarray(omega1)
    expected = alpha * 0.1 / alpha.mean(axis=1, keepdims=True)   # mean ω = omega_init
    np.testing.assert_allclose(start, expected, rtol=1e-6)
    # A class whose gradient is negative at every channel keeps stage 1's ω.
    none = np.asarray(G.stage2_start(dataclasses.replace(problem, params=-jnp.abs(w)),
                                     c, omega1))
    np.testing.assert_array_equal(none, np.asarray(omega1))


def test_signed_stage2_start_is_the_class_gradient_scaled():
    """With omega_min=None the start keeps α's sign (Grad-CAM's weights), mean |α| = omega_init."""
    cfg = gfi_jax.preset("reference", stage2_init="gradient", omega_init=0.1, omega_min=None)
    c = jnp.array([0, 2])
    problem, w = _toy_problem(cfg, c)
    omega1 = jnp.ones((2, 3), jnp.float32)
    alpha = np.asarray(w)[:, [0, 2]].T
    assert (alpha < 0).any() and (alpha > 0).any()   # the toy has both signs
    expected = alpha * 0.1 / np.abs(alpha).mean(axis=1, keepdims=True)
    np.testing.assert_allclose(np.asarray(G.stage2_start(problem, c, omega1)), expected,
                               rtol=1e-6)


def test_gradient_start_of_stage2(resnet, images):
    """A gradient start changes the result, keeps masks finite and in [0, 1], starts stage 2's
    schedule afresh, and an image still gets the same answer alone as in its batch."""
    base = gfi_jax.preset("reference", **SHORT)
    grad = dataclasses.replace(base, stage2_init="gradient")
    a, b = gfi_jax.explain(resnet, images, preset=base), gfi_jax.explain(resnet, images, preset=grad)
    assert not np.array_equal(a.mask, b.mask)
    assert np.isfinite(b.mask).all() and 0 <= b.mask.min() and b.mask.max() <= 1
    alone = gfi_jax.explain(resnet, images[1:2], preset=grad)
    np.testing.assert_array_equal(b.mask[1:2], alone.mask)
    lr = G.lr_trace(dataclasses.replace(grad, stage1_steps=11, stage2_steps=69))
    assert lr[11] == pytest.approx(1e-2)   # stage 2 starts at the full step size again
    f = G.flops(resnet, grad, (64, 64), compile=False)
    f0 = G.flops(resnet, base, (64, 64), compile=False)
    assert f["analytic"] == pytest.approx(f0["analytic"] + 2 * f0["forward"])


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the sequential default is CPU's")
@pytest.mark.parametrize("overrides", [
    {"trace_omega": True}, {"stage2_init": "gradient"}, {"restart_stage2": True}],
    ids=lambda v: ",".join(f"{k}={v}" for k, v in v.items()))
def test_each_target_is_bit_for_bit_its_single_target_run(resnet, images, overrides):
    cfg = gfi_jax.preset("reference", **SHORT, **overrides)
    three = gfi_jax.explain(resnet, images[:2], targets="top3", preset=cfg)
    for rank in (1, 3):
        alone = gfi_jax.explain(resnet, images[:2], targets=f"rank{rank}", preset=cfg)
        for field in ("omega", "mask", "mask_l1", "loss_trace", "target", "score_masked",
                      "score_background", "omega_trace"):
            if getattr(alone, field) is not None:
                np.testing.assert_array_equal(getattr(three, field)[rank - 1::3],
                                              getattr(alone, field), f"{field}, rank {rank}")
