"""The model-randomization sanity check (Adebayo et al. 2018): an explanation that does not
change when the weights are destroyed does not explain the model."""
from __future__ import annotations

import copy
from typing import Any

import jax
import jax.extend.core  # noqa: F401  (Literal, to skip constants in the jaxpr)
import jax.numpy as jnp
import numpy as np

from gfi_jax.metrics import checks


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 0..n−1 of a 1-D array, ties given their average rank."""
    order = np.argsort(x, kind="stable")
    xs = x[order]
    group = np.cumsum(np.r_[True, xs[1:] != xs[:-1]]) - 1
    counts = np.bincount(group)
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    r = np.empty(len(x))
    r[order] = (starts + (counts - 1) / 2)[group]
    return r


def spearman(a, b) -> np.ndarray:
    """Spearman rank correlation of each pair of maps `(N, H, W)` -> `(N,)`; NaN where a map
    is constant (the correlation is undefined there)."""
    a, b = checks.saliency_maps(a, "a"), checks.saliency_maps(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"maps to correlate must have the same shape; got {a.shape} and {b.shape}")
    out = np.empty(a.shape[0])
    for i, (x, y) in enumerate(zip(a.reshape(len(a), -1), b.reshape(len(b), -1))):
        rx, ry = rankdata(x), rankdata(y)
        rx, ry = rx - rx.mean(), ry - ry.mean()
        den = np.sqrt((rx * rx).sum() * (ry * ry).sum())
        out[i] = (rx * ry).sum() / den if den > 0 else np.nan
    return out


def _group(path) -> tuple:
    """A parameter's unit: the path up to its first module name after a list index (a VGG
    conv, a ResNet block, a Lite0 MBConv block), else its module (conv1, fc6, fc …)."""
    keys = tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path)
    keys = tuple(k for k in keys if k != "value")
    for i in range(1, len(keys)):
        if isinstance(keys[i], str) and isinstance(keys[i - 1], int):
            return keys[:i]
    return keys[:-1]


def layer_groups(m, images) -> list[tuple[str, list[int]]]:
    """The model's parameter units in forward order: [(name, leaf indices)], found by where
    each parameter is first used in the traced forward pass (no per-architecture table)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(m.params)
    jaxpr = jax.make_jaxpr(lambda ls: m.features(
        jax.tree_util.tree_unflatten(treedef, ls), images[:1], ("logits",)))([v for _, v in leaves])
    first = {v: len(jaxpr.eqns) for v in jaxpr.jaxpr.invars}
    for i, eqn in reversed(list(enumerate(jaxpr.eqns))):
        for v in eqn.invars:
            if not isinstance(v, jax.extend.core.Literal) and v in first:
                first[v] = i
    use = [first[v] for v in jaxpr.jaxpr.invars]
    groups: dict[tuple, list[int]] = {}
    for i, (path, _) in enumerate(leaves):
        groups.setdefault(_group(path), []).append(i)
    ordered = sorted(groups.items(), key=lambda kv: min(use[i] for i in kv[1]))
    return [(".".join(map(str, k)), idx) for k, idx in ordered]


def cascading_randomization(m, images, method: str = "grad", targets=None, absolute: bool = True,
                            seed: int = 0, every: int = 1, **config: Any) -> dict:
    """Spearman correlation of `method`'s maps before and after re-initializing the weights,
    cumulatively from the top layer down (Adebayo et al. 2018, Fig. 2).

    Re-initialization draws every conv/linear kernel of the unit from He-normal
    (σ = √(2/fan_in)); biases and BatchNorm parameters are kept. The target class is fixed
    to the original model's (targets as in `attribute`). absolute: correlate |maps| (the
    paper reports both). every: explain only after every `every`-th unit and after the last
    (the randomization is still cumulative over all units; this saves compute for slow
    methods). Returns {"layers": unit names, top first, "spearman": (L, B)}, L the units
    explained after.
    """
    if every < 1:
        raise ValueError(f"every must be >= 1; got {every}")
    from gfi_jax.methods import compiled, make_config, targets_array, attribute
    x = np.asarray(images, np.float32)
    m.check_images(x)
    t = targets_array(targets, x.shape[0], len(m.classes))
    if (t < 0).any():   # fix the class to the original model's ranking
        ranked = np.argsort(-np.asarray(m(x)["logits"]), axis=1, kind="stable")
        t = np.where(t >= 0, t, ranked[np.arange(len(t)), np.clip(-t - 1, 0, None)])
    cfg = make_config(method, m, **config)
    if method == "gfi":
        run = lambda params: attribute(_with(m, params), x, "gfi", t, **config)  # noqa: E731
    else:
        fn = compiled(method, m.features, cfg)
        run = lambda params: np.asarray(fn(params, x, jnp.asarray(t, jnp.int32)))  # noqa: E731
    prep = (lambda s: np.abs(s)) if absolute else (lambda s: s)  # noqa: E731
    ref = prep(run(m.params))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(m.params)
    values = [v for _, v in leaves]
    key = jax.random.PRNGKey(seed)
    names, rhos = [], []
    groups = list(reversed(layer_groups(m, x)))
    for k, (name, idx) in enumerate(groups):
        for i in idx:
            path, v = leaves[i]
            if _leaf_name(path) == "kernel":
                fan_in = int(np.prod(v.shape[:-1]))
                values[i] = jax.random.normal(jax.random.fold_in(key, i), v.shape, v.dtype) \
                    * np.sqrt(2.0 / fan_in)
        if (k + 1) % every and k + 1 < len(groups):
            continue
        params = jax.tree_util.tree_unflatten(treedef, values)
        names.append(name)
        rhos.append(spearman(ref, prep(run(params))))
    return {"layers": names, "spearman": np.stack(rhos)}


def _leaf_name(path) -> str:
    keys = [getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path]
    keys = [k for k in keys if k != "value"]
    return str(keys[-1])


def _with(m, params):
    """m with other params, any kind of model (zoo or wrapped)."""
    new = copy.copy(m)
    new.params = params
    # `features` is pure in its params: sharing m's keeps one compiled GFI program for every
    # randomization level (the programs are cached per features function and config).
    new.features = m.features
    return new
