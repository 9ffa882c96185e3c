"""`gfi-jax explain / models` end to end on the real EfficientNet-Lite0, kept cheap: 1+1 GFI
steps and one batch shape (2 images × 2 targets), so the module compiles GFI once."""
from __future__ import annotations

import contextlib
import io as _io
import json
import sys
import types

import numpy as np
import pytest
from PIL import Image

from gfi_jax import cli
from gfi_jax.gfi import parse_overrides
from gfi_jax.models import imagenet_classes
from test_io import write_bad_files, write_odd_modes

FAST = ["--set", "stage1_steps=1", "--set", "stage2_steps=1", "--batch-size", "2"]
CLASSES = imagenet_classes()


def gfi_jax(*argv) -> tuple[int, str, str]:
    """Runs `gfi-jax ARGV` in this process -> (exit code, stdout, stderr)."""
    out, err = _io.StringIO(), _io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("gfi-jax explain: "), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A folder with two small real photos, the odd modes and every kind of broken file."""
    import skimage.data
    d = tmp_path_factory.mktemp("photos")
    Image.fromarray(skimage.data.chelsea()[::3, ::3]).save(d / "cat.jpg", quality=92)
    Image.fromarray(skimage.data.coffee()[::4, ::4]).save(d / "cup.png")
    bad = write_bad_files(d)
    (d / "whole.jpg").unlink()  # a duplicate of nothing interesting
    odd = write_odd_modes(d)
    return d, bad, odd


@pytest.fixture(scope="module")
def folder_run(photos, tmp_path_factory):
    d, _, _ = photos
    out = tmp_path_factory.mktemp("out")
    rc, stdout, stderr = gfi_jax("explain", d, "--out", out, "--target", "top2", "--json", *FAST)
    return rc, json.loads(stdout), stderr, out


def test_folder_run_skips_bad_files_and_finishes_the_rest(photos, folder_run):
    d, bad, odd = photos
    rc, js, stderr, out = folder_run
    assert rc == 0
    records = json.loads((out / "summary.json").read_text())
    assert records == js["images"]
    by_name = {r["file"].rsplit("/", 1)[-1]: r for r in records}
    assert set(by_name) == {"cat.jpg", "cup.png", *bad, *odd}
    for name, phrase in bad.items():
        r = by_name[name]
        assert r["status"] == "error" and phrase in r["error"], r
        assert f"skipped {d / name}" in stderr
    for name in ["cat.jpg", "cup.png", *odd]:  # CMYK, gray, RGBA and 16-bit work
        assert by_name[name]["status"] == "ok", by_name[name]


def test_outputs_per_image_and_target(folder_run):
    _, js, _, out = folder_run
    for r in (r for r in js["images"] if r["status"] == "ok"):
        assert len(r["explanations"]) == 2  # top2: two targets, named <stem>_<class>
        top = [t["index"] for t in r["top5"]]
        probs = [t["prob"] for t in r["top5"]]
        assert len(top) == 5 and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
        assert [t["name"] for t in r["top5"]] == [CLASSES[i] for i in top]
        for k, e in enumerate(r["explanations"]):
            assert e["target"] == top[k] and e["target_name"] == CLASSES[top[k]]
            stem = r["file"].rsplit("/", 1)[-1].rsplit(".", 1)[0]
            assert e["png"] == f"{stem}_{e['target']}.png" and e["npy"] == f"{stem}_{e['target']}.npy"
            mask = np.load(out / e["npy"])
            assert mask.shape == (224, 224) and mask.dtype == np.float32
            assert 0.0 <= mask.min() and mask.max() <= 1.0 and mask.max() > 0
            assert Image.open(out / e["png"]).width >= 3 * 224
            assert 0.0 <= e["omega_sparsity"] <= 1.0 and abs(e["score"] - probs[k]) < 1e-3
        assert set(r["time"]) == {"load_s", "explain_s", "render_s", "write_s"}
        assert all(v > 0 for v in r["time"].values()), r["time"]
        assert r["target"] == r["explanations"][0]["target"]
    assert not list(out.glob(".tmp-*"))  # every file was renamed into place


def test_progress_compile_time_and_json(folder_run):
    _, js, stderr, _ = folder_run
    assert "img/s" in stderr and "ETA" in stderr and "compiling GFI" in stderr
    run = js["run"]
    assert run["compile_s"] > 0 and run["run_s"] > 0 and run["explained"] == 6
    assert run["skipped"] == 5 and run["config"]["stage1_steps"] == 1


def test_examples_quiet_and_the_grid(tmp_path):
    rc, stdout, stderr = gfi_jax("explain", "--examples", "--out", tmp_path, "--quiet",
                                 "--target", "top2", *FAST)
    assert rc == 0 and stdout == "" and stderr == ""
    records = json.loads((tmp_path / "summary.json").read_text())
    names = [r["file"].rsplit("/", 1)[-1] for r in records]
    assert names[:3] == ["chelsea.png", "coffee.png", "rocket.jpg"]
    assert all(r["status"] == "ok" for r in records)
    # the model sees what the photos show: a cat, an espresso
    assert records[0]["top5"][0]["name"] in {"tabby", "tiger cat", "Egyptian cat"}
    assert records[1]["top5"][0]["name"] in {"espresso", "cup", "coffee mug"}
    grid = Image.open(tmp_path / "examples.png")
    assert grid.mode == "P" and grid.height > 2 * 224


def test_method_all_uses_gfi_jax_methods(photos, tmp_path, monkeypatch):
    calls = []

    def attribute(m, images, method, targets=None, **config):
        calls.append((method, np.asarray(targets).tolist()))
        return np.broadcast_to(np.linspace(-1, 3, 224, dtype=np.float32), (len(images), 224, 224))

    fake = types.ModuleType("gfi_jax.methods")
    fake.METHODS = {"gfi": None, "ramp": None}
    fake.attribute = attribute
    monkeypatch.setitem(sys.modules, "gfi_jax.methods", fake)
    d, _, _ = photos
    rc, stdout, _ = gfi_jax("explain", d / "cat.jpg", d / "cup.png", "--out", tmp_path,
                            "--method", "all", "--target", "top2", "--json", "--quiet", *FAST)
    assert rc == 0
    r = json.loads(stdout)["images"][0]
    e = r["explanations"][0]
    assert e["method_npy"] == {"ramp": f"cat_{e['target']}.ramp.npy"}
    ramp = np.load(tmp_path / e["method_npy"]["ramp"])
    assert ramp.min() == 0.0 and ramp.max() == 1.0  # rescaled into [0, 1]
    assert Image.open(tmp_path / e["png"]).width >= 4 * 224  # a comparison panel per method
    assert [c[0] for c in calls] == ["ramp", "ramp"] and len(calls[0][1]) == 2
    rc, _, err = gfi_jax("explain", d / "cat.jpg", "--out", tmp_path, "--method", "lime")
    assert rc == 1 and "gfi, ramp, all" in one_error_line(err)
    assert cli._methods("ramp,gfi") == ["gfi", "ramp"] and cli._methods("ramp") == ["ramp"]


@pytest.mark.parametrize("name", ["truncated.jpg", "corrupt.jpg", "empty.jpg", "text.jpg",
                                  "bomb.png", "missing.jpg"])
def test_single_bad_file_exits_with_one_line(photos, tmp_path, name):
    d, bad, _ = photos
    rc, stdout, err = gfi_jax("explain", d / name, "--out", tmp_path, *FAST)
    assert rc == 1 and stdout == ""
    assert bad.get(name, "no such file") in one_error_line(err)


def test_folder_with_no_images(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hi")
    rc, _, err = gfi_jax("explain", tmp_path / "empty", "--out", tmp_path / "o")
    assert rc == 1 and "folder has no images" in one_error_line(err)
    rc, _, err = gfi_jax("explain", str(tmp_path / "*.jpeg"), "--out", tmp_path / "o")
    assert rc == 1 and "no file matches" in one_error_line(err)


def test_model_and_weights_errors(photos, tmp_path, monkeypatch):
    cat = photos[0] / "cat.jpg"
    rc, _, err = gfi_jax("explain", cat, "--model", "vgg99", "--out", tmp_path)
    assert rc == 1 and "unknown model 'vgg99'" in one_error_line(err)
    empty = tmp_path / "no-weights"
    empty.mkdir()
    rc, _, err = gfi_jax("explain", cat, "--model", "vgg19", "--weights", empty, "--out", tmp_path)
    assert rc == 1
    assert f"gfi-jax convert --arch vgg19 --source torchvision --out {empty}" in one_error_line(err)
    monkeypatch.setenv("GFI_JAX_CACHE", str(tmp_path / "cache"))
    rc, _, err = gfi_jax("explain", cat, "--model", "resnet18", "--out", tmp_path)
    assert rc == 1 and one_error_line(err).endswith(
        "gfi-jax convert --arch resnet18 --source torchvision")
    assert not (tmp_path / "cache").exists()


def test_target_errors(photos, tmp_path):
    cat = photos[0] / "cat.jpg"
    rc, _, err = gfi_jax("explain", cat, "--target", "Tabyy", "--out", tmp_path)
    assert rc == 1 and "unknown class name; closest: 'tabby'" in one_error_line(err)
    rc, _, err = gfi_jax("explain", cat, "--target", "1000", "--out", tmp_path)
    assert rc == 1 and "out of range" in one_error_line(err) and "0..999" in err
    assert cli.resolve_target("TABBY", CLASSES) == 281
    assert cli.resolve_target("285", CLASSES) == 285 and cli.resolve_target("top3", CLASSES) == "top3"


def test_unwritable_out_and_bad_overrides(photos, tmp_path):
    cat = photos[0] / "cat.jpg"
    (tmp_path / "a-file").write_text("x")
    rc, _, err = gfi_jax("explain", cat, "--out", tmp_path / "a-file" / "out")
    assert rc == 1 and "cannot write there" in one_error_line(err)
    rc, _, err = gfi_jax("explain", cat, "--set", "stage9_steps=1", "--out", tmp_path)
    assert rc == 1 and "valid keys:" in one_error_line(err) and "stage2_steps" in err
    rc, _, err = gfi_jax("explain", cat, "--set", "normalize=median", "--out", tmp_path)
    assert rc == 1 and "one of minmax, max" in one_error_line(err)
    assert parse_overrides(["stage1_steps=3", "omega_max=none", "lr=0.5",
                            "upsample_first=false", "l1=head"]) == dict(
        stage1_steps=3, omega_max=None, lr=0.5, upsample_first=False, l1="head")


def test_models_lists_the_zoo(tmp_path, monkeypatch):
    monkeypatch.setenv("GFI_JAX_CACHE", str(tmp_path))
    rc, out, _ = gfi_jax("models")
    assert rc == 0
    assert "resnet18" in out and "layer4.1.act1" in out
    assert "gfi-jax convert --arch vgg19 --source torchvision" in out
    assert f"weights cache: {tmp_path / 'weights'}" in out


def test_other_model_from_a_weights_folder(photos, tmp_path):
    """`--weights DIR` (no --model: the folder says which) with a random-init ResNet-18."""
    from flax import nnx

    from gfi_jax.models import get_arch
    from gfi_jax.weights import save_weights

    arch = get_arch("resnet18")
    flat = {"/".join(map(str, k)): np.asarray(v.get_value())
            for k, v in nnx.to_flat_state(nnx.state(arch.build(rngs=nnx.Rngs(0))))}
    weights = save_weights(tmp_path / "w", flat, {"architecture": "resnet18", "source": "random"})
    rc, stdout, err = gfi_jax("explain", photos[0] / "cat.jpg", "--weights", weights,
                              "--out", tmp_path / "o", "--json", "--quiet", *FAST)
    assert rc == 0, err
    js = json.loads(stdout)
    assert js["run"]["model"] == "resnet18" and js["images"][0]["model"] == "resnet18"
    mask = np.load(tmp_path / "o" / "cat.npy")
    assert mask.shape == (224, 224) and 0 <= mask.min() and mask.max() <= 1


def test_outputs_never_replace_or_feed_the_inputs(photos, tmp_path):
    d = photos[0]
    rc, _, err = gfi_jax("explain", d / "cup.png", d / "cat.jpg", "--out", d)
    assert rc == 1 and "would overwrite the input" in one_error_line(err)
    (tmp_path / "out").mkdir()
    for f in (tmp_path / "a.png", tmp_path / "out" / "a.png"):
        Image.new("RGB", (8, 8)).save(f)
    assert cli.expand_paths([str(tmp_path)], exclude=tmp_path / "out") == [
        (str(tmp_path / "a.png"), None)]
    assert cli.expand_paths([str(tmp_path / "**" / "*.png")], exclude=tmp_path / "out") == [
        (str(tmp_path / "a.png"), None)]


# ----------------------------------------------------------------------------- shared pieces
def test_parse_overrides_types_values_by_the_config_fields():
    from gfi_jax.methods import get_method
    assert parse_overrides(["omega_max=none", "stage1_steps=3", "log_keep=true", "l0=blocks.5",
                            "normalize=minmax", "gamma=2"]) == dict(
        omega_max=None, stage1_steps=3, log_keep=True, l0="blocks.5", normalize="minmax",
        gamma=2.0)
    assert isinstance(parse_overrides(["gamma=2"])["gamma"], float)
    assert parse_overrides(["name=none"]) == {"name": "none"}  # a str field without None
    assert parse_overrides([]) == {}
    for pairs, phrase in [(["stage9_steps=1"], "unknown GFI config field; valid keys: name, l0"),
                          (["stage1_steps=1.5"], "expected int"),
                          (["stage1_steps=none"], "expected int"),
                          (["log_keep=maybe"], "expected true or false"),
                          (["score=logit"], "expected one of softmax, sigmoid"),
                          (["omega_max=big"], "expected float or none"),
                          (["stage1_steps"], "write KEY=VALUE")]:
        with pytest.raises(ValueError, match=phrase) as e:
            parse_overrides(pairs)
        assert "\n" not in str(e.value)
    # another method's options, typed by its config dataclass
    rise = get_method("rise").config
    assert parse_overrides(["masks=8", "p=0.25"], rise) == {"masks": 8, "p": 0.25}
    with pytest.raises(ValueError, match="unknown RiseConfig field; valid keys: masks"):
        parse_overrides(["steps=3"], rise)


def test_atomic_writes_replace_whole_files_or_nothing(tmp_path):
    import os
    from gfi_jax import files

    p = tmp_path / "a.json"
    files.atomic_write_json(p, {"x": [1, 2]})
    assert p.read_text() == json.dumps({"x": [1, 2]}, indent=1)
    umask = os.umask(0)
    os.umask(umask)
    assert p.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    files.atomic_write_text(p, "é", durable=True)
    assert p.read_bytes() == "é".encode()
    files.atomic_write_bytes(p, b"ok")
    with pytest.raises(RuntimeError):
        with files.atomic_writer(p) as f:
            f.write(b"partial")
            raise RuntimeError("writer failed")
    assert p.read_bytes() == b"ok"                 # the old file, untouched
    assert sorted(q.name for q in tmp_path.iterdir()) == ["a.json"]   # no temporary left
    with files.atomic_writer(tmp_path / "m.npy") as f:
        np.save(f, np.arange(3))
    assert np.load(tmp_path / "m.npy").tolist() == [0, 1, 2]
    assert files.check_writable(tmp_path / "new" / "dir").is_dir()
    with pytest.raises(OSError):
        files.check_writable(tmp_path / "a.json" / "sub")


def test_progress_bar_rate_eta_and_quiet():
    from gfi_jax.frontend import Progress

    err = _io.StringIO()
    with contextlib.redirect_stderr(err):
        bar = Progress(4)
        bar.exclude(3600.0)         # "compiling" longer than the run: no rate, not a negative one
        bar.update(2)
        bar.write("skipped x.jpg: broken")
        bar.update(2)
        bar.close()
    text = err.getvalue()
    assert "4/4 images" in text and "img/s" in text and "ETA" in text
    assert "skipped x.jpg: broken\n" in text and "?img/s" in text and "-" not in text
    quiet = _io.StringIO()
    with contextlib.redirect_stderr(quiet):
        bar = Progress(4, enabled=False)
        bar.exclude(1.0)
        bar.update(4)
        bar.close()
    assert quiet.getvalue() == ""


def test_one_missing_weights_message_for_explain_and_run(tmp_path, monkeypatch):
    from gfi_jax import run as R
    from gfi_jax.frontend import check_weights

    monkeypatch.setenv("GFI_JAX_CACHE", str(tmp_path / "cache"))
    check_weights(None, None)      # the default model: made from its package on first use
    with pytest.raises(FileNotFoundError) as e:
        check_weights("vgg16", None)
    assert str(e.value).endswith("gfi-jax convert --arch vgg16 --source torchvision")
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "a.png")
    with pytest.raises(FileNotFoundError) as e2:
        R.run(tmp_path / "imgs", model="vgg16", out=tmp_path / "o", progress=False)
    assert str(e2.value) == str(e.value)
    with pytest.raises(ValueError, match="unknown model 'vgg99'"):
        check_weights("vgg99", None)
