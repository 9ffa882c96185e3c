"""The benchmark's methods: their settings, code versions, config hashes and analytic cost.

CODE_VERSIONS is the "method code version" of every stored row: bump a method's entry when
a change makes its maps differ, and its old rows stop counting. `probe` guards against a
forgotten bump: the benchmark keeps each (method, version)'s maps on a small fixed input and
refuses to add rows when the maps have moved under the same version.
"""
from __future__ import annotations

import dataclasses

import numpy as np

import gfi_jax
from gfi_jax import gfi as G
from gfi_jax.methods import make_config

CODE_VERSIONS = {"gfi": "1", "grad": "1", "guided_backprop": "1", "smoothgrad": "1",
                 "integrated_gradients": "1", "gradcam": "1", "cam": "1", "rise": "1",
                 "meaningful_perturbation": "1", "center": "1"}

# The paper's and the methods' own defaults where this CPU can afford them.
FULL = {"rise": {"masks": 4000}, "meaningful_perturbation": {"steps": 300}}


def specs(args, model) -> dict[str, tuple[str, dict]]:
    """Row name -> (registry method, options), in the table's order."""
    default = G.default_preset(model.arch.name)
    out = {
        f"GFI default ({default})": ("gfi", {"preset": default}),
        "GFI reference": ("gfi", {"preset": "reference"}),
        "GFI paper": ("gfi", {"preset": "paper"}),
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
    if default == "reference":  # one row, not the same preset run twice under two names
        del out["GFI reference"]
    for spec in args.gfi:
        name, _, opts = spec.partition(":")
        if not name or not opts:
            raise SystemExit(f"error: --gfi {spec!r}: expected 'NAME:key=value,...'")
        out[name] = ("gfi", gfi_options(opts.split(",")))
    if args.methods:
        wanted = [m.strip() for m in args.methods.split(",")] + [s.partition(":")[0]
                                                                 for s in args.gfi]
        alias = {"GFI reference": f"GFI default ({default})"} if default == "reference" else {}
        wanted = [alias.get(w, w) for w in wanted]
        wanted = [next((k for k in out if k.startswith(w)), w) for w in wanted]
        unknown = [m for m in wanted if m not in out]
        if unknown:
            raise SystemExit(f"error: unknown method(s) {unknown}; choose from {list(out)}")
        out = {k: v for k, v in out.items() if k in wanted}
    return out


def gfi_options(pairs: list[str]) -> dict:
    """`["preset=reference", "stage2_steps=20"]` -> GFI's options: a preset name and `Config`
    fields, parsed as `gfi-jax explain --set` parses them (`gfi.parse_overrides`)."""
    presets = [p.partition("=")[2].strip() for p in pairs if p.strip().startswith("preset=")]
    try:
        opts = G.parse_overrides([p for p in pairs if not p.strip().startswith("preset=")])
    except ValueError as e:
        raise SystemExit(f"error: --gfi: {e}") from None
    return {**({"preset": presets[-1]} if presets else {}), **opts}


def resolved(model, method: str, opts: dict):
    """The full configuration a method runs with on `model` (GFI: the resolved `Config`)."""
    if method == "gfi":
        o = dict(opts)
        return G.resolve_layers(gfi_jax.preset(o.pop("preset", None), arch=model.arch.name,
                                               **o), model.arch)
    return make_config(method, model, **opts)


def describe(model, method: str, opts: dict, task: dict) -> dict:
    """What the config hash covers: model and weights, method and its resolved settings, and
    the task's settings (size, steps, substrate …)."""
    cfg = dataclasses.asdict(resolved(model, method, opts))
    for field, neutral in ADDED_FIELDS.get(method, {}).items():
        if cfg.get(field) == neutral:
            del cfg[field]
    weights = model.metadata.get("source_sha256", model.metadata.get("source"))
    return {"model": model.name, "weights": weights, "method": method, "config": cfg,
            "task": task}


# Config fields added after rows were stored, with the value that computes exactly what the
# program computed before the field existed (checked bit for bit when each was added): at that
# value a field is left out of the description, so the stored rows keep their hash.
ADDED_FIELDS = {"gfi": {"stage2_init": "stage1", "target_area": None, "restarts": 1}}


def reduced(method: str, opts: dict) -> str:
    """'' or a note that a method runs below its full setting (for the table)."""
    full = FULL.get(method, {})
    less = {k: v for k, v in opts.items() if k in full and v < full[k]}
    return ", ".join(f"{k}={v} (full: {full[k]})" for k, v in less.items())


def passes(model, method: str, opts: dict) -> float:
    """Analytic cost of one baseline map in clean forward passes F (an input gradient costs
    one F, as in `gfi_jax.gfi.flops`)."""
    cfg = resolved(model, method, opts)
    per = {"grad": 2, "guided_backprop": 2, "gradcam": 2, "cam": 1, "center": 0}
    if method in per:
        return float(per[method])
    if method == "smoothgrad":
        return 2.0 * cfg.samples + 1
    if method in ("integrated_gradients", "meaningful_perturbation"):
        return 2.0 * cfg.steps + 1
    if method == "rise":
        return cfg.masks + 1.0
    raise ValueError(f"no cost model for method {method!r}")


def gflops(model, specs: dict[str, tuple[str, dict]], hw: tuple[int, int]) -> dict[str, float]:
    """Analytic GFLOPs per map of every row: GFI's own count (`gfi_jax.gfi.flops`), the
    baselines `passes` × the clean forward, which is counted once."""
    out, forward = {}, None
    for name, (method, opts) in specs.items():
        if method == "gfi":
            f = G.flops(model, resolved(model, method, opts), hw, compile=False)
            out[name], forward = f["analytic"] / 1e9, f["forward"] / 1e9
    if forward is None and any(m != "gfi" for m, _ in specs.values()):
        cfg = G.resolve_layers(gfi_jax.preset("reference", arch=model.arch.name), model.arch)
        forward = G.flops(model, cfg, hw, compile=False)["forward"] / 1e9
    for name, (method, opts) in specs.items():
        if method != "gfi":
            out[name] = passes(model, method, opts) * forward
    return out


def probe_maps(model, method: str, opts: dict) -> np.ndarray:
    """The method's maps of two fixed inputs at the model's input size, 16×16 box-averaged:
    the fingerprint that ties a code version to its outputs."""
    rng = np.random.default_rng(1234)
    size = model.preprocessing.size
    x = rng.normal(0, 0.5, (2, size, size, 3)).astype(np.float32)
    s = np.asarray(gfi_jax.attribute(model, x, method, np.array([1, 2]), **opts), np.float64)
    k = size // 16
    return s[:, :16 * k, :16 * k].reshape(2, 16, k, 16, k).mean(axis=(2, 4))
