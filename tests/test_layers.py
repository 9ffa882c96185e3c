"""The CPU depthwise convolution (shifted products, hand-written backward) against XLA's
grouped convolution: values and both gradients, for the strides, kernels and paddings the
model ports use."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gfi_jax.models import layers


@pytest.mark.parametrize("k,stride,pad,hw", [(3, 1, "SAME", 13), (3, 2, "SAME", 14),
                                             (5, 2, "SAME", 15), (5, 1, 2, 9), (3, 2, 1, 10)])
def test_depthwise_matches_grouped_conv(k, stride, pad, hw):
    mod = layers.depthwise_conv(6, k, stride=stride, pad=pad, bias=True, rngs=nnx.Rngs(0))
    mod.bias[...] = jnp.arange(6, dtype=jnp.float32) / 10
    ref = nnx.Conv.__call__          # the parent: lax.conv_general_dilated, grouped
    x = jax.random.normal(jax.random.PRNGKey(1), (2, hw, hw, 6))
    y_ref, y = ref(mod, x), mod(x)
    assert y.shape == y_ref.shape
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)

    # Through ReLU6, the case whose autodiff was slow, with a non-trivial cotangent.
    w = jax.random.normal(jax.random.PRNGKey(2), y.shape)
    gdef, params = nnx.split(mod)

    def loss(call, x, params):
        return (jnp.clip(call(nnx.merge(gdef, params), x), 0, 6) * w).sum()

    g_ref = jax.grad(loss, argnums=(1, 2))(ref, x, params)
    g = jax.grad(loss, argnums=(1, 2))(type(mod).__call__, x, params)
    assert float(jnp.abs(g[1]["kernel"][...]).max()) > 0
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.abs(b).max()))
