"""Forward-pass speed and peak memory of the gfi_jax model ports against PyTorch.

For every (model, dtype, batch) the logits forward is timed in JAX (`jax.jit` of
`LoadedModel.features`) and in PyTorch (`torch.inference_mode()`, `model.eval()`), with the
same random-init weights: the torch model (torchvision / efficientnet_lite_pytorch, seed 0) is
exported once per model, and the JAX side converts that very state_dict with
`convert_state_dict` + `state_from_flat`. Each framework runs each config in its own fresh
worker process, one at a time, so the memory numbers are per config, nothing leaks from one
config to the next, and the two frameworks never compete for the CPU or the GPU.

    python experiments/bench_models.py                       # all models, batch 1,32, f32+bf16
    python experiments/bench_models.py --quick --models resnet18,efficientnet_lite0
    python experiments/bench_models.py --models alexnet --batch-sizes 1 --dtypes float32

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
import gc
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MODELS = ("vgg16", "vgg19", "alexnet", "resnet18", "resnet50", "efficientnet_lite0")
DTYPES = ("float32", "bfloat16")
MB = 1 << 20


def ncores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- worker side

def _rss_kb() -> dict[str, int]:
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    k, v = line.split(":")
                    out[k] = int(v.split()[0])
    except OSError:
        pass
    return out


def _trim() -> None:
    gc.collect()
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class RssPeak:
    """Peak RSS above a baseline taken right after the framework imports (Linux)."""

    def __init__(self):
        _trim()
        self.base_kb = _rss_kb().get("VmRSS")
        self.label = None

    def reset(self) -> None:
        """Start the high-water mark from the current RSS (loading/compiling excluded)."""
        _trim()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.label = ("peak RSS over post-import RSS (HWM reset after loading/compiling; "
                          "params + input + activations + workspace)")
        except OSError:
            self.label = ("peak RSS over post-import RSS (no HWM reset possible: includes "
                          "loading/compile transients)")

    def peak_bytes(self) -> int | None:
        hwm = _rss_kb().get("VmHWM")
        if hwm is None or self.base_kb is None:
            import resource
            self.label = "ru_maxrss of the worker (whole process, incl. runtime and loading)"
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return (hwm - self.base_kb) * 1024


def _input(batch: int, size: int):
    import numpy as np
    return np.random.default_rng(0).standard_normal((batch, size, size, 3), dtype=np.float32)


def _time_runs(fn, warmup: int, repeats: int, max_time: float) -> tuple[float, int]:
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < repeats:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        if max_time and time.perf_counter() - start > max_time and len(times) >= min(3, repeats):
            break
    return statistics.median(times), len(times)


def _import_torch_model_lib(name: str) -> None:
    if name == "efficientnet_lite0":
        import efficientnet_lite_pytorch  # noqa: F401
    else:
        import torchvision  # noqa: F401


def _build_torch(name: str):
    import torch
    torch.manual_seed(0)
    if name == "efficientnet_lite0":
        from efficientnet_lite_pytorch import EfficientNet
        return EfficientNet.from_name("efficientnet-lite0")
    import torchvision
    return getattr(torchvision.models, name)(weights=None)


def worker_export(job: dict) -> dict:
    """Random-init torch model -> its state_dict as an .npz (float32 numpy)."""
    import numpy as np
    import torch  # noqa: F401
    model = _build_torch(job["model"])
    sd = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    tmp = job["npz"] + ".partial.npz"
    np.savez(tmp, **sd)
    os.replace(tmp, job["npz"])
    n = sum(v.size for k, v in sd.items() if not k.endswith("num_batches_tracked"))
    return {"params": int(n)}


def worker_jax(job: dict) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from gfi_jax.models import LoadedModel, get_arch
    from gfi_jax.weights import state_from_flat
    from weights_conversion.convert import convert_state_dict
    dev = jax.devices()[0]
    jax.block_until_ready(jnp.ones(8) + 1)          # backend up before the baseline
    mem = RssPeak()                                 # baseline: everything imported, no weights

    arch = get_arch(job["model"])
    with np.load(job["npz"]) as z:
        sd = {k: z[k] for k in z.files}
    flat, n = convert_state_dict(arch.name, sd)
    del sd
    params = state_from_flat(arch, flat, n)
    del flat
    m = LoadedModel(arch, params, classes=tuple(f"class_{i}" for i in range(n)))
    if job["dtype"] != "float32":
        m = m.astype(job["dtype"])

    def logits(p, x):
        return m.features(p, x, ("logits",))["logits"]

    x = jax.device_put(jnp.asarray(_input(job["batch"], job["size"])), dev)
    t0 = time.perf_counter()
    compiled = jax.jit(logits).lower(params, x).compile()
    compile_s = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    xla = None
    if ma is not None:
        xla = {k: int(getattr(ma, k + "_size_in_bytes", 0) or 0)
               for k in ("argument", "output", "temp", "alias")}

    gpu_stats = dev.platform != "cpu" and bool(dev.memory_stats())
    mem.reset()
    out = None

    def run():
        nonlocal out
        out = compiled(params, x)
        out.block_until_ready()

    sec, runs = _time_runs(run, job["warmup"], job["repeats"], job["max_time"])
    if gpu_stats:
        peak = int(dev.memory_stats()["peak_bytes_in_use"])
        label = "device peak_bytes_in_use (process lifetime, incl. compile-time autotuning)"
    else:
        peak, label = mem.peak_bytes(), mem.label
    np.save(job["logits"], np.asarray(out, np.float32))
    return {"sec": sec, "runs": runs, "compile_s": compile_s, "peak_bytes": peak,
            "mem_label": label, "xla": xla, "device": f"{dev.platform}:{dev.device_kind}"}


def worker_torch(job: dict) -> dict:
    import contextlib
    import numpy as np
    import torch
    _import_torch_model_lib(job["model"])
    torch.set_num_threads(job["threads"])
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.zeros(8, device=device).add_(1)
        torch.cuda.synchronize()
    else:                                             # oneDNN/threads up before the baseline
        with torch.inference_mode():
            torch.nn.functional.conv2d(torch.ones(1, 3, 8, 8), torch.ones(4, 3, 3, 3))
    mem = RssPeak()                                 # baseline: everything imported, no weights

    model = _build_torch(job["model"])
    with np.load(job["npz"]) as z:
        model.load_state_dict({k: torch.from_numpy(z[k]) for k in z.files})
    model.eval().to(device)
    x = torch.from_numpy(np.ascontiguousarray(_input(job["batch"], job["size"]).transpose(0, 3, 1, 2)))
    x = x.to(device)
    if job["dtype"] == "bfloat16":
        ctx = lambda: torch.autocast(device.type, dtype=torch.bfloat16)  # noqa: E731
    elif job["dtype"] == "float32":
        ctx = contextlib.nullcontext
    else:
        raise ValueError(f"unsupported dtype {job['dtype']}")

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    mem.reset()
    out = None

    def run():
        nonlocal out
        with torch.inference_mode(), ctx():
            out = model(x)
        if cuda:
            torch.cuda.synchronize()

    sec, runs = _time_runs(run, job["warmup"], job["repeats"], job["max_time"])
    if cuda:
        peak = int(torch.cuda.max_memory_allocated())
        label = "torch.cuda.max_memory_allocated() after reset (params + input + activations)"
    else:
        peak, label = mem.peak_bytes(), mem.label
    np.save(job["logits"], out.float().cpu().numpy())
    return {"sec": sec, "runs": runs, "peak_bytes": peak, "mem_label": label,
            "device": str(device) + (f":{torch.cuda.get_device_name()}" if cuda else "")}


def worker_probe(job: dict) -> dict:
    info = {}
    try:
        import jax
        d = jax.devices()[0]
        info["jax_backend"] = jax.default_backend()
        info["jax_device"] = f"{d.platform}:{d.device_kind}"
        info["jax_devices"] = len(jax.devices())
        info["jax_matmul_precision"] = str(jax.config.jax_default_matmul_precision)
    except Exception as e:  # noqa: BLE001
        info["jax_error"] = repr(e)
    try:
        import torch
        info["torch_cuda"] = torch.cuda.is_available()
        if info["torch_cuda"]:
            info["torch_gpu"] = torch.cuda.get_device_name()
            info["torch_tf32"] = {"cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
                                  "cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32}
        info["torch_interop_threads"] = torch.get_num_interop_threads()
        info["torch_config"] = next((l.strip() for l in torch.__config__.show().splitlines()
                                     if "CPU capability" in l), "")
    except Exception as e:  # noqa: BLE001
        info["torch_error"] = repr(e)
    return info


WORKERS = {"export": worker_export, "jax": worker_jax, "torch": worker_torch, "probe": worker_probe}


def worker_main(job_json: str) -> int:
    job = json.loads(job_json)
    try:
        res = WORKERS[job["kind"]](job)
    except BaseException as e:  # noqa: BLE001  (reported to the parent, which goes on)
        import traceback
        traceback.print_exc()
        res = {"error": f"{type(e).__name__}: {e}"[:300]}
    tmp = job["result"] + ".partial"
    with open(tmp, "w") as f:
        json.dump(res, f)
    os.replace(tmp, job["result"])
    return 0


# --------------------------------------------------------------------------- parent side

def run_worker(job: dict, tmpdir: Path, timeout: float) -> dict:
    """Runs one job in a fresh interpreter; stderr passes through; returns its result dict."""
    fd, result = tempfile.mkstemp(suffix=".json", dir=tmpdir)
    os.close(fd)
    os.unlink(result)
    job = {**job, "result": result}
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_worker", json.dumps(job)],
                           stdout=sys.stderr, timeout=timeout or None)
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


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def ram_gib() -> str:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return f"{int(line.split()[1]) / (1 << 20):.1f} GiB"
    except OSError:
        pass
    return "?"


def gpu_names() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            return "; ".join(l.strip() for l in out.stdout.strip().splitlines())
    except (OSError, subprocess.SubprocessError):
        pass
    return "none"


def version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def loadavg() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "?"


def busy(cores: int, load: str | None = "now") -> bool:
    """Whether the 1-minute load average says other work shares the CPUs."""
    if load == "now":
        load = loadavg()
    try:
        return float(load.split()[0]) > 0.5 * cores
    except (AttributeError, ValueError, IndexError):
        return False


def fmt(v, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def render(args, meta: dict, rows: list[dict], done: int, total: int) -> str:
    jl = sorted({r["jax"].get("mem_label") for r in rows if r["jax"].get("mem_label")})
    tl = sorted({r["torch"].get("mem_label") for r in rows if r["torch"].get("mem_label")})
    probe = meta["probe"]
    head = [
        "# Forward-pass benchmark: gfi_jax (JAX/Flax NNX) vs PyTorch",
        "",
        f"- Command: `{meta['command']}`",
        f"- Date (UTC): {meta['date']}" + (f" (finished {meta['finished']})" if meta.get("finished") else
                                          f" — PARTIAL: {done}/{total} configs"),
        f"- Machine: {meta['cpu']}, {meta['cores']} cores usable ({os.cpu_count()} logical), "
        f"RAM {meta['ram']}, GPU: {meta['gpu']}; load average (1/5/15 min) before the run "
        f"{meta['load_start']}" + (f", at its end {meta['load_end']} (includes this run)"
                                   if meta.get("load_end") else ""),
        f"- Versions: python {platform.python_version()}, jax {version('jax')}, jaxlib "
        f"{version('jaxlib')}, flax {version('flax')}, numpy {version('numpy')}, torch "
        f"{version('torch')}, torchvision {version('torchvision')}, efficientnet-lite-pytorch "
        f"{version('efficientnet-lite-pytorch')}",
        f"- JAX device: {probe.get('jax_device', probe.get('jax_error'))} (default backend "
        f"{probe.get('jax_backend')}); default matmul precision {probe.get('jax_matmul_precision')};"
        f" XLA_FLAGS={os.environ.get('XLA_FLAGS', '(unset)')!s}",
        f"- torch device: {'cuda:' + probe.get('torch_gpu', '') if probe.get('torch_cuda') else 'cpu'}"
        + (f" ({probe.get('torch_tf32')}, cudnn.benchmark=True)" if probe.get("torch_cuda") else "")
        + f"; {probe.get('torch_config', '')}",
        f"- Threads: torch.set_num_threads({args.threads}), interop threads "
        f"{probe.get('torch_interop_threads')}; XLA CPU uses its default intra-op pool "
        f"(all {meta['cores']} cores)",
        f"- Input: {args.size}×{args.size} RGB, standard-normal (seed 0), JAX NHWC, torch NCHW "
        "(contiguous); random-init weights (torch seed 0), identical in both frameworks "
        "(torch state_dict converted with convert_state_dict/state_from_flat)",
        f"- Timing: median of up to {args.repeats} runs after {args.warmup} warm-up run(s)"
        + (f", stopping once the timed runs exceed {args.max_time:g} s (at least 3 runs)"
           if args.max_time else "")
        + "; JAX: `jax.jit` logits forward, AOT-compiled (compile time = lower + compile, "
        "reported separately), `block_until_ready` each run; torch: `torch.inference_mode()`, "
        "eval mode" + (", `torch.cuda.synchronize()` each run" if probe.get("torch_cuda") else "")
        + ". Each framework × config runs in its own fresh worker process.",
        "- bfloat16: JAX `m.astype('bfloat16')` (activations/compute bf16, params stored f32); "
        "torch `torch.autocast(device, dtype=torch.bfloat16)` (f32 weights, bf16 compute for "
        "autocast ops)",
        f"- JAX peak MB: {'; '.join(jl) or '—'}",
        f"- torch peak MB: {'; '.join(tl) or '—'}",
        "- torch/JAX = torch ms ÷ JAX ms (> 1: JAX faster)",
        "",
        "| model | dtype | batch | JAX ms/batch | JAX img/s | JAX compile s | JAX peak MB "
        "| torch ms/batch | torch img/s | torch peak MB | torch/JAX |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for r in rows:
        j, t = r["jax"], r["torch"]
        jms = j["sec"] * 1e3 if "sec" in j else None
        tms = t["sec"] * 1e3 if "sec" in t else None
        cells = [r["model"], r["dtype"], str(r["batch"]),
                 fmt(jms, ".2f") if "error" not in j else "error",
                 fmt(r["batch"] / j["sec"] if jms else None, ".1f"),
                 fmt(j.get("compile_s"), ".2f"),
                 fmt(j["peak_bytes"] / MB if j.get("peak_bytes") is not None else None, ".0f"),
                 fmt(tms, ".2f") if "error" not in t else "error",
                 fmt(r["batch"] / t["sec"] if tms else None, ".1f"),
                 fmt(t["peak_bytes"] / MB if t.get("peak_bytes") is not None else None, ".0f"),
                 fmt(tms / jms if jms and tms else None, ".2f")]
        head.append("| " + " | ".join(cells) + " |")
        for fw, res in (("JAX", j), ("torch", t)):
            if "error" in res:
                notes.append(f"- {r['model']} {r['dtype']} b={r['batch']} {fw}: {res['error']}")
    if notes:
        head += ["", "Errors:", *notes]
    head += [
        "",
        "Details: timed runs per framework; XLA's memory analysis of the compiled JAX forward "
        "(argument + output + temp = params + input + logits + scratch, in MB); "
        "max |logits_JAX − logits_torch| / max |logits_torch| on the last timed batch "
        "(same weights and input); worker wall time (s, incl. start-up, loading, compile).",
        "",
        "| model | dtype | batch | JAX runs | torch runs | XLA arg+out+temp MB | XLA temp MB "
        "| rel. logit diff | JAX wall s | torch wall s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        j, t = r["jax"], r["torch"]
        x = j.get("xla")
        tot = (x["argument"] + x["output"] + x["temp"] - x["alias"]) / MB if x else None
        head.append("| " + " | ".join([
            r["model"], r["dtype"], str(r["batch"]), str(j.get("runs", "—")), str(t.get("runs", "—")),
            fmt(tot, ".0f"), fmt(x["temp"] / MB if x else None, ".0f"),
            fmt(r.get("diff"), ".1e"), fmt(j.get("wall_s"), ".1f"), fmt(t.get("wall_s"), ".1f")]) + " |")
    if busy(meta["cores"], meta["load_start"]):
        head.insert(5, "- **WARNING: the machine was already busy when this run started (1-minute "
                       "load average above half the core count); CPU timings are unreliable.**")
    return "\n".join(head) + "\n"


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._worker:
        return a
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


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._worker:
        return worker_main(args._worker)
    import numpy as np

    t_start = time.perf_counter()
    tmpdir = Path(tempfile.mkdtemp(prefix="bench_models-"))
    try:
        probe = run_worker({"kind": "probe"}, tmpdir, 600)
        backend = probe.get("jax_backend", "unknown")
        out = Path(args.out) if args.out else (
            REPO / "experiments" / "results" /
            f"bench_models_{backend}{'_quick' if args.quick else ''}.md")
        meta = {
            "command": shlex.join([Path(sys.executable).name, *sys.argv]),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
            "cpu": cpu_model(), "cores": ncores(), "ram": ram_gib(),
            "gpu": gpu_names() if gpu_names() != "none" else probe.get("torch_gpu", (
                probe.get("jax_device") if probe.get("jax_backend") not in (None, "cpu") else "none")),
            "load_start": loadavg(), "probe": probe,
        }
        log(f"bench_models: JAX {probe.get('jax_device')}, torch "
            f"{'cuda' if probe.get('torch_cuda') else 'cpu'}, {args.threads} torch threads; "
            f"writing {out}")
        if busy(meta["cores"]):
            log(f"WARNING: load average {meta['load_start']} on {meta['cores']} cores: the machine "
                "is busy and CPU timings will be unreliable (torch's OpenMP threads suffer most)")
        configs = [(m, d, b) for m in args.model_list for d in args.dtype_list for b in args.batch_list]
        rows: list[dict] = []
        common = {"size": args.size, "repeats": args.repeats, "warmup": args.warmup,
                  "max_time": args.max_time, "threads": args.threads}
        exported: dict[str, Path] = {}
        export_error: dict[str, str] = {}
        for i, (model, dtype, batch) in enumerate(configs, 1):
            if model not in exported:
                npz = tmpdir / f"{model}.npz"
                for old in exported.values():      # keep at most one model's weights on disk
                    old.unlink(missing_ok=True)
                log(f"[{model}] exporting random-init torch weights")
                res = run_worker({"kind": "export", "model": model, "npz": str(npz)}, tmpdir, args.timeout)
                if "error" in res:
                    export_error[model] = res["error"]
                    log(f"[{model}] export failed: {res['error']}")
                exported[model] = npz
            npz = exported[model]
            row = {"model": model, "dtype": dtype, "batch": batch}
            elapsed = time.perf_counter() - t_start
            log(f"[{i}/{len(configs)}] {model} {dtype} batch {batch} (elapsed {elapsed:.0f} s)")
            for fw in ("jax", "torch"):
                logits = tmpdir / f"logits_{fw}.npy"
                logits.unlink(missing_ok=True)
                if npz.exists():
                    res = run_worker({"kind": fw, "model": model, "dtype": dtype, "batch": batch,
                                      "npz": str(npz), "logits": str(logits), **common},
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
            rows.append(row)
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
