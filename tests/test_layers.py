"""The CPU kernels (`gfi_jax.models.cpu_kernels`) against XLA's ops: the depthwise conv (shifted
products, hand-written backward) against the grouped convolution, the dense one (hand-written
input gradient) against autodiff of `lax.conv_general_dilated`, the masked max-pool backward
against select-and-scatter; values and gradients, for the strides, kernels and paddings the
model ports use. And how a model gets its kernels: once, when it is built."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gfi_jax.models import cpu_kernels, layers
from gfi_jax.models.cpu_kernels import CPU


def _with_lax(mod):
    """A copy of `mod` that convolves with plain `lax.conv_general_dilated` (autodiff's rules,
    XLA's grouped convolution)."""
    plain = nnx.merge(*nnx.split(mod))
    plain.conv_general_dilated = jax.lax.conv_general_dilated
    return plain


@pytest.mark.parametrize("k,stride,pad,hw", [(3, 1, "SAME", 13), (3, 2, "SAME", 14),
                                             (5, 2, "SAME", 15), (5, 1, 2, 9), (3, 2, 1, 10)])
def test_depthwise_matches_grouped_conv(k, stride, pad, hw):
    def build(kernels):
        return layers.conv(6, 6, k, stride=stride, pad=pad, groups=6, bias=True,
                           kernels=kernels, rngs=nnx.Rngs(0))
    mod = build(CPU)
    assert mod.conv_general_dilated is cpu_kernels.depthwise_conv
    mod.bias[...] = jnp.arange(6, dtype=jnp.float32) / 10
    ref = _with_lax(mod)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, hw, hw, 6))
    y_ref, y = ref(x), mod(x)
    assert y.shape == y_ref.shape
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    grouped = build(dataclasses.replace(CPU, depthwise=False))   # the kernels gfi.flops uses
    nnx.update(grouped, nnx.state(mod))
    np.testing.assert_array_equal(grouped(x), y_ref)

    # Through ReLU6, the case whose autodiff was slow, with a non-trivial cotangent.
    w = jax.random.normal(jax.random.PRNGKey(2), y.shape)

    def grads(m):
        gdef, params = nnx.split(m)
        f = lambda x, p: (jnp.clip(nnx.merge(gdef, p)(x), 0, 6) * w).sum()  # noqa: E731
        return jax.grad(f, argnums=(0, 1))(x, params)

    g, g_ref = grads(mod), grads(ref)
    assert float(jnp.abs(g[1]["kernel"][...]).max()) > 0
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.abs(b).max()))


@pytest.mark.parametrize("k,stride,pad,hw", [(3, 1, 1, 9), (3, 2, 1, 10), (3, 2, 1, 9),
                                             (1, 2, 0, 8), (7, 2, 3, 17), (11, 4, 2, 67),
                                             (3, 2, "SAME", 14), (1, 1, "SAME", 5),
                                             # inputs smaller than the kernel (padded first)
                                             (3, 1, 1, 2), (3, 1, 1, 1), (3, 2, 1, 2),
                                             (7, 2, 3, 3)])
