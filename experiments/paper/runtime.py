"""The runtime numbers of Sec. 4.1.4: seconds per explained image for VGG-19, ResNet-18 and
AlexNet at batch size 1 (the paper: 8.04, 6.43, 4.82 s with PyTorch on a GPU), and per image
at a larger batch.

Compilation is excluded (one warm-up call per shape); each timing is the median of --repeat
calls of `gfi_jax.explain` on the images in --data, resized to 224×224.

    python -m experiments.paper.runtime --data ../shared/data/paper-samples \
        [--models vgg19,resnet18,alexnet] [--batch 8] [--repeat 3]

Data: any folder of images. Weights: `gfi-jax convert <arch> <torchvision .pth>` per model.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import numpy as np

import gfi_jax
from gfi_jax import io
from gfi_jax.testing.random_models import flax_init_model

from experiments import common

PAPER = {"vgg19": 8.04, "resnet18": 6.43, "alexnet": 4.82}   # s / image, batch 1, GPU


def seconds_per_image(model, x: np.ndarray, cfg, repeat: int = 3) -> float:
    """Median wall time of explaining `x` `(B, H, W, 3)` divided by B (after a warm-up)."""
    gfi_jax.explain(model, x, preset=cfg)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        gfi_jax.explain(model, x, preset=cfg)   # returns numpy: the work is done
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) / len(x)


def main(argv=None, models: dict | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="folder of images (or one image)")
    ap.add_argument("--models", default="vgg19,resnet18,alexnet")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--random-init", action="store_true",
                    help="random weights instead of converted ones (the runtime does not depend "
                         "on the weight values; for machines without the converted checkpoints)")
    ap.add_argument("--results", default=None, help="default experiments/results/runtime_<backend>.md")
    common.add_model_args(ap)
    common.add_gfi_args(ap)
    args = ap.parse_args(argv)
    data = Path(args.data)
    files = sorted(p for p in data.iterdir() if p.suffix.lower() in io.IMAGE_EXTENSIONS) \
        if data.is_dir() else [data]
    if not files:
        raise ValueError(f"{data}: no images; expected a folder of .jpg/.png files or one image")
    if models is None:
        models = {n: flax_init_model(n) if args.random_init
                  else gfi_jax.load_model(n, weights=args.weights) for n in args.models.split(",")}
    cfg = common.gfi_config(args)
    rows, out = [], {}
    for name, m in models.items():
        pre = common.preprocessing(m, args.size)
        x = common.load_images([files[i % len(files)] for i in range(args.batch)], pre)
        one = seconds_per_image(m, x[:1], cfg, args.repeat)
        many = seconds_per_image(m, x, cfg, args.repeat)
        out[name] = {"batch1": one, f"batch{args.batch}": many}
        rows.append([name, one, many, PAPER.get(name, "-")])
        print(f"{name}: {one:.3f} s/image at batch 1, {many:.3f} at batch {args.batch} "
              f"(paper, batch 1 on a GPU: {PAPER.get(name, '-')})")
    dev = jax.devices()[0]
    lines = common.table(["model", f"s/image (batch 1, {dev.device_kind})", f"s/image (batch {args.batch})",
                          "paper s/image (batch 1, PyTorch GPU)"], rows)
    lines += ["", ("Random-init weights (--random-init). " if args.random_init else "")
              + f"GFI {cfg.name} preset, {cfg.stage1_steps}+{cfg.stage2_steps} steps, "
              f"{args.size}×{args.size}, median of {args.repeat} after a warm-up call."]
    print("\n".join(lines))
    path = args.results if args.results is not None else str(
        common.RESULTS / f"runtime_{jax.default_backend()}.md")
    common.write_results(path, "Runtime: seconds per explained image", lines,
                         common.command("experiments.paper.runtime", argv))
    return out


if __name__ == "__main__":
    main()
