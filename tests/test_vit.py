"""The ViT port: parity with torchvision, conversion without torch, token grids, every method.

Kept fast with a tiny torchvision `VisionTransformer` (64×64 input, 16-pixel patches: a 4×4
grid; 2 blocks, 2 heads, width 32), registered for this module as `vit_tiny` through the same
record factory as `vit_b_16`; the real `vit_b_16` record is checked for its download path,
keys and shapes without running it at 224 (too slow for CI on CPU).
"""
from __future__ import annotations

import contextlib
import dataclasses
import io as _io
import json
import urllib.error
import urllib.request
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

import gfi_jax  # noqa: E402
from gfi_jax import cli  # noqa: E402
from gfi_jax import gfi as G  # noqa: E402
from gfi_jax.testing.no_torch import finish, start_conversion  # noqa: E402
from gfi_jax.jaxpr_guided import NO_RECTIFIER  # noqa: E402
from gfi_jax.methods import compiled as method_program  # noqa: E402
from gfi_jax.methods.cam import GradCamConfig  # noqa: E402
from gfi_jax.models import ARCHS, _vit, get_arch, grid_to_tokens, tokens_to_grid, vit  # noqa: E402
from gfi_jax.weights import flat_shapes, load_weights  # noqa: E402
from test_safetensors import write_safetensors  # noqa: E402
from weights_conversion.convert import ConversionError, convert  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY = vit.ViTConfig(image_size=64, patch_size=16, num_layers=2, num_heads=2, hidden_dim=32,
                     mlp_dim=64)
NAME = "vit_tiny"
SHORT = dict(stage1_steps=2, stage2_steps=2)


def _torch_tiny(seed: int = 0) -> torch.nn.Module:
    """The tiny torchvision ViT with every parameter moved off its init (the class token
    and the biases start at zero there, which would hide a dropped or swapped key)."""
    torch.manual_seed(seed)
    m = torchvision.models.VisionTransformer(**dataclasses.asdict(TINY))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