def test_dense_conv_matches_autodiff(k, stride, pad, hw):
    mod = layers.conv(5, 7, k, stride=stride, pad=pad, kernels=CPU, rngs=nnx.Rngs(0))
    assert mod.conv_general_dilated is cpu_kernels.dense_conv
    x = jax.random.normal(jax.random.PRNGKey(1), (2, hw, hw, 5))
    y = mod(x)
    plain = _with_lax(mod)
    if hw >= k:  # the same library call: bit for bit
        np.testing.assert_array_equal(y, plain(x))
    else:        # padded first: another summation order (here of up to 605 terms of size ~1)
        np.testing.assert_allclose(y, plain(x), rtol=1e-5, atol=1e-5)
    w = jax.random.normal(jax.random.PRNGKey(2), y.shape)

    def grads(m):
        gdef, params = nnx.split(m)
        f = lambda x, p: (jax.nn.relu(nnx.merge(gdef, p)(x)) * w).sum()  # noqa: E731
        return jax.grad(f, argnums=(0, 1))(x, params)

    g, g_ref = grads(mod), grads(plain)
    assert float(jnp.abs(g[0]).max()) > 0
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))

    # Inside a scan (where the rule matters) it computes the same input gradient.
    gdef, params = nnx.split(mod)
    dx = jax.grad(lambda x: (jax.nn.relu(nnx.merge(gdef, params)(x)) * w).sum())

    def body(c, _):
        return c - 0.1 * dx(c), None
    looped = jax.jit(lambda x: jax.lax.scan(body, x, None, length=2)[0])(x)
    step1 = x - 0.1 * dx(x)
    np.testing.assert_allclose(looped, step1 - 0.1 * dx(step1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k,stride,hw", [(3, 1, 7), (3, 2, 14), (1, 2, 14)])
def test_small_map_convs_per_image(k, stride, hw):
    # Small maps (ResNet's 7×7 layer4 at 224²): as GFI runs them (the library), an image's
    # output and input gradient do not depend on the batch it is in (GFI's batched runs equal
    # its single runs bit for bit).
    mod = layers.conv(64, 96, k, stride=stride, pad=k // 2, kernels=CPU, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (6, hw, hw, 64))
    gdef, params = nnx.split(mod)
    w = jax.random.normal(jax.random.PRNGKey(2), mod(x).shape)

    def run(x, w):
        return nnx.merge(gdef, params)(x), jax.grad(
            lambda x: (jax.nn.relu(nnx.merge(gdef, params)(x)) * w).sum())(x)

    f = jax.jit(run)
    y1, g1 = f(x[:1], w[:1])
    for n in (2, 6):
        y, g = f(x[:n], w[:n])
        np.testing.assert_array_equal(y[:1], y1)
        np.testing.assert_array_equal(g[:1], g1)


@pytest.mark.parametrize("k,stride,pad,hw", [(2, 2, 0, 8), (2, 2, 0, 9), (3, 2, 0, 13),
                                             (3, 2, 1, 12), (3, 2, 1, 11)])
@pytest.mark.parametrize("ties", [False, True])
def test_max_pool_gradient_matches_select_and_scatter(k, stride, pad, hw, ties):
    x = jax.random.normal(jax.random.PRNGKey(3), (2, hw, hw, 4))
    if ties:  # few distinct values: most windows have several maxima
        x = jnp.round(x)
    w = jax.random.normal(jax.random.PRNGKey(4),
                          cpu_kernels.plain_max_pool(x, k, stride, pad).shape)
    f = lambda pool: lambda x: (pool(x, k, stride, pad) * w).sum()  # noqa: E731
    np.testing.assert_array_equal(layers.max_pool(x, k, stride, pad, kernels=CPU),
                                  cpu_kernels.plain_max_pool(x, k, stride, pad))
    g = jax.grad(f(cpu_kernels.max_pool))(x)
    g_ref = jax.grad(f(cpu_kernels.plain_max_pool))(x)
    assert int((g != 0).sum()) > 0
    np.testing.assert_allclose(g, g_ref, rtol=1e-6, atol=1e-6)


def test_kernels_are_fixed_when_a_model_is_built():
    # The kernels live in the model's graphdef: a model with other kernels traces and
    # compiles programs of its own (the jit caches key on `m.features`), with the same values.
    import gfi_jax
    from gfi_jax import gfi, methods
    from gfi_jax.testing.random_models import random_model
    m = random_model("resnet18")
    assert m.kernels == cpu_kernels.for_backend(jax.default_backend())
    cpu, xla = m.with_kernels(CPU), m.with_kernels(cpu_kernels.XLA)
    assert cpu.astype(jnp.float32).kernels == CPU and xla.kernels == cpu_kernels.XLA
    x = np.random.default_rng(0).normal(size=(1, 32, 32, 3)).astype(np.float32)

    def grad_jaxpr(model):
        return str(jax.make_jaxpr(jax.grad(
            lambda x: model.features(model.params, x)["logits"][0, 0]))(x))
    assert "optimization_barrier" in grad_jaxpr(cpu)           # the conv's hand-written rule
    assert "optimization_barrier" not in grad_jaxpr(xla)
    # (to round-off: layer4's 1×1 maps are smaller than their kernels, padded first on CPU)
    np.testing.assert_allclose(cpu(x)["logits"], xla(x)["logits"], rtol=1e-5, atol=1e-4)
    cfg = gfi_jax.Config()
    assert gfi.compiled(cpu.features, cfg) is not gfi.compiled(xla.features, cfg)
    grad_cfg = methods.make_config("grad")
    assert (methods.compiled("grad", cpu.features, grad_cfg)
            is not methods.compiled("grad", xla.features, grad_cfg))


def test_layer_gradient_is_the_gradient_at_the_layer():
    # h = relu(x·w1) is the layer; logits read h and, past the cut, x itself:
    # ∂ logit_t / ∂h = w2[:, t] whatever x.
    from gfi_jax.methods.common import layer_gradient
    rng = np.random.default_rng(0)
    w1, w2, w3 = (jnp.asarray(rng.normal(size=s), jnp.float32)
                  for s in ((3, 4), (4, 5), (3, 5)))

    def features(params, x, names):
        h = layers.relu(x @ params["w1"])
        out = {"h": h, "pre": x @ params["w1"], "logits": h @ params["w2"] + x @ params["w3"]}
        return {n: out[n] for n in names}

    params = {"w1": w1, "w2": w2, "w3": w3}
    x = jnp.asarray(rng.normal(size=(2, 3)), jnp.float32)
    a, g, t = jax.jit(lambda p, x: layer_gradient(features, p, x, jnp.array([1, 3]), "h"))(
        params, x)
    np.testing.assert_array_equal(a, jax.nn.relu(x @ w1))
    np.testing.assert_array_equal(g, w2[:, [1, 3]].T)
    assert t.tolist() == [1, 3]
    # "pre" is recomputed beside h, not what the logits read: a zero gradient, refused.
    with pytest.raises(ValueError, match="'pre' does not feed the logits"):
        layer_gradient(features, params, x, jnp.array([1, 3]), "pre")
