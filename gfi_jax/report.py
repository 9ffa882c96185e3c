"""A static HTML gallery of an `gfi-jax explain` run: `OUT/index.html` + `OUT/thumbs/`.

The records of summary.json go into the page as one JSON blob inside a
`<script type="application/json">` element, with `<`, `>` and `&` written as `\\u003c` … so
no file or class name can close the element. A small script parses it and renders one page
of cards at a time (sorted and filtered in memory), setting text only through `textContent`
and attributes only through `setAttribute`: a name is never parsed as HTML, and 50,000 images
cost one JSON parse, not 50,000 DOM nodes.

When rendering finishes the page sets `data-status="rendered"` on `<html>`, and counts loaded
and failed images and script errors in `data-images-loaded`, `data-images-failed` and
`data-errors` (used by the headless-browser test).
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

from PIL import Image

from gfi_jax.files import atomic_write_text, atomic_writer

THUMB_HEIGHT = 120


def _escape_json(obj) -> str:
    """JSON that is safe inside a <script> element (no "<", ">", "&", U+2028/9 raw)."""
    s = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    for ch, esc in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e"),
                    ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        s = s.replace(ch, esc)
    return s


def _thumbnail(src: Path, dst: Path) -> bool:
    """Writes a JPEG thumbnail of an overlay PNG (THUMB_HEIGHT pixels high); False if the
    PNG is unreadable."""
    try:
        with Image.open(src) as img:
            img = img.convert("RGB")
            img.thumbnail((THUMB_HEIGHT * 8, THUMB_HEIGHT), Image.BILINEAR)
            with atomic_writer(dst) as f:
                img.save(f, format="JPEG", quality=80)
        return True
    except (OSError, ValueError):
        return False


def gallery_items(records: list[dict], out: Path, thumbs: bool = True) -> tuple[list, list]:
    """summary.json records -> (class-name table, compact cards), one card per explanation
    (or per failed image). A card is [file, status, png, thumb, target, score, top5, error],
    top5 as [[class, prob], …] with classes as indices into the table."""
    names: dict[str, int] = {}

    def cls(name: str) -> int:
        return names.setdefault(name, len(names))

    cards = []
    (out / "thumbs").mkdir(exist_ok=True)
    present = {e.name for e in os.scandir(out) if e.name.endswith(".png")}  # one listing, no stats
    done = {e.name: e.stat().st_mtime for e in os.scandir(out / "thumbs")} if thumbs else {}
    for r in records:
        file = str(r.get("file", "?"))
        if r.get("status") != "ok":
            cards.append([file, str(r.get("status", "error")), None, None, None, None, [],
                          str(r.get("error", ""))])
            continue
        top5 = [[cls(str(t["name"])), round(float(t["prob"]), 4)] for t in r.get("top5", [])]
        for e in r.get("explanations", []):
            png = e.get("png")
            thumb = None
            if thumbs and png in present:
                t = f"{len(cards):06d}.jpg"  # our own name: nothing to escape
                fresh = done.get(t, -1.0) >= os.stat(out / png).st_mtime
                thumb = f"thumbs/{t}" if fresh or _thumbnail(out / png, out / "thumbs" / t) else None
            score = e.get("score")
            cards.append([file, "ok", png, thumb, cls(str(e.get("target_name", e.get("target")))),
                          None if score is None else round(float(score), 5), top5, None])
    return list(names), cards


def write_report(out_dir: str | os.PathLike, page_size: int = 100, thumbs: bool = True) -> Path:
    """Writes `OUT/index.html` (and `OUT/thumbs/`) for the run in `out_dir`; returns its path.

    ValueError with the reason when `out_dir` holds no readable summary.json.
    """
    out = Path(out_dir).expanduser()
    summary = out / "summary.json"
    if not summary.is_file():
        raise ValueError(f"{out}: no summary.json here; run `gfi-jax explain ... --out {out}` first")
    try:
        records = json.loads(summary.read_text("utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{summary}: not readable JSON ({e})") from None
    if not isinstance(records, list):
        raise ValueError(f"{summary}: expected a list of records")
    if page_size < 1:
        raise ValueError("page size must be at least 1")
    classes, cards = gallery_items(records, out, thumbs)
    data = {"classes": classes, "cards": cards, "pageSize": page_size,
            "title": f"gfi-jax: {out.resolve().name}"}
    # CSP: only our own script runs (by its hash); an injected handler would be refused too.
    digest = base64.b64encode(hashlib.sha256(_SCRIPT.encode("utf-8")).digest()).decode()
    html = (_PAGE.replace("@@HASH@@", f"sha256-{digest}").replace("@@SCRIPT@@", _SCRIPT)
            .replace("@@DATA@@", _escape_json(data)))
    return atomic_write_text(out / "index.html", html)


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src 'self' file: data:; style-src 'unsafe-inline'; script-src '@@HASH@@'">
<title>gfi-jax report</title>
<style>
body{font:14px system-ui,sans-serif;margin:16px;background:#fafafa;color:#222}
#bar{display:flex;gap:10px;align-items:center;flex-wrap:wrap;margin-bottom:12px}
#cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(380px,1fr));gap:10px}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px;overflow:hidden}
.card img{height:120px;max-width:100%;display:block}
.file{font-weight:600;word-break:break-all}
.err{color:#b00020}
.top5{margin:4px 0 0;padding-left:18px;color:#555;font-size:12px}
.meta{color:#333;margin-top:4px}
</style></head>
<body>
<h1 id="title">gfi-jax report</h1>
<div id="bar">
<label>sort <select id="sort">
<option value="score-desc">score, high first</option><option value="score-asc">score, low first</option>
<option value="file">file name</option><option value="status">errors first</option></select></label>
<label>filter <input id="filter" type="search" placeholder="file or class"></label>
<button id="prev">&larr; prev</button><span id="pageinfo"></span><button id="next">next &rarr;</button>
</div>
<div id="cards"></div>
<script id="gfi-data" type="application/json">@@DATA@@</script>
<script>@@SCRIPT@@</script>
</body></html>
"""

