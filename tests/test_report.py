"""`gfi-jax report`: the HTML gallery, checked in real headless Chromium (Debian's `chromium`,
installed by .ci/run). The run folder is synthetic (figures from random images): the report
reads only summary.json and the PNGs, so no model is needed here."""
from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from gfi_jax import cli, viz
from gfi_jax.report import write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium; .ci/run does)")

ALERT = "<img src=x onerror=alert(1)>"
# If any name were parsed as HTML, this one would mark the page.
MARK = "<img src=y onerror=\"document.documentElement.setAttribute('data-pwned','1')\">"


def chromium(url: str, tmp_path, *extra: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Headless Chromium on `url`, offline and without a profile; stderr has the console."""
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
           "--virtual-time-budget=5000", *extra, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def console_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ":CONSOLE" in ln]


def attr(dom: str, name: str) -> str | None:
    m = re.search(r"<html[^>]*\s" + name + r'="([^"]*)"', dom)
    return m.group(1) if m else None


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A folder as `gfi-jax explain` leaves it: figures, summary.json; hostile names included."""
    out = tmp_path_factory.mktemp("run")
    rng = np.random.default_rng(0)
    records = []
    names = ["cat.jpg", f"{ALERT}.jpg", f"{MARK}.jpg", "dog & <b>bone.png"]
    for i, name in enumerate(names):
        x = rng.integers(0, 256, (64, 64, 3), np.uint8)
        yy, xx = np.mgrid[:64, :64]
        mask = np.exp(-((yy - 20 - 8 * i) ** 2 + (xx - 32) ** 2) / 200.0).astype(np.float32)
        stem = name.rsplit(".", 1)[0]
        viz.save_png(out / f"{stem}.png", viz.figure(x, mask, caption=f"class {i}"))
        score = [0.5, 0.9, 0.1, 0.7][i]
        records.append({"file": f"/data/{name}", "status": "ok", "png": f"{stem}.png",
                        "top5": [{"index": 3, "name": f"{ALERT} class", "prob": score},
                                 {"index": 4, "name": "tabby", "prob": 0.05}],
                        "explanations": [{"target": 3, "target_name": f"{MARK} class",
                                          "score": score, "png": f"{stem}.png"}]})
    records.append({"file": "/data/broken <i>.jpg", "status": "error",
                    "error": f"/data/broken <i>.jpg: not an image {ALERT}"})
    (out / "summary.json").write_text(json.dumps(records))
    rc = cli.main(["report", str(out)])
    assert rc == 0
    return out


@needs_chromium
def test_page_loads_images_and_runs_no_injected_code(run_dir, tmp_path):
    r = chromium((run_dir / "index.html").as_uri(), tmp_path, "--dump-dom")
    dom = r.stdout
    assert attr(dom, "data-status") == "rendered", r.stderr[-2000:]
    assert attr(dom, "data-page-cards") == "5"
    assert attr(dom, "data-images-loaded") == "4" and attr(dom, "data-images-failed") == "0"
    assert attr(dom, "data-errors") == "0"
    assert console_lines(r.stderr) == []           # no script error, no CSP violation
    assert attr(dom, "data-pwned") is None         # the marker name ran nothing
    # hostile names are shown as text: escaped in the serialized DOM, never elements
    assert "&lt;img src=x onerror=alert(1)&gt;.jpg</div>" in dom
    assert "dog &amp; &lt;b&gt;bone.png" in dom
    assert '<img src="x"' not in dom and '<img src="y"' not in dom and "<b>bone" not in dom
    # sorted by score, high first: 0.9, 0.7, 0.5, 0.1, then the failed file
    texts = ["&lt;img src=x onerror=alert(1)&gt;.jpg</div>", "&lt;b&gt;bone.png</div>",
             "cat.jpg</div>", "'data-pwned','1')\"&gt;.jpg</div>", "broken &lt;i&gt;.jpg</div>"]
    where = [dom.find(t) for t in texts]
    assert -1 not in where and where == sorted(where), where
    scores = [float(s) for s in re.findall(r"score: ([0-9.]+)", dom)]
    assert scores == [0.9, 0.7, 0.5, 0.1]


@needs_chromium
def test_screenshot_is_not_blank(run_dir, tmp_path):
    shot = tmp_path / "shot.png"
    chromium((run_dir / "index.html").as_uri(), tmp_path, f"--screenshot={shot}",
             "--window-size=1000,700")
    a = np.asarray(Image.open(shot).convert("RGB"), np.float32)
    assert a.shape[:2] == (700, 1000)
    assert a.std() > 20                                   # text, thumbnails, not one colour
    assert len(np.unique(a.reshape(-1, 3), axis=0)) > 500  # the heatmaps' colours are there


@needs_chromium
def test_fifty_thousand_images_render_one_page(tmp_path):
    n = 50_000
    rng = np.random.default_rng(1)
    records = [{"file": f"/data/img_{i:05d}.jpg", "status": "ok", "png": f"img_{i:05d}.png",
                "top5": [{"index": int(c), "name": f"class {c}", "prob": 0.5}
                         for c in rng.integers(0, 1000, 5)],
                "explanations": [{"target": 1, "target_name": f"class {i % 1000}",
                                  "score": float(s), "png": f"img_{i:05d}.png"}]}
               for i, s in enumerate(rng.random(n))]
    (tmp_path / "summary.json").write_text(json.dumps(records))
    path = write_report(tmp_path, page_size=100)
    assert path.stat().st_size < 12e6                     # compact: about 200 bytes a card
    r = chromium(path.as_uri(), tmp_path, "--dump-dom", timeout=120)
    assert attr(r.stdout, "data-status") == "rendered", r.stderr[-2000:]
    assert attr(r.stdout, "data-page-cards") == "100"
    assert "page 1 of 500 (50000 shown)" in r.stdout
    assert console_lines(r.stderr) == []
    best = max(rec["explanations"][0]["score"] for rec in records)
    first = re.search(r"score: ([0-9.]+)", r.stdout).group(1)
    assert float(first) == pytest.approx(best, abs=1e-3)


def test_report_errors(tmp_path):
    with pytest.raises(ValueError, match="no summary.json"):
        write_report(tmp_path)
    (tmp_path / "summary.json").write_text("{broken")
    with pytest.raises(ValueError, match="not readable JSON"):
        write_report(tmp_path)
