"""End-to-end throughput of `gfi-jax run` on this CPU, with 1 and with 8 simulated devices.

    python -m experiments.benchmarks.bench_run [--images 32] [--stage1-steps 2] [--stage2-steps 8]

Explains the first N images of ../shared/data/imagenet-samples (their ImageNet labels as
targets) with EfficientNet-Lite0 at 224 px, each device count in a fresh process (XLA_FLAGS
must be set before jax is imported), and writes experiments/results/bench_run_cpu.md:
images/s of the run loop (compiled program ready → last write), the fraction of that time the
devices waited for input, compile time, and whether the two runs' masks are bitwise equal.
Fewer GFI steps than the reference preset keep the default run under ~10 minutes; the cost of
an explanation is linear in the steps (gfi.flops' analytic count), which gives the reference
preset's rate from the measured one.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from experiments import common

DATA = common.ROOT.parent / "shared" / "data" / "imagenet-samples"


def child(a: argparse.Namespace) -> None:
    """One run in this process; prints its Summary as JSON on the last line."""
    import dataclasses

    import jax

    from gfi_jax import run as R
    t = time.monotonic()
    s = R.run(list_file=a.list, out=a.out, targets="labels", batch_size=a.batch_size,
              workers=a.workers, stage1_steps=a.stage1_steps, stage2_steps=a.stage2_steps)
    print(json.dumps({**dataclasses.asdict(s), "process_seconds": time.monotonic() - t,
                      "devices": jax.device_count()}))


def analytic_ratio(s1: int, s2: int) -> float:
    """Reference-preset FLOPs / FLOPs at (s1, s2) steps, by gfi.flops' analytic formula."""
    import jax
    import numpy as np

    import gfi_jax
    from gfi_jax import gfi
    m = gfi_jax.load_model("efficientnet_lite0")
    x = jax.ShapeDtypeStruct((1, 224, 224, 3), np.float32)
    fwd = lambda layers: gfi._matmul_flops(jax.make_jaxpr(
        lambda p, x: m.features(p, x, layers))(m.params, x).jaxpr)
    f, f0 = fwd(("logits",)), fwd((m.arch.l0,))
    cost = lambda a, b: f + a * 2 * f0 + b * 4 * f + 2 * f
    ref = gfi.PRESETS["reference"]
    return cost(ref.stage1_steps, ref.stage2_steps) / cost(s1, s2)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--images", type=int, default=32, help="first N images of the folder")
    p.add_argument("--stage1-steps", type=int, default=2)
    p.add_argument("--stage2-steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=1, help="Grain decoding processes")
    p.add_argument("--devices", default="1,8")
    p.add_argument("--results", type=Path, default=common.RESULTS / "bench_run_cpu.md")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--list", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p.parse_args()


def run_devices(a: argparse.Namespace, lst: Path, tmp: Path) -> list[dict]:
    """One child process per device count (XLA_FLAGS must be set before jax is imported);
    their Summaries, with the wall time of each process."""
    results = []
    for d in map(int, a.devices.split(",")):
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={d}"}
        # As a module from the repo root, as this script itself runs.
        cmd = [sys.executable, "-m", "experiments.benchmarks.bench_run", "--child",
               "--list", str(lst), "--out", str(tmp / f"out{d}"),
               "--batch-size", str(a.batch_size), "--workers", str(a.workers),
               "--stage1-steps", str(a.stage1_steps), "--stage2-steps", str(a.stage2_steps)]
        print(f"{d} device(s)…", flush=True)
        t = time.monotonic()
        r = subprocess.run(cmd, env=env, cwd=common.ROOT, capture_output=True, text=True)
        if r.returncode:
            sys.exit(r.stderr[-3000:])
        res = json.loads(r.stdout.strip().splitlines()[-1])
        res["wall_total"] = time.monotonic() - t
        results.append(res)
        print(json.dumps(res), flush=True)
    return results


def report(a: argparse.Namespace, results: list[dict], equal: bool, ratio: float, started: str,
           commit: str, load0, load1) -> list[str]:
    """The results file's lines: settings, one row per device count, the verdicts."""
    import jax
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    lines = [
        "# `gfi-jax run` end to end on CPU: 1 and 8 simulated devices", "",
        f"- command: `{common.command('experiments.benchmarks.bench_run', None)}`",
        f"- date: {started}; git {commit}; jax {jax.__version__}",
        f"- machine: {cpu}, {os.cpu_count()} cores, no accelerator. **Shared machine**: other jobs "
        f"ran at the same time; load average (1/5/15 min) {' '.join(f'{x:.2f}' for x in load0)} "
        f"before, {' '.join(f'{x:.2f}' for x in load1)} after (this run included).",
        f"- work: the first {a.images} images of imagenet-samples, EfficientNet-Lite0 at 224 px "
        f"(ImageNet weights), targets = their labels, GFI reference preset with "
        f"**{a.stage1_steps} + {a.stage2_steps} steps** (reference: 11 + 69), global batch "
        f"{a.batch_size}, {a.workers} Grain decoding process(es), uint8 masks; on CPU each device "
        "explains its images one after another (`sequential`), the bitwise-invariant mode.",
        "- 8 simulated devices (`XLA_FLAGS=--xla_force_host_platform_device_count=8`) share the "
        "same 2 cores: this row measures the sharded path's overhead and correctness, not a speedup.",
        "- images/s: over the run loop (compiled program ready → last mask and record written); "
        "device wait: share of that time the devices had no batch to run because input was not ready; "
        "process s: the whole process (imports, model load, compile, run).", "",
        "| devices | images | steps | images/s | s / image | device wait | compile s | run s | process s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        n = r["done"] + r["failed"]
        lines.append(f"| {r['devices']} | {n} | {a.stage1_steps}+{a.stage2_steps} | "
                     f"{r['images_per_s']:.3f} | {1 / r['images_per_s']:.2f} | "
                     f"{100 * r['device_wait']:.1f}% | {r['compile_seconds']:.1f} | "
                     f"{r['seconds']:.1f} | {r['wall_total']:.1f} |")
    best = max(r["images_per_s"] for r in results)
    lines += [
        "", f"- masks and records of all device counts bitwise equal: **{'yes' if equal else 'NO'}**",
        f"- reference preset (11 + 69 steps) costs {ratio:.2f}× these FLOPs per image "
        f"(analytic count), so this CPU would explain ≈ {best / ratio:.4f} images/s with it: "
        f"ImageNet val (50,000 images) ≈ {50000 / (best / ratio) / 86400:.1f} days on these 2 cores."]
    return lines


def main() -> None:
    a = parse_args()
    if a.child:
        return child(a)
    if not (a.data / "labels.csv").is_file():
        sys.exit(f"no {a.data}/labels.csv: pass --data FOLDER of ImageNet samples with labels.csv")

    import numpy as np

    from gfi_jax import run as R
    rows = (a.data / "labels.csv").read_text().splitlines()[1:a.images + 1]
    tmp = Path(tempfile.mkdtemp(prefix="bench_run-"))
    lst = tmp / "list.txt"
    lst.write_text("".join(f"{a.data / r.split(',')[0]} {r.split(',')[1]}\n" for r in rows))
    load0 = os.getloadavg()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=common.ROOT,
                            capture_output=True, text=True).stdout.strip()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    results = run_devices(a, lst, tmp)
    load1 = os.getloadavg()
    outs = [R.read_output(tmp / f"out{r['devices']}") for r in results]
    equal = all(np.array_equal(outs[0][0], o[0]) and outs[0][1] == o[1] for o in outs[1:])
    lines = report(a, results, equal, analytic_ratio(a.stage1_steps, a.stage2_steps), started,
                   commit, load0, load1)
    a.results.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
