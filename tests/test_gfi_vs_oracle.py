"""The JAX engine against the independent PyTorch oracle (gfi_jax/testing/oracle.py), same weights.

Before rounding noise is amplified (the first five steps of each stage) the per-image loss and
ω must agree to 1e-4 relative (in float64 for the real EfficientNet-Lite0); the final masks
must agree with median Pearson >= 0.95 (0.9 with real weights in float32, where the final mask
of some images is chaotic in the rounding: see `compare`). Where float32 rounding already grows
past 1e-4 within those early steps (the `paper` preset's stage 2, the log terms), they are
compared in float64; where the float32 final mask is chaotic (log_suppress with area), the
whole schedule is compared in float64 by an opt-in test.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

import gfi_jax  # noqa: E402
from gfi_jax import gfi as G  # noqa: E402
from gfi_jax.models import LoadedModel, get_arch, imagenet_classes  # noqa: E402
from gfi_jax.weights import state_from_flat  # noqa: E402
from weights_conversion.convert import convert_state_dict  # noqa: E402

from gfi_jax.testing import oracle as O  # noqa: E402

SAMPLES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "imagenet-samples"
ORACLE = {"paper": O.paper_config, "reference": O.reference_config,
          "contrastive": lambda **kw: O.reference_config(log_keep=True, **kw)}


def nchw(a):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2)))


def pearson(a, b):
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else float(np.array_equal(a, b))


def compare(model, torch_features, images, name, l0, l1, strict=True, stages=(1, 2),
            final=True, **extra):
    """extra: fields named alike in both configs (log_suppress, area), set on both sides.
    stages: whose first five steps are compared in float32 (the rest go to compare_float64);
    final=False: the float32 final masks are not compared (chaotic: see the caller)."""
    cfg = gfi_jax.preset(name, l0=l0, l1=l1, **extra)
    p = np.asarray(G.gaussian_blur(images, cfg.blur_sigma))
    target = np.asarray(model(images)["logits"]).argmax(1)
    ours = gfi_jax.explain(model, images, targets=target,
                           preset=dataclasses.replace(cfg, trace_omega=True), background=p)
    ref = O.explain(torch_features, nchw(images), nchw(p), target, l0, l1, ORACLE[name](**extra))
    assert ref["loss"].shape == ours.loss_trace.shape
    # Step 0 is a pure forward + loss evaluation: it agrees to float32 round-off.
    np.testing.assert_allclose(ours.loss_trace[:, 0], ref["loss"][:, 0], rtol=1e-5)
    r = [pearson(a, b) for a, b in zip(ours.mask, ref["mask"])]
    # Real weights in float32 (strict=False): the final mask of some images is chaotic in the
    # rounding. Measured for the `reference` preset on the three images below: Pearson 0.970,
    # 0.500, 0.945 against the oracle, after a change of summation order in the depthwise
    # convolutions alone (before it: 0.77, 0.51, 1.00 in one variant); yet the image at 0.500
    # agrees to 0.999 when both sides run the whole schedule in float64 (an ad-hoc run of this
    # comparison with dtype float64, 49 s here and 9 min for the oracle: too slow for CI).
    # So the float32 bound on real weights is looser; the algorithm is checked by the float64
    # early steps (compare_float64), strictly.
    assert not final or np.median(r) >= (0.95 if strict else 0.9), (name, r)
    if not strict:
        np.testing.assert_allclose(ours.loss_trace[:, :5], ref["loss"][:, :5], rtol=1e-3,
                                   err_msg=f"{name}: stage-1 loss, first 5 steps")
        return r
    early_steps_agree(ours, ref, cfg, name, stages)
    return r


def early_steps_agree(ours, ref, cfg, name, stages=(1, 2)):
    """Loss and ω over the first five steps of each stage agree to 1e-4 relative."""
    s1 = cfg.stage1_steps
    np.testing.assert_allclose(ours.loss_trace[:, :5], ref["loss"][:, :5], rtol=1e-4,
                               err_msg=f"{name}: stage-1 loss, first 5 steps")
    # Stage-2 losses are −f_c(Φ) + λ f_c(Φ_bg) + penalty: differences of probabilities that
    # nearly cancel, so they are compared on the probability scale (atol) as well.
    if 2 in stages:
        np.testing.assert_allclose(ours.loss_trace[:, s1:s1 + 5], ref["loss"][:, s1:s1 + 5],
                                   rtol=1e-4, atol=1e-4,
                                   err_msg=f"{name}: stage-2 loss, first 5 steps")
    # ω of one image is a vector: it agrees to 1e-4 relative in norm at every early step
    # where ω has not collapsed (relative error means nothing at ω ≈ 0: the released code's
    # 5Σω² drives ω to ~0 by the end of stage 1, and stage 2 starts there). Single coordinates
    # whose gradient is ~0 can move by a few 1e-4 of ‖ω‖: Adam's eps turns rounding-level
    # gradients into steps of up to lr, the noise the engine issue describes.
    early = np.r_[0:5, s1:s1 + 5] if 2 in stages else np.r_[0:5]
    a, b = ours.omega_trace[:, early], ref["omega_trace"][:, early]
    norm = np.linalg.norm(b, axis=-1)
    alive = norm >= 0.1 * cfg.omega_init * np.sqrt(b.shape[-1])
    assert alive[:, :5].all()  # stage 1 is always compared
    rel = np.linalg.norm(a - b, axis=-1) / np.maximum(norm, 1e-12)
    assert rel[alive].max() <= 1e-4, f"{name}: ω relative error per (image, step) {rel.round(7)}"


def compare_float64(model, torch_net, torch_features, images, name, l0, l1, **extra):
    """The first five steps of each stage with JAX and PyTorch both in float64.

    In float64 the rounding noise that Adam can amplify (see the float32 comparison) is
    ~1e-16 instead of ~1e-7, far below Adam's eps, so the two implementations must follow
    the same trajectory: this checks the algorithm, step by step, without that noise.
    Stage 2 is cut to its first 5 steps (the schedule of those steps is unchanged).
    """
    cfg = dataclasses.replace(gfi_jax.preset(name, l0=l0, l1=l1, **extra), stage2_steps=5,
                              trace_omega=True)
    oracle_cfg = dataclasses.replace(ORACLE[name](**extra), stage2_steps=5)
    x = images.astype(np.float64)
    with jax.enable_x64(True):
        m64 = model.astype("float64")
        p = np.asarray(G.gaussian_blur(jax.numpy.asarray(x), cfg.blur_sigma))
        assert p.dtype == np.float64
        target = np.asarray(m64(x)["logits"]).argmax(1)
        ours = gfi_jax.explain(m64, x, targets=target, preset=cfg, background=p)
    assert ours.loss_trace.dtype == np.float64
    torch_net.double()
    try:
        ref = O.explain(torch_features, nchw(x), nchw(p), target, l0, l1, oracle_cfg,
                        dtype=torch.float64)
    finally:
        torch_net.float()
    early_steps_agree(ours, ref, cfg, name + " float64")


@pytest.fixture(scope="module")
def vgg19():
    torch.manual_seed(0)
    net = torchvision.models.vgg19().eval().requires_grad_(False)  # input gradients only
    # Random VGG-19 at 64 px has a pool5 energy of ~1, so the paper's γ‖ω‖₁ = 51 would swamp
    # the inversion term and drive ω to 0 (an ill-conditioned comparison). Trained weights give
    # pool5 energies of 1e3 and more; scaling conv1 (ReLU nets are homogeneous, biases are 0
    # at init) brings the random net there.
    with torch.no_grad():
        net.features[0].weight.mul_(30.0)
    flat, n = convert_state_dict("vgg19", {k: v.numpy() for k, v in net.state_dict().items()})
    arch = get_arch("vgg19")
    model = LoadedModel(arch, state_from_flat(arch, flat, n), classes=imagenet_classes())

    return model, O.torch_features("vgg19", net), net


def smooth_images(n, size, seed=0):
    """Random images with structure (blurred noise plus bright blobs), normalized scale."""
    rs = np.random.RandomState(seed)
    x = np.asarray(G.gaussian_blur(rs.randn(n, size, size, 3).astype(np.float32), 2.0)) * 4
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        cy, cx = rs.randint(size // 4, 3 * size // 4, 2)
        x[i] += 2.0 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (size / 8) ** 2))[..., None]
    return x.astype(np.float32)


@pytest.mark.parametrize("name,extra", [
    ("paper", {}), ("reference", {}), ("contrastive", {}),
    ("contrastive", {"log_suppress": True, "area": 2.0}),
    ("contrastive", {"l1": "conv5_4+pool5", "combine": "product"}),
    ("contrastive", {"l1": "conv5_4+pool5", "combine": "product", "norm_grad": "detach",
                     "area": 1.0})],
    ids=lambda v: str(v))
def test_vgg19_random_weights_64px(vgg19, name, extra):
    model, features, net = vgg19
    # Paper layers for VGG-19 (Sec. 4.1.1); the released code uses pool5 for both.
    l0, l1 = ("pool5", "conv5_4") if name == "paper" else ("pool5", "pool5")
    extra = dict(extra)
    l1 = extra.pop("l1", l1)
    if name == "reference":
        compare(model, features, smooth_images(2, 64), name, l0, l1, **extra)
        return
    if name == "paper":
        # Stage 2 starts after 11 stage-1 steps over which the float32 rounding grows: ω's
        # relative error went 7e-7 (step 0), 1.8e-5 (step 4), 1.4e-4 (stage 2's first step) on
        # an AVX2-only CPU, 2026-12-02, under 1e-4 on the earlier CPU. So stage 2's early steps
        # are compared in float64, where that growth starts from 1e-16; stage 1's early steps
        # and the final masks in float32 as strictly as for `reference`.
        compare(model, features, smooth_images(2, 64), name, l0, l1, stages=(1,), **extra)
        compare_float64(model, net, features, smooth_images(2, 64), name, l0, l1, **extra)
        return
    # The log terms' gradients are large where the random net gives c a probability of ~e⁻⁵,
    # so float32 rounding is amplified from the second stage-2 step on (1e-3 relative in the
    # loss at step s1 + 4): the early steps are checked strictly in float64 instead. With the
    # log of Φ_bg's score and the area term the float32 final mask is chaotic in the rounding
    # (Pearson 0.71 for one image on an AVX2-only CPU, over 0.9 on the earlier one), while the
    # whole schedule in float64 agrees to 0.99999: that run is test_vgg19_whole_schedule_float64
    # (~8 minutes, opt-in; experiments/results/oracle_float64_cpu.md), and the float32 final
    # masks of that variant are not compared.
    chaotic = extra.get("log_suppress", False)
    compare(model, features, smooth_images(2, 64), name, l0, l1, strict=False,
            final=not chaotic, **extra)
    compare_float64(model, net, features, smooth_images(2, 64), name, l0, l1, **extra)


@pytest.mark.skipif(os.environ.get("GFI_JAX_SLOW_TESTS") != "1",
                    reason="whole-schedule float64 oracle run (~8 min on 2 cores): "
                           "set GFI_JAX_SLOW_TESTS=1")
def test_vgg19_whole_schedule_float64(vgg19):
    """The chaotic float32 variant above, all 82 steps on both sides in float64."""
    model, features, net = vgg19
    extra = {"log_suppress": True, "area": 2.0}
    cfg = gfi_jax.preset("contrastive", l0="pool5", l1="pool5", **extra)
    x = smooth_images(2, 64).astype(np.float64)
    with jax.enable_x64(True):
        m64 = model.astype("float64")
        p = np.asarray(G.gaussian_blur(jax.numpy.asarray(x), cfg.blur_sigma))
        target = np.asarray(m64(x)["logits"]).argmax(1)
        ours = gfi_jax.explain(m64, x, targets=target, preset=cfg, background=p)
    net.double()
    try:
        ref = O.explain(features, nchw(x), nchw(p), target, "pool5", "pool5",
                        ORACLE["contrastive"](**extra), dtype=torch.float64)
    finally:
        net.float()
    r = [pearson(a, b) for a, b in zip(ours.mask, ref["mask"])]
    assert min(r) >= 0.999, r
