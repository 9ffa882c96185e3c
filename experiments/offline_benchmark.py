"""Offline quality benchmark: every method on the real EfficientNet-Lite0 and the ImageNet
sample photographs, no download needed.

Metrics (gfi_jax.metrics):
- grid pointing game (Böhle et al. 2022): 2×2 mosaics of four confidently classified images
  (each correct with probability >= 0.5 alone) of four classes, each cell the image shrunk
  2× so the mosaic has the model's input size; one cell's class is explained. Energy
  fraction inside the cell and arg-max hit rate (chance: 0.25);
- deletion and insertion AUC (Petsiuk et al. 2018) on correctly classified images, blurred
  substrate, the true class's softmax probability (deletion: lower is better);
- cascading model randomization (Adebayo et al. 2018): Spearman of |saliency| after the top
  unit and after all units are re-drawn (lower: the map depends on the model);
- stability of GFI presets: mask Pearson of an image alone against the image in one batched
  computation, against bfloat16, and against input noise σ = 1e-3.

    python experiments/offline_benchmark.py                       # the full benchmark
    python experiments/offline_benchmark.py --mosaics 24 --images 16 --methods "GFI reference" \\
        --gfi "GFI l1=blocks.11:preset=reference,l1=blocks.11" --no-stability --no-randomization

Saliency maps are cached per method, task and batch under --cache, so an interrupted run
resumes and methods compared later reuse the others' maps. Seeds are fixed: a second run
gives the same table. Writes --out (a markdown table with the command, machine, date, seeds
and settings) and --figure (rows: images, columns: methods, as the paper's Fig. 2).
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from stability import pearson  # noqa: E402

import gfi_jax  # noqa: E402
from gfi_jax import metrics, viz  # noqa: E402

DATA = common.ROOT.parent / "shared" / "data" / "imagenet-samples"

# name -> (registry method, options). The order is the table's and the figure's.
def method_specs(args) -> dict[str, tuple[str, dict]]:
    specs = {
        "GFI paper": ("gfi", {"preset": "paper"}),
        "GFI reference": ("gfi", {"preset": "reference"}),
        "GFI stage 1 only": ("gfi", {"preset": "reference", "stage2_steps": 0}),
        "GFI detached_lite0": ("gfi", {"preset": "detached_lite0"}),
        "GFI contrastive_lite0": ("gfi", {"preset": "contrastive_lite0"}),
        "Grad": ("grad", {}),
        "Guided Backprop": ("guided_backprop", {}),
        "SmoothGrad": ("smoothgrad", {"samples": args.smoothgrad_samples}),
        "Integrated Gradients": ("integrated_gradients", {"steps": args.ig_steps}),
        "Grad-CAM": ("gradcam", {}),
        "CAM": ("cam", {}),
        "RISE": ("rise", {"masks": args.rise_masks}),
        "Meaningful Perturbation": ("meaningful_perturbation", {"steps": args.mp_steps}),
        "Center": ("center", {}),
    }
    for spec in args.gfi:
        name, _, opts = spec.partition(":")
        if not name or not opts:
            raise SystemExit(f"error: --gfi {spec!r}: expected 'NAME:key=value,...'")
        specs[name] = ("gfi", dict(_parse(kv) for kv in opts.split(",")))
    if args.methods:
        wanted = [m.strip() for m in args.methods.split(",")]
        wanted += [s.partition(":")[0] for s in args.gfi]
        unknown = [m for m in wanted if m not in specs]
        if unknown:
            raise SystemExit(f"error: unknown method(s) {unknown}; choose from {list(specs)}")
        specs = {k: v for k, v in specs.items() if k in wanted}
    return specs


def stability_config(name: str, specs: dict, model) -> gfi_jax.Config:
    """A preset name, or the name of a GFI method in the table (a --gfi variant)."""
    if name in specs and specs[name][0] == "gfi":
        opts = dict(specs[name][1])
        return gfi_jax.preset(opts.pop("preset", None), arch=model.arch.name, **opts)
    return gfi_jax.preset(name)


def _parse(kv: str) -> tuple[str, object]:
    key, _, value = kv.partition("=")
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    return key, {"true": True, "false": False, "none": None}.get(value.lower(), value)


# ----------------------------------------------------------------------------- data
def load_dataset(model, folder: Path, size: int = 224) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images `(N, size, size, 3)` preprocessed for `model` (its resize-and-crop policy scaled
    to `size`), labels `(N,)`, file names."""
    labels_csv = folder / "labels.csv"
    if not labels_csv.is_file():
        raise SystemExit(f"error: {labels_csv} not found; --data must be the imagenet-samples "
                         "folder (files plus labels.csv: file, class_index, wnid, name)")
    with open(labels_csv) as f:
        rows = list(csv.DictReader(f))
    names = [r["file"] for r in rows]
    pre = model.preprocessing
    pre = pre.replace(size=size, resize=round(pre.resize * size / pre.size))
    x = np.stack([model.preprocess(folder / n, pre) for n in names]).astype(np.float32)
    return x, np.array([int(r["class_index"]) for r in rows]), names


