"""`gfi-jax run`: device/process invariance, kill-and-resume, bad data, list files.

Runs that need other devices or processes are subprocesses (XLA_FLAGS must be set before jax
is imported); they share a persistent compilation cache so each program compiles once. GFI
runs use EfficientNet-Lite0 at 64 px with 1+1 steps and l0 = l1 = blocks.5 (a 4×4 map, so
masks are not constant); the 1,020-file run uses the cheap `center` method at 32 px.
"""
from __future__ import annotations

import io as _io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gfi_jax import run as R

GFI_ARGS = ["--image-size", "64", "--set", "stage1_steps=1", "--set", "stage2_steps=1",
            "--set", "l0=blocks.5", "--mask-dtype", "float32", "--workers", "0"]


# ----------------------------------------------------------------------------- test data
def _png_header_only(w: int, h: int) -> bytes:
    """A PNG that declares w×h pixels and holds none: 'oversize' without the bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IEND", b""))


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = _io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def make_good(folder: Path, n: int, seed: int = 0) -> None:
    """n small decodable images in assorted formats and modes (RGB, L, I;16, CMYK, RGBA, P)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        h, w = int(rng.integers(24, 48)), int(rng.integers(24, 48))
        rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        kind = i % 7
        if kind == 1:
            rgb.convert("L").save(folder / f"g{i:04d}_gray.png")
        elif kind == 2:
            a = rng.integers(0, 65536, (h, w), dtype=np.uint16)
            Image.fromarray(a).save(folder / f"g{i:04d}_16bit.png")
        elif kind == 3:
            rgb.convert("CMYK").save(folder / f"g{i:04d}_cmyk.jpg")
        elif kind == 4:
            rgb.convert("RGBA").save(folder / f"g{i:04d}_rgba.png")
        elif kind == 5:
            rgb.convert("P").save(folder / f"g{i:04d}_palette.gif")
        elif kind == 6:
            rgb.save(folder / f"g{i:04d}.jpg")
        else:
            rgb.save(folder / f"g{i:04d}.png")


