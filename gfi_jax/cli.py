"""`gfi-jax` command line: `explain`, `report`, `models`, `convert`.

Each subcommand is one row of `COMMANDS`: (help, add_arguments(parser), main(args) -> exit
code). A module adds itself with one row, e.g. `"run": ("…", *_lazy("gfi_jax.run"))`, whose
`add_arguments` and `main` are imported only when the command line is parsed or run.

Errors the user can fix print one line, `gfi-jax <command>: <problem and fix>`, and exit 1.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import glob
import importlib
import json
import os
import sys
import tempfile
import time
import types
import typing
from pathlib import Path

DEFAULT_MODEL = "efficientnet_lite0"
EXAMPLES = ("chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "astronaut.png")  # bundled in scikit-image


class CliError(Exception):
    """A problem with the user's input: printed as one line, exit code 1."""


# ============================================================================ models / convert
def _models_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layers", action="store_true", help="also list every layer with its shape")
    p.add_argument("--size", type=int, default=224, help="input size for --layers (default 224)")


def _models(args) -> int:
    from gfi_jax.models import ARCHS, layer_shapes
    from gfi_jax.weights import cache_dir, default_weights_dir

    print(f"{'model':<20}{'l0':<10}{'l1':<16}{'input':<8}{'min':<6}weights")
    for name, arch in ARCHS.items():
        cached = (default_weights_dir(name) / "metadata.json").is_file()
        note = "cached" if cached else ("converted on first use" if name == DEFAULT_MODEL
                                        else f"- (gfi-jax convert --arch {name} --source "
                                             f"{_convert_source(arch)})")
        print(f"{name:<20}{arch.l0:<10}{arch.l1:<16}{arch.preprocessing.size:<8}"
              f"{arch.min_size:<6}{note}")
        if args.layers:
            for layer, shape in layer_shapes(name, args.size).items():
                print(f"    {layer:<24}{shape}")
    print(f"default model: {DEFAULT_MODEL}; weights cache: {cache_dir() / 'weights'}")
    return 0


def _convert_args(p: argparse.ArgumentParser) -> None:
    from gfi_jax.models import ARCHS
    p.add_argument("--arch", required=True, choices=sorted(ARCHS))
    p.add_argument("--source", required=True, help="PATH, 'torchvision' or 'package'")
    p.add_argument("--out", default=None, help="weights folder (default: the user cache)")


def _convert(args) -> int:
    from weights_conversion.__main__ import main as convert_main
    argv = ["--arch", args.arch, "--source", args.source] + (["--out", args.out] if args.out else [])
    return convert_main(argv)


def _convert_source(arch) -> str:
    return "torchvision" if arch.source == "torchvision" else "package"


# ============================================================================ explain: inputs
def expand_paths(paths: list[str], exclude: Path | None = None) -> list[tuple[str, str | None]]:
    """Command-line PATHs (files, folders, globs) -> [(path, error or None)] in order.

    Folders are searched recursively for image extensions, skipping the folder `exclude`
    (the output folder: a second run must not explain the first run's figures); a folder
    with no images and a glob that matches nothing become one error entry each; other files
    are kept as given (a missing or unreadable one fails later, in `io.load_image`, with its
    own reason).
    """
    from gfi_jax.io import IMAGE_EXTENSIONS

    skip = exclude.resolve() if exclude else None

    def inside(f) -> bool:
        return skip is not None and skip in Path(f).resolve().parents

    out: list[tuple[str, str | None]] = []
    for arg in paths:
        p = Path(arg)
        if not p.exists() and glob.has_magic(arg):
            hits = sorted(glob.glob(arg, recursive=True))
            if not hits:
                out.append((arg, f"{arg}: no file matches this pattern"))
            out.extend((h, None) for h in hits if not Path(h).is_dir() and not inside(h))
        elif p.is_dir():
            hits = sorted(str(f) for f in p.rglob("*")
                          if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file()
                          and not inside(f))
            if not hits:
                out.append((arg, f"{arg}: folder has no images (looked for "
                                 f"{', '.join(IMAGE_EXTENSIONS[:4])}, …)"))
            out.extend((h, None) for h in hits)
        else:
            out.append((arg, None))
    return out


