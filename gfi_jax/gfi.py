"""Guided Feature Inversion (Du, Liu, Song, Hu; KDD 2018): both stages in one XLA program.

Notation follows the paper. For an image x with blurred background p, the mask is built
from the channels of a high conv layer l1:   m = Σᵢ ωᵢ fᵢ^{l1}(x),  normalized and upsampled;
the blends are   Φ = x⊙m + p⊙(1−m)   and   Φ_bg = x⊙(1−m) + p⊙m.
Stage 1 (Alg. 1) fits ω so that f^{l0}(Φ) ≈ f^{l0}(x); stage 2 (Alg. 2) fine-tunes ω so
that Φ keeps and Φ_bg loses the target class c. ω ≥ 0 is kept by projecting after every
Adam step: the optimizer is `optax.chain(adam(schedule), project(0, ω_max))`.

`gfi(features, params, images, targets, background, cfg)` is the pure program: any model
works that offers `features(params, x, layers) -> {layer: activation}`. `explain(model, …)`
is the convenience front end over a `gfi_jax.LoadedModel`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Literal, Sequence

import jax
import jax.extend.core  # noqa: F401  (jaxprs_in_params, for the FLOPs count)
import jax.numpy as jnp
import numpy as np
import optax

Features = Callable[[Any, jax.Array, Sequence[str]], dict]


# ----------------------------------------------------------------------------- configuration
@dataclasses.dataclass(frozen=True)
class Config:
    """Every hyper-parameter of GFI. `preset(name, **overrides)` gives the named ones."""
    name: str = "reference"
    l0: str | None = None                  # inversion layer (None: the architecture's default)
    l1: str | None = None                  # mask-basis layer(s), the channels that ω weighs;
                                           # "a+b": both layers' channels (see `basis`)
    combine: Literal["sum", "product"] = "sum"   # several l1 layers: one map Σωf over all
                                           # channels, or the product of each layer's map
    same_layer: bool = True                # l1 unset: use l0 (released code) or the arch's l1
    stage1_steps: int = 11
    stage2_steps: int = 69
    lr: float = 1e-2
    lr_decay: float = 0.5                  # lr *= lr_decay every `lr_every` steps …
    lr_every: int = 10
    decay_in_stage1: bool = True           # … counted from the first step of stage 1, or
    restart_stage2: bool = False           # a fresh Adam (and schedule) for stage 2
    adam_eps: float = 1e-8
    omega_init: float = 0.1
    omega_max: float | None = 1e5          # projection: ω ← clip(ω, omega_min, omega_max)
    omega_min: float | None = 0.0          # the paper's ω ≥ 0; None: signed ω, no lower bound
    inversion_error: Literal["sum", "relative"] = "relative"   # ‖Δf‖² or ‖Δf‖²/‖f(x)‖²
    gamma: float = 5.0                     # stage-1 penalty weight
    stage1_penalty: Literal["l1", "l2sq"] = "l2sq"
    lam: float = 1.0                       # λ, weight of the suppress term f_c(Φ_bg)
    delta: float = 2.0                     # stage-2 penalty weight
    stage2_penalty: Literal["l1", "l2sq"] = "l2sq"
    score: Literal["softmax", "sigmoid"] = "softmax"
    log_keep: bool = False                 # stage 2 keeps log f_c(Φ) instead of f_c(Φ) (see loss2)
    log_suppress: bool = False             # stage 2 suppresses log f_c(Φ_bg) instead of f_c(Φ_bg)
    area: float = 0.0                      # weight of the stage-2 mask area mean(m) (see loss2)
    normalize: Literal["minmax", "max"] = "max"   # (m−min)/(max−min) or (m−min)/max
    norm_grad: Literal["exact", "detach"] = "exact"   # the gradient through the
                                           # normalization's min and max (see `normalize`)
    upsample_first: bool = True            # normalize after (True) or before upsampling
    align_corners: bool = True             # bilinear upsampling grid
    background: Literal["blur", "mean", "noise"] = "blur"
    blur_sigma: float = 11.0               # in input pixels
    seed: int = 0                          # for the noise background
    trace_omega: bool = False              # also return ω after every step (N, steps, C)


PRESETS = {
    # The released code's behaviour (../shared/paper/authors-code-behaviour.md).
    "reference": Config(),
    # Equations 2–9 and Algorithms 1–2 as written.
    "paper": Config(
        name="paper", same_layer=False, stage1_steps=11, stage2_steps=71, decay_in_stage1=False,
        restart_stage2=True, omega_max=None, inversion_error="sum", gamma=10.0,
        stage1_penalty="l1", delta=1.0, stage2_penalty="l1", normalize="minmax",
        upsample_first=False, align_corners=False),
    # `reference` with stage 2 keeping log f_c(Φ) (cross-entropy) instead of f_c(Φ): the
    # probability's gradient vanishes when the class holds little of the softmax (several
    # objects in the image), the log's does not. Chosen on the offline benchmark
    # (experiments/results/offline_tuning.md, Runs 1-3).
    "contrastive": Config(name="contrastive", log_keep=True),
    # EfficientNet-Lite0's default: `contrastive` with the mask the product of two maps, one
    # over the class-specific 7×7 `head` channels and one over the 14×14 `blocks.11.expand`
    # channels (the widest non-negative layer at that grid). The offline benchmark found the
    # 7×7 head alone too coarse for deletion and the 14×14 layer alone not class-specific
    # enough for the grid game; their sum was between the two, their product better than
    # either on both (experiments/results/offline_tuning.md).
    "contrastive_lite0": Config(name="contrastive_lite0", log_keep=True,
                                l1="head+blocks.11.expand", combine="product"),
    # EfficientNet-Lite0's default: `contrastive_lite0` with the normalization's min and max
    # detached from the gradient, plus a small mask-area term. The exact gradient through
    # the arg-max pixel made the result follow last-bit changes (bfloat16 against float32:
    # median mask Pearson 0.883, worst 0.439 on 8 images); detached: 0.992 and 0.907, with
    # the grid game kept (energy 0.610 against 0.618) and deletion and insertion worse
    # (0.222 against 0.205, 0.619 against 0.676) (experiments/results/offline_tuning.md,
    # Run 5).
    "detached_lite0": Config(name="detached_lite0", log_keep=True, l1="head+blocks.11.expand",
                             combine="product", norm_grad="detach", area=1.0),
}


# The preset `explain` uses when none is given, per architecture: the winner of the offline
# benchmark where one was tuned (only EfficientNet-Lite0 has real weights here), else the
# released code's behaviour.
DEFAULT_PRESETS = {"efficientnet_lite0": "detached_lite0"}


def default_preset(arch: str) -> str:
    return DEFAULT_PRESETS.get(arch, "reference")


def preset(name: str | Config | None = "reference", *, arch: str | None = None,
           **overrides) -> Config:
    """The named preset (or a Config) with fields overridden: `preset("paper", l1="conv5_3")`.
    name None: the default preset of architecture `arch` (`DEFAULT_PRESETS`)."""
    if name is None:
        name = default_preset(arch) if arch else "reference"
    if isinstance(name, Config):
        base = name
    elif name in PRESETS:
        base = PRESETS[name]
    else:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    unknown = set(overrides) - {f.name for f in dataclasses.fields(Config)}
    if unknown:
        raise ValueError(f"unknown config field(s) {sorted(unknown)}; "
                         f"fields: {', '.join(f.name for f in dataclasses.fields(Config))}")
    return dataclasses.replace(base, **overrides)


_preset = preset  # `explain` takes an argument named `preset`


# ----------------------------------------------------------------------------- optimizer
def project(lo: float | None = 0.0, hi: float | None = None) -> optax.GradientTransformation:
    """Projection onto [lo, hi] as the last link of an optax chain: ω + u ∈ [lo, hi] (None:
    no bound on that side)."""
    def update(updates, state, params):
        return jax.tree.map(lambda u, w: jnp.clip(w + u, lo, hi) - w, updates, params), state
    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def schedules(cfg: Config) -> tuple[optax.Schedule, optax.Schedule]:
    """Step size of (stage 1, stage 2), each as a function of its optimizer's step count."""
    decayed = optax.exponential_decay(cfg.lr, cfg.lr_every, cfg.lr_decay, staircase=True)
    return (decayed if cfg.decay_in_stage1 else optax.constant_schedule(cfg.lr)), decayed


