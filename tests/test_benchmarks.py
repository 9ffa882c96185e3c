"""The pieces of the benchmark scripts that compute something: the space-to-depth stem and the
conv rewrites of experiments/benchmarks/bench_layers.py and the trace arithmetic of
experiments/benchmarks/profile_gfi.py."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from experiments.benchmarks import bench_layers, profile_gfi


@pytest.mark.parametrize("hw", [32, 18])
def test_space_to_depth_stem_is_the_strided_stem(hw):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, hw, hw, 3)).astype(np.float32)
    w = rng.standard_normal((7, 7, 3, 64)).astype(np.float32)
    y, y2d = bench_layers.stem_plain(x, w), bench_layers.stem_s2d(x, w)
    assert y.shape == y2d.shape == (2, hw // 2, hw // 2, 64)
    np.testing.assert_allclose(y2d, y, rtol=1e-5, atol=1e-4)
    g = rng.standard_normal(y.shape).astype(np.float32)
    dx = jax.vjp(lambda x: bench_layers.stem_plain(x, w), x)[1](g)[0]
    dx2d = jax.vjp(lambda x: bench_layers.stem_s2d(x, w), x)[1](g)[0]
    np.testing.assert_allclose(dx2d, dx, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("hw,k,s,p", [(9, 3, 1, 1), (10, 3, 1, 0), (11, 3, 2, 1), (8, 1, 2, 0),
                                      (13, 7, 2, 3)])
def test_conv_rewrites_are_the_convolution(hw, k, s, p):
    # Each variant timed by `--cases resnet18-convs` computes the same conv and input gradient.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, hw, hw + 1, 5)).astype(np.float32)
    w = rng.standard_normal((k, k, 5, 6)).astype(np.float32)
    variants = [bench_layers.conv_port(s, p), bench_layers.conv_im2col(s, p),
                bench_layers.conv_im2col_per_image(s, p)]
    if (k, s) == (3, 1):
        variants.append(bench_layers.conv_winograd(s, p))
    ref, vjp = jax.vjp(lambda x: bench_layers.conv_autodiff(s, p)(x, w), x)
    g = rng.standard_normal(ref.shape).astype(np.float32)
    for f in variants:
        y, f_vjp = jax.vjp(lambda x: f(x, w), x)
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(f_vjp(g)[0], vjp(g)[0], rtol=1e-5, atol=1e-4)


def test_space_to_depth_layout():
    x = np.arange(2 * 4 * 4 * 3).reshape(2, 4, 4, 3)
    s = np.asarray(bench_layers.space_to_depth(x))
    assert s.shape == (2, 2, 2, 12)
    # block (1, 0) of image 1: rows 2-3, columns 0-1, channels in (row, column, c) order
    np.testing.assert_array_equal(s[1, 1, 0], x[1, 2:4, 0:2].reshape(-1))


def test_busy_time_is_the_union_of_intervals():
    ev = [{"ts": 0, "dur": 10}, {"ts": 5, "dur": 10}, {"ts": 30, "dur": 5},
          {"ts": 31, "dur": 1}, {"ts": 40, "dur": 0}]
    assert profile_gfi.busy_time(ev) == 15 + 5      # [0, 15] and [30, 35]
    assert profile_gfi.busy_time([]) == 0


@pytest.mark.parametrize("name,cls", [
    ("sm90_xmma_dgrad_implicit_gemm_indexed_bf16bf16", "convolution"),
    ("void nhwcAddPaddingKernel<__nv_bfloat16, (cudnnKernelDataType_t)2>", "convolution"),
    ("ynn_fusion.76", "convolution"),
    ("loop_convert_fusion_42", "XLA fusion"),      # "conv" in "convert" is not a convolution
    ("input_scatter_fusion_1", "XLA fusion"),
    ("reverse_transpose_fusion.14", "copy / transpose"),
    ("MemcpyD2D", "copy / transpose"),
    ("triton_gemm_dot_3", "matmul"),
    ("while.10", "other")])
def test_kernel_classes(name, cls):
    assert profile_gfi.kernel_class(name) == cls
