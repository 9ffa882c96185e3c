"""Are GFI's unstable masks near-ties of its own objective?

`stability.py` finds images whose mask changes much under bfloat16 or an input noise of 1e-3.
This asks why. J(m) is the part of stage 2's loss that depends on the mask alone
(`gfi.mask_terms`: −log f_c(Φ) + λ·f_c(Φ_bg) + area·mean(m) for the Lite0 default), always on
the clean float32 image; the penalty on ω is left out, since the normalized mask does not
depend on ω's scale. For each image, m_a is the mask of the image explained alone in float32,
m_v the perturbed run's (its final ω on the clean image's basis), m_1 stage 1's mask (where
stage 2 starts). Against the drop D = J(m_1) − J(m_a) that stage 2 achieves:
- gap = (J(m_v) − J(m_a)) / D: how much worse the perturbed answer is for the clean objective;
- barrier = (max of J on the straight path m_a -> m_v − max of its ends) / D: whether a ridge
  separates them.
A gap near 0 (or below) and no barrier with a low mask Pearson means the objective is flat
across very different masks: which one the optimizer reaches is then decided by rounding, and
no optimizer setting can make it stable without changing the objective.

    python -m experiments.quality.ties --split test --n 16

Writes experiments/results/ties_<model>_<split>_<backend>.md (command, machine, date).
"""
from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import gfi_jax
from experiments import common
from experiments.quality import stability
from gfi_jax import gfi as G

PATH = np.linspace(0.0, 1.0, 11)   # points on the straight path m_a -> m_v


def clean_problem(model, x: np.ndarray, cfg: G.Config) -> G.Problem:
    """The float32 stage-2 problem of the clean images, as `gfi` builds it."""
    x = jnp.asarray(x, jnp.float32)
    _, f1, splits, _ = G.clean_features(model.features, model.params, x, cfg)
    return G.Problem(model.features, model.params, x, G.background(x, cfg), f1, splits, cfg)


def objective(problem: G.Problem, c: np.ndarray):
    """m `(N, H, W)` -> J(m) per row, jitted; and ω -> its mask on the clean basis."""
    pb, c = problem, jnp.asarray(c)
    J = jax.jit(lambda m: G.mask_terms(m, *G.blend_logits(pb, m), c, pb.cfg))
    to_mask = jax.jit(lambda w: G.mask(w, pb.f1, pb.hw, pb.cfg, pb.splits))
    return J, to_mask


def rows(model, x, t, preset: str | G.Config, noise: float, seed: int) -> list[list]:
    """One table row per (test, image): mask Pearson, D, J(m_a), J(m_v), gap/D, barrier/D."""
    cfg = G.resolve_layers(gfi_jax.preset(preset, arch=model.arch.name), model.arch)
    if cfg.stage2_init != "stage1":
        raise ValueError(f"preset {cfg.name!r} starts stage 2 from {cfg.stage2_init!r}, not "
                         "stage 1's ω: this probe's D needs the stage-1 start")
    alone = gfi_jax.explain(model, x, t, preset=cfg, sequential=True)
    s1 = gfi_jax.explain(model, x, t, preset=dataclasses.replace(cfg, stage2_steps=0),
                         sequential=True)                   # stage 1 alone: stage 2's start
    noisy = x + np.random.default_rng(seed).normal(0, noise, x.shape).astype(np.float32)
    variants = {stability.TESTS[1]: gfi_jax.explain(model.astype("bfloat16"), x, t, preset=cfg),
                stability.TESTS[2]: gfi_jax.explain(model, noisy, t, preset=cfg)}
    J, to_mask = objective(clean_problem(model, x, cfg), t)
    ma = to_mask(alone.omega)
    ja, drop = np.asarray(J(ma)), np.asarray(J(to_mask(s1.omega)) - J(ma))
    out = []
    for test, v in variants.items():
        mv = to_mask(v.omega)
        path = np.stack([np.asarray(J((1 - s) * ma + s * mv)) for s in PATH], 1)
        for i in range(len(x)):
            r = stability.pearson(alone.mask[i], v.mask[i])
            gap = (path[i, -1] - path[i, 0]) / drop[i]
            barrier = (path[i].max() - max(path[i, 0], path[i, -1])) / drop[i]
            out.append([cfg.name, test, i, f"{r:.3f}", f"{drop[i]:.3f}", f"{ja[i]:.4f}",
                        f"{path[i, -1]:.4f}", f"{gap:+.3f}", f"{barrier:.3f}"])
    return out


def main(argv=None) -> int:
    args = stability.parser(__doc__.split("\n\n")[0]).parse_args(argv)
    model, x, t, presets, items = stability.images(args)
    t0 = time.time()
    table = [r for p in presets for r in rows(model, x, t, p, args.noise, args.seed)]
    header = ["preset", "test", "image", "mask Pearson", "stage-2 drop D", "J(m_a)", "J(m_v)",
              "gap / D", "barrier / D"]
    lines = [f"- images: the first {len(items)} deletion images of the **{args.split}** split "
             f"(as `stability.py`), target: the true class; noise σ = {args.noise:g}",
             "- J: the mask terms of the clean image's float32 stage-2 loss (`gfi.mask_terms`); "
             "m_a: the mask of the image explained alone in float32; m_v: the perturbed run's "
             "final ω on the clean basis; D = J(stage 1's mask) − J(m_a); path: 11 points on "
             "the straight line m_a -> m_v", "", *common.table(header, table), "",
             f"Run time {time.time() - t0:.0f} s."]
    out = Path(args.out or common.RESULTS /
               f"ties_{model.name}_{args.split}_{jax.default_backend()}.md")
    common.write_results(out, f"GFI stability and the objective's ties: {model.name}, "
                         f"{args.split} split", lines, common.command("experiments.quality.ties",
                                                                      argv))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
