"""Safetensors checkpoints: the torch-free reader, conversion from it, timm's key names."""

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import gfi_jax
from gfi_jax.models import get_arch, timm_keys
from gfi_jax.safetensors_reader import CheckpointError, read_safetensors
from gfi_jax.testing.no_torch import finish, start_conversion
from gfi_jax.weights import flat_shapes, load_weights
from weights_conversion.convert import ConversionError, convert, convert_state_dict, load_state_dict

REPO = Path(__file__).resolve().parents[1]

# numpy dtype -> the format's name, for the writer below.
_NAMES = {np.dtype("?"): "BOOL", np.dtype("u1"): "U8", np.dtype("i1"): "I8",
          np.dtype("<u2"): "U16", np.dtype("<i2"): "I16", np.dtype("<u4"): "U32",
          np.dtype("<i4"): "I32", np.dtype("<u8"): "U64", np.dtype("<i8"): "I64",
          np.dtype("<f2"): "F16", np.dtype("<f4"): "F32", np.dtype("<f8"): "F64",
          np.dtype("<c8"): "C64", np.dtype(ml_dtypes.bfloat16): "BF16",
          np.dtype(ml_dtypes.float8_e5m2): "F8_E5M2", np.dtype(ml_dtypes.float8_e4m3fn): "F8_E4M3",
          np.dtype(ml_dtypes.float8_e8m0fnu): "F8_E8M0",
          np.dtype(ml_dtypes.float8_e4m3fnuz): "F8_E4M3FNUZ",
          np.dtype(ml_dtypes.float8_e5m2fnuz): "F8_E5M2FNUZ"}


def write_safetensors(path: Path, tensors: dict, metadata: dict | None = None) -> Path:
    """A .safetensors file by the format's definition: u64 LE header length, JSON header
    (space-padded to 8 bytes, as the reference writer does), then the tensors' bytes."""
    header, chunks, pos = {}, [], 0
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, a in tensors.items():
        a = np.asarray(a)  # (tobytes is C order; ascontiguousarray would make a scalar 1-D)
        header[name] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [pos, pos + a.nbytes]}
        chunks.append(a.tobytes())
        pos += a.nbytes
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + b"".join(chunks))
    return path


def raw_file(path: Path, header: object, data: bytes = b"") -> Path:
    """A file with a hand-made header, for the broken cases."""
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + data)
    return path


def _one_line(msg: str, *needles: str) -> None:
    assert msg and "\n" not in msg.strip(), msg
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"


