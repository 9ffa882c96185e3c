"""Where one GFI call spends its time: a device trace of one compiled explanation, summed by kernel.

Traces one call of the compiled program (after a warm-up call) with `jax.profiler`, then reads
the trace it wrote and prints, as markdown: the wall time of the call, the time the device was
busy (union of kernel intervals), the time per kernel class (convolution, matmul, XLA fusion,
copy/transpose, other) and the top kernels by total time.

    python -m experiments.benchmarks.profile_gfi --model resnet18 --dtype bfloat16 --batch 256
    python -m experiments.benchmarks.profile_gfi --model vgg19 --batch 1 --stage1-steps 2 --stage2-steps 2

On CPU (no device streams in the trace) the host threads' XLA ops are summed instead.
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import gfi_jax
from gfi_jax import gfi as G
from gfi_jax.models import LoadedModel, get_arch, imagenet_classes
from gfi_jax.weights import enable_compilation_cache

CLASSES = (  # first match wins; lower-case substrings of kernel names ("conv" alone would
    # also match XLA's "convert" fusions)
    ("convolution", ("xmma", "cudnn", "implicit_gemm", "conv_general", "convolution", "ynn")),
    ("copy / transpose", ("copy", "transpose", "memcpy", "memset")),
    ("matmul", ("gemm", "cublas", "cutlass", "dot", "matmul")),
    ("XLA fusion", ("fusion", "loop_", "input_", "wrapped_", "triton", "reduce", "select")),
)


def kernel_class(name: str) -> str:
    low = name.lower()
    return next((c for c, keys in CLASSES if any(k in low for k in keys)), "other")


_WRAPPERS = ("ThunkExecutor", "ThreadPool", "Thunk::")  # CPU events that enclose the op events


def device_events(trace: dict) -> tuple[list[dict], str]:
    """The trace's kernel events on the accelerator's streams, or the host's XLA ops on CPU."""
    names = {e["pid"]: e["args"]["name"] for e in trace["traceEvents"]
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    dev = {pid for pid, n in names.items() if "/device:" in n and "CPU" not in n}
    where = "device streams"
    if not dev:  # CPU: the host process's XLA ops (the Python threads are named too: skip them)
        dev = {pid for pid, n in names.items() if "/host:CPU" in n}
        where = "host threads (CPU backend)"
    ev = [e for e in trace["traceEvents"] if e.get("ph") == "X" and e.get("pid") in dev
          and "dur" in e and not str(e.get("name", "")).startswith("$")
          and not any(w in e.get("name", "") for w in _WRAPPERS)]
    return ev, where


def busy_time(events: list[dict]) -> float:
    """Microseconds covered by at least one event (union of intervals)."""
    total, end = 0.0, -np.inf
    for s, e in sorted((ev["ts"], ev["ts"] + ev["dur"]) for ev in events):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


def load_trace(logdir: Path) -> dict:
    files = sorted(logdir.rglob("*.trace.json.gz"))
    if not files:
        raise SystemExit(f"error: jax.profiler wrote no *.trace.json.gz under {logdir}")
    with gzip.open(files[-1]) as f:
        return json.load(f)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--stage1-steps", type=int, default=None)
    ap.add_argument("--stage2-steps", type=int, default=None)
    ap.add_argument("--sequential", action="store_true")
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--logdir", default=None, help="keep the trace here (default: a temp dir)")
    args = ap.parse_args()
    enable_compilation_cache()  # the same program as bench_gfi's: a second run skips compiling

    arch = get_arch(args.model)
    over = {k: v for k, v in (("stage1_steps", args.stage1_steps),
                              ("stage2_steps", args.stage2_steps)) if v is not None}
    cfg = G.resolve_layers(gfi_jax.preset(args.preset, **over), arch)
    model = LoadedModel(arch, nnx.state(arch.build(rngs=nnx.Rngs(0))),
                        classes=imagenet_classes()).astype(args.dtype)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((args.batch, args.size, args.size, 3)),
                    jnp.float32)
    t = jnp.zeros((args.batch, 1), jnp.int32) - 1
    exe = G.compiled(model.features, cfg, args.sequential).lower(model.params, x, t, None).compile()
    jax.block_until_ready(exe(model.params, x, t, None))
    logdir = Path(args.logdir or tempfile.mkdtemp(prefix="gfi_trace_"))
    jax.profiler.start_trace(str(logdir))
    t0 = time.perf_counter()
    jax.block_until_ready(exe(model.params, x, t, None))
    wall = time.perf_counter() - t0
    jax.profiler.stop_trace()
    events, where = device_events(load_trace(logdir))
    if not events:
        raise SystemExit(f"error: no kernel events in the trace under {logdir}")

    busy = busy_time(events) / 1e6
    fl = G.flops(model, cfg, (args.size, args.size), compile=False)["analytic"] * args.batch
    by_class, by_name = collections.Counter(), collections.Counter()
    count = collections.Counter()
    for e in events:
        by_class[kernel_class(e["name"])] += e["dur"] / 1e6
        by_name[e["name"]] += e["dur"] / 1e6
        count[e["name"]] += 1
    total = sum(by_class.values())
    steps = cfg.stage1_steps + cfg.stage2_steps
    print(f"# Profile: {args.model} {args.dtype} batch {args.batch} at {args.size}², preset "
          f"`{args.preset}` ({cfg.stage1_steps} + {cfg.stage2_steps} steps) on "
          f"{jax.devices()[0].device_kind}\n")
    print(f"- command: `python -m experiments.benchmarks.profile_gfi {' '.join(sys.argv[1:])}`")
    print(f"- wall time of the traced call: {wall:.3f} s ({args.batch / wall:.3g} img/s, "
          f"{wall / steps * 1e3:.2f} ms per Adam step); analytic {fl / 1e12:.3f} TFLOP → "
          f"{fl / wall / 1e12:.1f} TFLOP/s")
    print(f"- events read from the {where}: {len(events)}; busy (union of intervals) "
          f"{busy:.3f} s = {busy / wall:.0%} of the wall time; summed durations {total:.3f} s\n")
    print("| kernel class | s | % of summed |\n|---|---:|---:|")
    for c, s in by_class.most_common():
        print(f"| {c} | {s:.4f} | {s / total:.1%} |")
    print("\n| top kernels | class | calls | s | % of summed |\n|---|---|---:|---:|---:|")
    for n, s in by_name.most_common(args.top):
        short = n if len(n) <= 90 else n[:87] + "..."
        print(f"| `{short}` | {kernel_class(n)} | {count[n]} | {s:.4f} | {s / total:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
