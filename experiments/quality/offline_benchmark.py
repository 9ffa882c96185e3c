"""Offline quality benchmark: every method on a real ImageNet model and the ImageNet sample
photographs, no download needed, per-item scores kept in a store that runs add to.

Tasks, on one split of the photographs (`tasks.py`: tune or test, fixed by class):
- grid pointing game (Böhle et al. 2022): 2×2 mosaics of four confidently classified images
  of four classes, each cell the image shrunk 2×; one cell's class is explained. Energy
  fraction inside the cell and arg-max hit (chance: 0.25);
- on correctly classified images: deletion and insertion AUC (Petsiuk et al. 2018, blurred
  substrate) and ROAD (Rong et al. 2022, noisy linear imputation) in MoRF and LeRF order,
  the true class's softmax probability.

    python -m experiments.quality.offline_benchmark --split test          # fill, then report
    python -m experiments.quality.offline_benchmark --split tune --methods "GFI default" \\
        --gfi "GFI area2:preset=detached_lite0,area=2" --mosaics 64 --images 64
    python -m experiments.quality.offline_benchmark --split test --report-only

Scores go to --store (`store.py`, one jsonl file per model and method, committed): an item
already stored under the same config and code version is not computed again, so runs add
up and a killed run resumes. The report is made from the store alone: each metric's mean
with a 95% bootstrap interval, and the paired difference to the GFI default with its own.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import numpy as np

import gfi_jax
from experiments import common
from experiments.quality import methods as M
from experiments.quality import report, tasks
from experiments.quality.store import Store, config_hash
from gfi_jax import metrics
from gfi_jax.metrics.road import LEVELS as ROAD_LEVELS

DATA = common.ROOT.parent / "shared" / "data" / "imagenet-samples"
STORE = common.RESULTS / "quality"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--weights", default=None, help="converted weights folder (default: cache)")
    ap.add_argument("--data", default=str(DATA), help="imagenet-samples folder (with labels.csv)")
    ap.add_argument("--split", choices=list(tasks.SPLITS), required=True)
    ap.add_argument("--min-confidence", type=float, default=0.5,
                    help="grid images: correct with at least this probability alone")
    ap.add_argument("--mosaics", type=int, default=200, help="grid pointing mosaics")
    ap.add_argument("--images", type=int, default=200, help="deletion/insertion/ROAD images")
    ap.add_argument("--steps", type=int, default=56, help="deletion/insertion steps")
    ap.add_argument("--road-noise", type=float, default=0.01)
    ap.add_argument("--methods", default=None,
                    help="comma list of method names or their prefixes (default: all)")
    ap.add_argument("--gfi", action="append", default=[],
                    help="an extra GFI variant 'NAME:key=value,...' (preset= and Config fields)")
    ap.add_argument("--tasks", default="grid,image", help="grid, image or both")
    ap.add_argument("--rise-masks", type=int, default=1000)
    ap.add_argument("--mp-steps", type=int, default=100)
    ap.add_argument("--smoothgrad-samples", type=int, default=50)
    ap.add_argument("--ig-steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--limit-seconds", type=float, default=None,
                    help="stop adding rows after this long (the store keeps what is done)")
    ap.add_argument("--probe-tolerance", type=float, default=1e-3,
                    help="largest relative change of a method's probe maps under one code version")
    ap.add_argument("--report-only", action="store_true", help="no computing: tables from the store")
    ap.add_argument("--paired-with", default=None,
                    help="the row the Δ columns pair with (default: the first, the GFI default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--store", default=str(STORE))
    ap.add_argument("--out", default=None, help="results markdown (default: "
                    "experiments/results/quality_<model>_<split>.md)")
    ap.add_argument("--figure", default=None, help="quality-against-cost PNG (default: next to --out)")
    ap.add_argument("--quiet", action="store_true")
    return ap.parse_args(argv)


def task_settings(args, task: str, size: int) -> dict:
    """The task settings that change a score, and so enter the config hash."""
    common_ = {"split_rule": tasks.SPLIT_RULE, "size": size}
    if task == "grid":
        return {**common_, "task": "grid", "min_confidence": args.min_confidence}
    return {**common_, "task": "image", "steps": args.steps, "substrate": "blur 5",
            "road_levels": list(ROAD_LEVELS), "road_noise": args.road_noise}


# ----------------------------------------------------------------------------- scoring
def grid_rows(maps: np.ndarray, items) -> list[dict]:
    """Energy and hit per mosaic; a map with no positive saliency counts as energy 0 and a
    miss (a method that says nothing has not found the object)."""
    ok = (maps > 0).any(axis=(1, 2))
    energy, hit = np.zeros(len(maps)), np.zeros(len(maps), bool)
    if ok.any():
        g = metrics.grid_pointing(maps[ok], np.array([it.cell for it in items])[ok])
        energy[ok], hit[ok] = g["energy"], g["hit"]
    return [{"energy": float(e), "hit": float(h)} for e, h in zip(energy, hit)]


def image_rows(prob_fn, x, maps, targets, ids, args) -> list[dict]:
    """Deletion and insertion AUC and ROAD MoRF / LeRF per image; ROAD's noise is seeded by
    the item id, so it does not depend on the batch."""
    out = {}
    for mode in ("deletion", "insertion"):
        out[mode] = metrics.deletion_insertion(prob_fn, x, maps, targets, mode=mode,
                                               steps=args.steps)["auc"]
    seeds = [int.from_bytes(i.encode()[-8:].rjust(8, b"\0"), "little") % 2**31 for i in ids]
    for order in ("morf", "lerf"):
        out[f"road_{order}"] = metrics.road(prob_fn, x, maps, targets, order,
                                            noise=args.road_noise, seed=seeds)["score"]
    return [{k: float(v[i]) for k, v in out.items()} for i in range(len(ids))]


# ----------------------------------------------------------------------------- filling
def fill(model, ds, store: Store, name: str, spec, items, task: str, args, log,
         deadline: float) -> int:
    """Computes the items of `task` that `store` lacks for this method and config; returns
    how many were added. Writes after every batch, so a kill loses at most one batch."""
    method, opts = spec
    cfg, code = config_hash(M.describe(model, method, opts, task_settings(args, task, ds.x.shape[1]))), \
        M.CODE_VERSIONS[method]
    have = store.scores(name, cfg, code, task)
    todo = [it for it in items if it.id not in have]
    if not todo:
        return 0
    check_probe(store, model, name, method, opts, code, args.probe_tolerance)
    prob_fn = jax.jit(lambda z: jax.nn.softmax(
        model.features(model.params, z, ("logits",))["logits"]))
    added = 0
    for i in range(0, len(todo), args.batch):
        if time.time() > deadline:
            log(f"  {name} [{task}]: time limit reached; {added} added")
            break
        chunk = todo[i:i + args.batch]
        x = tasks.mosaics(ds, chunk) if task == "grid" else ds.x[[it.index for it in chunk]]
        t = np.array([it.target for it in chunk])
        t0 = time.perf_counter()
        maps = np.asarray(gfi_jax.attribute(model, x, method, t, **opts), np.float32)
        seconds = (time.perf_counter() - t0) / len(chunk)
        scores = grid_rows(maps, chunk) if task == "grid" else \
            image_rows(prob_fn, x, maps, t, [it.id for it in chunk], args)
        added += store.add(name, [
            {"method": name, "config": cfg, "code": code, "task": task, "item": it.id,
             "split": args.split, "scores": s, "seconds": seconds}
            for it, s in zip(chunk, scores)])
        log(f"  {name} [{task}] {len(items) - len(todo) + added}/{len(items)}  "
            f"{seconds:.2f} s/map")
    return added


def check_probe(store: Store, model, name: str, method: str, opts: dict, code: str,
                tolerance: float) -> None:
    """Refuses to add rows when the method's maps on the probe input moved under an unchanged
    code version (a change that forgot to bump `methods.CODE_VERSIONS`).

    Probes are compared within one numerical platform only (`numerics`): XLA:CPU compiles for
    the host's vector units, and GFI's optimization amplifies the last-bit differences, so the
    same code gives the default preset's probe a Pearson of 0.87 between an AVX2 and an
    AVX-512 machine. Rows from several machines are pooled, as samples of the same method."""
    key = f"{name}|{config_hash([method, opts])}|{code}|{numerics()}"
    now = M.probe_maps(model, method, opts)
    old = store.probe(key)
    if old is None:
        store.set_probe(key, now)
        return
    scale = max(float(np.abs(old).max()), 1e-12)
    change = float(np.abs(now - old).max()) / scale
    if change > tolerance:
        raise SystemExit(f"error: {name}'s maps on the probe input changed by {change:.2g} "
                         f"(relative) under code version {code!r}; bump "
                         f"CODE_VERSIONS[{method!r}] in experiments/quality/methods.py, or pass "
                         "--probe-tolerance if the difference is the platform's rounding")


def numerics() -> str:
    """A short tag of what decides a program's rounding: jax/jaxlib, backend, device kind and,
    on CPU, the host's vector extensions (which XLA:CPU compiles for)."""
    import jaxlib
    dev = jax.devices()[0]
    simd = ""
    if dev.platform == "cpu" and Path("/proc/cpuinfo").is_file():
        flags = next((ln.split(":", 1)[1].split() for ln in
                      Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), [])
        simd = ",".join(sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "sse"))))
    return config_hash([jax.__version__, jaxlib.__version__, dev.platform, dev.device_kind, simd])


