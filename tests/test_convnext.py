"""ConvNeXt-Tiny: parity with torchvision at random init, conversion from .pth and
.safetensors (the latter without torch), the methods on it and the command line, at 64×64.

GFI compiles once per (dtype, batch shape): every GFI call here uses one config, `CFG`."""
from __future__ import annotations

import contextlib
import dataclasses
import io as _io
import json
import os
import urllib.error
import urllib.request
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import gfi_jax
from gfi_jax import cli
from gfi_jax.gfi import resolve_layers
from gfi_jax.testing.no_torch import finish, start_conversion
from gfi_jax.methods import make_config
from gfi_jax.models.cpu_kernels import CPU
from gfi_jax.weights import ConversionError, convert, flat_shapes, load_weights
from test_safetensors import write_safetensors

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

REPO = Path(__file__).resolve().parents[1]
ARCH = "convnext_tiny"
SHORT = dict(stage1_steps=1, stage2_steps=1)
CFG = gfi_jax.preset("reference", **SHORT)
FIELDS = ("omega", "mask", "mask_l1", "loss_trace", "target", "score", "score_masked")


def _one_line(msg: str, *needles: str) -> None:
    assert msg and "\n" not in msg.strip(), msg
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"


def _cli(*argv) -> tuple[int, str, str]:
    out, err = _io.StringIO(), _io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


# ---------------------------------------------------------------- conversion without torch
def _random_sd(seed: int = 0) -> dict[str, np.ndarray]:
    """Random arrays under torchvision's key names and shapes (no torch needed)."""
    from gfi_jax.models import torch_keys as tk
    record, rng = gfi_jax.get_arch(ARCH), np.random.default_rng(seed)
    shapes = flat_shapes(record)
    return {t: rng.standard_normal(tk.torch_shape(kind, shapes[f])).astype(np.float32)
            for t, f, kind in record.torch_keys()}


@pytest.fixture(scope="module", autouse=True)
def no_torch_run(tmp_path_factory):
    """(process, state_dict, out): the CLI converting a .safetensors file where torch and
    pickle cannot be used, started before the first test so that it overlaps them."""
    d = tmp_path_factory.mktemp("no_torch")
    sd = _random_sd(3)
    src = write_safetensors(d / "cnx.safetensors", sd)
    proc = start_conversion("convnext_tiny", [(src, d / "w")], REPO)
    yield proc, sd, d / "w"
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """(torchvision model, .pth path, .safetensors path) of one random convnext_tiny."""
    torch.manual_seed(0)
    m = torchvision.models.convnext_tiny().eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("layer_scale"):  # its init, 1e-6, would hide every block
                p.uniform_(0.2, 1.0)
            elif p.ndim == 1:  # LayerNorm affines and biases, so their conversion shows
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)
    d = tmp_path_factory.mktemp("cnx")
    torch.save(m.state_dict(), d / "cnx.pth")
    sd = {k: v.numpy() for k, v in m.state_dict().items()}
    return m, d / "cnx.pth", write_safetensors(d / "cnx.safetensors", sd)


@pytest.fixture(scope="module")
def folders(ckpt, tmp_path_factory):
    d = tmp_path_factory.mktemp("cnx_weights")
    return convert(ARCH, ckpt[1], d / "pth"), convert(ARCH, ckpt[2], d / "st")


@pytest.fixture(scope="module")
def model(folders):
    return gfi_jax.load_model(ARCH, folders[0])


@pytest.fixture(scope="module")
def fast(model):
    """`model` without the depthwise CPU kernel: at 7×7 its unrolled taps make GFI's program
    compile ~2.5× slower. The kernel is checked against XLA's conv in tests/test_layers.py (the
    same code for every size) and the forward parity above runs with it."""
    return model.with_kernels(dataclasses.replace(CPU, depthwise=False))


@pytest.fixture(scope="module")
def images():
    """A noise image and a constant one (the mean colour: GFI's degenerate case, where the
    blurred background equals the image)."""
    noise = np.random.default_rng(0).standard_normal((1, 64, 64, 3))
    return np.concatenate([noise, np.zeros_like(noise)]).astype(np.float32)


