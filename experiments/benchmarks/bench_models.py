"""Forward-pass speed and peak memory of the gfi_jax model ports against PyTorch.

For every (model, dtype, batch) the logits forward is timed in JAX (`jax.jit` of
`LoadedModel.features`) and in PyTorch (`torch.inference_mode()`, `model.eval()`), with the
same random-init weights: the torch model (torchvision / efficientnet_lite_pytorch, seed 0) is
exported once per model, and the JAX side converts that very state_dict with
`convert_state_dict` + `state_from_flat`. Each framework runs each config in its own fresh
worker process, one at a time, so the memory numbers are per config, nothing leaks from one
config to the next, and the two frameworks never compete for the CPU or the GPU. The workers
are bench_models_worker.py; the tables are written by bench_models_report.py.

    python -m experiments.benchmarks.bench_models            # all models, batch 1,32, f32+bf16
    python -m experiments.benchmarks.bench_models --quick --models resnet18,efficientnet_lite0
    python -m experiments.benchmarks.bench_models --models alexnet --batch-sizes 1 --dtypes float32

Device: JAX's default backend; torch uses CUDA when available, else the CPU.

Peak memory (one measure per framework and device; the table header says which was used):
  * GPU, JAX:   `memory_stats()['peak_bytes_in_use']` of the worker (params, input, activations,
                output; process lifetime, so compile-time autotuning scratch is included).
  * GPU, torch: `torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()` once the
                weights are on the device (params, input, activations, workspace).
  * CPU, both:  peak RSS of the worker during the warm-up and timed runs, minus its RSS right
                after importing the framework (before any weights): that is params + input +
                activations + workspace + runtime buffers. The high-water mark is reset
                (/proc/self/clear_refs) after the weights are loaded and, for JAX, after
                compiling, and freed heap is returned with malloc_trim first, so loading and
                compile transients are not counted. XLA's own estimate for the compiled JAX
                forward (`compiled.memory_analysis()`: argument + output + temp) is listed in a
                second table for comparison.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from experiments import common
from experiments.benchmarks.bench_models_report import (MB, busy, cpu_model, gpu_names, loadavg,
                                                        ram_gib, render, write_atomic)

MODELS = ("vgg16", "vgg19", "alexnet", "resnet18", "resnet50", "efficientnet_lite0")
DTYPES = ("float32", "bfloat16")


def ncores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_worker(job: dict, tmpdir: Path, timeout: float) -> dict:
    """Runs one job in a fresh interpreter; stderr passes through; returns its result dict."""
    fd, result = tempfile.mkstemp(suffix=".json", dir=tmpdir)
    os.close(fd)
    os.unlink(result)
    job = {**job, "result": result}
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, "-m", "experiments.benchmarks.bench_models_worker",
                            json.dumps(job)], cwd=common.ROOT, stdout=sys.stderr,
                           timeout=timeout or None)
        rc = p.returncode
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s", "wall_s": time.perf_counter() - t0}
    wall = time.perf_counter() - t0
    if os.path.exists(result):
        with open(result) as f:
            res = json.load(f)
        os.unlink(result)
    elif rc < 0:
        res = {"error": f"killed by signal {-rc}" + (" (out of memory?)" if rc == -9 else "")}
    else:
        res = {"error": f"worker exited with status {rc} and no result"}
    res["wall_s"] = wall
    return res


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS),
                   help=f"comma list (default: all: {','.join(MODELS)})")
    p.add_argument("--batch-sizes", default=None, help="comma list (default 1,32; --quick: 1,2)")
    p.add_argument("--dtypes", default=",".join(DTYPES), help="comma list of float32,bfloat16 (default: both)")
    p.add_argument("--size", type=int, default=None, help="input side (default 224; --quick: 64)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed runs; the median is reported (default 10; --quick: 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 2; --quick: 1)")
    p.add_argument("--max-time", type=float, default=60.0,
                   help="stop timing a config after this many seconds of timed runs, once at least "
                        "3 are done (default 60; 0: always run --repeats)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: the number of usable cores; XLA's CPU "
                        "pool is not changed by this)")
    p.add_argument("--timeout", type=float, default=3600.0,
                   help="seconds before a worker process is abandoned (default 3600; 0: none)")
    p.add_argument("--out", default=None,
                   help="markdown file (default experiments/results/bench_models_<backend>.md, "
                        "with --quick bench_models_<backend>_quick.md)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: batch 1 and 2, size 64, 1 repeat, 1 warm-up")
    a = p.parse_args(argv)
    a.batch_sizes = a.batch_sizes or ("1,2" if a.quick else "1,32")
    a.size = a.size or (64 if a.quick else 224)
    a.repeats = a.repeats or (1 if a.quick else 10)
    a.threads = a.threads or ncores()
    a.warmup = a.warmup if a.warmup is not None else (1 if a.quick else 2)
    a.model_list = [s.strip() for s in a.models.split(",") if s.strip()]
    a.dtype_list = [s.strip() for s in a.dtypes.split(",") if s.strip()]
    try:
        a.batch_list = [int(s) for s in a.batch_sizes.split(",") if s.strip()]
    except ValueError:
        p.error(f"--batch-sizes must be integers, got {a.batch_sizes!r}")
    bad = [m for m in a.model_list if m not in MODELS]
    if bad:
        p.error(f"unknown model(s) {', '.join(bad)}; choose from {', '.join(MODELS)}")
    bad = [d for d in a.dtype_list if d not in DTYPES]
    if bad:
        p.error(f"unknown dtype(s) {', '.join(bad)}; choose from {', '.join(DTYPES)}")
    if not (a.model_list and a.dtype_list and a.batch_list) or min(a.batch_list) < 1:
        p.error("need at least one model, dtype and positive batch size")
    if a.repeats < 1 or a.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    if a.size < 63 and "alexnet" in a.model_list:
        p.error("alexnet needs --size >= 63")
    if a.size < 32:
        p.error("--size must be >= 32")
    return a


def run_metadata(args, probe: dict) -> dict:
    """What the report's header says about the run: command, date, machine, the probe."""
    return {
        "command": common.command("experiments.benchmarks.bench_models", None),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "cpu": cpu_model(), "cores": ncores(), "ram": ram_gib(),
        "gpu": gpu_names() if gpu_names() != "none" else probe.get("torch_gpu", (
            probe.get("jax_device") if probe.get("jax_backend") not in (None, "cpu") else "none")),
        "load_start": loadavg(), "probe": probe,
    }