def example_paths() -> list[str]:
    """The sample photographs that scikit-image ships (no download): cat, coffee, rocket, …"""
    try:
        import skimage.data
    except ImportError:
        raise CliError("--examples needs scikit-image: pip install scikit-image") from None
    base = Path(skimage.data.__file__).parent
    return [str(base / name) for name in EXAMPLES if (base / name).is_file()]


def parse_overrides(items: list[str]) -> dict:
    """`["stage1_steps=2", "omega_max=none"]` -> typed overrides of `gfi_jax.Config` fields."""
    from gfi_jax.gfi import Config

    hints = typing.get_type_hints(Config)
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep:
            raise CliError(f"--set {item!r}: expected KEY=VALUE, e.g. --set stage2_steps=20")
        if key not in hints:
            raise CliError(f"--set {key}: unknown GFI config field; valid keys: "
                           f"{', '.join(f.name for f in dataclasses.fields(Config))}")
        try:
            out[key] = _parse_value(text.strip(), hints[key])
        except ValueError:
            raise CliError(f"--set {key}={text}: expected {_type_name(hints[key])}") from None
    return out


def _parse_value(text: str, tp):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        for a in args:
            if a is not type(None):
                try:
                    return _parse_value(text, a)
                except ValueError:
                    pass
        raise ValueError(text)
    if origin is typing.Literal:
        if text in args:
            return text
        raise ValueError(text)
    if tp is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(text)
    if tp in (int, float, str):
        return tp(text)
    raise ValueError(text)


