"""Fig. 4: an FGSM adversarial example (Goodfellow et al. 2015), explained by GFI for its
true class (the paper's Sec. 4.1.3: "trailer truck" 95.8% turned into "container ship"
48.0%, and GFI still locates the truck).

x_adv = clip(x + ε·sign(∇ₓ CE(f(x), y))), ε in pixel units of [0, 1]. Printed: the clean and
adversarial predictions, and how similar the true-class explanations of the clean and the
adversarial image are (Pearson of the masks). Writes a figure: original | adversarial |
GFI mask for the true class on the adversarial image | the masked image Φ.

    python -m experiments.paper.adversarial --data IMAGE [--label 867] [--epsilon 0.01] \
        [--out experiments/results/adversarial.png]

Data: any image; the paper's is a trailer truck (ImageNet class 867). VGG-19 weights:
`gfi-jax convert vgg19 <torchvision vgg19-dcbb9e9d.pth>`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import gfi_jax
from gfi_jax import io, viz

from experiments import common

PAPER = "trailer truck 95.8% -> container ship 48.0%; GFI still highlights the truck"


def fgsm(model, x: np.ndarray, labels: np.ndarray, epsilon: float) -> np.ndarray:
    """One signed-gradient step of size ε (in [0, 1] pixel units) up the cross-entropy of
    `labels`, for preprocessed `x` `(B, H, W, 3)`; the result stays a valid image."""
    pre = model.preprocessing
    std = np.asarray(pre.std, np.float32)
    lo, hi = (0 - np.asarray(pre.mean)) / std, (1 - np.asarray(pre.mean)) / std

    def loss(x):
        logits = model.features(model.params, x, ("logits",))["logits"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).sum()

    g = jax.jit(jax.grad(loss))(jnp.asarray(x))
    return np.clip(x + epsilon / std * np.sign(np.asarray(g)), lo, hi).astype(np.float32)


def to_rgb(model, x: np.ndarray) -> np.ndarray:
    """A preprocessed image `(H, W, 3)` back to uint8 RGB."""
    pre = model.preprocessing
    return np.clip((x * np.asarray(pre.std) + np.asarray(pre.mean)) * 255 + 0.5, 0, 255).astype(np.uint8)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else float("nan")


def run(model, image_path, label: int | None, epsilon: float, cfg, size: int = 224) -> dict:
    """FGSM on one image for its true `label` (None: the clean top-1), then GFI for that class
    on the clean and the adversarial image. "pearson" is NaN where a mask is constant."""
    if label is not None and not 0 <= label < len(model.classes):
        raise ValueError(f"--label {label} is outside the model's {len(model.classes)} classes")
    pre = common.preprocessing(model, size)
    x = common.load_images([image_path], pre)
    probs = lambda z: np.asarray(jax.nn.softmax(model(z)["logits"]))[0]  # noqa: E731
    p = probs(x)
    y = int(p.argmax()) if label is None else int(label)
    x_adv = fgsm(model, x, np.array([y]), epsilon)
    pa = probs(x_adv)
    e = gfi_jax.explain(model, np.concatenate([x, x_adv]), np.array([y, y]), preset=cfg)
    return {"x": x[0], "x_adv": x_adv[0], "label": y, "p_clean": p, "p_adv": pa,
            "mask_clean": e.mask[0], "mask_adv": e.mask[1],
            "pearson": pearson(e.mask[0], e.mask[1])}


def figure(model, r: dict):
    c, name = model.classes, lambda i: model.classes[i]  # noqa: E731
    y, ya = r["label"], int(r["p_adv"].argmax())
    rgb, adv = to_rgb(model, r["x"]), to_rgb(model, r["x_adv"])
    panels = [rgb, adv, viz.heatmap(adv, r["mask_adv"]), viz.masked(adv, r["mask_adv"])]
    caps = [f"{name(int(r['p_clean'].argmax()))} {r['p_clean'].max():.1%}",
            f"adv: {name(ya)} {r['p_adv'][ya]:.1%}", f"GFI for {c[y]}", "masked"]
    return viz.grid([panels], [caps], ["(a) original  (b) FGSM  (c) GFI for the true class  (d) masked image"])


def main(argv=None, model=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="an image file")
    ap.add_argument("--label", type=int, default=None, help="true class (default: clean top-1)")
    ap.add_argument("--epsilon", type=float, default=0.01, help="FGSM step, [0, 1] pixel units")
    ap.add_argument("--out", default=str(common.RESULTS / "adversarial.png"))
    common.add_model_args(ap)
    common.add_gfi_args(ap)
    args = ap.parse_args(argv)
    io.load_image(args.data)   # a clear error for a bad path before loading the model
    model = common.load(args, model)
    r = run(model, args.data, args.label, args.epsilon, common.gfi_config(args), args.size)
    y, ya = r["label"], int(r["p_adv"].argmax())
    lines = [(f"- clean: {model.classes[int(r['p_clean'].argmax())]} {r['p_clean'].max():.1%}; "
              f"FGSM ε={args.epsilon:g}: {model.classes[ya]} {r['p_adv'][ya]:.1%} "
              f"(true class {model.classes[y]} {r['p_adv'][y]:.1%})"),
             f"- true-class mask Pearson, clean vs adversarial: {r['pearson']:.3f}",
             f"- paper: {PAPER}", f"- figure: {Path(args.out).name}"]
    print("\n".join(lines))
    viz.save_png(args.out, figure(model, r), palette=True)
    common.write_results(Path(args.out).with_suffix(".md"), f"Fig. 4: FGSM adversarial example "
                         f"({model.name}, {args.preset} preset)", lines,
                         common.command("experiments.paper.adversarial", argv))
    print(f"wrote {args.out} and its .md")
    return r


if __name__ == "__main__":
    main()