@pytest.fixture(scope="module", autouse=True)
def tiny_record():
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(ARCHS, NAME, _vit(NAME, TINY, ""))
        yield ARCHS[NAME]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(torch model, .pth, .safetensors, state_dict) of the tiny ViT."""
    m = _torch_tiny()
    d = tmp_path_factory.mktemp("vit")
    torch.save(m.state_dict(), d / "tiny.pth")
    sd = {k: v.numpy() for k, v in m.state_dict().items()}
    return m, d / "tiny.pth", write_safetensors(d / "tiny.safetensors", sd, {"format": "pt"}), sd


@pytest.fixture(scope="module")
def model(files, tmp_path_factory):
    return gfi_jax.load_model(NAME, weights=convert(NAME, files[1], tmp_path_factory.mktemp("w")))


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).standard_normal((2, 64, 64, 3)).astype(np.float32)


# ---------------------------------------------------------------- parity


def _torch_layers(m: torch.nn.Module, x: np.ndarray) -> dict[str, np.ndarray]:
    """Every named layer of ours, from torchvision's forward (hooks), grids read off tokens."""
    seen, hooks = {}, []

    def keep(name, pre=False):
        def hook(_mod, inp, out=None):
            seen[name] = (inp[0] if pre else out).detach().numpy().copy()
        return hook
    hooks.append(m.conv_proj.register_forward_hook(keep("patches")))
    hooks.append(m.encoder.layers.register_forward_pre_hook(keep("tokens", pre=True)))
    hooks.append(m.encoder.ln.register_forward_hook(keep("encoder")))
    for i, block in enumerate(m.encoder.layers):
        hooks.append(block.register_forward_hook(keep(f"blocks.{i}")))
        hooks.append(block.mlp[1].register_forward_hook(keep(f"blocks.{i}.mlp")))
    try:
        with torch.no_grad():
            seen["logits"] = m(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    finally:
        for h in hooks:
            h.remove()
    seen["patches"] = seen["patches"].transpose(0, 2, 3, 1)
    seen["cls"] = seen["encoder"][:, 0]
    g = TINY.grid
    for i in range(TINY.num_layers):
        seen[f"blocks.{i}.grid"] = seen[f"blocks.{i}"][:, 1:].reshape(len(x), g, g, -1)
        seen[f"blocks.{i}.pos"] = np.maximum(
            seen[f"blocks.{i}.mlp"][:, 1:].reshape(len(x), g, g, -1), 0)
    return seen


def test_logits_and_every_layer_match_torchvision(files, model, images):
    ref = _torch_layers(files[0], images)
    ours = {k: np.asarray(v) for k, v in model(images, layers=model.layers).items()}
    assert set(ref) == set(ours) == set(model.layers)
    for layer in model.layers:
        r, o = ref[layer], ours[layer]
        assert o.shape == r.shape, f"{layer}: ours {o.shape}, torchvision {r.shape}"
        assert np.abs(o - r).max() <= 1e-4 * np.abs(r).max(), layer
    # The random network still tells images and classes apart.
    assert np.all(ref["logits"].std(axis=1) > 1e-3 * np.abs(ref["logits"]).max())
    # The torchvision module paths name the same activations.
    for path, layer in (("encoder.layers.encoder_layer_1", "blocks.1"), ("conv_proj", "patches"),
                        ("encoder.layers.encoder_layer_0.mlp.1", "blocks.0.mlp"),
                        ("encoder.ln", "encoder"), ("heads.head", "logits")):
        assert model.arch.resolve(path) == layer


def test_vit_b_16_record_keys_shapes_and_size():
    """The real record: torchvision's vit_b_16 state_dict keys and shapes, 224 input only."""
    arch = get_arch("vit_b_16")
    ref = torchvision.models.vit_b_16().state_dict()
    rules = arch.torch_keys()
    assert {t for t, _, _ in rules} == set(ref)
    shapes = flat_shapes(arch)
    from gfi_jax.models import torch_keys as tk
    for t, f, kind in rules:
        assert tk.torch_shape(kind, shapes[f]) == tuple(ref[t].shape), t
    assert (arch.l0, arch.l1, arch.cam_layer, arch.gap) == ("blocks.10.pos", "blocks.10.pos",
                                                            "blocks.10.grid", False)
    assert gfi_jax.layer_shapes("vit_b_16", 224)["blocks.10.pos"] == (14, 14, 3072)
    with pytest.raises(ValueError, match="takes 224×224 images only.*resize or crop to 224"):
        gfi_jax.layer_shapes("vit_b_16", 256)


# ---------------------------------------------------------------- conversion

# The subprocess registers the test-only record itself (the .pth file is read by the torch-free
# reader's own restricted unpickler, so only pickle.load is blocked there).
_TINY = """
from gfi_jax.models import ARCHS, _vit, vit
ARCHS["vit_tiny"] = _vit("vit_tiny", vit.ViTConfig(64, 16, 2, 2, 32, 64), "")
"""


@pytest.fixture(scope="module", autouse=True)
def no_torch_run(files, tmp_path_factory):
    """(process, out folder): `python -m weights_conversion` on the .pth and the .safetensors
    file, run without torch or pickle.load, started now and checked by its test."""
    _, pth, st, _ = files
    d = tmp_path_factory.mktemp("no_torch")
    proc = start_conversion("vit_tiny", [(pth, d / "pth"), (st, d / "st")], REPO,
                            setup=_TINY, block_unpickler=False)
    yield proc, d
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def test_pth_and_safetensors_convert_without_torch(files, model, no_torch_run):
    (proc, out), st = no_torch_run, files[2]
    finish(proc)
    (a, meta_a), (b, meta_b) = load_weights(out / "pth"), load_weights(out / "st")
    held = {"/".join(map(str, p)): np.asarray(v.get_value())   # what the model holds
            for p, v in nnx.to_flat_state(model.params)}
    assert a.keys() == b.keys() == held.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        np.testing.assert_array_equal(a[k], held[k], err_msg=k)
    assert meta_a["architecture"] == meta_b["architecture"] == NAME
    assert meta_b["source"] == str(st.absolute())


def test_torchvision_download_path(tmp_path, monkeypatch):
    """`--source torchvision` fetches torchvision's URL and checks its hash prefix."""
    monkeypatch.setenv("GFI_JAX_CACHE", str(tmp_path / "cache"))
    asked = []

    def offline(url, *a, **k):
        asked.append(url)
        raise urllib.error.URLError("offline")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(ConversionError) as e:
        convert("vit_b_16", "torchvision", tmp_path / "w")
    assert asked == ["https://download.pytorch.org/models/vit_b_16-c867db91.pth"]
    msg = str(e.value)
    assert "\n" not in msg and "vit_b_16-c867db91.pth" in msg and "--source PATH" in msg
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: _io.BytesIO(b"not a ViT" * 99))
    with pytest.raises(ConversionError, match="hash check.*expected c867db91"):
        convert("vit_b_16", "torchvision", tmp_path / "w")
    assert not (tmp_path / "w").exists()


# ---------------------------------------------------------------- token grids


def test_tokens_to_grid_round_trip_and_bad_shape():
    x = np.arange(2 * 7 * 3, dtype=np.float32).reshape(2, 7, 3)
    g = tokens_to_grid(x, (2, 3))
    assert g.shape == (2, 2, 3, 3)
    np.testing.assert_array_equal(g[:, 1, 0], x[:, 4])        # row 1, column 0: patch 3
    np.testing.assert_array_equal(grid_to_tokens(x[:, :1], g), x)
    with pytest.raises(ValueError, match="7 tokens do not make a class token plus a 3×3 grid"):
        tokens_to_grid(x, (3, 3))


