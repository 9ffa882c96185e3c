"""Your own model behind the zoo's interface: `gfi_jax.wrap(features, params, num_classes=…)`.

>>> m = gfi_jax.wrap(features, params, num_classes=10)     # Linen, NNX, Equinox, Keras …
>>> e = gfi_jax.explain(m, images)                         # as for gfi_jax.load_model(…)

`features(params, x, layers) -> {name: activation}` is the protocol the engine runs on: x is
`(B, H, W, 3)`, every activation NHWC `(B, h, w, C)` or `(B, C)`, and "logits"
`(B, num_classes)` among the names. Returning every activation whatever `layers` asks for is
fine (under jit the unused ones are dead code), and it is the simplest to write.

`wrap` itself runs nothing. The first use evaluates `features` abstractly (`jax.eval_shape`:
no FLOPs, no memory) to learn the layers and their shapes, and every bad answer (no logits,
the wrong class count, a layer it was asked for and did not return, a function that fails at
the input size) is a one-line ValueError before anything compiles.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gfi_jax import io
from gfi_jax.models import ARCHS, Arch, check_image_shape

Features = Callable[[Any, jax.Array, Sequence[str]], dict]


class WrappedModel:
    """A user's `features` and `params` with what the front ends read (`models.Model`).

    GFI's and Grad-CAM's default layers are the last layer with a spatial map `(h, w, C)`:
    the highest-level map that still says *where*, as the zoo's are (VGG's conv5_3, ResNet's
    layer4, EfficientNet's head); l0 = l1 = it, as the released code does
    (`Config.same_layer`). CAM (`gap=True`) weighs that same map; GFI's mask basis must be
    non-negative there (a ReLU's output, or a clipped view as the zoo's ViT has). The layers are listed once, at the probe size (`wrap`'s input_size); a layer's
    rank, which picks the defaults, does not change with the size.
    """

    def __init__(self, features: Features, params: Any, *, num_classes: int,
                 layers: Sequence[str] | None, preprocessing: io.Preprocessing | None,
                 class_names: Sequence[str] | None, name: str, l0: str | None,
                 l1: str | None, cam_layer: str | None, gap: bool,
                 input_size: int | tuple[int, int] | None):
        self.features = features        # the user's function itself: the compile caches key on it
        self.params = params
        self.classes = _class_names(num_classes, class_names)
        self.preprocessing = preprocessing
        self.metadata = {"source": "wrap"}
        self.input_dtype = np.dtype(np.float32)
        self._name, self._declared = name, None if layers is None else tuple(layers)
        self._roles = {"l0": l0, "l1": l1, "cam_layer": cam_layer, "gap": gap}
        size = input_size or (preprocessing.size if preprocessing else 224)
        self._probe_hw = (size, size) if isinstance(size, int) else tuple(size)
        self._shapes: dict[tuple[int, int], dict[str, tuple[int, ...]]] = {}
        self._arch: Arch | None = None
        self._forward = jax.jit(features, static_argnums=2)   # m(images): the layers static

    @property
    def name(self) -> str:
        return self._name

    @property
    def arch(self) -> Arch:
        """The `Arch` record, from the layer shapes at the probe size (built once)."""
        if self._arch is None:
            self._arch = _custom_arch(self._name, self.layer_shapes(self._probe_hw),
                                      self.preprocessing, **self._roles)
        return self._arch

    @property
    def layers(self) -> tuple[str, ...]:
        return self.arch.layers

    def layer_shapes(self, hw: tuple[int, int]) -> dict[str, tuple[int, ...]]:
        """Every layer's activation shape (without batch) at input size `hw`, "logits" last."""
        hw = tuple(int(n) for n in hw)
        if hw not in self._shapes:
            self._shapes[hw] = abstract_shapes(self.features, self.params, hw, self._declared,
                                               len(self.classes), self._name)
        return dict(self._shapes[hw])

    def check_images(self, images) -> None:
        """ValueError, before any compile, for inputs this model cannot take: the shape, and
        whatever `features` answers at their size (see `abstract_shapes`)."""
        shape = check_image_shape(images)
        self.layer_shapes(shape[1:3])

    def __call__(self, images, layers: Iterable[str] = ()) -> dict[str, jax.Array]:
        self.check_images(images)
        names = tuple(dict.fromkeys((*(self.arch.resolve(n) for n in layers), "logits")))
        out = self._forward(self.params, jnp.asarray(images, self.input_dtype), names)
        return {n: out[n] for n in names}

    def __repr__(self) -> str:
        return f"WrappedModel({self._name!r}, classes={len(self.classes)})"


def _class_names(num_classes: int, names: Sequence[str] | None) -> tuple[str, ...]:
    if not isinstance(num_classes, (int, np.integer)) or isinstance(num_classes, bool) \
            or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int; got {num_classes!r}")
    if names is None:
        return tuple(str(i) for i in range(num_classes))
    names = tuple(map(str, names))
    if len(names) != num_classes:
        raise ValueError(f"class_names has {len(names)} names for num_classes={num_classes}; "
                         "give one name per class")
    return names


def eval_features(features: Features, params: Any, x: jax.ShapeDtypeStruct,
                  asked: tuple[str, ...], prefix: str = "") -> Any:
    """`features(params, x, asked)` by abstract evaluation (shapes only, no FLOPs); the user's
    code failing there is one ValueError line that says where."""
    try:
        return jax.eval_shape(lambda p, x: features(p, x, asked), params, x)
    except Exception as e:
        reason = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        raise ValueError(f"{prefix}features(params, x, {asked}) fails for x of shape "
                         f"{x.shape} ({reason}); check the input size and the layer names it "
                         "accepts") from e


def abstract_shapes(features: Features, params: Any, hw: tuple[int, int],
                    declared: tuple[str, ...] | None, num_classes: int,
                    name: str) -> dict[str, tuple[int, ...]]:
    """`features`' layers and shapes (without batch) for one `(1, *hw, 3)` input, by abstract
    evaluation; asked for the `declared` layers and "logits" (all it returns, when None).
    ValueError, one line, for a function that fails there or returns no (or wrong) logits."""
    asked = tuple(dict.fromkeys((*(declared or ()), "logits")))
    out = eval_features(features, params, jax.ShapeDtypeStruct((1, *hw, 3), jnp.float32),
                        asked, f"{name}: ")
    if not isinstance(out, dict):
        raise ValueError(f"{name}: features must return a dict {{name: activation}}; "
                         f"got {type(out).__name__}")
    _check_logits(out, num_classes, name)
    missing = [n for n in asked if n not in out]
    if missing:
        raise ValueError(f"{name}: features was asked for {missing} and did not return them "
                         f"(it returned {', '.join(map(str, out))}); return every requested "
                         "layer, or fix wrap's layers=")
    names = declared if declared is not None else tuple(n for n in out if n != "logits")
    return {**{n: tuple(out[n].shape[1:]) for n in names}, "logits": tuple(out["logits"].shape[1:])}


def _check_logits(out: dict, num_classes: int, name: str) -> None:
    if "logits" not in out:
        raise ValueError(f"{name}: features returned no 'logits' (it returned "
                         f"{', '.join(map(str, out)) or 'nothing'}); return the class scores "
                         f"(B, {num_classes}) under the key 'logits'")
    shape = tuple(out["logits"].shape)
    if shape != (1, num_classes):
        raise ValueError(f"{name}: features' logits have shape {shape} for one image; expected "
                         f"(1, {num_classes}) (num_classes={num_classes} in wrap)")


def _custom_arch(name: str, shapes: dict[str, tuple[int, ...]],
                 preprocessing: io.Preprocessing | None, *, l0: str | None, l1: str | None,
                 cam_layer: str | None, gap: bool) -> Arch:
    """The registry record of a wrapped model: its layers and GFI / CAM defaults (the last
    layer with a spatial map, see `WrappedModel`); no weights to convert, so no build."""
    layers = tuple(shapes)
    spatial = [n for n, s in shapes.items() if len(s) == 3 and n != "logits"]
    last = spatial[-1] if spatial else None
    chosen = {"l0": l0 or last, "l1": l1 or last, "cam_layer": cam_layer or last}
    if None in chosen.values():
        raise ValueError(f"{name}: features returns no layer with a spatial map (B, h, w, C) "
                         f"(it returns {', '.join(layers)}); return a conv activation too, "
                         "e.g. {'conv3': h, 'logits': z}, or pass layers= to wrap")
    arch = Arch(name, build=None, layers=layers, aliases={}, preprocessing=preprocessing,
                min_size=1, l0="", l1="", source="wrap", checkpoint="", torch_keys=list,
                cam_layer="", gap=bool(gap))
    for layer in chosen.values():  # an explicit choice must be a layer it returns
        for part in layer.split("+"):
            arch.resolve(part)
    return dataclasses.replace(arch, **chosen)


def wrap(features: Features, params: Any, *, num_classes: int,
         layers: Sequence[str] | None = None, preprocessing: io.Preprocessing | None = None,
         class_names: Sequence[str] | None = None, name: str = "custom",
         l0: str | None = None, l1: str | None = None, cam_layer: str | None = None,
         gap: bool = False, input_size: int | tuple[int, int] | None = None) -> WrappedModel:
    """Your model as one `gfi_jax.explain`, `attribute`, the metrics and `run` accept.

    features: `(params, x (B, H, W, 3), layers) -> {name: activation}` with "logits".
    layers: the names it can return, in forward order (None: whatever it returns when asked
    for "logits" alone). preprocessing: how images become inputs (`gfi_jax.io.Preprocessing`;
    needed by `run`, which decodes files, and by the "mean" background). class_names: one
    per class (default "0", "1", …). l0 / l1 / cam_layer: GFI's inversion and mask-basis
    layers and Grad-CAM's layer; default the last layer with a spatial map. gap: the model
    ends in global average pooling + one linear layer after cam_layer (CAM applies).
    input_size: the side(s) at which the layers are first listed (default the preprocessing's
    size, else 224); every input size is checked again when used.
    """
    if not callable(features):
        raise ValueError(f"features must be a function (params, x, layers) -> dict; got "
                         f"{type(features).__name__}")
    if name in ARCHS:   # presets and compile caches are keyed by the name
        raise ValueError(f"name {name!r} is a zoo model's; give your model another name")
    return WrappedModel(features, params, num_classes=num_classes, layers=layers,
                        preprocessing=preprocessing, class_names=class_names, name=name,
                        l0=l0, l1=l1, cam_layer=cam_layer, gap=gap, input_size=input_size)