_SCRIPT = """
"use strict";
(function () {
  var root = document.documentElement;
  var errors = 0, loaded = 0, failed = 0;
  window.addEventListener("error", function () { errors++; root.setAttribute("data-errors", String(errors)); });
  root.setAttribute("data-errors", "0");
  var D = JSON.parse(document.getElementById("gfi-data").textContent);
  var C = D.cards, page = 0, order = [];
  document.title = D.title;
  document.getElementById("title").textContent = D.title + " (" + C.length + " explanations)";
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.setAttribute("class", cls);
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function url(name) { return name.split("/").map(encodeURIComponent).join("/"); }
  function base(f) { var i = f.lastIndexOf("/"); return i < 0 ? f : f.slice(i + 1); }
  function count() {
    root.setAttribute("data-images-loaded", String(loaded));
    root.setAttribute("data-images-failed", String(failed));
  }
  function card(c) {
    var d = el("div", "card");
    d.appendChild(el("div", "file", base(c[0])));
    d.lastChild.setAttribute("title", c[0]);
    if (c[1] !== "ok") { d.appendChild(el("div", "err", c[1] + ": " + (c[7] || ""))); return d; }
    if (c[3]) {
      var a = el("a"); a.setAttribute("href", url(c[2]));
      var img = el("img"); img.setAttribute("alt", "overlay of " + base(c[0]));
      img.addEventListener("load", function () { loaded++; count(); });
      img.addEventListener("error", function () { failed++; count(); });
      img.setAttribute("src", url(c[3]));
      a.appendChild(img); d.appendChild(a);
    }
    d.appendChild(el("div", "meta", "target: " + D.classes[c[4]] +
      "   score: " + (c[5] === null ? "-" : c[5].toFixed(3))));
    var ol = el("ol", "top5");
    c[6].forEach(function (t) { ol.appendChild(el("li", null, D.classes[t[0]] + " " + t[1].toFixed(3))); });
    d.appendChild(ol);
    return d;
  }
  function sortKey() {
    var how = document.getElementById("sort").value;
    var q = document.getElementById("filter").value.toLowerCase();
    order = [];
    for (var i = 0; i < C.length; i++) {
      if (!q || C[i][0].toLowerCase().indexOf(q) >= 0 ||
          (C[i][4] !== null && D.classes[C[i][4]].toLowerCase().indexOf(q) >= 0)) order.push(i);
    }
    var s = function (i) { return C[i][5] === null ? -Infinity : C[i][5]; };
    if (how === "score-desc") order.sort(function (a, b) { return s(b) - s(a) || a - b; });
    else if (how === "score-asc") order.sort(function (a, b) { return (C[a][5] === null) - (C[b][5] === null) || s(a) - s(b) || a - b; });
    else if (how === "file") order.sort(function (a, b) { return C[a][0] < C[b][0] ? -1 : C[a][0] > C[b][0] ? 1 : a - b; });
    else order.sort(function (a, b) { return (C[a][1] === "ok") - (C[b][1] === "ok") || a - b; });
  }
  function render() {
    var pages = Math.max(1, Math.ceil(order.length / D.pageSize));
    page = Math.min(Math.max(page, 0), pages - 1);
    var box = document.getElementById("cards");
    while (box.firstChild) box.removeChild(box.firstChild);
    var frag = document.createDocumentFragment();
    order.slice(page * D.pageSize, (page + 1) * D.pageSize).forEach(function (i) { frag.appendChild(card(C[i])); });
    box.appendChild(frag);
    document.getElementById("pageinfo").textContent = "page " + (page + 1) + " of " + pages + " (" + order.length + " shown)";
    root.setAttribute("data-page-cards", String(box.childNodes.length));
    root.setAttribute("data-status", "rendered");
  }
  document.getElementById("sort").addEventListener("change", function () { sortKey(); page = 0; render(); });
  document.getElementById("filter").addEventListener("input", function () { sortKey(); page = 0; render(); });
  document.getElementById("prev").addEventListener("click", function () { page--; render(); });
  document.getElementById("next").addEventListener("click", function () { page++; render(); });
  count();
  sortKey();
  render();
})();
"""