def test_mask_basis_is_non_negative_where_gelu_is_not(model, images):
    cfg = G.resolve_layers(gfi_jax.preset(), model.arch)
    assert (cfg.l0, cfg.l1) == ("blocks.0.pos", "blocks.0.pos")
    out = model(images, layers=("blocks.0.mlp", "blocks.0.pos"))
    raw, pos = np.asarray(out["blocks.0.mlp"]), np.asarray(out["blocks.0.pos"])
    assert raw.min() < -0.05                   # GELU's negative lobe is there …
    np.testing.assert_array_equal(pos, np.maximum(raw[:, 1:], 0).reshape(2, 4, 4, 64))
    _, f1, splits, _ = jax.jit(lambda p, x: G.clean_features(model.features, p, x, cfg))(
        model.params, images)
    assert f1.shape == (2, 4, 4, 64) and splits == (64,)
    assert float(f1.min()) == 0.0              # … and clipped out of the basis
    np.testing.assert_allclose(np.asarray(f1), pos, rtol=0, atol=1e-5 * pos.max())


def test_wrapped_model_grid_off_the_forward_path_is_refused(model, images):
    """A features function that only reads a grid off the tokens gives Grad-CAM no gradient:
    a clear error, not a zero map."""
    def features(params, x, layers):
        out = model.features(params, x, ("blocks.0", "logits"))
        return {"grid": tokens_to_grid(out["blocks.0"], (4, 4)), "logits": out["logits"]}
    fn = method_program("gradcam", features, GradCamConfig(layer="grid"))
    with pytest.raises(ValueError, match="'grid' does not feed the logits.*grid_to_tokens"):
        fn(model.params, images, np.array([-1, -1], np.int32))


# ---------------------------------------------------------------- methods


def test_gfi_batch_equals_single_runs_bit_for_bit(model, images):
    cfg = gfi_jax.preset(**SHORT)
    batch = gfi_jax.explain(model, images, preset=cfg, sequential=True)
    assert batch.mask.shape == (2, 64, 64) and batch.mask_l1.shape == (2, 4, 4)
    assert np.isfinite(batch.mask).all() and batch.mask.min() >= 0 and batch.mask.max() <= 1
    assert batch.mask.max() > batch.mask.min()
    for i in range(len(images)):
        alone = gfi_jax.explain(model, images[i:i + 1], preset=cfg, sequential=True)
        for field in ("omega", "mask", "mask_l1", "loss_trace", "target", "score", "score_masked"):
            np.testing.assert_array_equal(getattr(batch, field)[i:i + 1], getattr(alone, field),
                                          err_msg=f"{field} of image {i}")
    # attribute runs the same program (CPU default: sequential).
    np.testing.assert_array_equal(gfi_jax.attribute(model, images, method="gfi", **SHORT),
                                  batch.mask)


def test_constant_image_gives_no_nan(model, images):
    e = gfi_jax.explain(model, np.full_like(images[:1], 0.7),
                        preset=gfi_jax.preset(**SHORT), sequential=True)   # the program above
    for field in ("mask", "mask_l1", "omega", "loss_trace", "score_masked"):
        assert np.isfinite(getattr(e, field)).all(), field
    assert e.mask.min() >= 0 and e.mask.max() <= 1


def test_bfloat16(model, images):
    e = gfi_jax.explain(model.astype("bfloat16"), images[:1], preset=gfi_jax.preset(**SHORT))
    assert e.omega.dtype == np.float32 and e.mask.shape == (1, 64, 64)
    assert np.isfinite(e.mask).all() and e.mask.min() >= 0 and e.mask.max() <= 1


FAST_OPTIONS = {"smoothgrad": dict(samples=2, chunk=2),
                "integrated_gradients": dict(steps=2, chunk=2),
                "rise": dict(masks=8, chunk=8), "meaningful_perturbation": dict(steps=2)}


def test_every_method_runs_or_refuses_clearly(model, images):
    x = images[:1]
    for name in gfi_jax.METHODS:
        if name == "gfi":
            continue   # the tests above
        if name == "guided_backprop":   # GELU, no ReLU: nothing for the guided rule to change
            with pytest.raises(ValueError) as e:
                gfi_jax.attribute(model, x, method=name)
            assert str(e.value) == NO_RECTIFIER
            continue
        if name == "cam":               # the head reads the class token, not an average pool
            with pytest.raises(ValueError, match="CAM needs a model that ends in global "
                               "average pooling.*vit_tiny does not.*method='gradcam'"):
                gfi_jax.attribute(model, x, method=name)
            continue
        s = gfi_jax.attribute(model, x, method=name, **FAST_OPTIONS.get(name, {}))
        assert s.shape == (1, 64, 64) and s.dtype == np.float32, name
        assert np.isfinite(s).all() and s.max() > s.min(), name
        if name == "gradcam":           # its layer feeds the last block's attention
            assert s.min() >= 0 and s.max() > 0