def predict(model, x: np.ndarray, batch: int = 32) -> np.ndarray:
    f = jax.jit(lambda z: jax.nn.softmax(model.features(model.params, z, ("logits",))["logits"]))
    return np.concatenate([np.asarray(f(x[i:i + batch])) for i in range(0, len(x), batch)])


def grid_tasks(x, labels, probs, n: int, seed: int, min_confidence: float = 0.5):
    """Mosaics `(n, H, W, 3)`, the explained cell `(n,)` and its class `(n,)`."""
    idx = metrics.select_grids(probs, labels, n, min_confidence=min_confidence, seed=seed)
    cells = np.random.default_rng(seed + 1).integers(0, 4, n)
    B, H, W, C = x.shape
    small = x.reshape(B, H // 2, 2, W // 2, 2, C).mean(axis=(2, 4))   # 2× box downsampling
    mosaics = metrics.mosaic(small[idx]).astype(np.float32)
    return mosaics, cells, labels[idx[np.arange(n), cells]]


def deletion_tasks(labels, probs, n: int, seed: int) -> np.ndarray:
    """`n` correctly classified images, drawn at random (seeded)."""
    ok = np.flatnonzero(probs.argmax(1) == labels)
    if len(ok) < n:
        print(f"warning: only {len(ok)} correctly classified images; using all", file=sys.stderr)
    return np.sort(np.random.default_rng(seed).permutation(ok)[:n])


# ----------------------------------------------------------------------------- saliency
def cache_folder(cache: Path, model, method: str, opts: dict, task: str) -> Path:
    """One folder per (model, method, options, task) under --cache."""
    key = hashlib.sha1(json.dumps([model.name, method, sorted(opts.items()), task],
                                  default=str).encode()).hexdigest()[:16]
    return cache / key


def saliency(model, name, spec, images, targets, batch: int, cache: Path, task: str, log):
    """Maps `(N, H, W)` of one method, computed batch by batch and cached; returns the maps
    and the seconds per image spent computing (NaN when everything came from the cache)."""
    method, opts = spec
    folder = cache_folder(cache, model, method, opts, task)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spec.json").write_text(json.dumps({"name": name, "method": method, "options": opts,
                                                  "task": task}, default=str))
    out, spent, computed = [], 0.0, 0
    for b, i in enumerate(range(0, len(images), batch)):
        path = folder / f"{b:05d}-{i}-{min(i + batch, len(images))}.npy"
        if path.is_file():
            out.append(np.load(path))
            continue
        t0 = time.perf_counter()
        s = gfi_jax.attribute(model, images[i:i + batch], method, targets[i:i + batch], **opts)
        spent += time.perf_counter() - t0
        computed += len(s)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npy", dir=folder)
        with os.fdopen(fd, "wb") as f:
            np.save(f, s.astype(np.float32))
        os.replace(tmp, path)
        out.append(s)
        log(f"  {name} [{task}] {i + len(s)}/{len(images)}  {spent / computed:.2f} s/img")
    return np.concatenate(out), (spent / computed if computed else float("nan"))


