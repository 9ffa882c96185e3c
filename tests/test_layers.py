"""The CPU convolutions against XLA's: the depthwise one (shifted products, hand-written
backward) against the grouped convolution, and the dense one (hand-written input gradient)
against autodiff of `lax.conv_general_dilated`; values and both gradients, for the strides,
kernels and paddings the model ports use."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gfi_jax.models import layers


def _with_lax(mod):
    """A copy of `mod` that convolves with plain `lax.conv_general_dilated` (autodiff's rules,
    XLA's grouped convolution)."""
    plain = nnx.merge(*nnx.split(mod))
    plain.conv_general_dilated = jax.lax.conv_general_dilated
    return plain


@pytest.mark.parametrize("k,stride,pad,hw", [(3, 1, "SAME", 13), (3, 2, "SAME", 14),
                                             (5, 2, "SAME", 15), (5, 1, 2, 9), (3, 2, 1, 10)])
def test_depthwise_matches_grouped_conv(k, stride, pad, hw):
    mod = layers.conv(6, 6, k, stride=stride, pad=pad, groups=6, bias=True, rngs=nnx.Rngs(0))
    mod.bias[...] = jnp.arange(6, dtype=jnp.float32) / 10
    ref = _with_lax(mod)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, hw, hw, 6))
    y_ref, y = ref(x), mod(x)
    assert y.shape == y_ref.shape
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    with layers.grouped_depthwise():           # the switch gfi.flops uses
        np.testing.assert_array_equal(mod(x), y_ref)

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
@pytest.mark.parametrize("path", ["library", "matrix product"])
def test_dense_conv_matches_autodiff(k, stride, pad, hw, path, monkeypatch):
    # Both CPU paths of `_conv_plain`: the convolution library, and for convs with few output
    # pixels (within `matrix_product_convs`) one matrix product over the k² shifted views.
    monkeypatch.setattr(layers, "_gemm_max_pixels", 0 if path == "library" else 10**9)
    mod = layers.conv(5, 7, k, stride=stride, pad=pad, rngs=nnx.Rngs(0))
    assert mod.conv_general_dilated is layers.conv_general_dilated
    x = jax.random.normal(jax.random.PRNGKey(1), (2, hw, hw, 5))
    y = mod(x)
    plain = _with_lax(mod)
    if hw >= k and path == "library":  # the same library call: bit for bit
        np.testing.assert_array_equal(y, plain(x))
    else:        # padded first, or a product: another summation order (here of up to 605
        np.testing.assert_allclose(y, plain(x), rtol=1e-5, atol=1e-5)  # terms of size ~1)
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
def test_small_map_convs_per_image_and_as_products(k, stride, hw):
    # Small maps (ResNet's 7×7 layer4 at 224²): as GFI runs them (the library), an image's
    # output and input gradient do not depend on the batch it is in (GFI's batched runs equal
    # its single runs bit for bit); within `matrix_product_convs` (opt-in for the methods)
    # they run as one matrix product, with the same values to round-off.
    mod = layers.conv(64, 96, k, stride=stride, pad=k // 2, rngs=nnx.Rngs(0))
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

    pads = ((k // 2,) * 2,) * 2
    assert not layers._few_pixels(x, mod.kernel[...], (stride, stride), pads)

    def products(x, w):  # the switch is read at trace time: a function of its own (jit
        with layers.matrix_product_convs(64):  # caches traces per function)
            return run(x, w)

    assert "conv_general_dilated" in str(jax.make_jaxpr(run)(x, w))
    jaxpr = str(jax.make_jaxpr(products)(x, w))
    assert "conv_general_dilated" not in jaxpr and "dot_general" in jaxpr
    y, g = jax.jit(products)(x, w)
    with layers.matrix_product_convs(64):
        assert layers._few_pixels(x, mod.kernel[...], (stride, stride), pads)
    y0, g0 = f(x, w)
    np.testing.assert_allclose(y, y0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g, g0, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k,stride,pad,hw", [(2, 2, 0, 8), (2, 2, 0, 9), (3, 2, 0, 13),
                                             (3, 2, 1, 12), (3, 2, 1, 11)])
@pytest.mark.parametrize("ties", [False, True])
def test_max_pool_gradient_matches_select_and_scatter(k, stride, pad, hw, ties):
    x = jax.random.normal(jax.random.PRNGKey(3), (2, hw, hw, 4))
    if ties:  # few distinct values: most windows have several maxima
        x = jnp.round(x)
    w = jax.random.normal(jax.random.PRNGKey(4), layers._max_pool_plain(x, k, stride, pad).shape)
    f = lambda pool: lambda x: (pool(x, k, stride, pad) * w).sum()  # noqa: E731
    np.testing.assert_array_equal(layers.max_pool(x, k, stride, pad),
                                  layers._max_pool_plain(x, k, stride, pad))
    g = jax.grad(f(layers._max_pool))(x)
    g_ref = jax.grad(f(layers._max_pool_plain))(x)
    assert int((g != 0).sum()) > 0
    np.testing.assert_allclose(g, g_ref, rtol=1e-6, atol=1e-6)