# ---------------------------------------------------------------- command line


def _gfi_jax(*argv) -> tuple[int, str, str]:
    out, err = _io.StringIO(), _io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def test_cli_convert_and_explain(files, tmp_path):
    """`gfi-jax convert` then `gfi-jax explain --weights DIR` on a photo; with `vit_tiny`
    (the CLI has no input-size option: a zoo model explains at its own size)."""
    from PIL import Image
    rc, _, err = _gfi_jax("convert", "--arch", NAME, "--source", files[1], "--out", tmp_path / "w")
    assert rc == 0, err
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (90, 120, 3), np.uint8)).save(photo)
    rc, stdout, err = _gfi_jax("explain", photo, "--model", NAME, "--weights", tmp_path / "w",
                               "--out", tmp_path / "o", "--json", "--quiet",
                               "--set", "stage1_steps=2", "--set", "stage2_steps=2")
    assert rc == 0, err
    assert json.loads(stdout)["run"]["model"] == NAME
    mask = np.load(tmp_path / "o" / "photo.npy")
    assert mask.shape == (64, 64) and np.isfinite(mask).all()
    assert 0 <= mask.min() and mask.max() <= 1


def test_cli_run_over_a_folder(files, tmp_path):
    """`gfi-jax run` with GFI (two steps a stage) over a folder, on the tiny ViT's converted
    weights: finite masks of the model's size for every image, one record each."""
    from PIL import Image
    from gfi_jax.run import read_output
    rc, _, err = _gfi_jax("convert", "--arch", NAME, "--source", files[2], "--out", tmp_path / "w")
    assert rc == 0, err
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(3):
        rgb = np.random.default_rng(i).integers(0, 255, (70, 90, 3), np.uint8)
        Image.fromarray(rgb).save(imgs / f"{i}.png")
    rc, _, err = _gfi_jax("run", "--images", imgs, "--out", tmp_path / "o", "--model", NAME,
                          "--weights", tmp_path / "w", "--batch-size", 2, "--workers", 0,
                          "--no-progress", "--set", "stage1_steps=2", "--set", "stage2_steps=2")
    assert rc == 0, err
    masks, records = read_output(tmp_path / "o")
    assert masks.shape == (3, 64, 64) and np.isfinite(masks).all() and masks.max() > 0
    assert [r["status"] for r in records] == ["ok"] * 3


def test_wrapped_token_model_gets_gfi_and_gradcam_on_its_grid():
    """A user's own token model (pure JAX: 8×8 patches of a 32² image, a class token, one
    token-mixing block) returns its grids through `tokens_to_grid` and goes on from them with
    `grid_to_tokens`: `gfi_jax.wrap` gives it GFI and Grad-CAM maps of the input's size."""
    from gfi_jax import io
    g, d, classes = 4, 16, 5
    rng = np.random.default_rng(0)
    params = {k: jnp.asarray(rng.normal(0, 0.3, s), jnp.float32) for k, s in
              {"embed": (8 * 8 * 3, d), "cls": (1, 1, d), "mix": (d, 4 * d), "out": (4 * d, d),
               "head": (d, classes)}.items()}

    def features(p, x, layers):
        b = x.shape[0]
        patches = x.reshape(b, g, 8, g, 8, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, g * g, -1)
        tokens = jnp.concatenate([jnp.broadcast_to(p["cls"], (b, 1, d)), patches @ p["embed"]], 1)
        hidden = jax.nn.relu(tokens @ p["mix"])
        grid = tokens_to_grid(hidden, (g, g))                  # (B, 4, 4, 64), non-negative
        hidden = grid_to_tokens(hidden[:, :1], grid)           # the network goes on from it
        tokens = tokens + hidden @ p["out"]
        return {"grid": grid, "logits": tokens.mean(1) @ p["head"]}

    m = gfi_jax.wrap(features, params, num_classes=classes, layers=("grid",),
                     preprocessing=io.Preprocessing(size=32, resize=32))
    x = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
    e = gfi_jax.explain(m, x, targets=[1, 3], preset=gfi_jax.preset(**SHORT))
    assert e.mask.shape == (2, 32, 32) and e.mask_l1.shape == (2, g, g)
    assert np.isfinite(e.mask).all() and (e.mask.max(axis=(1, 2)) > e.mask.min(axis=(1, 2))).all()
    s = gfi_jax.attribute(m, x, "gradcam", targets=[1, 3])
    assert s.shape == (2, 32, 32) and np.isfinite(s).all() and np.abs(s).max() > 0
