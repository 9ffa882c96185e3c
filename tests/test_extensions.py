"""GFI's extension points (`gfi_jax.Extensions`): a custom optimizer, extra loss terms and
stage 1's end state; each changes the result, a zero-weight term changes nothing, and a
changed hook is a new program while a repeated one is served from the cache."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gfi_jax
from gfi_jax import gfi as G
CFG = gfi_jax.preset("reference", stage1_steps=2, stage2_steps=3, lr=0.05)


def tiny_cnn(params, x, layers):
    """Three 3×3 convs with `jax.nn.relu`, global average pooling, 10 classes: every hook
    works on any model, and a tiny one keeps each compile to seconds."""
    acts = {}
    for i, (w, stride) in enumerate(zip(params["convs"], (2, 2, 1))):
        x = acts[f"conv{i + 1}"] = jax.nn.relu(jax.lax.conv_general_dilated(
            x, w, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
    return acts | {"logits": x.mean(axis=(1, 2)) @ params["head"]}


@pytest.fixture(scope="module")
def resnet():   # "resnet" in the tests below: the model they explain
    rng = np.random.default_rng(0)
    widths = (3, 8, 16, 16)
    params = {"convs": [jnp.asarray(rng.normal(size=(3, 3, i, o)) / np.sqrt(9 * i), jnp.float32)
                        for i, o in zip(widths, widths[1:])],
              "head": jnp.asarray(rng.normal(size=(16, 10)) / 4, jnp.float32)}
    return gfi_jax.wrap(tiny_cnn, params, num_classes=10, l0="conv2", l1="conv3")


@pytest.fixture(scope="module")
def image():
    return np.random.RandomState(0).randn(1, 64, 64, 3).astype(np.float32)


def total_variation(omega, m, z_phi, z_bg, target):
    """A smoothness term on the mask: the mean absolute difference of neighbouring pixels."""
    return (jnp.abs(jnp.diff(m, axis=1)).mean(axis=(1, 2))
            + jnp.abs(jnp.diff(m, axis=2)).mean(axis=(1, 2)))


def explain(resnet, image, ext=None, cfg=CFG, sequential=False, targets=None):
    return gfi_jax.explain(resnet, image, targets=targets, preset=cfg, sequential=sequential,
                           extensions=ext)


@pytest.fixture(scope="module")
def plain(resnet, image):
    """The program without extensions, computed once per (sequential, targets)."""
    done = {}

    def get(sequential=False, targets=None):
        key = (sequential, None if targets is None else str(targets))
        if key not in done:
            done[key] = explain(resnet, image, sequential=sequential, targets=targets)
        return done[key]
    return get


def test_custom_optimizer_is_used_and_still_projected(resnet, image):
    """One stage-1 step of plain SGD is ω₀ − lr·∇L_inversion(ω₀), clipped at 0 by the
    projection; the gradient computed here from the public pieces."""
    cfg = dataclasses.replace(CFG, stage1_steps=1, stage2_steps=0, trace_omega=True)
    cfg = G.resolve_layers(cfg, resnet.arch)
    x = jnp.asarray(image)
    f0, f1, splits, _ = G.clean_features(resnet.features, resnet.params, x, cfg)
    pb = G.Problem(resnet.features, resnet.params, x, G.background(x, cfg), f1, splits, cfg)
    w0 = jnp.full((1, f1.shape[-1]), cfg.omega_init)
    g = np.asarray(jax.grad(
        lambda w: G.inversion_loss(w, pb, f0, jnp.sum(f0 ** 2, axis=(1, 2, 3)))[0])(w0))
    # A step size that sends about half of the ω with a positive gradient below zero, so
    # that the projection has work to do.
    lr = float(cfg.omega_init / np.median(g[g > 0]))
    expect = np.maximum(np.asarray(w0) - lr * g, 0.0)
    assert (expect == 0).any() and (expect > 0).any()
    e = explain(resnet, image, G.Extensions(optimizer=optax.sgd(lr)), cfg)
    np.testing.assert_allclose(e.omega_trace[0, 0], expect[0], rtol=1e-4, atol=1e-6)
    adam = explain(resnet, image, None, cfg)
    assert not np.allclose(adam.omega, e.omega)


def test_a_stage2_term_of_mask_area_equals_the_area_option(resnet, image, plain):
    a = 3.0
    by_term = explain(resnet, image, G.Extensions(
        stage2_terms=(lambda w, m, zf, zb, c: a * m.mean(axis=(1, 2)),)))
    by_option = explain(resnet, image, None, dataclasses.replace(CFG, area=a))
    plain = plain()
    np.testing.assert_allclose(by_term.loss_trace, by_option.loss_trace, rtol=1e-5)
    np.testing.assert_allclose(by_term.mask, by_option.mask, rtol=1e-4, atol=1e-5)
    assert not np.allclose(by_term.loss_trace[:, CFG.stage1_steps:],
                           plain.loss_trace[:, CFG.stage1_steps:])


@pytest.mark.parametrize("sequential", [False, True])
def test_zero_weight_terms_change_nothing_bit_for_bit(resnet, image, plain, sequential):
    zero = lambda *a: 0.0 * total_variation(*a)  # noqa: E731
    plain = plain(sequential)
    ext = explain(resnet, image, G.Extensions(stage1_terms=(zero,), stage2_terms=(zero,)),
                  sequential=sequential)
    for field in ("mask", "omega", "loss_trace", "score_masked", "score_background"):
        np.testing.assert_array_equal(getattr(ext, field), getattr(plain, field), err_msg=field)


def test_terms_change_the_result_and_see_the_documented_shapes(resnet, image, plain):
    seen = {}

    def constant(omega, m, z_phi, z_bg, target):   # records its inputs' shapes at trace time
        seen.update(omega=omega.shape, m=m.shape, z=z_phi.shape, z_bg=z_bg.shape, c=target.shape)
        return jnp.full(omega.shape[:1], 7.0)

    plain = plain(targets=[[3, 5]])
    s1 = explain(resnet, image, G.Extensions(stage1_terms=(constant,)), targets=[[3, 5]])
    # A constant adds 7 to every stage-1 loss and has no gradient: ω is unchanged.
    n1 = CFG.stage1_steps
    np.testing.assert_allclose(s1.loss_trace[:, :n1], plain.loss_trace[:, :n1] + 7.0, rtol=1e-5)
    np.testing.assert_allclose(s1.omega, plain.omega, rtol=1e-5, atol=1e-7)
    assert seen == dict(omega=(1, plain.omega.shape[1]), m=(1, 64, 64), z=(1, 10),
                        z_bg=(1, 10), c=(1, 2))
    tv = explain(resnet, image, G.Extensions(stage2_terms=(lambda *a: 10 * total_variation(*a),)),
                 targets=[[3, 5]])
    assert not np.allclose(tv.mask, plain.mask)


def test_bad_extensions_are_one_line_errors(resnet, image):
    with pytest.raises(ValueError, match=r"stage-2 term 0 \(<lambda>\) returned shape \(\); a "
                                         r"term gives one value per row: \(1,\)"):
        explain(resnet, image, G.Extensions(stage2_terms=(lambda *a: jnp.float32(0.0),)))
    with pytest.raises(ValueError, match="optax.GradientTransformation"):
        G.Extensions(optimizer=optax.sgd)
    with pytest.raises(ValueError, match="must be a tuple of functions"):
        G.Extensions(stage2_terms=[total_variation])
    with pytest.raises(ValueError, match="stage1_state must be True or False"):
        G.Extensions(stage1_state=1)
    with pytest.raises(ValueError, match="extensions must be a gfi_jax.Extensions"):
        explain(resnet, image, {"optimizer": optax.sgd(0.1)})


def test_the_cache_keys_on_the_hooks(resnet, image):
    traces = []

    def counted(omega, m, z_phi, z_bg, target):   # runs once per trace, not per call
        traces.append(1)
        return 0.5 * total_variation(omega, m, z_phi, z_bg, target)

    sgd = optax.sgd(0.01, momentum=0.9)
    ext = G.Extensions(optimizer=sgd, stage2_terms=(counted,))
    a = explain(resnet, image, ext)
    n = len(traces)
    b = explain(resnet, image, G.Extensions(optimizer=sgd, stage2_terms=(counted,)))  # equal record
    assert len(traces) == n, "an equal Extensions record was compiled again"
    np.testing.assert_array_equal(a.mask, b.mask)
    assert G.compiled(resnet.features, a.config, False, ext) is \
        G.compiled(resnet.features, a.config, False, G.Extensions(optimizer=sgd,
                                                                  stage2_terms=(counted,)))
    other = explain(resnet, image, G.Extensions(optimizer=optax.sgd(0.01, momentum=0.5),
                                                stage2_terms=(counted,)))
    assert len(traces) > n, "a changed optimizer was served from the cache"
    assert not np.allclose(other.omega, a.omega)


@pytest.mark.parametrize("sequential", [False, True])
def test_stage2_from_the_public_pieces_continues_from_stage1s_state(resnet, image, sequential):
    images = np.concatenate([image, image[:, ::-1]])
    e = explain(resnet, images, G.Extensions(stage1_state=True), sequential=sequential)
    cfg = e.config
    assert e.stage1_omega.shape == (2, e.omega.shape[1])
    x = jnp.asarray(images)
    _, f1, splits, _ = G.clean_features(resnet.features, resnet.params, x, cfg)
    pb = G.Problem(resnet.features, resnet.params, x, G.background(x, cfg), f1, splits, cfg)
    opt = G.optimizer(cfg, G.schedules(cfg)[1])
    rows = []
    for i in range(2):   # each image alone, as the sequential program runs it
        one = dataclasses.replace(pb, x=pb.x[i:i + 1], p=pb.p[i:i + 1], f1=pb.f1[i:i + 1])
        state = jax.tree.map(lambda a: a if a.ndim == 0 else a[i:i + 1], e.stage1_state)
        (w, _), _ = G.stage2(one, jnp.asarray(e.target[i:i + 1]),
                             jnp.asarray(e.stage1_omega[i:i + 1]), state, opt)
        rows.append(np.asarray(w))
    np.testing.assert_allclose(np.concatenate(rows), e.omega, rtol=1e-4, atol=1e-6)
    # Not a coincidence of a stage 2 that does nothing: ω moved in stage 2.
    assert not np.allclose(e.stage1_omega, e.omega)


def test_stage1_state_with_restarts_is_refused(resnet, image):
    # Two targets of one image may keep the stage 1 of different restarts: no single state.
    with pytest.raises(ValueError, match=r"^Extensions\.stage1_state needs Config\.restarts=1"):
        explain(resnet, image, G.Extensions(stage1_state=True),
                cfg=dataclasses.replace(CFG, restarts=2))
