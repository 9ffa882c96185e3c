"""Random-init models for tests and benchmarks that need a network but not trained weights."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import gfi_jax
from gfi_jax.models import LoadedModel


def random_model(name: str, seed: int = 0) -> LoadedModel:
    """A random-init model straight from the abstract state: He-normal kernels, small
    biases, identity BatchNorm statistics."""
    arch = gfi_jax.get_arch(name)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(arch.split()[1])
    rng = np.random.default_rng(seed)
    values = []
    for path, v in leaves:
        kind = str(getattr(path[-2] if str(path[-1]).endswith("value") else path[-1], "key", ""))
        if kind == "kernel":
            a = rng.normal(0, np.sqrt(2 / np.prod(v.shape[:-1])), v.shape)
        elif kind in ("scale", "var"):
            a = np.ones(v.shape)
        elif kind == "bias":
            a = rng.uniform(-0.1, 0.1, v.shape)
        else:
            a = np.zeros(v.shape)
        values.append(jnp.asarray(a, v.dtype))
    return LoadedModel(arch, jax.tree_util.tree_unflatten(treedef, values),
                       classes=gfi_jax.imagenet_classes())


def flax_init_model(name: str, seed: int = 0) -> LoadedModel:
    """A zoo model with Flax's own random init (`arch.build(rngs=nnx.Rngs(seed))`): no
    download, no torch."""
    arch = gfi_jax.get_arch(name)
    return LoadedModel(arch, nnx.state(arch.build(rngs=nnx.Rngs(seed))),
                       classes=gfi_jax.imagenet_classes())