def export_weights(model: str, tmpdir: Path, timeout: float, exported: dict[str, Path],
                   export_error: dict[str, str]) -> Path:
    """The random-init torch weights of `model` as an .npz, written by a worker; a failure is
    recorded in `export_error` (the configs of that model then report it)."""
    npz = tmpdir / f"{model}.npz"
    for old in exported.values():      # keep at most one model's weights on disk
        old.unlink(missing_ok=True)
    log(f"[{model}] exporting random-init torch weights")
    res = run_worker({"kind": "export", "model": model, "npz": str(npz)}, tmpdir, timeout)
    if "error" in res:
        export_error[model] = res["error"]
        log(f"[{model}] export failed: {res['error']}")
    return npz


def bench_config(args, tmpdir: Path, npz: Path, model: str, dtype: str, batch: int,
                 export_error: dict[str, str]) -> dict:
    """One config's row: the JAX worker, the torch worker, and how far their logits differ."""
    import numpy as np
    settings = {"size": args.size, "repeats": args.repeats, "warmup": args.warmup,
                "max_time": args.max_time, "threads": args.threads}
    row = {"model": model, "dtype": dtype, "batch": batch}
    for fw in ("jax", "torch"):
        logits = tmpdir / f"logits_{fw}.npy"
        logits.unlink(missing_ok=True)
        if npz.exists():
            res = run_worker({"kind": fw, "model": model, "dtype": dtype, "batch": batch,
                              "npz": str(npz), "logits": str(logits), **settings},
                             tmpdir, args.timeout)
        else:
            res = {"error": f"weights export failed: {export_error.get(model, '?')}"}
        row[fw] = res
        if "error" in res:
            log(f"    {fw}: ERROR {res['error']}")
        else:
            extra = f", compile {res['compile_s']:.2f} s" if "compile_s" in res else ""
            log(f"    {fw}: {res['sec'] * 1e3:.2f} ms/batch (median of {res['runs']}){extra}, "
                f"peak {res['peak_bytes'] / MB:.0f} MB, worker {res['wall_s']:.1f} s")
    lj, lt = tmpdir / "logits_jax.npy", tmpdir / "logits_torch.npy"
    if lj.exists() and lt.exists():
        a, b = np.load(lj), np.load(lt)
        if a.shape == b.shape:
            row["diff"] = float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))
    return row


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    tmpdir = Path(tempfile.mkdtemp(prefix="bench_models-"))
    try:
        probe = run_worker({"kind": "probe"}, tmpdir, 600)
        backend = probe.get("jax_backend", "unknown")
        out = Path(args.out) if args.out else (
            common.RESULTS / f"bench_models_{backend}{'_quick' if args.quick else ''}.md")
        meta = run_metadata(args, probe)
        log(f"bench_models: JAX {probe.get('jax_device')}, torch "
            f"{'cuda' if probe.get('torch_cuda') else 'cpu'}, {args.threads} torch threads; "
            f"writing {out}")
        if busy(meta["cores"]):
            log(f"WARNING: load average {meta['load_start']} on {meta['cores']} cores: the machine "
                "is busy and CPU timings will be unreliable (torch's OpenMP threads suffer most)")
        configs = [(m, d, b) for m in args.model_list for d in args.dtype_list for b in args.batch_list]
        rows: list[dict] = []
        exported: dict[str, Path] = {}
        export_error: dict[str, str] = {}
        for i, (model, dtype, batch) in enumerate(configs, 1):
            if model not in exported:
                exported[model] = export_weights(model, tmpdir, args.timeout, exported,
                                                 export_error)
            elapsed = time.perf_counter() - t_start
            log(f"[{i}/{len(configs)}] {model} {dtype} batch {batch} (elapsed {elapsed:.0f} s)")
            rows.append(bench_config(args, tmpdir, exported[model], model, dtype, batch,
                                     export_error))
            write_atomic(out, render(args, meta, rows, i, len(configs)))
        meta["finished"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        meta["load_end"] = loadavg()
        text = render(args, meta, rows, len(configs), len(configs))
        write_atomic(out, text)
        print(text)
        log(f"wrote {out} ({time.perf_counter() - t_start:.0f} s in all)")
        return 1 if any("error" in r["jax"] or "error" in r["torch"] for r in rows) else 0
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