def _type_name(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(map(str, args))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("none" if a is type(None) else _type_name(a) for a in args)
    return getattr(tp, "__name__", str(tp))


def resolve_target(text: str, classes: tuple[str, ...]) -> int | str:
    """`--target` -> "topK" (K ranks) or a class index; class names match case-insensitively."""
    t = text.strip()
    low = t.lower()
    if low.startswith("top") and low[3:].isdigit():
        k = int(low[3:])
        if not 1 <= k <= len(classes):
            raise CliError(f"--target {t}: K must be between 1 and {len(classes)}")
        return f"top{k}"
    if t.lstrip("-").isdigit():
        i = int(t)
        if not 0 <= i < len(classes):
            raise CliError(f"--target {t}: class index out of range; the model has "
                           f"{len(classes)} classes (0..{len(classes) - 1})")
        return i
    lower = [c.lower() for c in classes]
    if low in lower:
        return lower.index(low)
    close = difflib.get_close_matches(low, lower, n=3, cutoff=0.6)
    hint = ("; closest: " + ", ".join(repr(classes[lower.index(c)]) for c in close)) if close \
        else "; use a class index (0..%d) or top1/top3" % (len(classes) - 1)
    raise CliError(f"--target {t!r}: unknown class name{hint}")


def prepare_out(out: str) -> Path:
    """Creates the output folder and checks that files can be written there."""
    path = Path(out).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise CliError(f"--out {out}: cannot write there ({e.strerror or e}); "
                       "choose a writable folder") from None
    return path


def _load(name: str | None, weights: str | None, dtype: str):
    """The model, or CliError with the `gfi-jax convert` command that makes its weights."""
    from gfi_jax.models import get_arch
    from gfi_jax.weights import default_weights_dir

    try:
        arch = get_arch(name or DEFAULT_MODEL) if (name or not weights) else None
    except ValueError as e:
        raise CliError(str(e)) from None
    folder = Path(weights).expanduser() if weights else default_weights_dir(arch.name)
    if not (folder / "metadata.json").is_file() and (weights or arch.name != DEFAULT_MODEL):
        a = arch.name if arch else "ARCH"
        where = f" --out {folder}" if weights else ""
        raise CliError(f"no converted weights for {a} in {folder}; convert them once with: "
                       f"gfi-jax convert --arch {a} --source "
                       f"{_convert_source(arch) if arch else 'torchvision'}{where}")
    try:
        m = _cached_model(name, weights, dtype)
    except (ValueError, OSError) as e:
        raise CliError(" ".join(str(e).split())) from None
    return m


_MODELS: dict = {}


def _cached_model(name, weights, dtype):
    # One load per process: repeated in-process runs (tests, notebooks) share the params.
    import gfi_jax
    key = (name, weights, dtype)
    if key not in _MODELS:
        m = gfi_jax.load_model(name, weights)
        _MODELS[key] = m if dtype == "float32" else m.astype(dtype)
    return _MODELS[key]


# ============================================================================ explain: timing
_COMPILE = {"s": 0.0}
_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")


def _count_compile_time() -> None:
    """Adds JAX's tracing, lowering and compiling time to `_COMPILE` (registered once)."""
    import jax.monitoring
    if _COMPILE.get("registered"):
        return

    def listener(event: str, duration: float, **_) -> None:
        if event in _COMPILE_EVENTS:
            _COMPILE["s"] += duration
    jax.monitoring.register_event_duration_secs_listener(listener)
    _COMPILE["registered"] = True


class Progress:
    """A one-line progress bar on stderr: done/total, images/s and ETA (steady-state rate,
    compile time excluded once known)."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled = total, enabled and total > 1
        self.tty = sys.stderr.isatty()
        self.done, self.start = 0, time.perf_counter()

    def update(self, done: int, compile_s: float = 0.0) -> None:
        """Shows `done` of `total` images; `compile_s` is left out of the rate."""
        self.done = done
        if not self.enabled:
            return
        elapsed = max(time.perf_counter() - self.start - compile_s, 1e-9)
        rate = done / elapsed
        eta = (self.total - done) / rate if rate > 0 else 0.0
        width = 24
        bar = "#" * int(width * done / self.total) + "." * (width - int(width * done / self.total))
        line = (f"[{bar}] {done}/{self.total} images  {rate:.2f} img/s  "
                f"ETA {int(eta) // 60}:{int(eta) % 60:02d}")
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n",
              file=sys.stderr, flush=True)

    def close(self) -> None:
        """Ends the bar's line (on a terminal)."""
        if self.enabled and self.tty:
            print(file=sys.stderr, flush=True)


# ============================================================================ explain: run
def _explain_args(p: argparse.ArgumentParser) -> None:
    from gfi_jax.gfi import PRESETS
    p.add_argument("paths", nargs="*", metavar="PATH", help="image files, folders or globs")
    p.add_argument("--examples", action="store_true",
                   help="explain scikit-image's bundled sample photos (no download)")
    p.add_argument("--model", default=None,
                   help=f"architecture (default {DEFAULT_MODEL}; see `gfi-jax models`)")
    p.add_argument("--weights", default=None, metavar="DIR", help="converted weights folder")
    p.add_argument("--target", default="top1",
                   help="top1 (default), topK, a class index, or a class name")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="GFI hyper-parameters (default: the model's, detached_lite0 for "
                        "efficientnet_lite0, reference for the others)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a GFI config field, e.g. --set stage2_steps=20 (repeatable)")
    p.add_argument("--method", default="gfi",
                   help="gfi (default), another attribution method, a comma-separated list "
                        "or 'all' to compare them side by side")
    p.add_argument("--batch-size", type=int, default=8, help="images per batch (default 8)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--out", default="gfi-jax-out", metavar="DIR",
                   help="output folder (default ./gfi-jax-out)")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no table")
    p.add_argument("--json", action="store_true",
                   help="print the run summary as JSON on stdout (instead of the table)")


