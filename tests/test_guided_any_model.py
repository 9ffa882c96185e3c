"""Guided Backprop, Grad-CAM and CAM on ordinary models (issue 20): a user's network that
rectifies with `flax.linen.relu` / `jax.nn.relu`, not gfi_jax's own ReLU, through the
methods' pure functions `(features, params, images, targets, cfg)`."""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import gfi_jax
from gfi_jax.gfi import upsample
from gfi_jax.jaxpr_guided import guided
from gfi_jax.methods import CamConfig, GradCamConfig, GradConfig, GuidedBackpropConfig
from gfi_jax.methods.cam import cam, declared_layer, gradcam
from gfi_jax.methods.common import input_gradient
from gfi_jax.methods.gradients import grad, guided_backprop
from gfi_jax.models import LoadedModel

SIZE, CLASSES = 32, 5
T = jnp.array([1, 3])


class Net(nn.Module):
    """conv → ReLU → stride-2 conv ("pre2") → ReLU ("conv2") → global mean → linear."""
    act: callable = nn.relu

    @nn.compact
    def __call__(self, x):
        a1 = self.act(nn.Conv(4, (3, 3), padding=1, name="conv1")(x))
        pre2 = nn.Conv(6, (3, 3), strides=2, padding=1, name="conv2")(a1)
        a2 = self.act(pre2)
        logits = nn.Dense(CLASSES, name="fc")(a2.mean(axis=(1, 2)))
        return {"conv1": a1, "pre2": pre2, "conv2": a2, "logits": logits}


def make_features(act=nn.relu):
    def features(params, x, layers):
        out = Net(act).apply(params, x)
        return {n: out[n] for n in layers}
    return features


@pytest.fixture(scope="module")
def params():
    # Random biases too (flax's are zero): no exact ties at the rectifiers' 0.
    rng = np.random.default_rng(0)
    shapes = {"conv1": (3, 3, 3, 4), "conv2": (3, 3, 4, 6), "fc": (6, CLASSES)}
    return {"params": {k: {"kernel": jnp.asarray(rng.normal(0, 0.5, s), jnp.float32),
                           "bias": jnp.asarray(rng.uniform(-0.1, 0.1, s[-1]), jnp.float32)}
                       for k, s in shapes.items()}}


@pytest.fixture(scope="module")
def x():
    return jnp.asarray(np.random.default_rng(1).normal(size=(2, SIZE, SIZE, 3)), jnp.float32)


def run(fn, features, params, x, cfg):
    """A method's pure function, jitted (eager flax is slow)."""
    return jax.jit(functools.partial(fn, features, cfg=cfg))(params, x, T)


def torch_twin(params):
    """The same network in PyTorch, weights copied across (HWIO -> OIHW, (in, out) -> (out, in))."""
    torch = pytest.importorskip("torch")
    p = {k: {n: np.asarray(v) for n, v in d.items()} for k, d in params["params"].items()}
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(4, 6, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(6, CLASSES))
    with torch.no_grad():
        for mod, name in ((net[0], "conv1"), (net[2], "conv2")):
            mod.weight.copy_(torch.from_numpy(p[name]["kernel"].transpose(3, 2, 0, 1).copy()))
            mod.bias.copy_(torch.from_numpy(p[name]["bias"]))
        net[6].weight.copy_(torch.from_numpy(p["fc"]["kernel"].T.copy()))
        net[6].bias.copy_(torch.from_numpy(p["fc"]["bias"]))
    return net.eval()


