"""Guided Feature Inversion (Du, Liu, Song, Hu; KDD 2018): both stages in one XLA program.

Notation follows the paper. For an image x with blurred background p, the mask is built
from the channels of a high conv layer l1:   m = Σᵢ ωᵢ fᵢ^{l1}(x),  normalized and upsampled;
the blends are   Φ = x⊙m + p⊙(1−m)   and   Φ_bg = x⊙(1−m) + p⊙m.
Stage 1 (Alg. 1) fits ω so that f^{l0}(Φ) ≈ f^{l0}(x); stage 2 (Alg. 2) fine-tunes ω so
that Φ keeps and Φ_bg loses the target class c. ω ≥ 0 is kept by projecting after every
Adam step: the optimizer is `optax.chain(adam(schedule), project(0, ω_max))`.

`gfi(features, params, images, targets, background, cfg)` is the pure program: any model
works that offers `features(params, x, layers) -> {layer: activation}`; `compiled(features,
cfg)` is it jitted. `explain(model, …)` is the front end that checks every input on the host
first, over a `gfi_jax.LoadedModel` or a `gfi_jax.wrap`ped model.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import operator
import types
import typing
from typing import Any, Callable, Literal, Sequence

import jax
import jax.extend.core  # noqa: F401  (jaxprs_in_params, for the FLOPs count)
import jax.numpy as jnp
import numpy as np
import optax

from gfi_jax.frontend import default_sequential
from gfi_jax.jaxpr_cut import class_gradient

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
    stage2_init: Literal["stage1", "gradient", "gated"] = "stage1"   # ω when stage 2 starts:
                                           # stage 1's, the class gradient at l1, or stage 1's
                                           # gated by it (see `stage2_start`)
    adam_eps: float = 1e-8
    restarts: int = 1                      # R starts of ω (see `restart_start`); each
                                           # (image, target) keeps the run whose last
                                           # stage-2 loss is lowest
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
    area: float = 0.0                      # weight of the stage-2 mask area term (see
                                           # `area_term`): mean(m), or with …
    target_area: float | None = None       # … a fraction a in (0, 1), the distance of m's
                                           # area to a (extremal perturbations' constraint)
    normalize: Literal["minmax", "max"] = "max"   # (m−min)/(max−min) or (m−min)/max
    norm_grad: Literal["exact", "detach"] = "exact"   # the gradient through the
                                           # normalization's min and max (see `normalize`)
    upsample_first: bool = True            # normalize after (True) or before upsampling
    align_corners: bool = True             # bilinear upsampling grid
    background: Literal["blur", "mean", "noise"] = "blur"
    blur_sigma: float = 11.0               # in input pixels
    seed: int = 0                          # for the noise background
    trace_omega: bool = False              # also return ω after every step (N, steps, C)

    def __post_init__(self):
        # A value outside a field's type or range would otherwise silently take some other
        # branch of the program (an unknown `normalize` normalizes as "max", and so on).
        for name, tp in _field_types().items():
            value = getattr(self, name)
            if not _matches(value, tp):
                raise ValueError(f"Config.{name}={value!r}: expected {_describe(tp)}")
        for name, (op, bound) in _RANGES.items():
            value = getattr(self, name)
            if value is not None and not _OPS[op](value, bound):
                raise ValueError(f"Config.{name}={value!r}: must be {op} {bound}")
        a = self.target_area
        if a is not None and not (0 < a < 1 and self.area > 0):
            raise ValueError(f"Config.target_area={a!r}: must be in (0, 1), with area > 0 as "
                             f"its weight (area={self.area!r})")
        lo, hi = self.omega_min, self.omega_max
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"Config.omega_min={lo!r} > omega_max={hi!r}: the projection's "
                             "lower bound must not exceed its upper bound")


# The range of each number whose type alone admits nonsense (None, an unset bound, is exempt).
# lr = 0 is allowed: it keeps ω at omega_init (the tests read the first losses that way).
_RANGES = {"stage1_steps": (">=", 0), "stage2_steps": (">=", 0), "lr": (">=", 0),
           "lr_decay": (">", 0), "lr_every": (">=", 1), "restarts": (">=", 1),
           "adam_eps": (">", 0),
           "gamma": (">=", 0), "lam": (">=", 0), "delta": (">=", 0), "area": (">=", 0),
           "blur_sigma": (">", 0)}
_OPS = {">=": operator.ge, ">": operator.gt}


@functools.cache
def _field_types() -> dict[str, Any]:
    """Config's annotations as types (they are strings under `from __future__ import
    annotations`): the one place the choices of every `Literal` field are written."""
    return typing.get_type_hints(Config)


def _matches(value, tp) -> bool:
    """Whether `value` is of the field type `tp`: a Literal's choices, a union, None, bool,
    int (not bool) or a finite real number (int or float, not bool), str."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return isinstance(value, str) and value in args
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, (bool, np.bool_))
    if isinstance(value, (bool, np.bool_)):
        return False
    if tp is int:
        return isinstance(value, numbers.Integral)
    if tp is float:
        return isinstance(value, numbers.Real) and math.isfinite(value)
    return isinstance(value, tp)


def _describe(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    return {type(None): "None", bool: "True or False", int: "an int",
            float: "a finite number"}.get(tp, getattr(tp, "__name__", str(tp)))


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
    # median mask Pearson 0.883; detached 0.992), at some cost in deletion and insertion
    # (experiments/results/offline_tuning.md, Run 5).
    "detached_lite0": Config(name="detached_lite0", log_keep=True, l1="head+blocks.11.expand",
                             combine="product", norm_grad="detach", area=1.0),
}


# The preset `explain` uses when none is given, per architecture: the `preset` field of its
# registry record (the winner of the offline benchmark where one was tuned, so far only
# EfficientNet-Lite0's, else the released code's behaviour); this dict is a view by name.
from gfi_jax.models import ARCHS as _ARCHS  # noqa: E402  (the records import nothing of gfi)

DEFAULT_PRESETS = {name: a.preset for name, a in _ARCHS.items()}


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


# `--set KEY=VALUE` for the command lines (gfi-jax explain / run), typed by the fields of
# `Config` (or of another method's config dataclass).
def parse_overrides(pairs: Sequence[str], fields: type | None = None) -> dict[str, Any]:
    """`["stage1_steps=2", "omega_max=none"]` -> `{"stage1_steps": 2, "omega_max": None}`,
    each value parsed as its field's annotation says (int, float, bool, str, a Literal's
    choices; `none` -> None only where the field allows None). `fields`: the config
    dataclass (default `Config`). ValueError, one line, for a malformed pair, an unknown
    key (naming the valid ones) or a bad value (naming what the field takes)."""
    import typing

    fields = fields or Config
    hints = typing.get_type_hints(fields)
    names = [f.name for f in dataclasses.fields(fields)]
    out = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key, text = key.strip(), text.strip()
        if not sep or not key:
            raise ValueError(f"--set {pair!r}: write KEY=VALUE, e.g. --set stage2_steps=20")
        if key not in names:
            what = "GFI config" if fields is Config else fields.__name__
            raise ValueError(f"--set {key}: unknown {what} field; valid keys: {', '.join(names)}")
        try:
            out[key] = _parse_field_value(text, hints[key])
        except ValueError:
            raise ValueError(f"--set {key}={text}: expected {_type_name(hints[key])}") from None
    return out


def _parse_field_value(text: str, tp) -> Any:
    import types
    import typing

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        for a in args:
            if a is not type(None):
                try:
                    return _parse_field_value(text, a)
                except ValueError:
                    pass
        raise ValueError(text)
    if origin is typing.Literal:
        if text in args:
            return text
        raise ValueError(text)
    if tp is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(text)
    if tp in (int, float, str):
        return tp(text)
    raise ValueError(text)  # e.g. a tuple field: not settable from a command line


def _type_name(tp) -> str:
    import types
    import typing

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(map(str, args))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("none" if a is type(None) else _type_name(a) for a in args)
    if tp is bool:
        return "true or false"
    return getattr(tp, "__name__", str(tp))


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


def optimizer(cfg: Config, schedule: optax.Schedule,
              base: optax.GradientTransformation | None = None) -> optax.GradientTransformation:
    """Adam with `schedule` (or `base`, an `Extensions.optimizer`), then the ω projection."""
    first = optax.adam(schedule, eps=cfg.adam_eps) if base is None else base
    return optax.chain(first, project(cfg.omega_min, cfg.omega_max))


# ----------------------------------------------------------------------------- extensions
Term = Callable[..., jax.Array]
"""An extra loss term `(ω, m, logits of Φ, logits of Φ_bg, target) -> (N,)`, one value per
row, added to its stage's per-row loss. ω is `(N, C)`, m `(N, H, W)`, the logits
`(N, classes)`. A stage-2 row is one (image, target), and target is `(N,)`; a stage-1 row is
one image, and target holds that image's K targets, `(N, K)`."""


@dataclasses.dataclass(frozen=True)
class Extensions:
    """Hooks into the GFI program. They are part of its cache key (`compiled`): a changed hook
    is a new program, and a repeated one is not compiled again. Hooks compare by identity, so
    build each once and reuse it.

    optimizer: replaces Adam in both stages. The ω projection is still chained after it.
    stage1_terms / stage2_terms: extra `Term`s, summed into L_inversion / L_target. A
    stage-1 term costs one more forward of Φ and Φ_bg per step, for its logits.
    stage1_state: also return stage 1's final ω `(B, C)` and optimizer state, so that a
    stage 2 written from the public pieces can continue where stage 1 stopped."""
    optimizer: optax.GradientTransformation | None = None
    stage1_terms: tuple[Term, ...] = ()
    stage2_terms: tuple[Term, ...] = ()
    stage1_state: bool = False

    def __post_init__(self):
        opt = self.optimizer
        if opt is not None and not (callable(getattr(opt, "init", None))
                                    and callable(getattr(opt, "update", None))):
            raise ValueError(f"Extensions.optimizer must be an optax.GradientTransformation, "
                             f"e.g. optax.sgd(0.1, momentum=0.9); got {type(opt).__name__}")
        for name in ("stage1_terms", "stage2_terms"):
            terms = getattr(self, name)
            if not isinstance(terms, tuple) or not all(callable(t) for t in terms):
                raise ValueError(f"Extensions.{name} must be a tuple of functions "
                                 f"(omega, mask, logits_phi, logits_bg, target) -> (N,); "
                                 f"got {terms!r}")
        if not isinstance(self.stage1_state, bool):
            raise ValueError(f"Extensions.stage1_state must be True or False; "
                             f"got {self.stage1_state!r}")


NO_EXTENSIONS = Extensions()


def extra_terms(terms: tuple[Term, ...], stage: str, per: jax.Array, *args) -> jax.Array:
    """`per` (one loss per row) plus each term's value; a term of another shape is an error."""
    for i, term in enumerate(terms):
        v = jnp.asarray(term(*args))
        if v.shape != per.shape:
            raise ValueError(f"{stage} term {i} ({getattr(term, '__name__', term)}) returned "
                             f"shape {v.shape}; a term gives one value per row: {per.shape}")
        per = per + v.astype(per.dtype)
    return per


def lr_trace(cfg: Config) -> np.ndarray:
    """The step size of every step, stage 1 then stage 2: `(stage1_steps + stage2_steps,)`."""
    s1, s2 = schedules(cfg)
    off = 0 if cfg.restart_stage2 or cfg.stage2_init != "stage1" else cfg.stage1_steps
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


def blend_bg(x: jax.Array, p: jax.Array, m: jax.Array) -> jax.Array:
    """Φ_bg(x, m) = x⊙(1−m) + p⊙m (Eq. 4): Φ with the complement mask."""
    return blend(x, p, 1.0 - m)


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
        p: jax.Array | None, cfg: Config, sequential: bool = False,
        ext: Extensions = NO_EXTENSIONS) -> dict[str, jax.Array]:
    """Both stages for a batch: images `(B, H, W, 3)`, targets `(B, K)` -> N = B·K explanations.

    Stage 1 runs once per image and only up to l0; stage 2 runs once per (image, target),
    evaluating Φ and Φ_bg in one forward of a 2K batch per image. Only ω is differentiated.
    Losses are per image and summed, so each image's gradient and Adam state depend on that
    image only. Mathematically that makes every image's answer independent of its batch;
    bitwise it does not, because convolution kernels round differently for different batch
    sizes (XLA:CPU's GEMM tiling puts an image's rows at other tile positions). With
    `sequential=True` the images go through one after another (`lax.map`) inside the same
    program, and with K > 1 targets so do an image's stage-2 rows (`rowwise`), so each
    (image, target) runs exactly the computation it runs alone, as its image's only target.
    `ext`: the program's `Extensions` (none by default).
    """
    if not sequential:
        return _gfi_batch(features, params, images, targets, p, cfg, ext=ext)
    B, K = targets.shape
    one = lambda a: _gfi_batch(features, params, a[0][None], a[1][None],  # noqa: E731
                               None if a[2] is None else a[2][None], cfg, rows_alone=True,
                               ext=ext)
    out = jax.lax.map(one, (images, targets, p))
    ends1 = {n: out.pop(n) for n in ("stage1_omega", "stage1_state") if n in out}
    # Stage 1's ends are per image: (B, 1, …) -> (B, …); a step count, the same for every
    # image, stays one scalar as in the batched program.
    ends1 = jax.tree.map(lambda a: a[0] if a.ndim == 1 else a.reshape(B, *a.shape[2:]), ends1)
    return ends1 | jax.tree.map(lambda a: a.reshape(B * K, *a.shape[2:]), out)


@dataclasses.dataclass(frozen=True, eq=False)
class Problem:
    """What the losses hold fixed, one row per image (stage 1) or per (image, target)
    (stage 2): the model, x and p `(N, H, W, 3)` in the accumulation dtype, the mask basis
    f^{l1}(x) `(N, h, w, C)` and each l1 layer's channel count in it (`splits`)."""
    features: Features
    params: Any
    x: jax.Array
    p: jax.Array
    f1: jax.Array
    splits: tuple[int, ...]
    cfg: Config
    ext: Extensions = NO_EXTENSIONS
    targets: jax.Array | None = None   # (N, K), stage 1's rows only (for its extra terms)

    @property
    def hw(self) -> tuple[int, int]:
        return self.x.shape[1:3]

    def repeat(self, k: int) -> Problem:
        """Each row k times, in order: a row per (image, target) for stage 2."""
        return dataclasses.replace(self, x=_repeat(self.x, k), p=_repeat(self.p, k),
                                   f1=_repeat(self.f1, k), targets=None)


def _repeat(a: jax.Array, k: int) -> jax.Array:
    """`(B, …) -> (B·k, …)`, each row k times; scalars (Adam's step count) as they are."""
    return a if a.ndim == 0 else jnp.repeat(a, k, axis=0)


def clean_features(features: Features, params: Any, x: jax.Array,
                   cfg: Config) -> tuple[jax.Array, jax.Array, tuple[int, ...], jax.Array]:
    """One forward of the clean images x: f^{l0}(x), the mask basis f^{l1}(x) (constants of
    the optimization: only ω is differentiated), each l1 layer's channel count in the
    basis, and the logits."""
    l0, l1 = cfg.l0, tuple(cfg.l1.split("+"))
    clean = features(params, x, tuple(dict.fromkeys((l0, *l1, "logits"))))
    f0 = jax.lax.stop_gradient(clean[l0]).astype(x.dtype)
    f1 = jax.lax.stop_gradient(basis([clean[n].astype(x.dtype) for n in l1], cfg.align_corners))
    return f0, f1, tuple(clean[n].shape[-1] for n in l1), clean["logits"]


def inversion_error(f: jax.Array, f0: jax.Array, f0_norm: jax.Array, how: str) -> jax.Array:
    """‖f^{l0}(Φ) − f^{l0}(x)‖² per image ("sum"), or over ‖f^{l0}(x)‖² ("relative"; an
    all-zero f^{l0}(x) divides by 1)."""
    err = _sumsq(f - f0)
    if how == "relative":
        err = err / jnp.where(f0_norm > 0, f0_norm, 1.0)
    return err


def inversion_loss(omega: jax.Array, problem: Problem, f0: jax.Array,
                   f0_norm: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Stage 1, L_inversion (Eq. 8): inversion error at l0 + γ·penalty(ω), per image.
    Returns the sum (what is differentiated: each image's gradient is its own) and the
    per-image losses."""
    pb, cfg = problem, problem.cfg
    m = mask(omega, pb.f1, pb.hw, cfg, pb.splits)
    f = pb.features(pb.params, blend(pb.x, pb.p, m), (cfg.l0,))[cfg.l0].astype(f0.dtype)
    per = (inversion_error(f, f0, f0_norm, cfg.inversion_error)
           + cfg.gamma * penalty(omega, cfg.stage1_penalty))
    if pb.ext.stage1_terms:   # only then stage 1 needs the logits: one more forward
        z_fg, z_bg = blend_logits(pb, m)
        per = extra_terms(pb.ext.stage1_terms, "stage-1", per, omega, m, z_fg, z_bg, pb.targets)
    return per.sum(), per


def target_logits(omega: jax.Array,
                  problem: Problem) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The logits of Φ and of Φ_bg `(N, classes)`, from one forward of a 2N batch, and m."""
    pb = problem
    m = mask(omega, pb.f1, pb.hw, pb.cfg, pb.splits)
    return (*blend_logits(pb, m), m)


def blend_logits(problem: Problem, m: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The logits of Φ and of Φ_bg for mask m, from one forward of a 2N batch."""
    pb = problem
    both = jnp.concatenate([blend(pb.x, pb.p, m), blend_bg(pb.x, pb.p, m)])
    z = pb.features(pb.params, both, ("logits",))["logits"]
    n = pb.x.shape[0]
    return z[:n], z[n:]


def target_loss(omega: jax.Array, problem: Problem,
                c: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Stage 2, L_target (Eq. 9): −f_c(Φ) + λ·f_c(Φ_bg) + δ·penalty(ω) (+ area·area_term(m)), per
    (image, target); the sum and the per-row losses, as `inversion_loss`.

    log_keep / log_suppress: the log of a probability keeps a gradient when c holds little
    of the softmax (other objects in the scene take the mass), where the probability's own
    gradient vanishes with it. area: the normalized mask is invariant to the scale of ω, so
    the penalty on ω cannot make the mask small; mean(m) can (as in Fong & Vedaldi's mask
    area term)."""
    cfg = problem.cfg
    z_fg, z_bg, m = target_logits(omega, problem)
    per = mask_terms(m, z_fg, z_bg, c, cfg) + cfg.delta * penalty(omega, cfg.stage2_penalty)
    per = extra_terms(problem.ext.stage2_terms, "stage-2", per, omega, m, z_fg, z_bg, c)
    return per.sum(), per


def mask_terms(m: jax.Array, z_fg: jax.Array, z_bg: jax.Array, c: jax.Array,
               cfg: Config) -> jax.Array:
    """The part of L_target that depends on the mask alone, per row: −f_c(Φ) + λ·f_c(Φ_bg)
    (+ area·area_term(m)), from the logits of Φ and Φ_bg. The penalty on ω is left out: the
    mask is normalized, so ω's scale, which the penalty sees, does not change it."""
    keep = class_score(z_fg, c, cfg.score, log=cfg.log_keep)
    drop = class_score(z_bg, c, cfg.score, log=cfg.log_suppress)
    per = -keep + cfg.lam * drop
    if cfg.area:
        per = per + cfg.area * area_term(m, cfg.target_area)
    return per


def area_term(m: jax.Array, target: float | None) -> jax.Array:
    """Stage 2's area term per row of masks `(N, H, W)`: mean(m), which shrinks the mask
    however it is shaped; or, with a target area a, the mean squared distance of m's values,
    sorted, to (1 − a)·HW zeros then a·HW ones (Fong et al. 2019's area constraint: zero
    exactly when m is a binary mask covering the fraction a, so it neither shrinks a mask
    below a nor lets it spread above it)."""
    if target is None:
        h, w = m.shape[1:]
        return rowdot(m, jnp.ones_like(m)) / (h * w)
    flat = m.reshape(m.shape[0], -1)
    n = flat.shape[1]
    step = (jnp.arange(n) >= round((1 - target) * n)).astype(flat.dtype)
    d = jnp.sort(flat, axis=1) - step
    return rowdot(d, d) / n


def descent_step(loss: Callable, opt: optax.GradientTransformation, trace: bool, carry, _):
    """One optimizer step on `loss(ω) -> (sum, per row)`: (ω, state) -> (ω, state) after the
    step, and as the step's outputs the per-row loss before it (and ω after it, with
    `trace`)."""
    omega, state = carry
    (_, per), g = jax.value_and_grad(loss, has_aux=True)(omega)
    updates, state = opt.update(g, state, omega)
    omega = optax.apply_updates(omega, updates)
    return (omega, state), (per, omega if trace else None)


def descend(loss: Callable, opt: optax.GradientTransformation, omega: jax.Array, state,
            steps: int, trace: bool, unroll: bool):
    """`steps` descent steps in a `lax.scan`: ((ω, state), (losses, ω's or None)), the
    outputs stacked steps first."""
    return jax.lax.scan(functools.partial(descent_step, loss, opt, trace), (omega, state),
                        None, length=steps, unroll=unroll)


def stage1(problem: Problem, f0: jax.Array, opt: optax.GradientTransformation,
           unroll: bool = False, restart: jax.Array | None = None):
    """Alg. 1 once per image: ω from omega_init (or restart r's start, `restart_start`),
    `stage1_steps` steps on L_inversion."""
    cfg = problem.cfg
    f0_norm = _sumsq(f0)
    omega = jnp.full((problem.x.shape[0], problem.f1.shape[-1]), cfg.omega_init,
                     problem.x.dtype)
    if restart is not None:
        omega = omega * restart_start(cfg, restart, omega.shape[1]).astype(omega.dtype)
    loss = functools.partial(inversion_loss, problem=problem, f0=f0, f0_norm=f0_norm)
    return descend(loss, opt, omega, opt.init(omega), cfg.stage1_steps, cfg.trace_omega, unroll)


def stage2(problem: Problem, c: jax.Array, omega: jax.Array, state,
           opt: optax.GradientTransformation, unroll: bool = False):
    """Alg. 2 once per (image, target): from stage 1's ω (and Adam state, unless
    `restart_stage2`), `stage2_steps` steps on L_target for class c."""
    cfg = problem.cfg
    loss = functools.partial(target_loss, problem=problem, c=c)
    return descend(loss, opt, omega, state, cfg.stage2_steps, cfg.trace_omega, unroll)


def rowwise(fn: Callable, problem: Problem, *rows: jax.Array):
    """`fn(problem, *rows)` for one row after another (`lax.map`), as if each row were the
    whole problem: XLA:CPU's kernels round otherwise for a batch of K rows than for one, so
    this is how each (image, target) gets exactly its single-target answer."""
    def one(row):
        x, p, f1, *rest = row
        pb = dataclasses.replace(problem, x=x[None], p=p[None], f1=f1[None])
        return jax.tree.map(lambda a: a[0], fn(pb, *(r[None] for r in rest)))
    return jax.lax.map(one, (problem.x, problem.p, problem.f1, *rows))


def stage2_rows(problem: Problem, c: jax.Array, omega: jax.Array, state,
                opt: optax.GradientTransformation, unroll: bool = False):
    """`stage2`, row by row (`rowwise`); the final Adam state is not returned."""
    leaves, tree = jax.tree.flatten(state)
    per_row = [a.ndim > 0 for a in leaves]   # Adam's moments per row; step counts shared

    def one(pb, c1, w, *moments):
        it = iter(moments)
        st = tree.unflatten([next(it) if r else a for a, r in zip(leaves, per_row)])
        (w, _), (trace, omegas) = stage2(pb, c1, w, st, opt, unroll)
        return w, trace.T, None if omegas is None else omegas.transpose(1, 0, 2)

    moments = [a for a, r in zip(leaves, per_row) if r]
    omega, trace, omegas = rowwise(one, problem, c, omega, *moments)
    return (omega, None), (trace.T, None if omegas is None else omegas.transpose(1, 0, 2))


def stage2_start(problem: Problem, c: jax.Array, omega1: jax.Array) -> jax.Array:
    """ω for stage 2 from the class c's gradient at l1 (cfg.stage2_init "gradient" / "gated").

    Stage 1 fits ω to reconstruct the whole image, class-blind; in a scene of several objects
    stage 2 then has to move ω far, and the decayed schedule lets it move each ω by about 0.2
    in total. Grad-CAM's channel weights α_c = mean over the grid of ∂logit_c/∂f^{l1} say which
    channels raise c; their positive part (ω ≥ 0) is a class-specific start ("gradient"), or
    gates stage 1's ω ("gated"). Each l1 layer's part is scaled to mean `omega_init`, the scale
    Adam's steps are sized for (the normalized mask does not depend on it); a layer with no
    positive α keeps stage 1's ω. With signed ω (`omega_min=None`) α keeps its sign, as
    Grad-CAM's weights do, and is scaled to mean |α| = omega_init."""
    pb, cfg = problem, problem.cfg
    parts, start = [], 0
    for layer, n in zip(cfg.l1.split("+"), pb.splits):
        _, g, _ = class_gradient(pb.features, pb.params, pb.x, layer, c)
        alpha = g.mean(axis=(1, 2)).astype(omega1.dtype)
        if cfg.omega_min is not None:
            alpha = jnp.maximum(alpha, 0.0)
        w1 = omega1[:, start:start + n]
        if cfg.stage2_init == "gated":
            alpha = alpha * w1
        mean = jnp.abs(alpha).mean(axis=1, keepdims=True)
        parts.append(jnp.where(mean > 0, alpha * (cfg.omega_init / jnp.where(mean > 0, mean, 1.0)),
                               w1))
        start += n
    return jnp.concatenate(parts, axis=1)


def restart_start(cfg: Config, r: jax.Array, channels: int) -> jax.Array:
    """Restart r's factor on stage 1's start omega_init, per channel `(C,)`: 1 for r = 0 (the
    paper's constant start), else U(½, 3/2) draws of (cfg.seed, r). The mask is normalized,
    so only the channels' relative weights matter; the draw is the same for every image, so
    an image's answer does not depend on its batch."""
    u = jax.random.uniform(jax.random.fold_in(jax.random.PRNGKey(cfg.seed), r), (channels,),
                           minval=0.5, maxval=1.5)
    return jnp.where(r == 0, 1.0, u)


def best_restart(runs: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Per row, the restart whose last stage-2 loss (`loss_trace[..., -1]`, the loss before
    the final step) is lowest, from the program's outputs stacked restarts first."""
    idx = jnp.argmin(runs["loss_trace"][:, :, -1], axis=0)
    rows = jnp.arange(idx.shape[0])
    return {k: a[idx, rows] for k, a in runs.items()}


def _gfi_batch(features: Features, params: Any, images: jax.Array, targets: jax.Array,
               p: jax.Array | None, cfg: Config, unroll: bool = False,
               rows_alone: bool = False, ext: Extensions = NO_EXTENSIONS) -> dict[str, jax.Array]:
    """Both stages once (`_gfi_run`), or `cfg.restarts` times and the best run per row."""
    run = functools.partial(_gfi_run, features, params, images, targets, p, cfg, unroll,
                            rows_alone, ext)
    if cfg.restarts == 1:
        return run(None)
    if ext.stage1_state:
        raise ValueError("Extensions.stage1_state needs Config.restarts=1: with restarts, "
                         "an image's targets may keep the stage 1 of different runs")
    return best_restart(jax.lax.map(run, jnp.arange(cfg.restarts)))


def _gfi_run(features: Features, params: Any, images: jax.Array, targets: jax.Array,
             p: jax.Array | None, cfg: Config, unroll: bool, rows_alone: bool,
             ext: Extensions, restart: jax.Array | None) -> dict[str, jax.Array]:
    k = targets.shape[1]
    x = images.astype(accumulation_dtype(images.dtype))
    p = background(x, cfg) if p is None else p.astype(x.dtype)
    f0, f1, splits, logits = clean_features(features, params, x, cfg)
    targets = resolve_targets(logits, targets)
    s1, s2 = schedules(cfg)
    opt1 = optimizer(cfg, s1, ext.optimizer)
    opt2 = optimizer(cfg, s2, ext.optimizer) if cfg.restart_stage2 else opt1
    problem = Problem(features, params, x, p, f1, splits, cfg, ext, targets)
    (omega, state), (trace1, omegas1) = stage1(problem, f0, opt1, unroll, restart)
    ends1 = {"stage1_omega": omega, "stage1_state": state} if ext.stage1_state else {}

    # Stage 2 runs per (image, target): repeat each image's stage-1 result k times.
    problem, c = problem.repeat(k), targets.reshape(-1)
    omega = _repeat(omega, k)
    rows_alone = rows_alone and k > 1
    if cfg.stage2_init != "stage1":   # a new start: a fresh Adam, its schedule from step 0
        omega = (rowwise(stage2_start, problem, c, omega) if rows_alone
                 else stage2_start(problem, c, omega))
        state = opt2.init(omega)
    else:
        state = opt2.init(omega) if cfg.restart_stage2 else jax.tree.map(
            functools.partial(_repeat, k=k), state)
    run2 = stage2_rows if rows_alone else stage2
    (omega, _), (trace2, omegas2) = run2(problem, c, omega, state, opt2, unroll)
    return ends1 | _outputs(problem, c, omega, logits, k, (trace1, omegas1),
                            (trace2, omegas2), rows_alone)


def _outputs(problem: Problem, c: jax.Array, omega: jax.Array, logits: jax.Array, k: int,
             stage1_out, stage2_out, rows_alone: bool = False) -> dict[str, jax.Array]:
    """The program's results per (image, target) from the final ω, the clean images' logits
    and both stages' traces (stage 1's per image: each repeated k times); the final forward
    row by row with `rows_alone`, as stage 2 ran."""
    cfg = problem.cfg
    (trace1, omegas1), (trace2, omegas2) = stage1_out, stage2_out
    if rows_alone:
        z_fg, z_bg, _ = rowwise(lambda pb, w: target_logits(w, pb), problem, omega)
    else:
        z_fg, z_bg, _ = target_logits(omega, problem)
    s_fg, s_bg = class_score(z_fg, c, cfg.score), class_score(z_bg, c, cfg.score)
    extra = {}
    if cfg.trace_omega:  # scan stacks steps first: (steps, N, C) -> (N, steps, C)
        extra["omega_trace"] = jnp.concatenate(
            [_repeat(omegas1.transpose(1, 0, 2), k), omegas2.transpose(1, 0, 2)], axis=1)
    return extra | {
        "omega": omega,
        "mask": mask(omega, problem.f1, problem.hw, cfg, problem.splits),
        "mask_l1": mask_l1(omega, problem.f1, cfg, problem.splits),
        "target": c,
        "score": class_score(_repeat(logits, k), c, cfg.score),
        "score_masked": s_fg,
        "score_background": s_bg,
        "loss_trace": jnp.concatenate([_repeat(trace1.T, k), trace2.T], axis=1),
    }


def compiled(features: Features, cfg: Config, sequential: bool = False,
             ext: Extensions = NO_EXTENSIONS) -> Program:
    """The jitted program for one (model, config, extensions); jit caches per input shape.
    `features` stands for the model and its layer kernels (`LoadedModel.kernels`, fixed in its
    graphdef), so a model with other kernels is another key; so is another `Extensions`."""
    # One cache key however the arguments are spelled (lru_cache tells f(a, b) from
    # f(a, b, c=default)).
    return _compiled(features, cfg, bool(sequential), ext)


@functools.lru_cache(maxsize=64)
def _compiled(features: Features, cfg: Config, sequential: bool, ext: Extensions) -> Program:
    return Program(features, cfg, jax.jit(functools.partial(gfi, features, cfg=cfg,
                                                            sequential=sequential, ext=ext)))


class Program:
    """What `compiled` returns: `program(params, images, targets, background=None)` checks its
    inputs on the host (`check_inputs`), so that a mistake is a one-line ValueError before
    anything compiles, then runs the jitted `gfi`. `.jitted` is the bare `jax.jit`, whose
    other attributes the program passes through."""

    def __init__(self, features: Features, cfg: Config, jitted: Callable):
        self.features, self.cfg, self.jitted = features, cfg, jitted
        self.shapes: dict = {}   # (image shape, dtype) -> the model's layer shapes there

    def __call__(self, params, images, targets, background=None) -> dict[str, jax.Array]:
        check_inputs(self, params, images, targets, background)
        return self.jitted(params, images, targets, background)

    def __getattr__(self, name: str):
        # The rest of jit's interface (`lower`, `eval_shape`, `_cache_size`, …) as it is.
        if name == "jitted":
            raise AttributeError(name)
        return getattr(self.jitted, name)


def check_inputs(program: Program, params, images, targets, background) -> None:
    """What the pure program needs, checked on the host: l0/l1 set, images `(B, H, W, C)` of
    finite pixels, `(B, K)` integer targets within the classes (−k: the k-th ranked class), a
    background of the images' shape, and a `features` that returns l0, l1 and "logits"."""
    cfg = program.cfg
    if not cfg.l0 or not cfg.l1:
        raise ValueError("cfg.l0 and cfg.l1 are unset: name the layers, e.g. gfi_jax.preset("
                         "'reference', l0=..., l1=...), or use gfi_jax.explain, which fills in "
                         "the model's defaults")
    if np.ndim(images) != 4:
        raise ValueError(f"images must be (B, H, W, C); got shape {np.shape(images)}")
    B = np.shape(images)[0]
    if np.ndim(targets) != 2 or np.shape(targets)[0] != B:
        raise ValueError(f"targets: expected ({B}, K) ints, K per image (−k: the k-th ranked "
                         f"class); got shape {np.shape(targets)}")
    if background is not None and np.shape(background) != np.shape(images):
        raise ValueError(f"background must have the images' shape {np.shape(images)}; "
                         f"got {np.shape(background)}")
    key = (tuple(np.shape(images)), str(images.dtype))
    if key not in program.shapes:
        program.shapes[key] = _program_layers(program.features, params, images, cfg)
    classes = program.shapes[key]["logits"][-1]
    t = np.asarray(targets)
    if t.dtype.kind not in "iu":
        raise ValueError(f"targets must be integers (class indices); got {t.dtype}")
    if t.size and (t.min() < -classes or t.max() >= classes):
        bad = int(t.min() if t.min() < -classes else t.max())
        raise ValueError(f"target class {bad} is outside the model's {classes} classes "
                         f"(0..{classes - 1}; −1..−{classes}: ranks)")
    finite = np.isfinite if isinstance(images, np.ndarray) else jnp.isfinite
    if not bool(finite(images).all()):
        raise ValueError("images contain NaN or Inf pixels; check the decoding and preprocessing")


def _program_layers(features: Features, params, images, cfg: Config) -> dict:
    """The shapes of l0, l1 and the logits for `images`, by abstract evaluation (no FLOPs)."""
    from gfi_jax.models.custom import eval_features
    asked = tuple(dict.fromkeys((cfg.l0, *cfg.l1.split("+"), "logits")))
    out = eval_features(features, params, jax.ShapeDtypeStruct(np.shape(images), images.dtype),
                        asked)
    missing = [n for n in asked if n not in out]
    if missing:
        raise ValueError(f"features was asked for {asked} and returned no {missing} (it "
                         f"returned {', '.join(map(str, out)) or 'nothing'}); return every "
                         "requested layer, and the class scores under 'logits'")
    for layer in cfg.l1.split("+"):
        if len(out[layer].shape) != 4:
            raise ValueError(f"l1 must be a layer with a spatial map (B, h, w, C); {layer!r} "
                             f"has shape {tuple(out[layer].shape)}")
    return {n: tuple(a.shape) for n, a in out.items()}


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
    stage1_omega: np.ndarray | None = None  # (B, C) ω at the end of stage 1, per image, and
    stage1_state: Any = None               # its optimizer state (Extensions.stage1_state)


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
    if t.shape[1] == 0:
        raise ValueError("targets: got no target for the images; give at least one per image")
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
            background=None, sequential: bool | None = None,
            extensions: Extensions | None = None) -> Explanation:
    """Explains `images` `(B, H, W, 3)` (preprocessed for `model`) with GFI.

    targets: None or "top1" (default), "topK" (K explanations per image), "rankK" (the
    K-th ranked class), an int for all images, one int per image, or `(B, K)` ints.
    preset: a preset name or a `Config`; None: the model's default (`DEFAULT_PRESETS`).
    background: None (the config's: blur / mean / noise) or an explicit `(B, H, W, 3)` p.
    sequential: explain the images, and each image's targets, one after another inside the
    program, so that each (image, target) gets bit for bit the answer it gets alone (see
    `gfi`). Default: on CPU yes, on accelerators no (there the batch is what makes it fast).
    extensions: an `Extensions` (custom optimizer, extra loss terms, stage 1's end state).
    """
    # float64 models (x64 mode) explain in float64; everything else in float32 (see
    # `accumulation_dtype`). The images first: a wrapped model learns its layers from them.
    images = np.asarray(images, model.input_dtype)
    model.check_images(images)
    if not np.isfinite(images).all():
        raise ValueError("images contain NaN or Inf pixels; check the decoding and preprocessing")
    cfg = resolve_layers(_preset(preset, arch=model.arch.name), model.arch)
    B, H, W, _ = images.shape
    check_layers(model, cfg, (H, W))
    t = _targets_array(targets, B, len(model.classes))
    if background is None and cfg.background == "mean":
        if model.preprocessing is None:
            raise ValueError("the 'mean' background needs the model's preprocessing; wrap the "
                             "model with preprocessing=... or pass background=")
        color = model.preprocessing.normalize(np.asarray(model.preprocessing.mean) * 255.0)
        background = np.broadcast_to(color.astype(images.dtype), images.shape)
    if background is not None:
        background = np.asarray(background, images.dtype)
        if background.shape != images.shape:
            raise ValueError(f"background must have the images' shape {images.shape}; "
                             f"got {background.shape}")
    if sequential is None:
        sequential = default_sequential()
    ext = NO_EXTENSIONS if extensions is None else extensions
    if not isinstance(ext, Extensions):
        raise ValueError(f"extensions must be a gfi_jax.Extensions; got {type(ext).__name__}")
    # The checks above cover what `check_inputs` would check again: run the bare jit.
    program = compiled(model.features, cfg, sequential, ext).jitted
    out = program(model.params, images, t, background)
    out = jax.tree.map(np.asarray, jax.device_get(out))
    return Explanation(image_index=np.repeat(np.arange(B), t.shape[1]), config=cfg, **out)


def check_layers(model, cfg: Config, hw: tuple[int, int]) -> None:
    """Clear errors, before compiling, for l0/l1 choices that cannot work."""
    shapes = model.layer_shapes(hw)  # by abstract evaluation: no FLOPs
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
    the forward costs); a gradient start of stage 2 adds 2F per l1 layer, and R restarts
    multiply the whole by R. xla: `cost_analysis()` of the compiled program. XLA counts a
    loop body once, so the program is compiled with unrolled loops at 1–2 steps per stage and the
    (exactly linear) step dependence is extrapolated to the configured step counts.
    compile=False reads the cost analysis of the lowered (unoptimized) program instead:
    no compile, which matters on accelerators, where compiling is slow.
    Both count the program as accelerators run it: its depthwise convolutions are traced as
    XLA's grouped convolution (with CPU kernels they run as shifted products,
    `models.cpu_kernels.depthwise_conv`, whose stride-2 input gradient also multiplies the
    zeros of the dilated cotangent, FLOPs the accelerators do not spend).
    """
    grouped = dataclasses.replace(model.kernels, depthwise=False)
    return _flops(model.with_kernels(grouped), cfg, hw, compile)


def _flops(model, cfg: Config, hw: tuple[int, int], compile: bool) -> dict[str, float]:
    cfg = dataclasses.replace(resolve_layers(cfg, model.arch), trace_omega=False)
    l0 = cfg.l0
    x = jax.ShapeDtypeStruct((1, *hw, 3), jnp.float32)
    fwd = lambda layers: _matmul_flops(jax.make_jaxpr(  # noqa: E731
        lambda p, x: model.features(p, x, layers))(model.params, x).jaxpr)
    f_full, f_l0 = fwd(("logits",)), fwd((l0,))
    s1, s2 = cfg.stage1_steps, cfg.stage2_steps
    analytic = f_full + s1 * 2 * f_l0 + s2 * 4 * f_full + 2 * f_full
    if cfg.stage2_init != "stage1":   # `stage2_start`: a forward and a backward per l1 layer
        analytic += 2 * f_full * len(cfg.l1.split("+"))
    r = cfg.restarts   # XLA counts the restarts' loop body once: count one, times R
    analytic *= r

    def xla(n1: int, n2: int) -> float:
        c = dataclasses.replace(cfg, stage1_steps=n1, stage2_steps=n2, restarts=1)
        fn = jax.jit(functools.partial(_gfi_batch, model.features, cfg=c, unroll=True))
        t = jax.ShapeDtypeStruct((1, 1), jnp.int32)
        lowered = fn.lower(model.params, x, t, None)
        ca = None if compile else lowered.cost_analysis()
        if ca is None:  # some backends only analyse compiled programs
            ca = lowered.compile().cost_analysis()
        return float((ca[0] if isinstance(ca, (list, tuple)) else ca)["flops"])

    base = xla(1, 1)
    per1, per2 = xla(2, 1) - base, xla(1, 2) - base
    return {"xla": r * (base + (s1 - 1) * per1 + (s2 - 1) * per2), "analytic": analytic,
            "forward": f_full, "forward_to_l0": f_l0,
            "xla_stage1_step": r * per1, "xla_stage2_step": r * per2}