# ----------------------------------------------------------------------------- main
def main(argv=None, model=None) -> dict:
    args = parse_args(argv)
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    t_start = time.time()
    deadline = t_start + args.limit_seconds if args.limit_seconds else float("inf")
    model = model or gfi_jax.load_model(args.model, weights=args.weights)
    specs = M.specs(args, model)
    if args.paired_with is not None and args.paired_with not in specs:
        raise SystemExit(f"--paired-with {args.paired_with!r} is not a row of this run; "
                         f"choose one of: {', '.join(specs)}")
    ds = tasks.load(model, Path(args.data))
    items = {"grid": tasks.grid_items(ds, args.split, args.mosaics, args.seed,
                                      args.min_confidence),
             "image": tasks.image_items(ds, args.split, args.images, args.seed)}
    wanted = [t.strip() for t in args.tasks.split(",")]
    store = Store(args.store, model.name)
    if not args.report_only:
        for task in wanted:
            for name, spec in specs.items():
                fill(model, ds, store, name, spec, items[task], task, args, log, deadline)
    rows = {task: {name: collect(store, model, ds, name, spec, items[task], task, args)
                   for name, spec in specs.items()} for task in wanted}
    out = Path(args.out or common.RESULTS / f"quality_{model.name}_{args.split}.md")
    figure = Path(args.figure or out.with_suffix(".png"))
    costs = M.gflops(model, specs, ds.x.shape[1:3])
    lines = report.markdown(args, model, specs, rows, costs, ds, items, figure.name)
    common.write_results(out, f"Offline quality benchmark: {model.name}, {args.split} split",
                         lines, command(argv))
    if "grid" in rows:
        report.figure(figure, rows["grid"], costs, f"{model.name}, {args.split} split")
    log(f"wrote {out} ({(time.time() - t_start) / 60:.1f} min)")
    return rows


def command(argv) -> str:
    """This run's command line (argv None: the process's own), as a module run from the root."""
    import shlex
    return " ".join(["python -m experiments.quality.offline_benchmark",
                     *map(shlex.quote, sys.argv[1:] if argv is None else argv)])


def collect(store: Store, model, ds, name: str, spec, items, task: str, args) -> dict[str, dict]:
    """item id -> row, for the requested items that the store holds under the current config."""
    method, opts = spec
    cfg = config_hash(M.describe(model, method, opts, task_settings(args, task, ds.x.shape[1])))
    have = store.scores(name, cfg, M.CODE_VERSIONS[method], task)
    return {it.id: have[it.id] for it in items if it.id in have}


if __name__ == "__main__":
    main()
    sys.exit(0)