def _random_sd(arch: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 arrays under `arch`'s reference key names and PyTorch shapes."""
    from gfi_jax.models import torch_keys as tk
    record, rng = get_arch(arch), np.random.default_rng(seed)
    shapes = flat_shapes(record)
    return {t: rng.standard_normal(tk.torch_shape(kind, shapes[f])).astype(np.float32)
            for t, f, kind in record.torch_keys()}


@pytest.fixture(scope="module", autouse=True)
def no_torch_run(tmp_path_factory):
    """(process, state_dict, out): `python -m weights_conversion` on a random resnet18
    .safetensors file, run without torch or pickle, started now and checked by its test."""
    d = tmp_path_factory.mktemp("no_torch")
    sd = _random_sd("resnet18", seed=3)
    src = write_safetensors(d / "r18.safetensors", sd)
    proc = start_conversion("resnet18", [(src, d / "w")], REPO)
    yield proc, sd, d / "w"
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


# ---------------------------------------------------------------- the reader


def test_every_dtype_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {f"t_{name}": rng.uniform(0, 4, (2, 3)).astype(dtype) for dtype, name in _NAMES.items()}
    tensors.update(scalar=np.float32(2.5), empty=np.zeros((0, 3), np.float16))
    meta = {"format": "pt", "note": "hi"}
    got, got_meta = read_safetensors(write_safetensors(tmp_path / "all.safetensors", tensors, meta))
    assert got_meta == meta and list(got) == list(tensors)
    for k, a in tensors.items():
        a = np.asarray(a)
        assert got[k].dtype == a.dtype and got[k].shape == a.shape and got[k].flags.c_contiguous, k
        assert got[k].tobytes() == a.tobytes(), k  # bitwise: bf16/float8 compare exactly


def _broken(tmp_path: Path, case: str) -> Path:
    def f32(shape, begin, end):
        return {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}

    p = tmp_path / f"{case}.safetensors"
    if case in ("header_length", "huge_header"):  # a 1 MB (or 2**40-byte) header in 10 bytes
        p.write_bytes((10**6 if case == "header_length" else 2**40).to_bytes(8, "little") + b"{}")
        return p
    return raw_file(p, *{
        "not_json": (b"{this is not json}   ",),
        "not_object": ([1, 2],),
        "unknown_dtype": ({"a": {"dtype": "F12", "shape": [1], "data_offsets": [0, 4]}}, bytes(4)),
        "packed_dtype": ({"a": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}, bytes(1)),
        "size_mismatch": ({"a": f32([2, 2], 0, 12)}, bytes(12)),
        "out_of_range": ({"a": f32([2], 0, 8), "b": f32([2], 8, 16)}, bytes(12)),
        "overlap": ({"a": f32([2], 0, 8), "b": f32([2], 4, 12)}, bytes(12)),
        "gap": ({"a": f32([1], 0, 4), "b": f32([1], 8, 12)}, bytes(12)),
        "trailing": ({"a": f32([1], 0, 4)}, bytes(9)),
        "malformed": ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, bytes(4)),
        "no_offsets": ({"a": {"dtype": "F32", "shape": [1]}}, bytes(4)),
        "metadata": ({"__metadata__": {"n": 3}}, b""),
        "duplicate": (b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, '
                      b'"a": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}', bytes(2)),
    }[case])