def _methods(name: str) -> list[str]:
    """--method -> method names, gfi first: one name, a comma-separated list, or "all".
    Methods other than gfi come from `gfi_jax.methods` (imported only when asked for)."""
    names = [n.strip() for n in name.split(",") if n.strip()]
    if names == ["gfi"]:
        return names
    try:
        others = [n for n in importlib.import_module("gfi_jax.methods").METHODS if n != "gfi"]
    except ImportError:  # the baselines are optional
        others = []
    if names == ["all"]:
        return ["gfi"] + others
    unknown = [n for n in names if n != "gfi" and n not in others]
    if unknown or not names:
        raise CliError(f"--method {name}: unknown; choose one of: "
                       f"{', '.join(['gfi', *others, 'all'])} (or a comma-separated list)")
    return sorted(dict.fromkeys(names), key=lambda n: n != "gfi")


def _stems(paths: list[str]) -> dict[str, str]:
    """A unique output stem per input path (`cat`, `cat-2`, … for equal file names)."""
    seen: dict[str, int] = {}
    out = {}
    for p in paths:
        stem = Path(p).stem or "image"
        n = seen.get(stem, 0) + 1
        seen[stem] = n
        out[p] = stem if n == 1 else f"{stem}-{n}"
    return out


def _save_npy(path: Path, a) -> None:
    import numpy as np
    from gfi_jax import viz
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npy", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, np.asarray(a, np.float32))
        viz.publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj) -> None:
    """Writes JSON atomically (temporary name, then rename)."""
    from gfi_jax import viz
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1)
        viz.publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _background_rgb(m, x, cfg, crops):
    """p in RGB for drawing Φ: the same background the engine used (blur / mean / noise)."""
    import numpy as np
    from gfi_jax import viz
    pre = m.preprocessing
    mean, std = np.asarray(pre.mean, np.float32), np.asarray(pre.std, np.float32)
    if cfg.background == "blur":
        return [viz.gaussian_blur(c, cfg.blur_sigma) for c in crops]
    if cfg.background == "mean":
        return [np.broadcast_to(mean * 255.0, np.asarray(c).shape) for c in crops]
    from gfi_jax.gfi import background
    p = np.asarray(background(x, cfg))
    return [np.clip((p[i] * std + mean) * 255.0, 0, 255) for i in range(len(crops))]