def optimizer(cfg: Config, schedule: optax.Schedule) -> optax.GradientTransformation:
    return optax.chain(optax.adam(schedule, eps=cfg.adam_eps),
                       project(cfg.omega_min, cfg.omega_max))


def lr_trace(cfg: Config) -> np.ndarray:
    """The step size of every step, stage 1 then stage 2: `(stage1_steps + stage2_steps,)`."""
    s1, s2 = schedules(cfg)
    off = 0 if cfg.restart_stage2 else cfg.stage1_steps
    return np.array([float(s1(t)) for t in range(cfg.stage1_steps)]
                    + [float(s2(t + off)) for t in range(cfg.stage2_steps)], np.float32)


# ----------------------------------------------------------------------------- the mask
@functools.lru_cache(maxsize=None)
def interp_matrix(n_in: int, n_out: int, align_corners: bool,
                  dtype: str = "float32") -> np.ndarray:
    """(n_out, n_in) bilinear interpolation weights, PyTorch's `F.interpolate` grid.

    The fraction is rounded to `dtype` first and 1 − fraction formed in `dtype`, as PyTorch
    does in its compute type (forming both in float64 and rounding afterwards can differ in
    the last bit, and GFI's optimization amplifies last-bit differences)."""
    if align_corners:
        src = np.arange(n_out) * ((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0)
    else:
        src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = (src - i0).astype(dtype)
    w = np.zeros((n_out, n_in), dtype)
    np.add.at(w, (np.arange(n_out), i0), 1 - frac)
    np.add.at(w, (np.arange(n_out), i1), frac)
    return w


def upsample(m: jax.Array, hw: tuple[int, int], align_corners: bool) -> jax.Array:
    """Bilinear `(N, h, w) -> (N, H, W)` as two small matmuls.

    The weights are broadcast over N and contracted as a batched dot so that forward and
    backward are computed image by image (bitwise independent of the batch on XLA:CPU).
    """
    n = m.shape[0]
    dt = jnp.dtype(m.dtype).name
    uh = jnp.asarray(interp_matrix(m.shape[1], hw[0], align_corners, dt))
    uw = jnp.asarray(interp_matrix(m.shape[2], hw[1], align_corners, dt))
    uh = jnp.broadcast_to(uh, (n, hw[0], m.shape[1]))
    uw = jnp.broadcast_to(uw, (n, hw[1], m.shape[2]))
    hi = jax.lax.Precision.HIGHEST
    return jnp.einsum("nWw,nHw->nHW", uw, jnp.einsum("nHh,nhw->nHw", uh, m, precision=hi),
                      precision=hi)


def normalize(m: jax.Array, how: str, grad: str = "exact") -> jax.Array:
    """Per map: (m−min)/(max−min) ("minmax") or (m−min)/max ("max").

    Guard: where the denominator is 0 (a flat or all-zero map, e.g. ω driven to 0) it is
    replaced by 1, so the result is m − min = 0 and no NaN appears, while the gradient of
    m − min still flows and ω can leave 0 again (a zeroed result would freeze ω at 0).

    grad: the gradient the optimizer sees through min and max; the values are the same.
    "exact": autodiff's, through the single arg-min and arg-max pixels. "detach": none, min
    and max are constants. Why it matters: with "exact", stage 2 follows last-bit changes of
    its input (bfloat16 against float32, noise of 1e-3) to visibly different masks; with
    "detach" far less (experiments/results/offline_tuning.md, Run 5).
    """
    lo = m.min(axis=(1, 2), keepdims=True)
    hi = m.max(axis=(1, 2), keepdims=True)
    if grad == "detach":
        lo, hi = jax.lax.stop_gradient(lo), jax.lax.stop_gradient(hi)
    elif grad != "exact":
        raise ValueError(f"norm_grad {grad!r} must be 'exact' or 'detach'")
    den = hi - lo if how == "minmax" else hi
    return (m - lo) / jnp.where(den > 0, den, 1.0)


def _weighted_sums(omega: jax.Array, f_l1: jax.Array, cfg: Config,
                   splits: tuple[int, ...]) -> list[jax.Array]:
    """Σᵢ ωᵢ fᵢ `(N, h, w)`: one map, or with `combine="product"` one per l1 layer (`splits`:
    each layer's channel count in f^{l1})."""
    if cfg.combine not in ("sum", "product"):
        raise ValueError(f"combine {cfg.combine!r} must be 'sum' or 'product'")
    hi = jax.lax.Precision.HIGHEST
    if cfg.combine == "sum" or len(splits) < 2:
        return [jnp.einsum("nhwc,nc->nhw", f_l1, omega, precision=hi)]
    ends = np.cumsum(splits)
    return [jnp.einsum("nhwc,nc->nhw", f_l1[..., e - k:e], omega[:, e - k:e], precision=hi)
            for k, e in zip(splits, ends)]


def _product(maps: list[jax.Array], cfg: Config) -> jax.Array:
    # Each layer's map normalized alone, so neither layer's scale decides; the product keeps
    # only what every layer marks (a high layer's class evidence at a finer layer's detail).
    norm = functools.partial(normalize, how=cfg.normalize, grad=cfg.norm_grad)
    m = norm(maps[0])
    for other in maps[1:]:
        m = m * norm(other)
    return norm(m) if len(maps) > 1 else m


def mask(omega: jax.Array, f_l1: jax.Array, hw: tuple[int, int], cfg: Config,
         splits: tuple[int, ...] = ()) -> jax.Array:
    """ω `(N, C)`, f^{l1} `(N, h, w, C)` -> m `(N, H, W)` in [0, 1]."""
    maps = _weighted_sums(omega, f_l1, cfg, splits)
    if cfg.upsample_first:
        return _product([upsample(m, hw, cfg.align_corners) for m in maps], cfg)
    return upsample(_product(maps, cfg), hw, cfg.align_corners)


def basis(acts: Sequence[jax.Array], align_corners: bool) -> jax.Array:
    """The mask basis f^{l1} `(N, h, w, C)` from one or more layers' activations: each map
    bilinearly resized to the finest of their grids, channels concatenated.

    Why several: a high layer's channels are class-specific but coarse (7×7 in
    EfficientNet-Lite0 at 224²), a middle layer's are finer but shared by every object in
    the scene; with both, stage 2 can weigh the one against the other."""
    h = max(a.shape[1] for a in acts)
    w = max(a.shape[2] for a in acts)
    out = []
    for a in acts:
        if a.shape[1:3] != (h, w):
            dt = jnp.dtype(a.dtype).name
            uh = jnp.asarray(interp_matrix(a.shape[1], h, align_corners, dt))
            uw = jnp.asarray(interp_matrix(a.shape[2], w, align_corners, dt))
            a = jnp.einsum("Hh,nhwc,Ww->nHWc", uh, a, uw, precision=jax.lax.Precision.HIGHEST)
        out.append(a)
    return out[0] if len(out) == 1 else jnp.concatenate(out, axis=-1)


def mask_l1(omega: jax.Array, f_l1: jax.Array, cfg: Config,
            splits: tuple[int, ...] = ()) -> jax.Array:
    """The normalized mask at l1 resolution `(N, h, w)`."""
    return _product(_weighted_sums(omega, f_l1, cfg, splits), cfg)


@jax.custom_vjp
def blend(x: jax.Array, p: jax.Array, m: jax.Array) -> jax.Array:
    """Φ(x, m) = x⊙m + p⊙(1−m) for `(N, H, W, 3)` images and an `(N, H, W)` mask."""
    m = m[..., None]
    return x * m + p * (1.0 - m)


def _blend_fwd(x, p, m):
    return blend(x, p, m), (x, p, m)


def _blend_bwd(res, g):
    # ∂Φ/∂m summed over the colour channels in a fixed order: XLA's reduce over a 3-wide axis
    # may associate differently per batch size, and GFI amplifies last-bit differences.
    x, p, m = res
    d = g * (x - p)
    dm = d[..., 0] + d[..., 1] + d[..., 2] if x.shape[-1] == 3 else d.sum(-1)
    return g * m[..., None], g * (1.0 - m[..., None]), dm


blend.defvjp(_blend_fwd, _blend_bwd)


# ----------------------------------------------------------------------------- backgrounds
def gaussian_blur(images: jax.Array, sigma: float) -> jax.Array:
    """Separable Gaussian blur of `(B, H, W, C)`, edges extended, kernel cut at 3σ.

    Blur and the per-channel affine normalization commute, so blurring the preprocessed
    image equals blurring the pixels and then normalizing.
    """
    r = max(int(np.ceil(3 * sigma)), 1)
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k = jnp.asarray(k / k.sum(), images.dtype)
    x = jnp.pad(images, ((0, 0), (r, r), (r, r), (0, 0)), mode="edge")
    h, w = images.shape[1:3]
    x = sum(k[i] * x[:, i:i + h] for i in range(2 * r + 1))
    return sum(k[i] * x[:, :, i:i + w] for i in range(2 * r + 1))


def background(images: jax.Array, cfg: Config) -> jax.Array:
    """p for `cfg.background` "blur" or "noise" (the "mean" colour needs the model's
    normalization, so `explain` passes it as an explicit background)."""
    if cfg.background == "blur":
        return gaussian_blur(images, cfg.blur_sigma)
    if cfg.background == "noise":
        # One fixed noise image for all: an image's explanation must not depend on its batch.
        noise = jax.random.normal(jax.random.PRNGKey(cfg.seed), images.shape[1:], images.dtype)
        return jnp.broadcast_to(noise, images.shape)
    raise ValueError(f"background {cfg.background!r} must be passed as an array")


# ----------------------------------------------------------------------------- losses
def rowdot(a: jax.Array, b: jax.Array) -> jax.Array:
    """Σ a·b over all but the first axis, per row, written as a batched dot.

    XLA:CPU vectorizes a plain `sum(axis=1)` differently for different batch sizes, so an
    image's loss would change in the last bit with its batch; a dot with the batch as a
    batch dimension is computed row by row.
    """
    a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    return jnp.einsum("nk,nk->n", a, b, precision=jax.lax.Precision.HIGHEST)


def class_score(logits: jax.Array, target: jax.Array, kind: str, log: bool = False) -> jax.Array:
    """f_c: softmax probability (single-label) or sigmoid (multi-label) of class `target`;
    its logarithm, computed stably, with `log`."""
    logits = logits.astype(accumulation_dtype(logits.dtype))
    z = jnp.take_along_axis(logits, target[:, None], axis=1)[:, 0]
    if kind == "sigmoid":
        return jax.nn.log_sigmoid(z) if log else jax.nn.sigmoid(z)
    top = jax.lax.stop_gradient(logits.max(axis=1, keepdims=True))
    e = jnp.exp(logits - top)
    if log:
        return z - top[:, 0] - jnp.log(rowdot(e, jnp.ones_like(e)))
    return jnp.exp(z - top[:, 0]) / rowdot(e, jnp.ones_like(e))


def penalty(omega: jax.Array, kind: str) -> jax.Array:
    """‖ω‖₁ or Σω², per row.

    ‖ω‖₁ is written as ω·sign(ω) so that its gradient at ω = 0 is sign(0) = 0, as in PyTorch
    (the authors' framework); `jnp.abs` has gradient 1 at 0, which would keep pushing a
    projected-to-zero ωᵢ into the bound and build up Adam momentum there.
    """
    if kind == "l1":
        return rowdot(omega, jax.lax.stop_gradient(jnp.sign(omega)))
    return rowdot(omega, omega)


def _sumsq(a: jax.Array) -> jax.Array:
    return rowdot(a, a)


def resolve_targets(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """`(B, K)` class indices; an entry −k means "the class ranked k-th on the clean image"."""
    ranked = jnp.argsort(-logits.astype(accumulation_dtype(logits.dtype)), axis=1, stable=True)
    rank_idx = jnp.clip(-targets - 1, 0, logits.shape[1] - 1)
    return jnp.where(targets >= 0, targets, jnp.take_along_axis(ranked, rank_idx, axis=1))


# ----------------------------------------------------------------------------- the program
def accumulation_dtype(dtype) -> jnp.dtype:
    """ω, Adam state, masks and losses: float32, or float64 for float64 inputs (x64 mode,
    used by the oracle comparison to take rounding noise out of the picture)."""
    return jnp.promote_types(dtype, jnp.float32)


def gfi(features: Features, params: Any, images: jax.Array, targets: jax.Array,
        p: jax.Array | None, cfg: Config, sequential: bool = False) -> dict[str, jax.Array]:
    """Both stages for a batch: images `(B, H, W, 3)`, targets `(B, K)` -> N = B·K explanations.

    Stage 1 runs once per image and only up to l0; stage 2 runs once per (image, target),
    evaluating Φ and Φ_bg in one forward of a 2K batch per image. Only ω is differentiated.
    Losses are per image and summed, so each image's gradient and Adam state depend on that
    image only. Mathematically that makes every image's answer independent of its batch;
    bitwise it does not, because convolution kernels round differently for different batch
    sizes (XLA:CPU's GEMM tiling puts an image's rows at other tile positions). With
    `sequential=True` the images go through one after another (`lax.map`) inside the same
    program, so each image runs exactly the computation it runs alone.
    """
    if not sequential:
        return _gfi_batch(features, params, images, targets, p, cfg)
    B, K = targets.shape
    one = lambda a: _gfi_batch(features, params, a[0][None], a[1][None],  # noqa: E731
                               None if a[2] is None else a[2][None], cfg)
    out = jax.lax.map(one, (images, targets, p))
    return jax.tree.map(lambda a: a.reshape(B * K, *a.shape[2:]), out)


def _gfi_batch(features: Features, params: Any, images: jax.Array, targets: jax.Array,
               p: jax.Array | None, cfg: Config, unroll: bool = False) -> dict[str, jax.Array]:
    l0, l1 = cfg.l0, tuple(cfg.l1.split("+"))
    B, H, W, _ = images.shape
    K = targets.shape[1]
    acc = accumulation_dtype(images.dtype)
    images = images.astype(acc)
    p = background(images, cfg) if p is None else p.astype(acc)
    clean = features(params, images, tuple(dict.fromkeys((l0, *l1, "logits"))))
    f0 = jax.lax.stop_gradient(clean[l0]).astype(acc)
    f1 = jax.lax.stop_gradient(basis([clean[n].astype(acc) for n in l1], cfg.align_corners))
    splits = tuple(clean[n].shape[-1] for n in l1)
    targets = resolve_targets(clean["logits"], targets)
    s1, s2 = schedules(cfg)
    opt1 = optimizer(cfg, s1)
    opt2 = optimizer(cfg, s2) if cfg.restart_stage2 else opt1
    f0_norm = _sumsq(f0)

    def loss1(omega):
        phi = blend(images, p, mask(omega, f1, (H, W), cfg, splits))
        err = _sumsq(features(params, phi, (l0,))[l0].astype(acc) - f0)
        if cfg.inversion_error == "relative":
            err = err / jnp.where(f0_norm > 0, f0_norm, 1.0)
        per = err + cfg.gamma * penalty(omega, cfg.stage1_penalty)
        return per.sum(), per

    def step(loss, opt):
        def body(carry, _):
            omega, state = carry
            (_, per), g = jax.value_and_grad(loss, has_aux=True)(omega)
            updates, state = opt.update(g, state, omega)
            omega = optax.apply_updates(omega, updates)
            return (omega, state), (per, omega if cfg.trace_omega else None)
        return body

    omega = jnp.full((B, f1.shape[-1]), cfg.omega_init, acc)
    (omega, state), (trace1, omegas1) = jax.lax.scan(
        step(loss1, opt1), (omega, opt1.init(omega)), None, length=cfg.stage1_steps,
        unroll=unroll)

    # Stage 2 runs per (image, target): repeat each image's stage-1 result K times.
    rep = lambda a: a if a.ndim == 0 else jnp.repeat(a, K, axis=0)  # noqa: E731
    x, pn, f1n, c = rep(images), rep(p), rep(f1), targets.reshape(-1)
    omega = rep(omega)
    state = opt2.init(omega) if cfg.restart_stage2 else jax.tree.map(rep, state)

    def logits2(omega):
        m = mask(omega, f1n, (H, W), cfg, splits)
        both = jnp.concatenate([blend(x, pn, m), blend(x, pn, 1.0 - m)])  # Φ and Φ_bg
        z = features(params, both, ("logits",))["logits"]
        return z[:B * K], z[B * K:], m

    def scores(omega):
        z_fg, z_bg, _ = logits2(omega)
        return class_score(z_fg, c, cfg.score), class_score(z_bg, c, cfg.score)

    def loss2(omega):
        # log_keep / log_suppress: the log of a probability keeps a gradient when c holds
        # little of the softmax (other objects in the scene take the mass), where the
        # probability's own gradient vanishes with it.
        # area: the normalized mask is invariant to the scale of ω, so the penalty on ω cannot
        # make the mask small; mean(m) can (as in Fong & Vedaldi's mask area term).
        z_fg, z_bg, m = logits2(omega)
        keep = class_score(z_fg, c, cfg.score, log=cfg.log_keep)
        drop = class_score(z_bg, c, cfg.score, log=cfg.log_suppress)
        per = -keep + cfg.lam * drop + cfg.delta * penalty(omega, cfg.stage2_penalty)
        if cfg.area:
            per = per + cfg.area * rowdot(m, jnp.ones_like(m)) / (H * W)
        return per.sum(), per

    (omega, _), (trace2, omegas2) = jax.lax.scan(step(loss2, opt2), (omega, state), None,
                                                 length=cfg.stage2_steps, unroll=unroll)
    s_fg, s_bg = scores(omega)
    extra = {}
    if cfg.trace_omega:  # scan stacks steps first: (steps, N, C) -> (N, steps, C)
        extra["omega_trace"] = jnp.concatenate(
            [rep(omegas1.transpose(1, 0, 2)), omegas2.transpose(1, 0, 2)], axis=1)
    return extra | {
        "omega": omega,
        "mask": mask(omega, f1n, (H, W), cfg, splits),
        "mask_l1": mask_l1(omega, f1n, cfg, splits),
        "target": c,
        "score": class_score(rep(clean["logits"]), c, cfg.score),
        "score_masked": s_fg,
        "score_background": s_bg,
        "loss_trace": jnp.concatenate([rep(trace1.T), trace2.T], axis=1),
    }


@functools.lru_cache(maxsize=64)
def compiled(features: Features, cfg: Config, sequential: bool = False) -> Callable:
    """The jitted program for one (model, config); jit caches per input shape."""
    return jax.jit(functools.partial(gfi, features, cfg=cfg, sequential=sequential))


# ----------------------------------------------------------------------------- front end
@dataclasses.dataclass(frozen=True)
class Explanation:
    """N = B·K explanations, one per (image, target), as numpy arrays."""
    mask: np.ndarray              # (N, H, W) in [0, 1], input resolution
    mask_l1: np.ndarray           # (N, h, w) in [0, 1], l1 resolution
    omega: np.ndarray             # (N, C) ω ≥ 0
    target: np.ndarray            # (N,) class index
    image_index: np.ndarray       # (N,) which input image
    score: np.ndarray             # (N,) f_c(x), the clean image's class score
    score_masked: np.ndarray      # (N,) f_c(Φ) with the final mask
    score_background: np.ndarray  # (N,) f_c(Φ_bg)
    loss_trace: np.ndarray        # (N, stage1_steps + stage2_steps), loss before each step
    config: Config
    omega_trace: np.ndarray | None = None  # (N, steps, C) ω after each step (cfg.trace_omega)


def _targets_array(targets, batch: int, num_classes: int) -> np.ndarray:
    """None | "topK" | "rankK" | int | per-image ints | (B, K) ints -> (B, K) int32."""
    if targets is None:
        targets = "top1"
    if isinstance(targets, str):
        k = targets[3:] if targets.startswith("top") else targets[4:] if targets.startswith("rank") else ""
        if not k.isdigit() or int(k) < 1 or int(k) > num_classes:
            raise ValueError(f"targets {targets!r} not understood; use 'top1', 'top3', 'rank2', "
                             "a class index, or one index per image")
        k = int(k)
        ranks = -np.arange(1, k + 1) if targets.startswith("top") else np.array([-k])
        return np.broadcast_to(ranks, (batch, len(ranks))).astype(np.int32)
    t = np.asarray(targets)
    if t.dtype.kind not in "iu":
        raise ValueError(f"targets must be integers (class indices); got {t.dtype}")
    if t.ndim == 0:
        t = np.full((batch, 1), t)
    elif t.ndim == 1:
        t = t[:, None]
    if t.ndim != 2 or t.shape[0] != batch:
        raise ValueError(f"targets: expected one int, one per image ({batch}) or (images, K) ints;"
                         f" got shape {np.shape(targets)}")
    if t.min() < 0 or t.max() >= num_classes:
        bad = int(t.min() if t.min() < 0 else t.max())
        raise ValueError(f"target class {bad} is outside the model's {num_classes} classes "
                         f"(0..{num_classes - 1})")
    return t.astype(np.int32)


def resolve_layers(cfg: Config, arch) -> Config:
    """`cfg` with l0/l1 set to `arch`'s layer names: the config's own (aliases resolved), or
    the architecture's defaults (l1 = l0 when `same_layer`, as the released code does)."""
    l0 = arch.resolve(cfg.l0 or arch.l0)
    l1 = ("+".join(arch.resolve(n) for n in cfg.l1.split("+")) if cfg.l1
          else (l0 if cfg.same_layer else arch.l1))
    return dataclasses.replace(cfg, l0=l0, l1=l1)


def explain(model, images, targets=None, preset: str | Config | None = None,
            background=None, sequential: bool | None = None) -> Explanation:
    """Explains `images` `(B, H, W, 3)` (preprocessed for `model`) with GFI.

    targets: None or "top1" (default), "topK" (K explanations per image), "rankK" (the
    K-th ranked class), an int for all images, one int per image, or `(B, K)` ints.
    preset: a preset name or a `Config`; None: the model's default (`DEFAULT_PRESETS`).
    background: None (the config's: blur / mean / noise) or an explicit `(B, H, W, 3)` p.
    sequential: explain the images one after another inside the program, so that each gets
    bit for bit the answer it gets alone (see `gfi`). Default: on CPU yes, on accelerators
    no (there the batch is what makes it fast).
    """
    cfg = resolve_layers(_preset(preset, arch=model.arch.name), model.arch)
    # float64 models (x64 mode) explain in float64; everything else in float32 (see
    # `accumulation_dtype`).
    images = np.asarray(images, model.input_dtype)
    model.check_images(images)
    if not np.isfinite(images).all():
        raise ValueError("images contain NaN or Inf pixels; check the decoding and preprocessing")
    B, H, W, _ = images.shape
    check_layers(model, cfg, (H, W))
    t = _targets_array(targets, B, len(model.classes))
    if background is None and cfg.background == "mean":
        color = model.preprocessing.normalize(np.asarray(model.preprocessing.mean) * 255.0)
        background = np.broadcast_to(color.astype(images.dtype), images.shape)
    if background is not None:
        background = np.asarray(background, images.dtype)
        if background.shape != images.shape:
            raise ValueError(f"background must have the images' shape {images.shape}; "
                             f"got {background.shape}")
    if sequential is None:
        sequential = jax.default_backend() == "cpu"
    out = compiled(model.features, cfg, sequential)(model.params, images, t, background)
    out = jax.device_get(out)
    return Explanation(image_index=np.repeat(np.arange(B), t.shape[1]), config=cfg,
                       **{k: np.asarray(v) for k, v in out.items()})


def check_layers(model, cfg: Config, hw: tuple[int, int]) -> None:
    """Clear errors, before compiling, for l0/l1 choices that cannot work."""
    from gfi_jax.models import layer_shapes  # shapes by abstract evaluation: no FLOPs
    shapes = layer_shapes(model.arch.name, hw)
    for l1 in cfg.l1.split("+"):
        s1 = shapes[l1]
        if len(s1) != 3:
            raise ValueError(f"l1 must be a convolutional layer with a spatial map; {l1!r} "
                             f"has shape {s1}. Conv layers of {model.arch.name}: "
                             f"{', '.join(n for n, s in shapes.items() if len(s) == 3)}")
        if s1[0] > hw[0] or s1[1] > hw[1]:
            raise ValueError(f"l1 {l1!r} map {s1[:2]} is larger than the input {hw}")


# ----------------------------------------------------------------------------- cost
def _matmul_flops(jaxpr) -> float:
    """2·MACs of every convolution and dot in a jaxpr, loops multiplied by their length."""
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "conv_general_dilated":
            lhs, rhs = (v.aval.shape for v in eqn.invars)
            out = eqn.outvars[0].aval.shape
            dn = eqn.params["dimension_numbers"]
            k_spatial = np.prod([rhs[d] for d in dn.rhs_spec[2:]])
            c_in = rhs[dn.rhs_spec[1]]
            total += 2.0 * np.prod(out) * k_spatial * c_in
        elif name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod([lhs[d] for d in contract])
        times = eqn.params.get("length", 1) if name == "scan" else 1
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            total += times * _matmul_flops(sub)
    return total


def flops(model, cfg: Config, hw: tuple[int, int] = (224, 224),
          compile: bool = True) -> dict[str, float]:
    """FLOPs per explanation (one image, one target): XLA's cost analysis and the analytic count.

    analytic: forward + input-gradient FLOPs of the convolutions and matmuls over all steps —
    the clean forward F, stage 1 S₁·(F_l0 forward + F_l0 input gradient), stage 2
    S₂·2·(F + F) for Φ and Φ_bg, and the final 2F scoring pass (an input gradient costs what
    the forward costs). xla: `cost_analysis()` of the compiled program. XLA counts a loop body
    once, so the program is compiled with unrolled loops at 1–2 steps per stage and the
    (exactly linear) step dependence is extrapolated to the configured step counts.
    compile=False reads the cost analysis of the lowered (unoptimized) program instead:
    no compile, which matters on accelerators, where compiling is slow.
    Both count the program as accelerators run it: on CPU the depthwise convolutions run as
    shifted products (`models.layers.conv_general_dilated`), whose stride-2 input gradient also
    multiplies the zeros of the dilated cotangent (+19% FLOPs on EfficientNet-Lite0).
    """
    from gfi_jax.models.layers import grouped_depthwise
    with grouped_depthwise():
        return _flops(model, cfg, hw, compile)


def _flops(model, cfg: Config, hw: tuple[int, int], compile: bool) -> dict[str, float]:
    cfg = dataclasses.replace(resolve_layers(cfg, model.arch), trace_omega=False)
    l0 = cfg.l0
    x = jax.ShapeDtypeStruct((1, *hw, 3), jnp.float32)
    fwd = lambda layers: _matmul_flops(jax.make_jaxpr(  # noqa: E731
        lambda p, x: model.features(p, x, layers))(model.params, x).jaxpr)
    f_full, f_l0 = fwd(("logits",)), fwd((l0,))
    s1, s2 = cfg.stage1_steps, cfg.stage2_steps
    analytic = f_full + s1 * 2 * f_l0 + s2 * 4 * f_full + 2 * f_full

    def xla(n1: int, n2: int) -> float:
        c = dataclasses.replace(cfg, stage1_steps=n1, stage2_steps=n2)
        fn = jax.jit(functools.partial(_gfi_batch, model.features, cfg=c, unroll=True))
        t = jax.ShapeDtypeStruct((1, 1), jnp.int32)
        lowered = fn.lower(model.params, x, t, None)
        ca = None if compile else lowered.cost_analysis()
        if ca is None:  # some backends only analyse compiled programs
            ca = lowered.compile().cost_analysis()
        return float((ca[0] if isinstance(ca, (list, tuple)) else ca)["flops"])

    base = xla(1, 1)
    per1, per2 = xla(2, 1) - base, xla(1, 2) - base
    return {"xla": base + (s1 - 1) * per1 + (s2 - 1) * per2, "analytic": analytic,
            "forward": f_full, "forward_to_l0": f_l0,
            "xla_stage1_step": per1, "xla_stage2_step": per2}