def randomization(model, method, opts, x, targets, args, cache: Path) -> dict:
    """`metrics.cascading_randomization`, cached under --cache like the maps."""
    task = f"randomization-{len(x)}-{args.images}-{args.randomization_every}-{args.seed}"
    path = cache_folder(cache, model, method, opts, task) / "randomization.json"
    if path.is_file():
        out = json.loads(path.read_text())
        return {"layers": out["layers"], "spearman": np.asarray(out["spearman"], float)}
    out = metrics.cascading_randomization(model, x, method, targets, seed=args.seed,
                                          every=args.randomization_every, **opts)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump({"method": method, "options": opts, "task": task, "layers": out["layers"],
                   "spearman": np.asarray(out["spearman"]).tolist()}, f, default=str)
    os.replace(tmp, path)
    return out


def stability(model, x, targets, cfg, noise: float, seed: int) -> dict[str, list[float]]:
    """Mask Pearson of each image explained alone against three perturbed settings."""
    alone = np.concatenate([gfi_jax.explain(model, x[i:i + 1], targets[i:i + 1], preset=cfg,
                                            sequential=True).mask for i in range(len(x))])
    noisy = x + np.random.default_rng(seed).normal(0, noise, x.shape).astype(np.float32)
    other = {
        "batch (one batched computation)": gfi_jax.explain(model, x, targets, preset=cfg,
                                                           sequential=False).mask,
        "bfloat16 vs float32": gfi_jax.explain(model.astype("bfloat16"), x, targets,
                                               preset=cfg).mask,
        f"input noise σ={noise:g}": gfi_jax.explain(model, noisy, targets, preset=cfg).mask,
    }
    return {k: [pearson(a, b) for a, b in zip(alone, v)] for k, v in other.items()}