def make_bad(folder: Path, n: int) -> list[str]:
    """n undecodable files: corrupt, truncated JPEG/PNG, 0-byte, non-image, oversize."""
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
    jpg, png = _encode(img, "JPEG"), _encode(img, "PNG")
    kinds = [("corrupt.jpg", bytes(rng.integers(0, 256, 500, dtype=np.uint8))),
             ("truncated.jpg", jpg[:len(jpg) // 2]), ("empty.png", b""),
             ("text.jpg", b"this is not an image\n"), ("oversize.png", _png_header_only(100000, 100000)),
             ("truncated.png", png[:len(png) // 2])]
    names = []
    for i in range(n):
        name, data = kinds[i % len(kinds)]
        names.append(f"bad{i:03d}_{name}")
        (folder / names[-1]).write_bytes(data)
    return names


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """21 inputs: 20 good images and one undecodable file (sorted first)."""
    d = tmp_path_factory.mktemp("small")
    make_good(d / "imgs", 20)
    (d / "imgs" / "a_bad.jpg").write_bytes(b"not an image")
    return d


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    e = dict(os.environ)
    e.update(JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax-cache")),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    e.pop("XLA_FLAGS", None)
    e.pop(R.FAULT_ENV, None)
    e.pop("GFI_JAX_COMPILATION_CACHE", None)   # these processes share their programs
    return e


def start(args: list[str], env: dict, **extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "gfi_jax.run", *args], env={**env, **extra},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(p: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    _, err = p.communicate(timeout=timeout)
    return p.returncode, err


@pytest.fixture(scope="module")
def reference(small, env) -> Path:
    """One process, one device, global batch 2 (11 chunks), uninterrupted."""
    out = small / "ref"
    rc, err = finish(start(["--images", str(small / "imgs"), "--out", str(out),
                            "--batch-size", "2", *GFI_ARGS], env))
    assert rc == 0, err[-3000:]
    assert "ETA" in err and "20 done, 1 failed, 0 skipped" in err and "device waited" in err, err[-2000:]
    return out


def assert_same(a: Path, b: Path) -> None:
    ma, ra = R.read_output(a)
    mb, rb = R.read_output(b)
    assert ma.dtype == mb.dtype and ma.shape == mb.shape
    assert np.array_equal(ma, mb), f"max diff {np.abs(ma.astype(float) - mb).max()}"
    assert ra == rb


# ----------------------------------------------------------------------------- tests
def test_reference_output(reference, small):
    masks, recs = R.read_output(reference)
    names = sorted(p.name for p in (small / "imgs").iterdir())
    assert masks.shape == (21, 64, 64) and masks.dtype == np.float32
    assert [r["index"] for r in recs] == list(range(21))
    assert [r["path"] for r in recs] == names          # row i = i-th input in sorted order
    bad = recs[0]
    assert bad["status"] == "failed" and "a_bad.jpg" in bad["error"] and bad["score"] is None
    assert not masks[0].any()
    ok = [r for r in recs if r["status"] == "ok"]
    assert len(ok) == 20 and all(0 <= r["target"] < 1000 and 0 < r["score"] <= 1 for r in ok)
    assert all(r["error"] is None for r in ok)
    # masks are real explanations: in range, not constant, different per image
    assert 0 <= masks[1:].min() and all(masks[i].std() > 0 for i in range(1, 21))
    assert not np.array_equal(masks[1], masks[2])
    meta = json.loads((reference / "run.json").read_text())
    assert meta["config"]["stage1_steps"] == 1 and meta["config"]["l0"] == "blocks.5"


def test_eight_devices_bitwise(reference, small, env):
    out = small / "dev8"
    rc, err = finish(start(["--images", str(small / "imgs"), "--out", str(out),
                            "--batch-size", "16", *GFI_ARGS], env,
                           XLA_FLAGS="--xla_force_host_platform_device_count=8"))
    assert rc == 0, err[-3000:]
    assert_same(reference, out)


def test_two_processes_bitwise(reference, small, env):
    out = small / "proc2"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [start(["--images", str(small / "imgs"), "--out", str(out), "--batch-size", "4",
                    *GFI_ARGS, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                    "--process-id", str(i)], env) for i in range(2)]
    results = [finish(p) for p in procs]
    for rc, err in results:
        assert rc == 0, err[-3000:]
    assert sorted(p.name for p in out.glob("records-*.jsonl")) == [
        "records-00000.jsonl", "records-00001.jsonl"]   # one file per writer
    assert_same(reference, out)


def _lines(out: Path) -> list[bytes]:
    p = out / "records-00000.jsonl"
    return p.read_bytes().split(b"\n") if p.exists() else [b""]


def _wait_lines(out: Path, n: int, p: subprocess.Popen, timeout: float = 180) -> None:
    t = time.monotonic()
    while len(_lines(out)) - 1 < n:
        assert p.poll() is None, p.communicate()[1][-3000:]
        assert time.monotonic() - t < timeout
        time.sleep(0.05)


def test_kill_anywhere_and_resume_is_identical(reference, small, env):
    """Chunks of 2 rows; each step resumes what the previous one left and is interrupted."""
    out = small / "killed"
    args = ["--images", str(small / "imgs"), "--out", str(out), "--batch-size", "2", *GFI_ARGS]
    fault = R.FAULT_ENV

    # 1. killed right after chunk 1's masks were written, before its records
    rc, err = finish(start(args, env, **{fault: "after_chunk:2"}))
    assert rc == -signal.SIGKILL, err[-2000:]
    assert len(_lines(out)) - 1 == 2 and (out / "masks.zarr" / "1.0.0").exists()

    # 2. resumed, then killed halfway through appending chunk 2's records: a torn line
    rc, err = finish(start(args, env, **{fault: "torn_records:2"}))
    assert rc == -signal.SIGKILL, err[-2000:]
    assert _lines(out)[-1] != b"" and 4 <= len(_lines(out)) - 1 < 6

    # 3. resumed (chunk 2's lines are dropped), then killed after tearing its zarr chunk file
    rc, err = finish(start(args, env, **{fault: "torn_chunk:1"}))
    assert rc == -signal.SIGKILL, err[-2000:]
    assert _lines(out)[-1] == b"" and len(_lines(out)) - 1 == 4

    # 4. SIGKILL from outside at an arbitrary moment (often between masks and records)
    p = start(args, env, **{fault: "slow:0.3"})
    _wait_lines(out, 5, p)
    time.sleep(float(np.random.default_rng().uniform(0, 0.4)))
    p.kill()
    finish(p)
    n = len(_lines(out)) - 1

    # 5. SIGTERM (preemption): the batch in flight is finished and written, exit 0
    p = start(args, env, **{fault: "slow:1.0"})
    _wait_lines(out, n + 1, p)
    p.send_signal(signal.SIGTERM)
    rc, err = finish(p)
    assert rc == 0 and "stopped early" in err, err[-2000:]
    n = len(_lines(out)) - 1
    assert n < 21 and n % 2 == 0 and _lines(out)[-1] == b""

    # 6. the same command once more finishes the job: exactly the uninterrupted output
    rc, err = finish(start(args, env))
    assert rc == 0, err[-2000:]
    assert f"{n} skipped (already done)" in err
    assert_same(reference, out)
    assert (out / "records-00000.jsonl").read_bytes() == (reference / "records-00000.jsonl").read_bytes()


def test_thousand_good_twenty_bad(tmp_path):
    folder = tmp_path / "imgs"
    make_good(folder, 1000)
    bad = make_bad(folder, 20)
    kw = dict(out=tmp_path / "out", method="center", image_size=32, batch_size=64, workers=1,
              threads=2)
    t = time.monotonic()
    s = R.run(folder, **kw)
    took = time.monotonic() - t
    assert (s.done, s.failed, s.skipped, s.total) == (1000, 20, 0, 1020), s
    assert 0.0 <= s.device_wait <= 1.0 and s.images_per_s > 0
    masks, recs = R.read_output(tmp_path / "out")
    assert masks.shape == (1020, 32, 32) and masks.dtype == np.uint8
    failed = {r["path"]: r["error"] for r in recs if r["status"] == "failed"}
    assert sorted(failed) == sorted(bad)
    assert all(isinstance(e, str) and "\n" not in e and len(e) > 10 for e in failed.values())
    ok = [r["index"] for r in recs if r["status"] == "ok"]
    assert len(ok) == 1000 and all(masks[i].max() > 0 for i in ok)
    assert not masks[[r["index"] for r in recs if r["status"] == "failed"]].any()
    print(f"1,020 files in {took:.1f} s: {s.line()}")
    # resuming a finished run does nothing and says so
    s2 = R.run(folder, **kw)
    assert (s2.done, s2.failed, s2.skipped) == (0, 0, 1020)


def test_list_file_with_labels(tmp_path):
    make_good(tmp_path / "imgs", 6)
    names = sorted(p.name for p in (tmp_path / "imgs").iterdir())
    lines = ["# path label", *(f"imgs/{n} {i * 100 + 7}" for i, n in enumerate(names)),
             "imgs/missing.png 3", ""]
    (tmp_path / "val.txt").write_text("\n".join(lines))
    s = R.run(list_file=tmp_path / "val.txt", out=tmp_path / "out", method="center",
              image_size=32, targets="labels", batch_size=4, dtype="float16", progress=False)
    assert (s.done, s.failed) == (6, 1)
    masks, recs = R.read_output(tmp_path / "out")
    assert masks.dtype == np.float16 and masks.shape == (7, 32, 32)
    assert [r["target"] for r in recs[:6]] == [i * 100 + 7 for i in range(6)]
    assert [r["label"] for r in recs] == [i * 100 + 7 for i in range(6)] + [3]
    assert recs[6]["status"] == "failed" and "missing.png" in recs[6]["error"]
    (tmp_path / "bad.txt").write_text("imgs/x.png 1000\n")
    with pytest.raises(ValueError, match="outside the model's 1000 classes"):
        R.run(list_file=tmp_path / "bad.txt", out=tmp_path / "o2", targets="labels")
    # another command cannot resume this folder
    with pytest.raises(ValueError, match="batch_size"):
        R.run(list_file=tmp_path / "val.txt", out=tmp_path / "out", method="center",
              image_size=32, targets="labels", batch_size=2, dtype="float16", progress=False)


def test_list_parsing_and_errors(tmp_path):
    from gfi_jax import pipeline
    (tmp_path / "a.csv").write_text("file,class_index,wnid\nx.jpg,3,n0\ny z.jpg,4,n1\n")
    assert pipeline.read_list(tmp_path / "a.csv") == (["x.jpg", "y z.jpg"], [3, 4])
    (tmp_path / "b.txt").write_text("dir/a b.png\n\nc.png 12\n")
    assert pipeline.read_list(tmp_path / "b.txt") == (["dir/a b.png", "c.png"], [None, 12])
    (tmp_path / "c.txt").write_text("a.png 1\nb.png,x\n")
    with pytest.raises(ValueError, match="c.txt:2"):
        pipeline.read_list(tmp_path / "c.txt")
    with pytest.raises(ValueError, match="--targets labels"):
        R.run(list_file=tmp_path / "b.txt", out=tmp_path / "o", targets="labels")
    with pytest.raises(ValueError, match="exactly one"):
        R.run(out=tmp_path / "o")


# ----------------------------------------------------------------------------- resume planning
def _recs(indices) -> list[dict]:
    return [{"index": i} for i in indices]


def test_plan_resume_from_nothing_and_from_a_finished_run():
    paths = [f"p{i}" for i in range(7)]          # chunks of 2 rows: 0-1, 2-3, 4-5, 6
    fresh = R.plan_resume([[]], paths, 2, 1, 0)
    assert fresh.done == frozenset() and fresh.batches == (0, 1, 2, 3)
    assert fresh.chunks == (0, 1, 2, 3) and fresh.write == (True,) * 4 and fresh.skipped == 0
    assert fresh.items == (*((i, f"p{i}") for i in range(7)), (-1, ""))   # the last chunk padded
    finished = R.plan_resume([_recs(range(7))], paths, 2, 1, 0)
    assert finished.batches == () and finished.items == () and finished.skipped == 7


def test_plan_resume_redoes_only_incomplete_chunks():
    paths = [f"p{i}" for i in range(7)]
    # chunk 0 done, chunk 1 half written (a kill between its records), chunk 2 done
    plan = R.plan_resume([_recs([0, 1, 2, 4, 5])], paths, 2, 1, 0)
    assert plan.done == {0, 2} and plan.batches == (1, 3) and plan.chunks == (1, 3)
    assert plan.write == (True, True) and plan.skipped == 4
    assert plan.items == ((2, "p2"), (3, "p3"), (6, "p6"), (-1, ""))


def test_plan_resume_with_two_processes():
    paths = [f"p{i}" for i in range(10)]         # 5 chunks of 2; global batch b = chunks 2b, 2b+1
    records = [_recs([0, 1, 8, 9]), _recs([2, 3])]   # chunks 0, 4 (process 0) and 1 (process 1)
    p0, p1 = (R.plan_resume(records, paths, 2, 2, q) for q in (0, 1))
    assert p0.batches == p1.batches == (1,)       # batch 0 is done; batch 2 = chunk 4 (+ padding)
    assert p0.chunks == (2,) and p1.chunks == (3,) and p0.write == p1.write == (True,)
    assert (p0.skipped, p1.skipped) == (4, 2)
    # a batch is redone when any of its chunks is missing; the done one is not rewritten
    q0, q1 = (R.plan_resume([_recs([0, 1]), []], paths, 2, 2, q) for q in (0, 1))
    assert q0.batches == (0, 1, 2) and q0.write == (False, True, True) and q1.write == (True,) * 2 + (False,)
    assert q1.chunks == (1, 3, 5) and q1.items[-2:] == ((-1, ""), (-1, ""))   # chunk 5: padding only


def test_drop_incomplete_records(tmp_path):
    path = tmp_path / "records-00000.jsonl"
    lines = [json.dumps({"index": i}) + "\n" for i in (0, 1, 2)]
    path.write_text("".join(lines) + '{"index": 3, "pa')          # chunk 1 half done, torn line
    recs = R.read_records(path)
    assert [r["index"] for r in recs] == [0, 1, 2]
    R.drop_incomplete_records(path, recs, 2, 6)
    assert path.read_text() == "".join(lines[:2])
    R.drop_incomplete_records(tmp_path / "absent.jsonl", [], 2, 6)  # nothing to do, no file made
    assert not (tmp_path / "absent.jsonl").exists()


def test_device_wait_counts_only_fetches_past_the_previous_batch():
    # (fetch start, fetch end, done): batch 0 fetched until 1 s with the program ready at
    # 0.5 s (waited 0.5 s); batches 1 and 2 arrived while the one before ran (no wait); batch
    # 3 arrived at 6.5 s, 0.5 s after batch 2 was done at 6 s
    timeline = [(0.0, 1.0, 3.0), (1.0, 2.0, 4.5), (2.5, 4.0, 6.0), (5.0, 6.5, 8.0)]
    assert R.device_wait(timeline, 0.5) == pytest.approx(0.5 + 0 + 0 + 0.5)
    assert R.device_wait([], 0.0) == 0.0


def test_command_line_errors_are_one_line_with_the_user_error_code(tmp_path, capsys):
    import argparse
    from gfi_jax import cli

    parser = argparse.ArgumentParser()
    R.add_arguments(parser)
    (tmp_path / "imgs").mkdir()
    base = ["--images", str(tmp_path / "imgs"), "--out", str(tmp_path / "o")]
    for extra, phrase in [(["--set", "omega_max"], "write KEY=VALUE"),
                          (["--set", "stage9_steps=1"], "valid keys: name, l0"),
                          (["--set", "normalize=median"], "one of minmax, max"),
                          (["--method", "center", "--set", "sigma=wide"], "sigma=wide: expected float"),
                          (["--method", "lime"], "unknown method 'lime'"),
                          ([], "no image files found")]:
        rc = cli.run_command("run", R.main, parser.parse_args(base + extra))
        err = capsys.readouterr().err
        assert rc == cli.USER_ERROR and err.count("\n") == 1, err
        assert err.startswith("gfi-jax run: ") and phrase in err, err