def _explain_batch(m, x, crops, k_targets, methods, cfg):
    """One batch -> per image: (top-5 [(index, prob)], [explanation dicts]), timings."""
    import jax
    import numpy as np
    import gfi_jax

    B = len(crops)
    logits = np.asarray(jax.device_get(m(x)["logits"]), np.float64)
    z = logits - logits.max(1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    order = np.argsort(-probs, axis=1, kind="stable")
    if isinstance(k_targets, str):  # "topK"
        targets = order[:, :int(k_targets[3:])]
    else:
        targets = np.full((B, 1), k_targets)
    targets = targets.astype(np.int32)
    K = targets.shape[1]
    masks: dict[str, np.ndarray] = {}
    e = None
    c0 = _COMPILE["s"]
    t0 = time.perf_counter()
    if "gfi" in methods:
        e = gfi_jax.explain(m, x, targets=targets, preset=cfg)
        masks["gfi"] = e.mask.reshape(B, K, *e.mask.shape[1:])
    others = [n for n in methods if n != "gfi"]
    if others:
        M = importlib.import_module("gfi_jax.methods")
        for name in others:
            try:
                per_k = [np.asarray(M.attribute(m, x, name, targets=targets[:, k]))
                         for k in range(K)]
            except ValueError as err:  # e.g. CAM on a model without global average pooling
                if len(methods) == 1:
                    raise CliError(f"--method {name}: {' '.join(str(err).split())}") from None
                methods.remove(name)  # `all`: leave it out of this run, say so once
                print(f"gfi-jax explain: leaving out {name}: {' '.join(str(err).split())}",
                      file=sys.stderr)
                continue
            masks[name] = np.stack(per_k, 1)
    wall = time.perf_counter() - t0
    compile_s = _COMPILE["s"] - c0
    out = []
    for i in range(B):
        top5 = [(int(j), float(probs[i, j])) for j in order[i, :5]]
        exps = []
        for k in range(K):
            c = int(targets[i, k])
            d = {"target": c, "score": float(probs[i, c]),
                 "masks": {n: masks[n][i, k] for n in masks}}
            if e is not None:
                n = i * K + k
                d.update(score=float(e.score[n]), score_masked=float(e.score_masked[n]),
                         score_background=float(e.score_background[n]),
                         omega_sparsity=float(np.mean(e.omega[n] == 0)),
                         mask_mean=float(e.mask[n].mean()))
            exps.append(d)
        out.append((top5, exps))
    return out, compile_s, max(wall - compile_s, 0.0)


def _write_outputs(out: Path, stem: str, crop, bg, top5, exps, m, methods):
    """One image's figures and masks -> (its summary fields, the figures); the fields
    include the seconds spent drawing (`render_s`) and writing files (`write_s`)."""
    import numpy as np
    from gfi_jax import viz

    render_s = write_s = 0.0

    rec = {"input_size": list(np.asarray(crop).shape[:2]),
           "top5": [{"index": j, "name": m.classes[j], "prob": p} for j, p in top5],
           "explanations": []}
    figs = []
    for d in exps:
        t0 = time.perf_counter()
        name = stem if len(exps) == 1 else f"{stem}_{d['target']}"
        primary = methods[0]
        mask = d["masks"][primary]
        mask = np.clip(mask, 0, 1) if primary == "gfi" else viz.normalize(mask)
        caption = f"{m.classes[d['target']]} {d['score']:.2f}"
        others = {n: d["masks"][n] for n in methods[1:] if n in d["masks"]}
        fig = viz.figure(crop, mask, background=bg, caption=caption, others=others)
        t1 = time.perf_counter()
        render_s += t1 - t0
        viz.save_png(out / f"{name}.png", fig)
        _save_npy(out / f"{name}.npy", mask)
        npys = {}
        for n, other in others.items():
            npys[n] = f"{name}.{n}.npy"
            _save_npy(out / npys[n], viz.normalize(other))
        write_s += time.perf_counter() - t1
        exp = {k: v for k, v in d.items() if k != "masks"}
        exp.update(target_name=m.classes[d["target"]], png=f"{name}.png", npy=f"{name}.npy",
                   **({"method_npy": npys} if npys else {}))
        rec["explanations"].append(exp)
        figs.append(fig)
    first = rec["explanations"][0]  # the top-level fields describe the first target
    rec.update(target=first["target"], target_name=first["target_name"], score=first["score"],
               omega_sparsity=first.get("omega_sparsity"), png=first["png"], npy=first["npy"])
    rec["time"] = {"render_s": round(render_s, 4), "write_s": round(write_s, 4)}
    return rec, figs


def _explain(args) -> int:
    import numpy as np
    from gfi_jax import io
    import gfi_jax

    t_start = time.perf_counter()
    if args.batch_size < 1:
        raise CliError("--batch-size must be at least 1")
    if not args.paths and not args.examples:
        raise CliError("give image files, folders or globs, or --examples")
    methods = _methods(args.method)
    try:  # bad preset names and fields fail before the model loads
        gfi_jax.preset(args.preset, arch=args.model or DEFAULT_MODEL, **parse_overrides(args.set))
    except ValueError as e:
        raise CliError(str(e)) from None
    out = prepare_out(args.out)
    examples = example_paths() if args.examples else []
    entries = expand_paths(args.paths, exclude=out) + [(p, None) for p in examples]
    single = len(entries) == 1
    if single:  # fail before loading the model
        path, err = entries[0]
        if err:
            raise CliError(err)
        try:
            io.load_image(path)
        except ValueError as e:
            raise CliError(str(e)) from None
    stems = _stems([p for p, err in entries if err is None])
    inputs = {Path(p).resolve() for p, err in entries if err is None}
    clash = [p for p, stem in stems.items()
             if {(out / f"{stem}{ext}").resolve() for ext in (".png", ".npy")} & inputs]
    if clash:
        raise CliError(f"--out {out}: the outputs would overwrite the input {clash[0]}; "
                       "choose another --out")
    m = _load(args.model, args.weights, args.dtype)
    # The loaded architecture's default preset (--weights may name another one than --model's
    # default, and presets may name layers: detached_lite0's exist only in Lite0).
    cfg = gfi_jax.preset(args.preset, arch=m.name, **parse_overrides(args.set))
    k_targets = resolve_target(args.target, m.classes)
    _count_compile_time()
    pre = m.preprocessing
    bs = min(args.batch_size, len(entries))
    records: list[dict] = [None] * len(entries)  # type: ignore[list-item]
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr))
    progress = Progress(len(entries), not args.quiet)
    compile_s = run_s = 0.0
    done = 0
    grid_rows: list = []  # --examples: every figure, for OUT/examples.png
    pending: list[tuple[int, str, object, object, float]] = []  # (index, path, crop, x, load_s)

    def fail(i, path, msg):
        records[i] = {"file": str(path), "status": "error", "error": msg}
        say(f"skipped {path}: {msg.removeprefix(str(path) + ': ')}")

    def flush():
        nonlocal compile_s, run_s, done
        if not pending:
            return
        crops = [p[2] for p in pending]
        x = np.stack([p[3] for p in pending])
        if len(x) < bs:  # pad with the last image: one batch shape, one compile
            x = np.concatenate([x, np.repeat(x[-1:], bs - len(x), 0)])
        if done == 0 and not args.quiet and "gfi" in methods:
            say(f"compiling GFI for {m.name} ({cfg.stage1_steps}+{cfg.stage2_steps} steps, "
                f"batch {bs}) …")
        results, c_s, r_s = _explain_batch(m, x, crops + crops[-1:] * (bs - len(crops)),
                                           k_targets, methods, cfg)
        compile_s += c_s
        run_s += r_s
        bgs = _background_rgb(m, x[:len(crops)], cfg, crops)
        per_image = r_s / len(pending)
        for (i, path, crop, _, load_s), (top5, exps), bg in zip(pending, results, bgs):
            rec, figs = _write_outputs(out, stems[path], crop, bg, top5, exps, m, methods)
            rec = {"file": str(path), "status": "ok", "model": m.name, "method": args.method,
                   **rec}
            rec["time"] = {"load_s": round(load_s, 4), "explain_s": round(per_image, 4),
                           **rec["time"]}
            records[i] = rec
            if args.examples:
                grid_rows.extend(figs)
        done += len(pending)
        pending.clear()
        progress.update(sum(r is not None for r in records), compile_s)

    try:
        for i, (path, err) in enumerate(entries):
            if err:
                fail(i, path, err)
                continue
            t0 = time.perf_counter()
            try:
                img = io.load_image(path)
                crop = pre.resize_image(img)
                x = pre.normalize(np.asarray(crop))
            except ValueError as e:
                if single:
                    raise CliError(str(e)) from None
                fail(i, path, str(e))
                continue
            pending.append((i, path, crop, x, time.perf_counter() - t0))
            if len(pending) == bs:
                flush()
        flush()
    finally:
        progress.close()
        records = [r for r in records if r is not None]
        write_json(out / "summary.json", records)
    if grid_rows:
        _examples_grid(out, grid_rows)
    ok = [r for r in records if r["status"] == "ok"]
    n_exp = sum(len(r["explanations"]) for r in ok)
    run = {"model": m.name, "method": args.method, "methods": methods, "preset": cfg.name,
           "target": args.target,
           "images": len(records), "explained": len(ok), "skipped": len(records) - len(ok),
           "explanations": n_exp, "compile_s": round(compile_s, 3), "run_s": round(run_s, 3),
           "images_per_s": round(len(ok) / run_s, 3) if run_s > 0 else None,
           "total_s": round(time.perf_counter() - t_start, 3), "out": str(out),
           "config": dataclasses.asdict(cfg) if "gfi" in methods else None}
    if args.json:
        print(json.dumps({"run": run, "images": records}, indent=1))
    elif not args.quiet:
        _print_table(records)
        print(f"{len(ok)} explained, {run['skipped']} skipped; compile {compile_s:.1f} s, "
              f"run {run_s:.1f} s ({run['images_per_s'] or 0:.2f} img/s); outputs in {out}")
    if single and not ok:
        return 1
    return 0 if ok else 1