# ---------------------------------------------------------------- parity and conversion
def test_logits_and_every_named_layer_match_torchvision(ckpt, model, images):
    tm, arch = ckpt[0], model.arch
    mods, acts = dict(tm.named_modules()), {}
    hooks = [mods[t].register_forward_hook(
        lambda _m, _i, o, k=ours: acts.__setitem__(k, o.detach().numpy()))
        for t, ours in arch.aliases.items()]
    with torch.no_grad():
        tm(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
    for h in hooks:
        h.remove()
    # The aliases name every layer but the `.pos` views, which torchvision has no module for:
    # they are max(GELU, 0) of the block's hidden.
    acts.update({k[:-len(".gelu")] + ".pos": np.maximum(v, 0)
                 for k, v in list(acts.items()) if k.endswith(".gelu")})
    assert set(acts) == set(arch.layers)
    out = model(images, layers=arch.layers)
    for name in arch.layers:
        ref = acts[name]
        if ref.ndim == 4 and not name.endswith((".gelu", ".pos")):  # the MLP runs channels-last
            ref = ref.transpose(0, 2, 3, 1)
        got = np.asarray(out[name])
        assert got.shape == ref.shape, name
        err = np.abs(got - ref).max() / np.abs(ref).max()
        assert err < 1e-4, f"{name}: relative error {err:.2e}"


def test_pth_and_safetensors_convert_to_the_same_params(folders):
    (a, meta), (b, _) = load_weights(folders[0]), load_weights(folders[1])
    assert meta["architecture"] == ARCH and a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert a["blocks/3/2/layer_scale"].shape == (768, 1, 1)  # torchvision's own shape


def test_conversion_without_torch_or_pickle(no_torch_run):
    from gfi_jax.weights import convert_state_dict
    proc, sd, out = no_torch_run
    assert "converted convnext_tiny" in finish(proc, timeout=180)
    flat, _ = load_weights(out)
    want, _ = convert_state_dict(ARCH, sd)
    assert flat.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(flat[k], want[k], err_msg=k)


def test_torchvision_download_checks_the_url_and_hash(ckpt, tmp_path, monkeypatch):
    """The official-weights path: the record's URL is fetched and its sha256 prefix checked
    (a local checkpoint served in its place fails the check and leaves nothing behind)."""
    monkeypatch.setenv("GFI_JAX_CACHE", str(tmp_path / "cache"))
    urls = []

    def serve(url, timeout=None):
        urls.append(url)
        return open(ckpt[1], "rb")

    monkeypatch.setattr(urllib.request, "urlopen", serve)
    with pytest.raises(ConversionError) as e:
        convert(ARCH, "torchvision", tmp_path / "w")
    _one_line(str(e.value), "hash", "983f1562")
    assert urls == ["https://download.pytorch.org/models/convnext_tiny-983f1562.pth"]
    assert os.listdir(tmp_path / "cache" / "downloads") == [] and not (tmp_path / "w").exists()

    def offline(*a, **k):
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(ConversionError) as e:
        convert(ARCH, "torchvision", tmp_path / "w")
    _one_line(str(e.value), "convnext_tiny-983f1562.pth", "--source PATH")


# ---------------------------------------------------------------- GFI
def test_default_basis_is_the_positive_part_of_the_last_blocks_gelu(model, images):
    """The record's choice: l0 = l1 = stage4.2.pos (block outputs are signed, GELU dips to
    −0.17): max(GELU, 0) exactly, ≥ 0 as the mask basis must be, and not all zero."""
    for name in ("reference", "paper"):
        cfg = resolve_layers(gfi_jax.preset(name), model.arch)
        assert cfg.l0 == cfg.l1 == "stage4.2.pos", name
    out = model(images, layers=("stage4.2.gelu", "stage4.2.pos"))   # parity's program
    gelu, pos = np.asarray(out["stage4.2.gelu"]), np.asarray(out["stage4.2.pos"])
    assert pos.shape == (2, 2, 2, 3072) and gelu.min() < 0
    np.testing.assert_array_equal(pos, np.maximum(gelu, 0))
    assert pos.max() > 0


def test_gfi_batch_equals_single_runs_and_constant_image_is_finite(fast, images):
    """On CPU (sequential) each image's explanation is bit for bit its explanation alone,
    the constant image's included, which stays finite. (ConvNeXt's plain forward is not
    batch-invariant to the last bit: XLA:CPU's 1×1 convs block by batch size.)"""
    batch = gfi_jax.explain(fast, images, preset=CFG)
    assert batch.mask.shape == (2, 64, 64) and batch.mask_l1.shape == (2, 2, 2)
    for field in FIELDS:
        assert np.isfinite(getattr(batch, field)).all(), field
    assert batch.mask.min() >= 0 and batch.mask.max() <= 1
    for i in range(len(images)):
        alone = gfi_jax.explain(fast, images[i:i + 1], preset=CFG)
        for field in FIELDS:
            np.testing.assert_array_equal(getattr(batch, field)[i:i + 1], getattr(alone, field),
                                          err_msg=f"{field} of image {i}")
    # attribute's gfi is explain's mask (the same compiled program as the single runs)
    s = gfi_jax.attribute(fast, images[:1], method="gfi", **SHORT)
    np.testing.assert_array_equal(s, gfi_jax.explain(fast, images[:1], preset=CFG).mask)


def test_gfi_bfloat16(fast, images):
    e = gfi_jax.explain(fast.astype(jnp.bfloat16), images[:1], preset=CFG)
    assert e.mask.shape == (1, 64, 64)
    for field in FIELDS:
        assert np.isfinite(getattr(e, field)).all(), field
    assert e.mask.min() >= 0 and e.mask.max() <= 1


# ---------------------------------------------------------------- the other methods
FAST_OPTIONS = {"smoothgrad": dict(samples=2, chunk=2),
                "integrated_gradients": dict(steps=2, chunk=2),
                "rise": dict(masks=8, chunk=8), "meaningful_perturbation": dict(steps=2)}


@pytest.mark.parametrize("name", [m for m in gfi_jax.METHODS
                                  if m not in ("gfi", "cam", "guided_backprop")])
def test_every_other_method_gives_a_finite_input_sized_map(fast, images, name):
    """GFI is tested above; CAM and Guided Backprop refuse (below)."""
    s = gfi_jax.attribute(fast, images[:1], method=name, **FAST_OPTIONS.get(name, {}))
    assert s.shape == (1, 64, 64) and s.dtype == np.float32, name
    assert np.isfinite(s).all() and s.max() > s.min(), name
    if name == "gradcam":
        assert s.min() >= 0 and make_config("gradcam", fast).layer == "stage4"


def test_cam_and_guided_backprop_refuse_with_one_line(model, images):
    with pytest.raises(ValueError) as e:
        gfi_jax.attribute(model, images[:1], method="cam")
    _one_line(str(e.value), "convnext_tiny does not", "method='gradcam'")
    with pytest.raises(ValueError) as e:  # GELU only: nothing for the guided rule to change
        gfi_jax.attribute(model, images[:1], method="guided_backprop")
    _one_line(str(e.value), "no rectifier", "method='grad'")


# ---------------------------------------------------------------- the command line
def test_cli_convert_then_explain(ckpt, tmp_path):
    """`convert`, then `explain` with Grad-CAM: the CLI's model has the default CPU kernels,
    whose GFI program alone would compile longer than this whole file should take."""
    rc, out, err = _cli("convert", "--arch", ARCH, "--source", ckpt[1], "--out", tmp_path / "w")
    assert rc == 0, err
    assert "converted convnext_tiny" in out
    meta_path = tmp_path / "w" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    assert meta["preprocessing"]["resize"] == 236 and meta["preprocessing"]["size"] == 224
    # A 64×64 crop keeps the test cheap: the folder's preprocessing is what explain uses.
    meta["preprocessing"].update(size=64, resize=73)
    meta_path.write_text(json.dumps(meta))
    rgb = np.random.default_rng(1).integers(0, 256, (80, 96, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "x.png")
    rc, stdout, err = _cli("explain", tmp_path / "x.png", "--model", ARCH, "--weights",
                           tmp_path / "w", "--out", tmp_path / "o", "--json", "--quiet",
                           "--method", "gradcam")
    assert rc == 0, err
    assert json.loads(stdout)["run"]["model"] == ARCH
    mask = np.load(tmp_path / "o" / "x.npy")
    assert mask.shape == (64, 64) and np.isfinite(mask).all()
    assert 0 <= mask.min() and mask.max() <= 1 and mask.max() > 0


def test_cli_run_over_a_folder(ckpt, tmp_path):
    """`gfi-jax run` over a folder with a converted random-init ConvNeXt: every image gets a
    finite map of the run's size, and a rerun (the Python call) finds the work done."""
    from gfi_jax.run import read_output, run
    rc, _, err = _cli("convert", "--arch", ARCH, "--source", ckpt[1], "--out", tmp_path / "w")
    assert rc == 0, err
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(3):
        rgb = np.random.default_rng(i).integers(0, 256, (70, 90, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(imgs / f"{i}.png")
    argv = ("run", "--images", imgs, "--out", tmp_path / "o", "--model", ARCH, "--weights",
            tmp_path / "w", "--method", "gradcam", "--image-size", 64, "--batch-size", 2,
            "--workers", 0, "--no-progress")
    rc, _, err = _cli(*argv)
    assert rc == 0, err
    masks, records = read_output(tmp_path / "o")
    assert masks.shape == (3, 64, 64) and np.isfinite(masks).all() and masks.max() > 0
    assert sorted(Path(r["path"]).name for r in records) == ["0.png", "1.png", "2.png"]
    again = run(imgs, model=ARCH, weights=tmp_path / "w", method="gradcam", image_size=64,
                batch_size=2, out=tmp_path / "o", progress=False)
    assert (again.done, again.skipped) == (0, 3)
    assert read_output(tmp_path / "o")[0].tobytes() == masks.tobytes()
