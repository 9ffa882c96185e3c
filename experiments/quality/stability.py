"""How stable is each GFI preset? Mask Pearson of an image explained alone in float32 against
the same image (a) inside one batched computation, (b) in bfloat16, (c) with input noise.

GFI's optimization amplifies rounding noise (Adam's eps turns near-zero gradients into full
steps; the min/max normalization can switch its arg-min/arg-max), so these numbers measure how
much an explanation depends on things it should not depend on. The images are the first `--n`
deletion images of a split (`tasks.image_items`), the target their true class.

    python -m experiments.quality.stability --split test --n 16 --presets detached_lite0,reference

Writes experiments/results/stability_<model>_<split>_<backend>.md (command, machine, date).
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
from experiments.quality import tasks

DATA = common.ROOT.parent / "shared" / "data" / "imagenet-samples"
TESTS = ("batch (one batched computation)", "bfloat16 vs float32", "input noise")


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else float(np.array_equal(a, b))


def preset_rows(model, x: np.ndarray, t: np.ndarray, preset: str, noise: float,
                seed: int) -> dict[str, list[float]]:
    """{test: per-image Pearson against the image explained alone in float32}."""
    cfg = gfi_jax.preset(preset)
    alone = gfi_jax.explain(model, x, t, preset=cfg, sequential=True).mask   # = one by one
    noisy = x + np.random.default_rng(seed).normal(0, noise, x.shape).astype(np.float32)
    variants = {
        TESTS[0]: gfi_jax.explain(model, x, t, preset=cfg, sequential=False).mask,
        TESTS[1]: gfi_jax.explain(model.astype("bfloat16"), x, t, preset=cfg).mask,
        TESTS[2]: gfi_jax.explain(model, noisy, t, preset=cfg).mask,
    }
    return {k: [pearson(a, b) for a, b in zip(alone, v)] for k, v in variants.items()}


def parser(description: str) -> argparse.ArgumentParser:
    """The arguments of this script and of `ties.py`: which images, presets and noise."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--weights", default=None, help="weights folder (default: the cache)")
    ap.add_argument("--data", default=str(DATA), help="imagenet-samples folder (with labels.csv)")
    ap.add_argument("--split", choices=list(tasks.SPLITS), default="test")
    ap.add_argument("--n", type=int, default=16, help="number of images")
    ap.add_argument("--presets", default=None, help="comma list (default: the model's default)")
    ap.add_argument("--noise", type=float, default=1e-3, help="std of the input noise")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    return ap


def images(args) -> tuple:
    """(model, images x, true classes t, presets, items) for parsed `parser` arguments."""
    model = gfi_jax.load_model(args.model, weights=args.weights)
    ds = tasks.load(model, Path(args.data))
    items = tasks.image_items(ds, args.split, args.n, args.seed)
    x, t = ds.x[[it.index for it in items]], np.array([it.target for it in items])
    presets = (args.presets or gfi_jax.gfi.default_preset(model.name)).split(",")
    return model, x, t, presets, items


def main(argv=None) -> int:
    args = parser(__doc__.split("\n\n")[0]).parse_args(argv)
    model, x, t, presets, items = images(args)
    lines = [f"- images: the first {len(items)} deletion images of the **{args.split}** split "
             f"(`tasks.image_items`), target: the true class; noise σ = {args.noise:g}", "",
             "| preset | test | worst | median | ≥ 0.98 | per image |", "|---|---|---|---|---|---|"]
    t0 = time.time()
    for preset in presets:
        for test, r in preset_rows(model, x, t, preset, args.noise, args.seed).items():
            lines.append(f"| {preset} | {test} | {min(r):.3f} | {np.median(r):.3f} | "
                         f"{sum(v >= 0.98 for v in r)}/{len(r)} | "
                         + ", ".join(f"{v:.3f}" for v in r) + " |")
            print(lines[-1], file=sys.stderr, flush=True)
    lines += ["", f"Run time {time.time() - t0:.0f} s. Pearson 1 means identical masks. 'alone' "
              "is `explain(..., sequential=True)`, bit for bit each image explained by itself "
              "(the CPU default); 'one batched computation' is the accelerator default, where "
              "kernels round differently for different batch sizes."]
    out = Path(args.out or common.RESULTS /
               f"stability_{model.name}_{args.split}_{jax.default_backend()}.md")
    common.write_results(out, f"GFI stability: {model.name}, {args.split} split", lines,
                         common.command("experiments.quality.stability", argv))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
