"""Fig. 3 (class discriminability) and Fig. 5 (three architectures) as PNG figures.

Fig. 3: one image; columns: the input, the stage-1 inversion mask (all foreground objects),
and the final GFI masks for two classes (the paper: "African elephant" 95.3% and "zebra"
0.2%, classes 386 and 340). Fig. 5: rows of images, columns VGG-19 / ResNet-18 / AlexNet with
the paper's layers for each (Sec. 4.1.4).

    python -m experiments.paper.figures --fig 3 --data elephant_zebra.jpg [--classes 386,340]
    python -m experiments.paper.figures --fig 5 --data a.jpg b.jpg [--models vgg19,resnet18,alexnet]

Data: any images (the paper's are not published separately; ../shared/data/paper-samples has
ImageNet validation images). Weights: `gfi-jax convert <arch> <torchvision .pth>` per model.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import gfi_jax
from gfi_jax import io, viz

from experiments import common


def fig3(model, path, classes, cfg: gfi_jax.Config, size: int = 224):
    """Input | inversion (stage 1) | GFI for classes[0] | GFI for classes[1]."""
    pre = common.preprocessing(model, size)
    x = common.load_images([path], pre)
    rgb = np.asarray(pre.resize_image(io.load_image(path)))
    probs = np.asarray(model(x)["logits"])[0]
    probs = np.exp(probs - probs.max())
    probs /= probs.sum()
    t = np.asarray(classes if classes else np.argsort(-probs)[:2], np.int32)
    inv = gfi_jax.explain(model, x, preset=gfi_jax.preset(cfg, stage2_steps=0)).mask[0]
    e = gfi_jax.explain(model, x, t[None], preset=cfg)
    panels = [rgb, viz.heatmap(rgb, inv), *(viz.heatmap(rgb, m) for m in e.mask)]
    caps = ["(a) input", "(b) inversion", *(f"({'cd'[i]}) {model.classes[c]} {probs[c]:.1%}"
                                             for i, c in enumerate(t))]
    return viz.grid([panels], [caps]), t


def fig5(models: dict, paths, cfg: gfi_jax.Config, size: int = 224):
    """Rows: images; columns: the input and each model's GFI mask for its top-1 class."""
    rows, caps = [], []
    for path in paths:
        rgb = None
        row, cap = [], []
        for name, m in models.items():
            pre = common.preprocessing(m, size)
            rgb = np.asarray(pre.resize_image(io.load_image(path))) if rgb is None else rgb
            e = gfi_jax.explain(m, common.load_images([path], pre), preset=cfg)
            row.append(viz.heatmap(rgb, e.mask[0]))
            cap.append(f"{name}: {m.classes[e.target[0]]}")
        rows.append([rgb, *row])
        caps.append([Path(path).name, *cap])
    return viz.grid(rows, caps)


def main(argv=None, models: dict | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fig", choices=("3", "5"), required=True)
    ap.add_argument("--data", nargs="+", required=True, help="image file(s)")
    ap.add_argument("--classes", default=None, help="Fig. 3: two class indices (default: top-2)")
    ap.add_argument("--models", default="vgg19,resnet18,alexnet", help="Fig. 5's architectures")
    ap.add_argument("--out", default=None, help="PNG (default experiments/results/fig<N>.png)")
    common.add_model_args(ap)
    common.add_gfi_args(ap)
    args = ap.parse_args(argv)
    for p in args.data:
        io.load_image(p)   # a clear error for a bad path before loading any model
    names = [args.model] if args.fig == "3" else args.models.split(",")
    if models is None:
        models = {n: gfi_jax.load_model(n, weights=args.weights) for n in names}
    cfg = common.gfi_config(args)
    out = Path(args.out or common.RESULTS / f"fig{args.fig}.png")
    if args.fig == "3":
        classes = [int(c) for c in args.classes.split(",")] if args.classes else None
        img, t = fig3(next(iter(models.values())), args.data[0], classes, cfg, args.size)
        print(f"Fig. 3: explained classes {t.tolist()} (paper: African elephant 95.3%, zebra 0.2%)")
    else:
        img = fig5(models, args.data, cfg, args.size)
        print(f"Fig. 5: {len(args.data)} image(s) × {', '.join(models)}")
    viz.save_png(out, img, palette=True)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