BROKEN = {
    "header_length": ("header length 1000000 runs past the end of the 10-byte file", "re-download"),
    "huge_header": ("exceeds the format's 100000000-byte limit",),
    "not_json": ("not valid JSON",), "not_object": ("not an object",),
    "unknown_dtype": ("unknown dtype 'F12'", "re-save the weights as F32"),
    "packed_dtype": ("packed sub-byte dtype F4", "re-save"),
    "size_mismatch": ("spans 12 bytes", "needs 16"),
    "out_of_range": ("truncated", "ends at byte 16"), "overlap": ("'a' and 'b' overlap",),
    "gap": ("bytes 4-8",), "trailing": ("5 bytes after the last tensor",),
    "malformed": ("malformed shape",), "no_offsets": ("lacks dtype, shape or data_offsets",),
    "metadata": ("__metadata__",), "duplicate": ("names 'a' twice",),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_header_one_line_error(case, tmp_path):
    path = _broken(tmp_path, case)
    with pytest.raises(CheckpointError) as e:
        read_safetensors(path)
    _one_line(str(e.value), str(path), *BROKEN[case])


# ---------------------------------------------------------------- resnet18: .pth vs .safetensors


@pytest.fixture(scope="module")
def r18(tmp_path_factory):
    """(torchvision model, .pth folder, .safetensors folder, .safetensors path), both converted."""
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    with torch.no_grad():  # random BatchNorm statistics, so their conversion is exercised
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
    d = tmp_path_factory.mktemp("r18")
    torch.save(model.state_dict(), d / "r18.pth")
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    st = write_safetensors(d / "r18.safetensors", sd, {"format": "pt"})
    return model, convert("resnet18", d / "r18.pth", d / "w_pth"), convert("resnet18", st, d / "w_st"), st


def test_resnet18_safetensors_equals_pth(r18):
    torch = pytest.importorskip("torch")
    model, w_pth, w_st, st = r18
    (p_pth, m_pth), (p_st, m_st) = load_weights(w_pth), load_weights(w_st)
    assert p_pth.keys() == p_st.keys()
    for k in p_pth:
        np.testing.assert_array_equal(p_st[k], p_pth[k], err_msg=k)
    assert m_st["source"] == str(st.absolute()) and m_st["num_classes"] == 1000
    assert m_pth["num_classes"] == 1000 and m_pth["source"] != m_st["source"]

    m = gfi_jax.load_model("resnet18", weights=w_st)
    x = np.random.default_rng(1).standard_normal((2, 64, 64, 3)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    ours = np.asarray(m(x)["logits"])
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()


def test_content_not_extension_decides(r18, tmp_path):
    """A safetensors file under another name still reads as one (dispatch by content)."""
    *_, st = r18
    renamed = tmp_path / "r18.bin"
    renamed.write_bytes(st.read_bytes())
    sd = load_state_dict(renamed)
    assert sd.keys() == load_state_dict(st).keys() and "fc.weight" in sd


@pytest.mark.parametrize("how", ["truncated", "header"])
def test_damaged_file_one_line_error(r18, tmp_path, how):
    *_, st = r18
    raw = bytearray(st.read_bytes())
    if how == "truncated":
        raw = raw[: len(raw) // 2]
    else:
        raw[8:40] = b"#" * 32  # the JSON header's start overwritten
    bad = tmp_path / f"{how}.safetensors"
    bad.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError) as e:
        convert("resnet18", bad, tmp_path / "w")
    _one_line(str(e.value), str(bad), "truncated" if how == "truncated" else "not valid JSON",
              "re-download")
    assert not (tmp_path / "w").exists()


def test_conversion_without_torch_or_pickle(no_torch_run):
    """The CLI converted a .safetensors file in a process where `import torch` fails and any
    use of pickle raises (started at the module's first test, so it overlaps the others)."""
    proc, sd, out = no_torch_run
    assert "converted resnet18" in finish(proc, timeout=180)
    flat, _ = load_weights(out)
    want, _ = convert_state_dict("resnet18", sd)
    assert flat.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(flat[k], want[k], err_msg=k)


# ---------------------------------------------------------------- timm's key names


def test_timm_resnet_names_are_torchvision_names():
    for arch in ("resnet18", "resnet50"):
        table = timm_keys.timm_names(get_arch(arch))
        assert table and all(k == v for k, v in table.items())
    assert timm_keys.timm_names(get_arch("alexnet")) is None  # timm has no AlexNet


def test_timm_lite0_names(tmp_path):
    """Spot checks of timm's tf_efficientnet_lite0 names (from its state_dict: 247 params), then
    a checkpoint under those names converts to the reference-named one's params."""
    table = timm_keys.timm_names(get_arch("efficientnet_lite0"))
    assert len(table) == 247
    assert {"conv_stem.weight": "_conv_stem.weight", "bn1.running_var": "_bn0.running_var",
            "blocks.0.0.conv_dw.weight": "_blocks.0._depthwise_conv.weight",
            "blocks.0.0.bn1.weight": "_blocks.0._bn1.weight",
            "blocks.0.0.conv_pw.weight": "_blocks.0._project_conv.weight",
            "blocks.1.0.conv_pw.weight": "_blocks.1._expand_conv.weight",
            "blocks.1.0.bn1.bias": "_blocks.1._bn0.bias",
            "blocks.2.1.conv_pwl.weight": "_blocks.4._project_conv.weight",
            "blocks.6.0.bn3.running_mean": "_blocks.15._bn2.running_mean",
            "conv_head.weight": "_conv_head.weight", "bn2.weight": "_bn1.weight",
            "classifier.bias": "_fc.bias"}.items() <= table.items()

    sd = _random_sd("efficientnet_lite0")
    timm_sd = {k: sd[v] for k, v in table.items()}
    timm_sd["bn1.num_batches_tracked"] = np.array(0, np.int64)  # ignored, as in torchvision files
    got = load_state_dict(write_safetensors(tmp_path / "lite0_timm.safetensors", timm_sd))
    with pytest.warns(UserWarning, match="tf_efficientnet_lite0 .*timm's efficientnet_lite0"):
        ours, n = convert_state_dict("efficientnet_lite0", got)  # the names fit both models
    want, _ = convert_state_dict("efficientnet_lite0", sd)
    assert n == 1000 and ours.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(ours[k], want[k], err_msg=k)


def test_timm_vgg_conv_head_flattens_in_chw_order():
    """timm's pre_logits.fc1 is a 7×7 conv on the 512×7×7 map: its weight (O, C, 7, 7) must
    become torchvision's Linear (O, C·7·7) in C·H·W order. Tiny stand-in arrays: only names
    and the reshape are under test here."""
    arch = get_arch("vgg16")
    table = timm_keys.timm_names(arch)
    sd = {k: np.zeros(1, np.float32) for k in table}
    fc1 = np.arange(3 * 2 * 7 * 7, dtype=np.float32).reshape(3, 2, 7, 7)
    sd.update({"pre_logits.fc1.weight": fc1, "pre_logits.fc2.weight": np.ones((5, 3, 1, 1), np.float32),
               "head.fc.weight": np.full((4, 5), 2, np.float32)})
    ref = timm_keys.from_timm(arch, sd)
    assert ref.keys() == {t for t, _, _ in arch.torch_keys()}
    w = ref["classifier.0.weight"]
    assert w.shape == (3, 98) and w[2, 1 * 49 + 3 * 7 + 5] == fc1[2, 1, 3, 5]
    assert ref["classifier.3.weight"].shape == (5, 3) and ref["classifier.6.weight"].shape == (4, 5)
    assert ref["features.0.weight"] is sd["features.0.weight"]


def test_unrecognized_keys_are_listed():
    sd = {k: v for k, v in _random_sd("resnet18").items() if not k.startswith("fc.")}
    sd.update({k: np.zeros(shape, np.float32) for k, shape in (
        ("head.fc.weight", (1000, 512)), ("head.fc.bias", (1000,)),
        ("head.norm.weight", (512,)), ("head.norm.bias", (512,)))})
    with pytest.raises(ConversionError) as e:
        convert_state_dict("resnet18", sd)
    _one_line(str(e.value), "missing keys 'fc.weight', 'fc.bias'", "unexpected keys 'head.fc.weight'",
              "'head.fc.bias', 'head.norm.weight' (and 1 more)", "timm")


def test_timm_checkpoint_reported_in_timm_names():
    """A timm VGG checkpoint with one key missing is told so in timm's names."""
    table = timm_keys.timm_names(get_arch("vgg16"))
    sd = {k: np.zeros(1, np.float32) for k in table if k != "head.fc.bias"}
    with pytest.raises(ConversionError) as e:
        convert_state_dict("vgg16", sd)
    _one_line(str(e.value), "missing key 'head.fc.bias'")
    assert "unexpected" not in str(e.value)


# ---------------------------------------------------------------- against timm itself, if installed


@pytest.mark.parametrize("arch,timm_name,size", [
    ("resnet18", "resnet18", 64),
    ("efficientnet_lite0", "tf_efficientnet_lite0", 64),
    pytest.param("vgg16", "vgg16", 224, marks=pytest.mark.slow),  # timm's ConvMlp needs 7×7 maps
    ("convnext_tiny", "convnext_tiny", 32),
    pytest.param("vit_b_16", "vit_base_patch16_224", 224, marks=pytest.mark.slow),  # 224² only
])
def test_timm_model_converts(arch, timm_name, size, tmp_path):
    """A random-init timm model, saved as .safetensors, gives timm's logits once converted."""
    timm = pytest.importorskip("timm")
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = timm.create_model(timm_name, pretrained=False).eval()
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    out = convert(arch, write_safetensors(tmp_path / f"{timm_name}.safetensors", sd), tmp_path / "w")
    x = np.random.default_rng(0).standard_normal((2, size, size, 3)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    ours = np.asarray(gfi_jax.load_model(arch, weights=out)(x)["logits"])
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()
