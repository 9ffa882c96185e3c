"""The report of bench_models: machine facts and the markdown tables."""
from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

MB = 1 << 20


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


def _settings(args, meta: dict, rows: list[dict], done: int, total: int) -> list[str]:
    """The header: command, date, machine, versions, devices, and how each number is taken."""
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
    ]
    if busy(meta["cores"], meta["load_start"]):
        head.insert(5, "- **WARNING: the machine was already busy when this run started (1-minute "
                       "load average above half the core count); CPU timings are unreliable.**")
    return head


def _speed_table(rows: list[dict]) -> list[str]:
    """Time per batch, images/s, compile time and peak memory of both frameworks; errors."""
    head = [
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
    return head


def _details_table(rows: list[dict]) -> list[str]:
    """Runs, XLA's memory analysis, the logits' agreement and the workers' wall times."""
    head = [
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
    return head


def render(args, meta: dict, rows: list[dict], done: int, total: int) -> str:
    """The whole results file for the configs done so far (`done` of `total`)."""
    return "\n".join(_settings(args, meta, rows, done, total) + _speed_table(rows)
                     + _details_table(rows)) + "\n"


def write_atomic(path: Path, text: str) -> None:
    from gfi_jax.files import atomic_write_text
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)