def test_guided_backprop_matches_captum_and_differs_from_grad(params, x):
    torch = pytest.importorskip("torch")
    captum_attr = pytest.importorskip("captum.attr")
    features = make_features()
    ours, _ = jax.jit(lambda p, x: input_gradient(features, p, x, T, guided=True))(params, x)
    xt = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()).requires_grad_()
    theirs = captum_attr.GuidedBackprop(torch_twin(params)).attribute(xt, target=T.tolist())
    theirs = theirs.detach().numpy().transpose(0, 2, 3, 1)
    scale = np.abs(theirs).max()
    assert scale > 0
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5 * scale)
    # The method's map is that gradient's channel max of |·|, and not the plain gradient's.
    gb = np.asarray(run(guided_backprop, features, params, x, GuidedBackpropConfig()))
    np.testing.assert_allclose(gb, np.abs(theirs).max(-1), rtol=1e-5, atol=1e-5 * scale)
    plain = np.asarray(run(grad, features, params, x, GradConfig()))
    assert np.abs(plain - gb).max() > 0.1 * np.abs(gb).max()


def test_model_without_rectifier_is_a_clear_error(params, x):
    with pytest.raises(ValueError, match=r"no rectifier, max\(x, 0\).*use method='grad'"):
        guided_backprop(make_features(jnp.tanh), params, x, T, GuidedBackpropConfig())


def _mlp(how: str, relu):
    """Two rectified dense layers, applied plainly or inside scan / cond / jit / remat."""
    def layer(h, w):
        return relu(h @ w)

    def f(ws, x):
        if how == "scan":
            return lax.scan(lambda h, w: (layer(h, w), None), x, ws)[0].sum(-1)
        if how == "cond":
            return lax.cond(x.sum() > -1e9, lambda v: layer(layer(v, ws[0]), ws[1]),
                            lambda v: v, x).sum(-1)
        wrap = {"jit": jax.jit, "remat": jax.checkpoint, "plain": lambda g: g}[how]
        return wrap(lambda v: layer(layer(v, ws[0]), ws[1]))(x).sum(-1)
    return f


@jax.custom_vjp
def _hand_guided_relu(v):
    return jnp.maximum(v, 0)


_hand_guided_relu.defvjp(lambda v: (jnp.maximum(v, 0), v),
                         lambda v, g: (jnp.where((v > 0) & (g > 0), g, 0),))


@pytest.mark.parametrize("how", ["plain", "scan", "cond", "jit", "remat"])
def test_guided_rule_inside_higher_order_primitives(how):
    # The rewrite of jax.nn.relu must give the gradient of a ReLU written with the guided
    # rule by hand (test_methods checks that rule elementwise).
    rng = np.random.default_rng(2)
    ws = jnp.asarray(rng.normal(size=(2, 8, 8)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(3, 8)), jnp.float32)
    got = jax.grad(lambda v: guided(_mlp(how, jax.nn.relu))(ws, v).sum())(x)
    want = jax.grad(lambda v: _mlp(how, _hand_guided_relu)(ws, v).sum())(x)
    plain = jax.grad(lambda v: _mlp(how, jax.nn.relu)(ws, v).sum())(x)
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(got, plain)


def test_custom_derivative_without_rectifier_is_kept():
    @jax.custom_vjp
    def double_grad(v):
        return v

    double_grad.defvjp(lambda v: (v, None), lambda _, g: (2 * g,))
    f = lambda v: jax.nn.relu(double_grad(v)).sum()  # noqa: E731
    x = jnp.array([-1.0, 2.0, 3.0])
    assert jax.grad(guided(f))(x).tolist() == [0.0, 2.0, 2.0]


def _hand_gradcam(a, dy_da):
    """The map, and its float32 rounding scale: the same sum over channels of |terms|."""
    alpha = dy_da.mean(axis=(1, 2))                                    # (B, C)
    low = jax.nn.relu(jnp.einsum("bhwc,bc->bhw", a, alpha, precision="highest"))
    size = jnp.einsum("bhwc,bc->bhw", jnp.abs(a), jnp.abs(alpha), precision="highest")
    return [upsample(m, (SIZE, SIZE), align_corners=False) for m in (low, size)]