# ----------------------------------------------------------------------------- main
def main(argv=None, model=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--weights", default=None, help="converted weights folder (default: cache)")
    ap.add_argument("--data", default=str(DATA), help="imagenet-samples folder (with labels.csv)")
    ap.add_argument("--size", type=int, default=224, help="input side (mosaic cells: half)")
    ap.add_argument("--min-confidence", type=float, default=0.5,
                    help="grid images: correct with at least this probability alone")
    ap.add_argument("--mosaics", type=int, default=200, help="grid pointing mosaics")
    ap.add_argument("--images", type=int, default=300, help="deletion/insertion images")
    ap.add_argument("--steps", type=int, default=56, help="deletion/insertion steps")
    ap.add_argument("--methods", default=None, help="comma list of method names (default: all)")
    ap.add_argument("--gfi", action="append", default=[],
                    help="an extra GFI variant 'NAME:key=value,...' (preset= and Config fields)")
    ap.add_argument("--rise-masks", type=int, default=4000)
    ap.add_argument("--mp-steps", type=int, default=300)
    ap.add_argument("--smoothgrad-samples", type=int, default=50)
    ap.add_argument("--ig-steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--randomization-images", type=int, default=4)
    ap.add_argument("--randomization-every", type=int, default=4,
                    help="explain after every k-th randomized unit (and the last)")
    ap.add_argument("--no-randomization", action="store_true")
    ap.add_argument("--stability-images", type=int, default=8)
    ap.add_argument("--stability-presets", default="detached_lite0,contrastive_lite0,reference",
                    help="comma list of presets or GFI method names of the table")
    ap.add_argument("--no-stability", action="store_true")
    ap.add_argument("--figure-images", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", default=str(common.ROOT / ".cache" / "offline_benchmark"))
    ap.add_argument("--out", default=str(common.RESULTS / "offline_benchmark.md"))
    ap.add_argument("--figure", default=str(common.RESULTS / "offline_benchmark.png"))
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    t_start = time.time()

    specs = method_specs(args)
    model = model or gfi_jax.load_model(args.model, weights=args.weights)
    x, labels, names = load_dataset(model, Path(args.data), args.size)
    probs = predict(model, x)
    log(f"{len(x)} images, top-1 {float((probs.argmax(1) == labels).mean()):.3f}")
    mosaics, cells, grid_targets = grid_tasks(x, labels, probs, args.mosaics, args.seed,
                                              args.min_confidence)
    sel = deletion_tasks(labels, probs, args.images, args.seed)
    cache = Path(args.cache)
    prob_fn = jax.jit(lambda z: jax.nn.softmax(
        model.features(model.params, z, ("logits",))["logits"]))

    results, figure_maps = {}, {}
    for name, spec in specs.items():
        r = results[name] = {}
        if args.mosaics:
            s, r["grid_s"] = saliency(model, name, spec, mosaics, grid_targets, args.batch, cache,
                                      f"grid-{args.mosaics}-{args.seed}", log)
            g = grid_scores(s, cells)
            r["energy"], r["hit"] = g["mean_energy"], g["hit_rate"]
        if args.images:
            s, r["del_s"] = saliency(model, name, spec, x[sel], labels[sel], args.batch, cache,
                                     f"deletion-{args.images}-{args.seed}", log)
            figure_maps[name] = s[:args.figure_images]
            for mode in ("deletion", "insertion"):
                aucs = [metrics.deletion_insertion(prob_fn, x[sel][i:i + 16], s[i:i + 16],
                                                   labels[sel][i:i + 16], mode=mode,
                                                   steps=args.steps)["auc"]
                        for i in range(0, len(sel), 16)]
                r[mode] = float(np.concatenate(aucs).mean())
        log(f"{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in r.items()))

    rand = {}
    if not args.no_randomization and args.images:
        xr, tr = x[sel][:args.randomization_images], labels[sel][:args.randomization_images]
        for name, (method, opts) in specs.items():
            t0 = time.perf_counter()
            out = randomization(model, method, opts, xr, tr, args, cache)
            rho = np.nan_to_num(out["spearman"], nan=1.0)   # a constant map did not change
            half = (len(rho) - 1) // 2   # a level near half of the units
            rand[name] = (float(rho[0].mean()), float(rho[half].mean()), float(rho[-1].mean()),
                          out["layers"][half], out["layers"][0])
            log(f"randomization {name}: {rand[name]} ({time.perf_counter() - t0:.0f} s)")

    stab = {}
    if not args.no_stability and args.images:
        xs, ts = x[sel][:args.stability_images], labels[sel][:args.stability_images]
        for p in args.stability_presets.split(","):
            stab[p] = stability(model, xs, ts, stability_config(p, specs, model), 1e-3,
                                args.seed)
            log(f"stability {p}: " + ", ".join(f"{k} min {min(v):.3f}" for k, v in stab[p].items()))

    lines = report(args, specs, results, rand, stab, names, sel, len(x), probs, labels,
                   time.time() - t_start)
    common.write_results(args.out, f"Offline quality benchmark ({args.model}, ImageNet samples)",
                         lines, common.command("offline_benchmark.py", argv))
    if args.figure and figure_maps:
        write_figure(args.figure, model.preprocessing, x[sel][:args.figure_images], figure_maps,
                     [names[i] for i in sel[:args.figure_images]])
    print("\n".join(lines))
    return {"results": results, "randomization": rand, "stability": stab}


def grid_scores(s, cells) -> dict:
    """Grid scores when some maps have no positive saliency: those count as energy 0 and a
    miss (a method that says nothing has not found the object)."""
    ok = (s > 0).any(axis=(1, 2))
    g = metrics.grid_pointing(s[ok], cells[ok]) if ok.any() else {"energy": [], "hit": []}
    energy, hit = np.zeros(len(s)), np.zeros(len(s), bool)
    energy[ok], hit[ok] = g["energy"], g["hit"]
    return {"mean_energy": float(energy.mean()), "hit_rate": float(hit.mean())}


def report(args, specs, results, rand, stab, names, sel, n_images, probs, labels, seconds):
    def rank(key, reverse):
        vals = {k: v[key] for k, v in results.items() if key in v}
        better = (lambda a, b: a > b) if reverse else (lambda a, b: a < b)  # noqa: E731
        return {k: 1 + sum(better(v, vals[k]) for v in vals.values()) for k in vals}   # ties share
    ranks = {k: rank(*k_r) for k, k_r in {"energy": ("energy", True), "hit": ("hit", True),
                                           "deletion": ("deletion", False),
                                           "insertion": ("insertion", True)}.items()}
    fmt = lambda v: "—" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.3f}"  # noqa: E731
    header = ["method", "grid energy ↑", "grid hit ↑", "deletion AUC ↓", "insertion AUC ↑",
              "randomization ρ: top / half / all ↓", "s/img (grid, deletion)"]
    rows = []
    for name, r in results.items():
        cell = lambda k: (f"{fmt(r.get(k))} ({ranks[k][name]})" if k in r else "—")  # noqa: E731
        rd = rand.get(name)
        rows.append([name, cell("energy"), cell("hit"), cell("deletion"), cell("insertion"),
                     " / ".join(fmt(v) for v in rd[:3]) if rd else "—",
                     f"{fmt(r.get('grid_s'))}, {fmt(r.get('del_s'))}"])
    lines = [
        f"- data: {args.data} ({n_images} images; top-1 "
        f"{float((probs.argmax(1) == labels).mean()):.3f})",
        f"- grid pointing: {args.mosaics} mosaics (2×2 cells of {args.size // 2}², images correct "
        f"with p >= {args.min_confidence:g} alone, "
        f"four classes, one random cell explained); seed {args.seed}",
        f"- deletion/insertion: {len(sel)} correctly classified images, {args.steps} steps, "
        f"blurred substrate (σ 5 px), softmax of the true class; seed {args.seed}",
        *([f"- randomization: {args.randomization_images} of those images, units re-drawn from "
           f"the top down (He-normal, seed {args.seed}); ρ after the units down to "
           f"`{next(iter(rand.values()))[4]}` (the top {args.randomization_every} units), down to "
           f"`{next(iter(rand.values()))[3]}` (about half), and all (Spearman of |maps|, mean "
           f"over images)"] if rand else []),
        "- settings: " + "; ".join(f"{k}: {m}({', '.join(f'{a}={b}' for a, b in o.items())})"
                                   for k, (m, o) in specs.items()),
        f"- run time: {seconds / 60:.1f} min (saliency maps cached under --cache; the s/img "
        "columns are for maps computed in this run, compile included, — when they came from "
        "the cache)",
        "- (n) = rank among the methods in this table; ↑ higher is better, ↓ lower is better",
        "", *common.table(header, rows), ""]
    if stab:
        lines += ["## Stability of the GFI presets (mask Pearson, against the image alone)",
                  "", f"{args.stability_images} of the deletion images.", "",
                  *common.table(["preset", "test", "min", "median"],
                                [[p, t, f"{min(v):.3f}", f"{np.median(v):.3f}"]
                                 for p, d in stab.items() for t, v in d.items()]), ""]
    return lines


def write_figure(path, pre, images, maps: dict, names) -> None:
    """Rows: images; columns: the image, then each method's map over it (Fig. 2's layout)."""
    rows, captions = [], []
    for i, img in enumerate(images):
        rgb = viz.as_rgb((img * np.asarray(pre.std) + np.asarray(pre.mean)) * 255.0)
        rows.append([rgb] + [viz.heatmap(rgb, viz.normalize(np.abs(m[i]))) for m in maps.values()])
        captions.append([Path(names[i]).stem[10:][:22]] + list(maps))
    viz.save_png(path, viz.grid(rows, captions), palette=True)


if __name__ == "__main__":
    main()
    sys.exit(0)
