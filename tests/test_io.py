"""Image decoding (`io.load_image`) on bad and unusual files, and the figure helpers (`viz`)."""
from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from gfi_jax import io, viz


def png_header_only(w: int, h: int) -> bytes:
    """A PNG that claims w×h pixels but holds no pixel data (decoding must not start)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b""))
            + chunk(b"IEND", b""))


def write_bad_files(folder) -> dict[str, str]:
    """The broken files of the issue -> the phrase their error must contain."""
    good = Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 96, 3), np.uint8))
    good.save(folder / "whole.jpg", quality=90)
    data = (folder / "whole.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "corrupt.jpg").write_bytes(data[:200] + bytes(range(256)) * 8)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("this is not a picture\n")
    (folder / "bomb.png").write_bytes(png_header_only(40000, 40000))
    return {"truncated.jpg": "truncated", "corrupt.jpg": "corrupt", "empty.jpg": "empty file",
            "text.jpg": "not an image", "bomb.png": "too large"}


def write_odd_modes(folder) -> dict[str, np.ndarray]:
    """CMYK, grayscale, RGBA and 16-bit files -> the RGB pixels they must decode to."""
    out = {}
    Image.new("CMYK", (40, 30), (0, 255, 0, 0)).save(folder / "cmyk.jpg", quality=100)
    out["cmyk.jpg"] = np.array([255, 0, 255])               # no magenta ink: red + blue light
    Image.new("L", (40, 30), 77).save(folder / "gray.png")
    out["gray.png"] = np.array([77, 77, 77])
    Image.new("RGBA", (40, 30), (10, 200, 30, 128)).save(folder / "rgba.png")
    out["rgba.png"] = np.array([10, 200, 30])
    Image.fromarray(np.full((30, 40), 65535, np.uint16)).save(folder / "deep16.png")
    out["deep16.png"] = np.array([255, 255, 255])            # 16-bit white stays white
    return out


@pytest.mark.parametrize("name", ["truncated.jpg", "corrupt.jpg", "empty.jpg", "text.jpg",
                                  "bomb.png"])
def test_bad_files_raise_one_line_value_errors(tmp_path, name):
    phrase = write_bad_files(tmp_path)[name]
    with pytest.raises(ValueError) as e:
        io.load_image(tmp_path / name)
    msg = str(e.value)
    assert msg.startswith(str(tmp_path / name)) and phrase in msg and "\n" not in msg


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        io.load_image(tmp_path / "nope.jpg")
    with pytest.raises(ValueError, match="is a folder"):
        io.load_image(tmp_path)


def test_over_the_limit_but_under_twice_is_refused_too(tmp_path, monkeypatch):
    # PIL only warns between 1× and 2× MAX_IMAGE_PIXELS; load_image refuses both.
    Image.new("RGB", (40, 40)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1600 pixels: warning range
    with pytest.raises(ValueError, match="too large"):
        io.load_image(tmp_path / "big.png")


def test_cmyk_gray_rgba_16bit_decode_to_rgb(tmp_path):
    for name, rgb in write_odd_modes(tmp_path).items():
        img = io.load_image(tmp_path / name)
        assert img.mode == "RGB" and img.size == (40, 30), name
        np.testing.assert_allclose(np.asarray(img)[15, 20], rgb, atol=2, err_msg=name)


def test_jet_endpoints_and_monotone_hue():
    c = viz.jet(np.array([0.0, 0.5, 1.0]))
    np.testing.assert_array_equal(c[0], [0, 0, 128])      # dark blue
    np.testing.assert_array_equal(c[2], [128, 0, 0])      # dark red
    assert c[1, 1] > 200                                  # green-ish in the middle
    assert viz.jet(np.zeros((3, 4))).shape == (3, 4, 3)


def test_masked_is_the_blend():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (20, 30, 3), np.uint8)
    p = np.full((20, 30, 3), 100.0, np.float32)
    m = np.zeros((20, 30), np.float32)
    m[:, :15] = 1.0
    phi = viz.masked(x, m, p)
    np.testing.assert_array_equal(phi[:, :15], x[:, :15])
    np.testing.assert_array_equal(phi[:, 15:], 100)
    # the default background is the blurred image, with the engine's blur
    blurred = viz.gaussian_blur(x, 2.0)
    assert blurred.std() < x.std() and abs(blurred.mean() - x.mean()) < 2


def test_figure_has_three_panels_and_saves_atomically(tmp_path):
    x = np.random.default_rng(2).integers(0, 256, (64, 64, 3), np.uint8)
    m = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    fig = viz.figure(x, m, caption="tabby 0.71")
    assert fig.width >= 3 * 64 and fig.height > 64
    fig2 = viz.figure(x, m, others={"other": m * 5})       # a 4th panel, rescaled into [0, 1]
    assert fig2.width > fig.width
    path = viz.save_png(tmp_path / "f.png", fig)
    assert Image.open(path).size == fig.size
    assert [p.name for p in tmp_path.iterdir()] == ["f.png"]  # no temporary left behind