@pytest.mark.parametrize("layer", ["pre2", "conv2"])
def test_gradcam_at_any_layer_is_the_hand_computation(params, x, layer):
    # "pre2" is no ReLU output; "conv2" is jax.nn.relu's (both used to be refused). After
    # "pre2" come relu → mean → linear, so ∂y_c/∂A is w_c/(h·w) where A > 0; after "conv2"
    # only mean → linear, so it is w_c/(h·w) everywhere.
    features = make_features()
    a = features(params, x, (layer,))[layer]
    w = params["params"]["fc"]["kernel"][:, T].T                       # (B, C)
    h, w_ = a.shape[1:3]
    passes = (a > 0) if layer == "pre2" else jnp.ones_like(a)
    dy_da = passes * w[:, None, None, :] / (h * w_)
    want, size = _hand_gradcam(a, dy_da)
    got = run(gradcam, features, params, x, GradCamConfig(layer=layer))
    assert np.ptp(want) > 0
    # The two sides sum the same terms in different orders: α is a mean over h·w positions
    # and the map a sum over C channels. Where those terms nearly cancel (a value near the
    # ReLU's 0) float32 rounding is relative to the terms' size, not to the result: on an
    # AVX-512 CPU 3 of 2048 values were 8e-5 apart relative to themselves, while no value's
    # error exceeded 3.3e-6 of its terms' size. So a value passes the first bound below or
    # the a-priori float32 bound of those sums, (h·w + C)·eps·Σ|terms| (1.6e-5 of Σ|terms|
    # with h·w = 256).
    got, want, size = (np.asarray(v, np.float64) for v in (got, want, size))
    err = np.abs(got - want)
    bound = np.maximum(1e-5 * np.abs(want) + 1e-6 * np.abs(want).max(),
                       (h * w_ + a.shape[-1]) * np.finfo(np.float32).eps * size)
    assert np.all(err <= bound), (err / bound).max()


def test_cam_on_a_user_model_is_the_classifier_weighted_map(params, x):
    features = make_features()
    a = features(params, x, ("conv2",))["conv2"]
    w = params["params"]["fc"]["kernel"][:, T].T
    want = upsample(jnp.einsum("bhwc,bc->bhw", a, w, precision="highest"), (SIZE, SIZE),
                    align_corners=False)
    got = run(cam, features, params, x, CamConfig(layer="conv2"))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


def test_layer_none_without_a_declared_layer(params, x):
    features = make_features()
    for method, fn, cfg in (("Grad-CAM", gradcam, GradCamConfig()), ("CAM", cam, CamConfig())):
        with pytest.raises(ValueError, match=f"^{method} needs a layer.*declares no default"):
            fn(features, params, x, T, cfg)
    # A features function may declare its layer as an attribute.
    declared = functools.partial(features)
    declared.cam_layer = "pre2"
    np.testing.assert_array_equal(run(gradcam, declared, params, x, GradCamConfig()),
                                  run(gradcam, features, params, x, GradCamConfig(layer="pre2")))


def test_layer_none_is_the_zoo_models_declared_layer(random_resnet18):
    m = random_resnet18
    assert declared_layer(m.features, "gradcam") == declared_layer(m.features, "cam") == "layer4"
    x = np.random.default_rng(3).normal(size=(1, 32, 32, 3)).astype(np.float32)
    t = jnp.array([7])
    # The same program as with the layer named, equation for equation (nothing to compile).
    program = lambda cfg: str(jax.make_jaxpr(  # noqa: E731
        lambda p, x: gradcam(m.features, p, x, t, cfg))(m.params, x))
    assert program(GradCamConfig()) == program(GradCamConfig(layer="layer4"))
    arch = gfi_jax.get_arch("vgg16")
    vgg = LoadedModel(arch, arch.split()[1], classes=gfi_jax.imagenet_classes())  # shapes only
    assert declared_layer(vgg.features, "gradcam") == "conv5_3"
    with pytest.raises(ValueError, match="global average pooling"):
        cam(vgg.features, vgg.params, x, t, CamConfig())
