"""The worker side of bench_models: one job (export, jax, torch or probe) in a fresh process.

    python -m experiments.benchmarks.bench_models_worker JOB_JSON

bench_models starts one such process per framework and config, so memory numbers are per
config and the two frameworks never share a process. This module imports neither JAX nor
torch at the top (nor gfi_jax, which would load JAX into the PyTorch workers): each worker
imports only its own framework. The result is written as JSON to `job["result"]`.
"""
from __future__ import annotations

import gc
import json
import os
import statistics
import sys
import time


# --------------------------------------------------------------------------- memory
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
    # Not gfi_jax.files: importing gfi_jax would load JAX into this PyTorch worker.
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
    # Not gfi_jax.files: importing gfi_jax would load JAX into the PyTorch workers too.
    tmp = job["result"] + ".partial"
    with open(tmp, "w") as f:
        json.dump(res, f)
    os.replace(tmp, job["result"])
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1]))
