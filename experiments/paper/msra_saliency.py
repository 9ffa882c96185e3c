"""Fig. 8: salient-object detection on MSRA-B with GFI's first stage only (guided feature
inversion, no class term), the paper's Sec. 4.4.2.

Each image is resized to 224×224, explained with stage 1 only (`stage2_steps=0`), and its
mask, resized back to the image, is scored against the ground-truth mask: precision, recall
and F_β (β² = 0.3) after binarizing at twice the map's mean, and MAE. The paper gives
Fig. 8 as bar charts without numbers; its text says GFI is slightly better than SS and SIM
and comparable with RC, FT, SF and BL, so the printed "paper" column is that statement.

    python -m experiments.paper.msra_saliency --data MSRA-B [--names test.txt] [--limit 500]

Data (not downloaded by this script): MSRA-B (5000 images with pixel-wise masks, Jiang et
al.'s DRFI release, "MSRA-B.zip"): `<stem>.jpg` images with `<stem>.png` masks in one folder
(or images/ and masks/ folders). VGG-19 weights: `gfi-jax convert vgg19 <vgg19 .pth>`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

import gfi_jax
from gfi_jax.metrics import salient_object

from experiments import common
from experiments.paper import datasets

PAPER = "bars only (Fig. 8): GFI slightly better than SS and SIM on both metrics"


def load_mask(path: Path) -> np.ndarray:
    """A ground-truth mask image -> `(H, W)` bool (foreground where the value is over half)."""
    a = np.asarray(Image.open(path).convert("L"), np.float32)
    return a > 127.5


def evaluate(model, pairs, cfg: gfi_jax.Config, size: int = 224, batch: int = 8) -> dict:
    """Per-image precision, recall, F_β and MAE of the stage-1 masks; their means."""
    pre = common.preprocessing(model, size)
    per = {"precision": [], "recall": [], "f": [], "mae": []}
    for chunk in common.batches(pairs, batch):
        x = common.load_images([p for p, _ in chunk], pre)
        masks = gfi_jax.explain(model, x, preset=cfg).mask
        for m, (_, g) in zip(masks, chunk):
            gt = load_mask(g)
            s = np.clip(common.resize_map(m, gt.shape[::-1]), 0.0, 1.0)
            r = salient_object(s, gt)
            for k, v in per.items():
                v.append(r[k][0])
    out = {k: np.asarray(v) for k, v in per.items()}
    return out | {f"mean_{k}": float(v.mean()) for k, v in out.items()}


def main(argv=None, model=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="MSRA-B folder of image/mask pairs")
    ap.add_argument("--names", default=None, help="optional list of image names to use")
    ap.add_argument("--results", default=str(common.RESULTS / "msra_saliency.md"))
    common.add_model_args(ap)
    common.add_gfi_args(ap)
    args = ap.parse_args(argv)
    pairs = datasets.msra_b(args.data, args.names)[:args.limit]
    model = common.load(args, model)
    cfg = common.gfi_config(args, stage2_steps=0)   # stage 1 only: the inversion mask
    res = evaluate(model, pairs, cfg, args.size, args.batch)
    rows = [["GFI stage 1", len(res["f"]), res["mean_precision"], res["mean_recall"],
             res["mean_f"], res["mean_mae"], PAPER]]
    lines = common.table(["method", "images", "precision", "recall", "F_β", "MAE", "paper"], rows)
    print("\n".join(lines))
    common.write_results(args.results, f"Fig. 8: MSRA-B salient objects ({model.name}, "
                         f"{args.preset} preset, stage 1 only)", lines,
                         common.command("experiments.paper.msra_saliency", argv))
    return res


if __name__ == "__main__":
    main()
