"""`gfi_jax.wrap`: a user's own model (Flax Linen, Flax NNX, Equinox, Keras 3) behind the
front ends, and their one-line errors for bad input.

Every model is the same tiny random-init CNN (64×64×3, three 3×3 convs with `jax.nn.relu`,
global average pooling, 10 classes); GFI runs 3 + 3 steps. The wrapped models are module
fixtures, so each framework's programs compile once for the whole file.
"""
from __future__ import annotations

import functools
import os

os.environ["KERAS_BACKEND"] = "jax"   # before keras is first imported

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import gfi_jax  # noqa: E402
from gfi_jax import io, metrics  # noqa: E402

CFG = gfi_jax.preset("reference", stage1_steps=3, stage2_steps=3)
HW, CLASSES, WIDTHS = 64, 10, (8, 16, 16)
CONVS = ("conv1", "conv2", "conv3")
PRE = io.Preprocessing(size=HW, resize=HW)


def images(b: int = 2) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(b, HW, HW, 3)).astype(np.float32)


# ----------------------------------------------------------------------------- the four models
def random_like(abstract, seed: int = 0):
    """Random weights of the abstract parameter tree's shapes, drawn in numpy: the frameworks'
    own initializers run as eager JAX ops, each compiled on its own (~30 s on a busy CPU)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: jnp.asarray(0.2 * rng.normal(size=a.shape), a.dtype), abstract)


def linen_model():
    import flax.linen as nn

    class CNN(nn.Module):
        @nn.compact
        def __call__(self, x):
            acts = {}
            for name, w, s in zip(CONVS, WIDTHS, (2, 2, 1)):
                x = acts[name] = jax.nn.relu(nn.Conv(w, (3, 3), strides=s, name=name)(x))
            acts["logits"] = nn.Dense(CLASSES)(x.mean(axis=(1, 2)))
            return acts

    module = CNN()
    params = random_like(jax.eval_shape(module.init, jax.random.PRNGKey(0),
                                        jnp.zeros((1, HW, HW, 3))))

    def features(params, x, layers):
        return module.apply(params, x)      # every activation; the unused ones are dead code
    return features, params


def nnx_model():
    from flax import nnx

    class CNN(nnx.Module):
        def __init__(self, rngs):
            ins = (3,) + WIDTHS[:-1]
            self.convs = nnx.List([nnx.Conv(i, o, (3, 3), strides=s, rngs=rngs)
                                   for i, o, s in zip(ins, WIDTHS, (2, 2, 1))])
            self.head = nnx.Linear(WIDTHS[-1], CLASSES, rngs=rngs)

        def __call__(self, x):
            acts = {}
            for name, conv in zip(CONVS, self.convs):
                x = acts[name] = jax.nn.relu(conv(x))
            acts["logits"] = self.head(x.mean(axis=(1, 2)))
            return acts

    graphdef, state = nnx.split(nnx.eval_shape(lambda: CNN(nnx.Rngs(0))))
    state = random_like(state)

    def features(state, x, layers):
        return nnx.merge(graphdef, state)(x)
    return features, state


def equinox_model():
    import equinox as eqx

    def build(key):
        keys = jax.random.split(key, 4)
        ins = (3,) + WIDTHS[:-1]
        return {"convs": [eqx.nn.Conv2d(i, o, 3, stride=s, padding=1, key=k)
                          for i, o, s, k in zip(ins, WIDTHS, (2, 2, 1), keys)],
                "head": eqx.nn.Linear(WIDTHS[-1], CLASSES, key=keys[3])}
    params, static = eqx.partition(eqx.filter_eval_shape(build, jax.random.PRNGKey(0)),
                                   lambda a: isinstance(a, jax.ShapeDtypeStruct))
    params = random_like(params)

    def features(params, x, layers):
        m = eqx.combine(params, static)
        acts, h = {}, x
        for name, conv in zip(CONVS, m["convs"]):
            # Equinox convs take one CHW image; rectify after the move back to NHWC, so the
            # returned map is a ReLU's output (what Grad-CAM's layer must be).
            y = jax.vmap(conv)(jnp.moveaxis(h, -1, 1))
            h = acts[name] = jax.nn.relu(jnp.moveaxis(y, 1, -1))
        acts["logits"] = jax.vmap(m["head"])(h.mean(axis=(1, 2)))
        return acts
    return features, params


def keras_model():
    import keras

    rng = np.random.default_rng(0)

    def he(shape, dtype=None):   # numpy draws, as `random_like`
        return rng.normal(size=shape).astype("float32") * np.sqrt(2 / np.prod(shape[:-1]))

    inp = keras.Input((HW, HW, 3))
    x, outs = inp, []
    for name, w, s in zip(CONVS, WIDTHS, (2, 2, 1)):
        x = keras.layers.Conv2D(w, 3, strides=s, padding="same", activation="relu", name=name,
                                kernel_initializer=he, bias_initializer="zeros")(x)
        outs.append(x)
    logits = keras.layers.Dense(CLASSES, kernel_initializer=he)(
        keras.layers.GlobalAveragePooling2D()(x))
    # The functional sub-model that also returns the intermediate maps shares the variables.
    sub = keras.Model(inp, [*outs, logits])
    params = ([v.value for v in sub.trainable_variables],
              [v.value for v in sub.non_trainable_variables])

    def features(params, x, layers):
        ys, _ = sub.stateless_call(*params, x)
        return dict(zip((*CONVS, "logits"), ys))
    return features, params


BUILDERS = {"linen": linen_model, "nnx": nnx_model, "equinox": equinox_model,
            "keras": keras_model}


@functools.cache
def wrapped(name: str):
    """One wrapped model per framework for the whole file: its programs compile once."""
    features, params = BUILDERS[name]()
    return gfi_jax.wrap(features, params, num_classes=CLASSES, name=name, preprocessing=PRE)


@pytest.fixture(scope="module", params=list(BUILDERS))
def model(request):
    return wrapped(request.param)


@pytest.fixture(scope="module")
def linen():
    return wrapped("linen")


# ----------------------------------------------------------------------------- what works
def test_wrapped_models_list_their_layers_and_defaults(model):
    assert model.layers == (*CONVS, "logits")
    assert (model.arch.l0, model.arch.l1, model.arch.cam_layer) == ("conv3",) * 3
    shapes = model.layer_shapes((HW, HW))
    assert shapes["conv1"] == (32, 32, 8) and shapes["conv3"] == (16, 16, 16)
    assert shapes["logits"] == (CLASSES,)
    assert model(images(1))["logits"].shape == (1, CLASSES)


def test_explain_gives_a_finite_mask_in_0_1(model):
    e = gfi_jax.explain(model, images(), targets=[3, 7], preset=CFG)
    assert e.mask.shape == (2, HW, HW) and e.mask_l1.shape == (2, 16, 16)
    assert np.isfinite(e.mask).all() and e.mask.min() >= 0 and e.mask.max() <= 1
    assert e.mask.max() > e.mask.min()             # a map, not a constant
    np.testing.assert_array_equal(e.target, [3, 7])
    assert e.loss_trace.shape == (2, 6) and np.isfinite(e.loss_trace).all()


@pytest.mark.parametrize("method", ["grad", "gradcam"])
def test_attribute_runs_grad_and_gradcam_at_the_last_conv(model, method):
    s = gfi_jax.attribute(model, images(), method)
    assert s.shape == (2, HW, HW) and np.isfinite(s).all()
    assert np.abs(s).max() > 0


def test_gradcam_at_the_last_conv_is_the_weighted_map(linen):
    # The default layer is conv3; Grad-CAM there is ReLU(Σc αc A_c) upsampled, αc the mean
    # gradient: checked against the gradient of the logit with respect to conv3 directly.
    x = images(1)
    s = gfi_jax.attribute(linen, x, "gradcam", targets=4)
    a = linen(x, ("conv3",))["conv3"]
    g = jax.grad(lambda a: _logits_from_conv3(linen, a)[0, 4])(a)
    cam = jax.nn.relu(jnp.einsum("bhwc,bc->bhw", a, g.mean(axis=(1, 2))))
    want = gfi_jax.gfi.upsample(cam, (HW, HW), align_corners=False)
    np.testing.assert_allclose(s, want, rtol=1e-4, atol=1e-6)


def _logits_from_conv3(m, a):
    p = m.params["params"]["Dense_0"]
    return a.mean(axis=(1, 2)) @ p["kernel"] + p["bias"]


def test_cam_needs_gap_declared(linen):
    with pytest.raises(ValueError, match="wrapped with gap=True"):
        gfi_jax.attribute(linen, images(), "cam")
    gap = gfi_jax.wrap(linen.features, linen.params, num_classes=CLASSES, gap=True)
    s = gfi_jax.attribute(gap, images(), "cam")
    assert s.shape == (2, HW, HW) and np.isfinite(s).all()


def test_explicit_layers_and_class_names(linen):
    features, params = linen_model()
    m = gfi_jax.wrap(features, params, num_classes=CLASSES, layers=("conv2", "conv3"),
                     class_names=[f"c{i}" for i in range(CLASSES)], l1="conv2")
    assert m.layers == ("conv2", "conv3", "logits") and m.classes[3] == "c3"
    cfg = gfi_jax.gfi.resolve_layers(gfi_jax.preset("paper"), m.arch)
    assert (cfg.l0, cfg.l1) == ("conv3", "conv2")


def test_a_metric_on_a_wrapped_model(linen):
    x = images()
    s = gfi_jax.attribute(linen, x, "grad")
    probs = jax.jit(lambda x: jax.nn.softmax(linen(x)["logits"]))
    out = metrics.deletion_insertion(probs, x, s, steps=4)
    assert out["curves"].shape == (2, 5) and np.isfinite(out["auc"]).all()
    np.testing.assert_allclose(out["curves"][:, 0], np.asarray(probs(x)).max(1), rtol=1e-5)


def test_run_on_a_wrapped_model(linen, tmp_path):
    from PIL import Image

    from gfi_jax import run as R

    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (80, 90, 3), np.uint8)).save(folder / f"{i}.png")
    # Grad-CAM: one small program (GFI's own compile is what test_explain pays once per model).
    s = R.run(folder, model=linen, method="gradcam", out=tmp_path / "out", batch_size=2,
              dtype="float32", progress=False)
    assert (s.done, s.failed) == (2, 0)
    masks, records = R.read_output(tmp_path / "out")
    assert masks.shape == (2, HW, HW) and np.isfinite(masks).all()
    assert masks.min() >= 0 and masks.max() <= 1
    assert [r["index"] for r in records] == [0, 1]
    # The GFI branch of run resolves the wrapped model's layers and checks them at the size.
    cfg, name = R._method_config(linen, "gfi", None, {"stage1_steps": 3}, (HW, HW))
    assert (cfg.l0, cfg.l1, cfg.stage1_steps, name) == ("conv3", "conv3", 3, "reference")
    with pytest.raises(ValueError, match="linen has no layer 'nope'"):
        R._method_config(linen, "gfi", None, {"l1": "nope"}, (HW, HW))


def test_run_needs_the_preprocessing():
    features, params = linen_model()
    m = gfi_jax.wrap(features, params, num_classes=CLASSES)
    from gfi_jax import run as R
    with pytest.raises(ValueError, match="needs its preprocessing"):
        R._load_model(m, None, "float32", None)


# ----------------------------------------------------------------------------- bad input
def _no_logits_model():
    features, params = linen_model()

    def bad(params, x, layers):
        out = features(params, x, layers)
        out["scores"] = out.pop("logits")
        return out
    return gfi_jax.wrap(bad, params, num_classes=CLASSES)


def _explain(m, x, **kw):
    return gfi_jax.explain(m, x, preset=kw.pop("preset", CFG), **kw)


def _attribute(m, x, **kw):
    kw.pop("preset", None)
    return gfi_jax.attribute(m, x, kw.pop("method", "grad"), **kw)


def _with_pixel(value) -> np.ndarray:
    x = images()
    x[1, 5, 7, 2] = value
    return x


BAD = {   # (images, keyword arguments, the message)
    "rank": (images()[0], {}, r"images must be \(B, H, W, 3\) preprocessed arrays; got shape \(64, 64, 3\)"),
    "channels": (images()[..., :1], {}, r"images must be \(B, H, W, 3\).*got shape \(2, 64, 64, 1\)"),
    "nan": (_with_pixel(np.nan), {}, "NaN or Inf pixels"),
    "inf": (_with_pixel(-np.inf), {}, "NaN or Inf pixels"),
    "target_high": (images(), {"targets": 10}, r"target class 10 is outside the model's 10 classes \(0..9\)"),
    "target_negative": (images(), {"targets": [1, -1]}, r"target class -1 is outside the model's 10 classes"),
    "no_targets": (images(), {"targets": np.zeros((2, 0), int)}, "no target"),
}


@pytest.mark.parametrize("front", [_explain, _attribute], ids=["explain", "attribute"])
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_a_one_line_value_error(linen, front, case):
    x, kw, msg = BAD[case]
    with pytest.raises(ValueError, match=msg) as err:
        front(linen, x, **kw)
    assert "\n" not in str(err.value)


def test_the_same_messages_as_a_zoo_model(linen, random_resnet18):
    for case in ("rank", "channels", "nan", "target_negative"):
        x, kw, _ = BAD[case]
        messages = []
        for m in (linen, random_resnet18):
            with pytest.raises(ValueError) as err:
                _attribute(m, x, **kw)
            messages.append(str(err.value).replace("1000 classes (0..999)", "10 classes (0..9)"))
        assert messages[0] == messages[1], case


def test_unknown_layer_lists_the_valid_ones(linen):
    msg = r"linen has no layer 'nope'; valid layers: conv1, conv2, conv3, logits$"
    with pytest.raises(ValueError, match=msg):
        _explain(linen, images(), preset=gfi_jax.preset(CFG, l1="nope"))
    with pytest.raises(ValueError, match=msg):
        _explain(linen, images(), preset=gfi_jax.preset(CFG, l0="nope"))
    with pytest.raises(ValueError, match=msg):
        gfi_jax.attribute(linen, images(), "gradcam", layer="nope")
    with pytest.raises(ValueError, match=msg):
        gfi_jax.attribute(linen, images(), "gfi", l1="nope", stage1_steps=1, stage2_steps=1)
    with pytest.raises(ValueError, match=msg):
        linen(images(), ("nope",))


def test_a_layer_without_a_spatial_map_cannot_be_l1(linen):
    with pytest.raises(ValueError, match="l1 must be a convolutional layer.*'logits'"):
        _explain(linen, images(), preset=gfi_jax.preset(CFG, l1="logits"))


@pytest.mark.parametrize("front", [_explain, _attribute], ids=["explain", "attribute"])
def test_features_without_logits(front):
    msg = (r"custom: features returned no 'logits' \(it returned conv1, conv2, conv3, scores\);"
           r" return the class scores \(B, 10\) under the key 'logits'")
    with pytest.raises(ValueError, match=msg):
        front(_no_logits_model(), images())


@pytest.mark.parametrize("front", [_explain, _attribute], ids=["explain", "attribute"])
def test_wrong_class_count_and_failing_features(front):
    features, params = linen_model()
    with pytest.raises(ValueError, match=r"logits have shape \(1, 10\) for one image; expected "
                                         r"\(1, 1000\)"):
        front(gfi_jax.wrap(features, params, num_classes=1000), images())

    def fails(params, x, layers):
        raise RuntimeError("boom\nsecond line")
    with pytest.raises(ValueError, match=r"fails for x of shape \(1, 64, 64, 3\) \(RuntimeError: "
                                         r"boom second line\)") as err:
        front(gfi_jax.wrap(fails, params, num_classes=CLASSES), images())
    assert "\n" not in str(err.value)


def test_negative_steps(linen):
    # Config rejects it when it is made, before anything is traced (once an MLIR error).
    msg = r"^Config.stage1_steps=-1: must be >= 0$"
    with pytest.raises(ValueError, match=msg):
        gfi_jax.preset(CFG, stage1_steps=-1)           # what explain's preset= is made with
    with pytest.raises(ValueError, match=msg):
        gfi_jax.attribute(linen, images(), "gfi", stage1_steps=-1)


def test_the_fast_path_pitfalls_are_handled_by_explain(linen):
    # What the pure `compiled` program needs and `explain` supplies: l0/l1 left unset (they
    # default to the last spatial layer) and (B,) targets (one per image).
    cfg = gfi_jax.preset("reference", stage1_steps=3, stage2_steps=3)
    assert cfg.l0 is None and cfg.l1 is None
    e = gfi_jax.explain(linen, images(), targets=np.array([3, 7]), preset=cfg)
    assert (e.config.l0, e.config.l1) == ("conv3", "conv3")
    run = gfi_jax.gfi.compiled(linen.features, e.config, gfi_jax.gfi.default_sequential())
    ref = run(linen.params, images(), np.array([[3], [7]], np.int32), None)
    np.testing.assert_array_equal(e.mask, np.asarray(ref["mask"]))


def test_wrap_rejects_bad_arguments():
    features, params = linen_model()
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        gfi_jax.wrap(features, params, num_classes=0)
    with pytest.raises(ValueError, match="class_names has 3 names for num_classes=10"):
        gfi_jax.wrap(features, params, num_classes=CLASSES, class_names="abc")
    with pytest.raises(ValueError, match="'vgg16' is a zoo model's"):
        gfi_jax.wrap(features, params, num_classes=CLASSES, name="vgg16")
    with pytest.raises(ValueError, match="features must be a function"):
        gfi_jax.wrap(params, features, num_classes=CLASSES)
    m = gfi_jax.wrap(features, params, num_classes=CLASSES, l1="conv9")
    with pytest.raises(ValueError, match="custom has no layer 'conv9'"):
        m.arch