def _examples_grid(out: Path, rows) -> None:
    """All example figures stacked, palette PNG (small enough to commit): OUT/examples.png."""
    import numpy as np
    from gfi_jax import viz
    panels = [[np.asarray(fig)] for fig in rows]
    viz.save_png(out / "examples.png", viz.grid(panels), palette=True)


def _print_table(records: list[dict]) -> None:
    w = max([len(Path(r["file"]).name) for r in records] + [4])
    w = min(w, 40)
    print(f"{'file':<{w}}  {'status':<6}  {'top-1':<28}{'target':<24}{'score':>6}  {'ω=0':>5}")
    for r in records:
        name = Path(r["file"]).name[:w]
        if r["status"] != "ok":
            print(f"{name:<{w}}  {'error':<6}  {r['error']}")
            continue
        t = r["top5"][0]
        top = f"{t['name'][:20]} {t['prob']:.2f}"
        for e in r["explanations"]:
            sp = e.get("omega_sparsity")
            print(f"{name:<{w}}  {'ok':<6}  {top:<28}{e['target_name'][:22]:<24}{e['score']:>6.3f}"
                  f"  {'-' if sp is None else f'{sp:.2f}':>5}")


# ============================================================================ report
def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", metavar="OUT_DIR", help="a folder written by `gfi-jax explain`")
    p.add_argument("--page-size", type=int, default=100, help="cards per page (default 100)")


