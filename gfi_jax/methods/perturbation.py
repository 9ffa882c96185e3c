"""Perturbation methods: RISE (Petsiuk et al. 2018) and Meaningful Perturbation (Fong &
Vedaldi 2017, the GFI paper's "Mask" baseline). Both score the target's softmax probability.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from gfi_jax.gfi import gaussian_blur, project, upsample
from gfi_jax.methods.common import Features, logits_fn, resolve


@dataclasses.dataclass(frozen=True)
class RiseConfig:
    masks: int = 4000            # N (the paper's setting for ResNet-50)
    cells: int = 7               # s: masks are s×s binary grids …
    p: float = 0.5               # … with cells kept with probability p
    chunk: int = 100             # masks drawn at a time (memory: chunk masked images)
    batch: int = 10              # masked images per forward pass (at most chunk, a divisor
                                 # of it): on a CPU small batches run faster, as they stay in
                                 # cache; on an accelerator set batch = chunk
    seed: int = 0


def rise_masks(cfg: RiseConfig, key: jax.Array, n: int, hw: tuple[int, int]) -> jax.Array:
    """`(n, H, W)` RISE masks: s×s Bernoulli(p) grids upsampled bilinearly to (s+1)·cell
    pixels, then cropped at a random shift in [0, cell) per mask (smooth, position-jittered)."""
    s, (H, W) = cfg.cells, hw
    ch, cw = -(-H // s), -(-W // s)
    kg, kx, ky = jax.random.split(key, 3)
    grid = jax.random.bernoulli(kg, cfg.p, (n, s, s)).astype(jnp.float32)
    big = upsample(grid, ((s + 1) * ch, (s + 1) * cw), align_corners=False)
    dx = jax.random.randint(kx, (n,), 0, ch)
    dy = jax.random.randint(ky, (n,), 0, cw)
    crop = lambda m, i, j: jax.lax.dynamic_slice(m, (i, j), (H, W))  # noqa: E731
    return jax.vmap(crop)(big, dx, dy)


def rise(features: Features, params: Any, images: jax.Array, targets: jax.Array,
         cfg: RiseConfig) -> jax.Array:
    """RISE: Σᵢ P_t(x ⊙ Mᵢ) Mᵢ / (N·p) over N random masks (0 in preprocessed space is the
    dataset mean colour). The masks are the same for every image of the batch."""
    if cfg.masks % cfg.chunk:
        raise ValueError(f"RISE masks ({cfg.masks}) must be a multiple of chunk ({cfg.chunk})")
    batch = min(cfg.batch, cfg.chunk)
    if batch < 1 or cfg.chunk % batch:
        raise ValueError(f"RISE batch ({cfg.batch}) must divide chunk ({cfg.chunk}); "
                         "set batch to a divisor of chunk")
    f = logits_fn(features, params)
    t = resolve(f(images), targets)
    hw = images.shape[1:3]
    key = jax.random.PRNGKey(cfg.seed)

    def chunk(i, acc):
        m = rise_masks(cfg, jax.random.fold_in(key, i), cfg.chunk, hw)

        def one(args):
            x, ti = args
            xs = (x[None] * m[..., None]).reshape(-1, batch, *x.shape)
            p = jax.lax.map(lambda b: jax.nn.softmax(f(b), axis=-1)[:, ti], xs).reshape(-1)
            return jnp.einsum("n,nhw->hw", p, m, precision=jax.lax.Precision.HIGHEST)
        return acc + jax.lax.map(one, (images, t))
    total = jax.lax.fori_loop(0, cfg.masks // cfg.chunk, chunk,
                              jnp.zeros(images.shape[:3], jnp.float32))
    return total / (cfg.masks * cfg.p)


@dataclasses.dataclass(frozen=True)
class MeaningfulPerturbationConfig:
    steps: int = 300
    lr: float = 0.1              # Adam
    size: int = 28               # the mask is optimized at size×size and upsampled
    l1: float = 0.01             # weight of mean|1 − m| (delete as little as possible)
    tv: float = 0.2              # weight of the total variation Σ|∇m|^β (smooth masks)
    tv_beta: float = 3.0
    blur_sigma: float = 10.0     # the perturbation: a Gaussian blur of the image


def tv_norm(m: jax.Array, beta: float) -> jax.Array:
    """Per mask `(B, h, w)`: mean |∂_h m|^β + mean |∂_w m|^β."""
    dh = jnp.abs(m[:, 1:] - m[:, :-1]) ** beta
    dw = jnp.abs(m[:, :, 1:] - m[:, :, :-1]) ** beta
    return dh.mean(axis=(1, 2)) + dw.mean(axis=(1, 2))


def meaningful_perturbation(features: Features, params: Any, images: jax.Array,
                            targets: jax.Array, cfg: MeaningfulPerturbationConfig) -> jax.Array:
    """Meaningful Perturbation: minimize  l1·mean|1−m| + tv·TV_β(m) + P_t(x⊙M + blur(x)⊙(1−M))
    over a low-resolution mask m ∈ [0, 1] (1 keeps the pixel) with Adam, M = upsampled m.
    Returns the deletion map 1 − M `(B, H, W)`. Without Fong & Vedaldi's input jitter and
    noise (deterministic). Each image's loss is its own, so images do not interact.
    """
    f = logits_fn(features, params)
    t = resolve(f(images), targets)
    blurred = gaussian_blur(images, cfg.blur_sigma)
    hw = images.shape[1:3]

    def losses(m):
        M = upsample(m, hw, align_corners=False)[..., None]
        p = jax.nn.softmax(f(images * M + blurred * (1 - M)), axis=-1)
        p_t = jnp.take_along_axis(p, t[:, None], axis=1)[:, 0]
        return cfg.l1 * jnp.abs(1 - m).mean(axis=(1, 2)) + cfg.tv * tv_norm(m, cfg.tv_beta) + p_t

    opt = optax.chain(optax.adam(cfg.lr), project(0.0, 1.0))
    m0 = jnp.ones((images.shape[0], cfg.size, cfg.size), jnp.float32)

    def step(state, _):
        m, s = state
        g = jax.grad(lambda m: losses(m).sum())(m)
        u, s = opt.update(g, s, m)
        return (optax.apply_updates(m, u), s), None
    (m, _), _ = jax.lax.scan(step, (m0, opt.init(m0)), None, length=cfg.steps)
    return 1.0 - upsample(m, hw, align_corners=False)