def _report(args) -> int:
    from gfi_jax.report import write_report
    try:
        path = write_report(args.out, page_size=args.page_size)
    except (ValueError, OSError) as e:
        raise CliError(" ".join(str(e).split())) from None
    print(f"wrote {path}")
    return 0


# ============================================================================ the table
def _lazy(module: str):
    """(add_arguments, main) of a subcommand module, imported when first used."""
    return (lambda p: importlib.import_module(module).add_arguments(p),
            lambda args: importlib.import_module(module).main(args))


COMMANDS = {
    "explain": ("explain images: overlay PNGs, masks (.npy) and summary.json",
                _explain_args, _explain),
    "run": ("explain a whole dataset: sharded over devices and hosts, resumable, zarr output",
            *_lazy("gfi_jax.run")),
    "report": ("write a static HTML gallery (index.html) of an explain run", _report_args,
               _report),
    "models": ("list the architectures, their GFI layers and cached weights", _models_args,
               _models),
    "convert": ("convert a PyTorch checkpoint (see python -m weights_conversion)", _convert_args,
                _convert),
}


def _compilation_cache() -> None:
    """A second run of the same model, config and batch shape loads its compiled program."""
    from gfi_jax.weights import enable_compilation_cache
    enable_compilation_cache()


def main(argv: list[str] | None = None) -> int:
    """Entry point of `gfi-jax`: parses `argv` (default sys.argv) and returns the exit code."""
    p = argparse.ArgumentParser(prog="gfi-jax", description="Guided Feature Inversion in JAX.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, (help_, add_arguments, run) in COMMANDS.items():
        s = sub.add_parser(name, help=help_, description=help_)
        add_arguments(s)
        s.set_defaults(run=run)
    args = p.parse_args(argv)
    if args.command in ("explain", "run"):
        _compilation_cache()
    try:
        return args.run(args)
    except CliError as e:
        print(f"gfi-jax {args.command}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"gfi-jax {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
