"""`gfi-jax run`: explain a whole dataset on every local device and every host, resumably.

    gfi-jax run --images DIR --out OUT [--model efficientnet_lite0] [--batch-size 64]
    python -m gfi_jax.run --list val.txt --targets labels --out OUT

Work layout. The N inputs (sorted paths under --images, or the --list order) are cut into
chunks of L = batch_size / processes rows; global batch b is chunks b·P … b·P+P−1, and process p
explains chunk b·P+p on its local devices (the batch is one global array sharded along the
`data` mesh axis; `shard_map` runs the per-device program). Process p is the only writer of its
chunks: `OUT/masks.zarr` (tensorstore, zarr v2, shape (N, H, W), one chunk = L rows) and
`OUT/records-PPPPP.jsonl` (one JSON object per input).

Nothing lost. A chunk's masks are written first, then its records in one append; a chunk is
done when all its records are there. On restart with the same command every process reads all
record files (a torn last line is dropped), redoes the global batches that are not complete, and
rewrites only chunks that are not done, so each input ends with exactly one record and one mask
row. SIGTERM/SIGINT: finish the batch in flight, write it, exit 0.

Results do not depend on devices or processes: on CPU the engine explains the images of a
device one after another inside the program (`sequential=True`), the same computation as for an
image alone; on accelerators images are batched per device (faster, equal up to rounding).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gfi_jax.files import atomic_write_bytes, atomic_write_json
from gfi_jax.frontend import (DEFAULT_MODEL, Progress, check_weights, default_sequential,
                              mean_background)

FORMAT = "gfi_jax.run/1"
FAULT_ENV = "GFI_JAX_RUN_FAULT"   # test hook: "after_chunk:N", "torn_chunk:N", "torn_records:N"
MASK_DTYPES = {"uint8": "|u1", "float16": "<f2", "float32": "<f4"}


@dataclasses.dataclass(frozen=True)
class Summary:
    """What one process did in one `run` call."""
    total: int              # inputs in the dataset (all processes)
    done: int               # explained in this call by this process
    failed: int             # recorded as failed in this call by this process
    skipped: int            # this process's inputs already done by an earlier call
    seconds: float          # from the compiled program being ready to the last write
    images_per_s: float     # (done + failed) / seconds
    device_wait: float      # fraction of `seconds` the devices sat idle waiting for input
    compile_seconds: float
    process: int = 0
    processes: int = 1
    stopped: bool = False   # ended early by SIGTERM / SIGINT

    def line(self) -> str:
        who = f"process {self.process}/{self.processes}: " if self.processes > 1 else ""
        return (f"{who}{self.done} done, {self.failed} failed, {self.skipped} skipped (already "
                f"done) of {self.total}; {self.images_per_s:.2f} images/s over {self.seconds:.1f} s;"
                f" device waited for data {100 * self.device_wait:.1f}% of the time; compile "
                f"{self.compile_seconds:.1f} s" + ("; stopped early (signal)" if self.stopped else ""))


# ----------------------------------------------------------------------------- inputs
def inputs(images: str | os.PathLike | None, list_file: str | os.PathLike | None
           ) -> tuple[list[str], list[str], list[int | None]]:
    """-> (names as recorded, paths to read, labels) for `--images DIR` or `--list FILE`."""
    from gfi_jax import pipeline

    if (images is None) == (list_file is None):
        raise ValueError("give exactly one of --images DIR or --list FILE")
    if images is not None:
        names = pipeline.list_images(images)
        root = Path(images).expanduser()
        return names, [str(root / n) for n in names], [None] * len(names)
    names, labels = pipeline.read_list(list_file)
    base = Path(list_file).expanduser().parent
    return names, [str(base / Path(n).expanduser()) for n in names], labels


# ----------------------------------------------------------------------------- records
def records_path(out: Path, process: int) -> Path:
    return out / f"records-{process:05d}.jsonl"


def read_records(path: Path) -> list[dict]:
    """Complete JSON lines of a records file; a torn last line (killed mid-write) is dropped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_bytes().split(b"\n")[:-1]:   # the part after the last \n is torn
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def chunk_rows(c: int, rows: int, n: int) -> range:
    return range(c * rows, min((c + 1) * rows, n))


def complete_chunks(records: Iterable[dict], rows: int, n: int) -> set[int]:
    """Chunks of one writer's records all of whose rows have a record: those are done (the
    masks of a chunk are written before its records, so its masks are there too)."""
    by_chunk: dict[int, set[int]] = {}
    for r in records:
        by_chunk.setdefault(r["index"] // rows, set()).add(r["index"])
    return {c for c, got in by_chunk.items() if got == set(chunk_rows(c, rows, n))}


@dataclasses.dataclass(frozen=True)
class ResumePlan:
    """What one process does in a (re)started run. The global batches are the same on every
    process (each computes them from all record files), so all step through them together."""
    done: frozenset[int]                  # chunks already done (by any writer)
    batches: tuple[int, ...]              # global batches with any chunk not done
    chunks: tuple[int, ...]               # this process's chunk of each (≥ chunk count: padding)
    write: tuple[bool, ...]               # per chunk: write it (False: done already, or padding)
    skipped: int                          # this process's inputs done by an earlier call
    items: tuple[tuple[int, str], ...]    # (index, path) per row to decode; (-1, "") pads


def plan_resume(records: Sequence[Iterable[dict]], paths: Sequence[str], rows: int,
                processes: int, process: int) -> ResumePlan:
    """The plan for `paths` cut into chunks of `rows`, given each writer's records so far
    (`records[q]`: the complete lines of process q's file). Pure: reads and writes nothing."""
    n = len(paths)
    nchunks = math.ceil(n / rows)
    done = frozenset().union(*(complete_chunks(r, rows, n) for r in records))
    batches = tuple(b for b in range(math.ceil(nchunks / processes))
                    if any(c not in done for c in range(b * processes,
                                                        min((b + 1) * processes, nchunks))))
    chunks = tuple(b * processes + process for b in batches)
    items: list[tuple[int, str]] = []
    for c in chunks:
        real = [(i, paths[i]) for i in chunk_rows(c, rows, n)] if c < nchunks else []
        items += real + [(-1, "")] * (rows - len(real))
    return ResumePlan(
        done=done, batches=batches, chunks=chunks,
        write=tuple(c < nchunks and c not in done for c in chunks),
        skipped=sum(len(chunk_rows(c, rows, n)) for c in range(process, nchunks, processes)
                    if c in done),
        items=tuple(items))


def drop_incomplete_records(path: Path, records: list[dict], rows: int, n: int) -> None:
    """Rewrites this process's records file without torn lines or the lines of chunks left
    half written, so that redoing those chunks cannot give an input two records."""
    if not path.is_file():
        return
    complete = complete_chunks(records, rows, n)
    data = b"".join(_record_line(r) for r in records if r["index"] // rows in complete)
    if data != path.read_bytes():
        atomic_write_bytes(path, data, durable=True)


def _record_line(r: dict) -> bytes:
    return (json.dumps(r) + "\n").encode()


# ----------------------------------------------------------------------------- output
def open_masks(out: Path, n: int, hw: tuple[int, int], rows: int, dtype: str):
    """`OUT/masks.zarr`, created if absent (concurrent creation by several processes is safe:
    tensorstore writes the metadata only if none exists, and checks it otherwise)."""
    import tensorstore as ts

    spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": str(out / "masks.zarr")},
            "metadata": {"shape": [n, *hw], "chunks": [rows, *hw], "dtype": MASK_DTYPES[dtype],
                         "fill_value": 0, "compressor": {"id": "zlib", "level": 1}}}
    return ts.open(spec, create=True, open=True).result()


def read_output(out: str | os.PathLike) -> tuple[np.ndarray, list[dict]]:
    """(masks `(N, H, W)`, records sorted by index) of a run folder."""
    import tensorstore as ts

    out = Path(out)
    arr = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(out / "masks.zarr")}},
                  open=True).result()
    recs = [r for p in sorted(out.glob("records-*.jsonl")) for r in read_records(p)]
    return arr.read().result(), sorted(recs, key=lambda r: r["index"])


def to_mask_dtype(m: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "uint8":
        return np.round(np.clip(m, 0.0, 1.0) * 255.0).astype(np.uint8)
    return m.astype(dtype)


# ----------------------------------------------------------------------------- compute
def resolve_config(model, cfg):
    """The config with l0/l1 resolved to the model's layer names (as `gfi.explain` does)."""
    from gfi_jax.gfi import resolve_layers
    return resolve_layers(cfg, model.arch)


def make_step(model, method: str, cfg, mesh, sequential: bool) -> Callable:
    """jit(shard_map(explain)): (params, images `(G, H, W, 3)`, targets `(G, 1)`, −1 = top-1)
    -> {"mask" `(G, H, W)`, "target" `(G,)`, "score" `(G,)`}, all sharded along `data`; every
    device explains its own rows, one image at a time when `sequential`."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    from gfi_jax import gfi

    color = None
    if method == "gfi" and cfg.background == "mean":
        color = mean_background(model.preprocessing).astype(np.float32)

    def explain_gfi(params, images, targets):
        p = None if color is None else jnp.broadcast_to(color, images.shape)
        o = gfi.gfi(model.features, params, images, targets, p, cfg, sequential)
        return {"mask": o["mask"], "target": o["target"], "score": o["score"]}

    def explain_other(params, images, targets):
        from gfi_jax.methods import METHODS

        def one(x, t):
            logits = model.features(params, x, ("logits",))["logits"]
            t = gfi.resolve_targets(logits, t)[:, 0]
            return {"mask": METHODS[method].fn(model.features, params, x, t, cfg), "target": t,
                    "score": gfi.class_score(logits, t, "softmax")}
        if not sequential:
            return one(images, targets)
        out = jax.lax.map(lambda a: one(a[0][None], a[1][None]), (images, targets))
        return jax.tree.map(lambda a: a[:, 0], out)

    # check_vma=False: ω starts device-invariant, and with vma checks its gradient would be
    # summed over devices (the transpose of an implicit pvary); each device's images are its own.
    return jax.jit(jax.shard_map(explain_gfi if method == "gfi" else explain_other, mesh=mesh,
                                 in_specs=(P(), P("data"), P("data")), out_specs=P("data"),
                                 check_vma=False))


def local_rows(a) -> np.ndarray:
    """This process's rows of an array sharded along its first axis, in order."""
    if isinstance(a, np.ndarray):
        return a
    shards = sorted(a.addressable_shards, key=lambda s: s.index[0].start or 0)
    return np.concatenate([np.asarray(s.data) for s in shards])


# ----------------------------------------------------------------------------- the run
def run(images: str | os.PathLike | None = None, list_file: str | os.PathLike | None = None, *,
        model=None, weights: str | os.PathLike | None = None,
        method: str = "gfi", targets: str = "top1", batch_size: int = 8,
        out: str | os.PathLike = "gfi-out", dtype: str = "uint8", preset: str | None = None,
        image_size: int | None = None, model_dtype: str = "float32", workers: int = 0,
        threads: int = 2, prefetch: int = 2, sequential: bool | None = None,
        progress: bool = True, **config) -> Summary:
    """Explains every image of a folder (`images`, recursive) or a list file (`list_file`) into
    `out`, resuming whatever an earlier call with the same arguments left unfinished.

    model: an architecture name (default `efficientnet_lite0`; with `weights` only, the
    folder's), or a model object (`gfi_jax.load_model`'s, or `gfi_jax.wrap`'s with its
    preprocessing). batch_size: the global batch, a multiple of the device count (all processes).
    targets: "top1" or "labels" (the list's labels). dtype: "uint8", "float16" (or "float32")
    masks. preset / **config: the GFI preset and field overrides (`stage1_steps=1`), or the
    method's options for other methods. image_size: input side (default: the model's).
    workers: decoding processes (0: threads in this process). sequential: explain a device's
    images one after another (default: on CPU, which makes results bitwise device-invariant).
    Call `jax.distributed.initialize` first for several hosts. Returns this process's Summary.
    """
    import jax

    if dtype not in MASK_DTYPES:
        raise ValueError(f"mask dtype {dtype!r}: use one of {', '.join(MASK_DTYPES)}")
    if targets not in ("top1", "labels"):
        raise ValueError(f"targets {targets!r}: use 'top1' or 'labels' (labels from --list)")
    names, paths, labels = _read_inputs(images, list_file, targets)
    mesh = _data_mesh(batch_size)
    nproc, proc = jax.process_count(), jax.process_index()
    rows = batch_size // nproc               # rows per chunk = this process's part of a batch
    m, pre = _load_model(model, weights, model_dtype, image_size)
    hw = (pre.size, pre.size)
    if targets == "labels":
        _check_labels(names, labels, len(m.classes))
    if sequential is None:
        sequential = default_sequential()
    cfg, preset = _method_config(m, method, preset, config, hw)

    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    _check_run_file(out, {
        "format": FORMAT, "inputs": len(names), "names_sha256": _sha(names),
        "labels_sha256": _sha(labels), "model": m.name,
        "weights": str(weights) if weights else None, "model_dtype": model_dtype,
        "method": method, "targets": targets, "preset": preset,
        "config": dataclasses.asdict(cfg), "preprocessing": dataclasses.asdict(pre),
        "dtype": dtype, "batch_size": batch_size, "processes": nproc, "sequential": sequential})
    writer = _ChunkWriter(out, open_masks(out, len(names), hw, rows, dtype), rows, dtype,
                          names, labels, proc, _Fault(os.environ.get(FAULT_ENV, "")))
    records = [read_records(records_path(out, q)) for q in range(nproc)]
    plan = plan_resume(records, paths, rows, nproc, proc)
    drop_incomplete_records(records_path(out, proc), records[proc], rows, len(names))

    pool = concurrent.futures.ThreadPoolExecutor(1)
    program = _Program(m, method, cfg, mesh, sequential, (batch_size, *hw, 3), pool,
                       compile_now=bool(plan.batches))
    it = _batches(plan.items, rows, pre, workers, threads, prefetch)
    bar = Progress(len(plan.batches) * batch_size,
                   enabled=progress and proc == 0 and bool(plan.batches))
    target_of = np.array([-1 if targets == "top1" else lab for lab in labels], np.int32)
    stop = _StopFlag()
    with stop.installed():
        try:
            timeline = _explain_batches(plan, program, it, target_of, writer, bar, stop, pool)
        finally:
            bar.close()
            if hasattr(it, "close"):
                it.close()
    s = _summary(len(names), plan, program, writer, timeline, stop.set)
    pool.shutdown()
    if progress:
        print(s.line(), file=sys.stderr, flush=True)
    return s


def _summary(total: int, plan: ResumePlan, program: "_Program", writer: "_ChunkWriter",
             timeline: list, stopped: bool) -> Summary:
    """This process's Summary, timed from the program being ready to now."""
    import jax

    t_end = time.monotonic()
    start = program.ready_at if timeline else t_end
    waited = device_wait([(fs, fe, ready.result()) for fs, fe, ready in timeline], start)
    secs = max(t_end - start, 1e-9)
    return Summary(total=total, done=writer.done, failed=writer.failed, skipped=plan.skipped,
                   seconds=t_end - start, images_per_s=(writer.done + writer.failed) / secs,
                   device_wait=waited / secs,
                   compile_seconds=(program.ready_at - program.t0) if timeline else 0.0,
                   process=jax.process_index(), processes=jax.process_count(), stopped=stopped)


def _read_inputs(images, list_file, targets: str) -> tuple[list[str], list[str], list]:
    names, paths, labels = inputs(images, list_file)
    if targets == "labels" and any(lab is None for lab in labels):
        missing = next(nm for nm, lab in zip(names, labels) if lab is None)
        raise ValueError(f"--targets labels needs a label for every input; {missing!r} has none "
                         "(use --list with 'PATH LABEL' lines, or --targets top1)")
    return names, paths, labels


def _data_mesh(batch_size: int):
    """All devices of all processes along one `data` axis, in process order."""
    import jax
    from jax.sharding import Mesh

    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    if batch_size < 1 or batch_size % len(devices):
        raise ValueError(f"--batch-size {batch_size} must be a positive multiple of the "
                         f"{len(devices)} devices")
    return Mesh(np.array(devices), ("data",))


def _load_model(name, weights, model_dtype: str, image_size: int | None):
    """-> (the model, its preprocessing at `image_size`). name: a zoo name (or None), or a
    model object (`load_model`'s or `wrap`'s), used as it is."""
    m = _model_object(name, weights, model_dtype)
    if m is None:
        from gfi_jax.weights import load_model
        check_weights(name, weights)
        m = load_model(name, weights, dtype=model_dtype)
    pre = m.preprocessing
    if pre is None:
        raise ValueError(f"run decodes image files, so the model needs its preprocessing; wrap "
                         f"{m.name} with preprocessing=gfi_jax.io.Preprocessing(size=...)")
    if image_size is not None:
        pre = pre.replace(size=image_size, resize=max(image_size,
                                                      round(image_size * pre.resize / pre.size)))
    m.check_images(np.zeros((1, pre.size, pre.size, 3), np.float32))
    return m, pre


def _model_object(model, weights, model_dtype: str):
    """`model` when it is a model object, not a name (None for a name)."""
    if model is None or isinstance(model, str):
        return None
    if not hasattr(model, "features"):
        raise ValueError(f"model must be a zoo name or a model (load_model / wrap); got "
                         f"{type(model).__name__}")
    if weights is not None or model_dtype != "float32":
        raise ValueError("weights= and model_dtype= apply to a zoo model name; a model object "
                         "brings its own (cast a LoadedModel with m.astype)")
    return model


def _check_labels(names: list[str], labels: list[int], classes: int) -> None:
    bad = [(nm, lab) for nm, lab in zip(names, labels) if not 0 <= lab < classes]
    if bad:
        raise ValueError(f"label {bad[0][1]} of {bad[0][0]!r} is outside the model's "
                         f"{classes} classes (0..{classes - 1})")


def _method_config(m, method: str, preset: str | None, config: dict, hw) -> tuple[Any, str | None]:
    """-> (the method's config, the preset name the run file records)."""
    if method == "gfi":
        from gfi_jax import gfi
        cfg = resolve_config(m, gfi.preset(preset or None, arch=m.arch.name, **config))
        gfi.check_layers(m, cfg, hw)
        return cfg, cfg.name                   # the resolved name, not None
    from gfi_jax import methods
    return methods.make_config(method, m, **config), preset


def _batches(items, rows: int, pre, workers: int, threads: int, prefetch: int):
    from gfi_jax import pipeline
    return pipeline.batches(items, rows, pre, workers=workers, threads=threads, prefetch=prefetch)


class _Program:
    """The step compiled (in `pool`, while the first batch is decoded) for global batches of
    `shape` `(G, H, W, 3)`, with the params placed on every device: `program(x, t)` launches
    one batch."""

    def __init__(self, model, method: str, cfg, mesh, sequential: bool, shape: tuple, pool,
                 compile_now: bool):
        import jax
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        self.batch = shape[0]                # global images per batch
        self.data = NamedSharding(mesh, P("data"))
        self.params = jax.tree.map(lambda a: jax.make_array_from_process_local_data(
            NamedSharding(mesh, P()), np.asarray(a)), model.params)
        step = make_step(model, method, cfg, mesh, sequential)
        x_spec = jax.ShapeDtypeStruct(shape, np.float32, sharding=self.data)
        t_spec = jax.ShapeDtypeStruct((shape[0], 1), np.int32, sharding=self.data)
        # Bitwise mode: XLA's SPMD pipeline runs an extra CSE before algebraic simplification
        # when there are ≥ 2 devices, which rewrites a few divisions differently than for one
        # device (last-bit differences). Without CSE the program is the same for any count.
        opts = {"xla_disable_hlo_passes": "cse"} if sequential else {}
        self.t0 = time.monotonic()
        self.ready_at = self.t0
        self.compiling = pool.submit(
            lambda: step.lower(self.params, x_spec, t_spec).compile(opts)) if compile_now else None

    def wait(self) -> None:
        """Blocks until compiled; `ready_at` is then when it was."""
        self.compiling.result()
        self.ready_at = time.monotonic()

    def __call__(self, x: np.ndarray, t: np.ndarray):
        import jax
        return self.compiling.result()(self.params,
                                       jax.make_array_from_process_local_data(self.data, x),
                                       jax.make_array_from_process_local_data(self.data, t))


def _explain_batches(plan: ResumePlan, program: _Program, it, target_of: np.ndarray,
                     writer: "_ChunkWriter", bar: Progress, stop: "_StopFlag", pool) -> list:
    """Runs the plan's batches, writing batch k−1 while batch k runs on the devices (and the
    pipeline decodes ahead). -> per batch (fetch start, fetch end, future of its done time)."""
    timeline = []
    pending = None
    t_bar = time.monotonic()
    for k, chunk in enumerate(plan.chunks):
        fs = time.monotonic()
        # copies: Grain's shared-memory buffers are freed as soon as possible
        idx, x, err = (np.array(a) for a in next(it))
        fe = time.monotonic()
        if k == 0:
            program.wait()
            bar.exclude(program.ready_at - t_bar)   # the rate starts when the program is ready
        t = np.where(idx >= 0, target_of[np.maximum(idx, 0)], -1).astype(np.int32)[:, None]
        o = program(x, t)
        ready = pool.submit(_when_ready, o)
        if pending is not None:
            writer.write(*pending)
            bar.update(program.batch)
        pending = (chunk, plan.write[k], idx, err, o)
        timeline.append((fs, fe, ready))
        if stop.set:
            break
    if pending is not None:
        writer.write(*pending)
        bar.update(program.batch)
    return timeline


def device_wait(timeline: Sequence[tuple[float, float, float]], start: float) -> float:
    """Seconds the devices sat idle waiting for input, from per-batch (fetch start, fetch end,
    done time): fetching batch k only keeps the devices waiting after batch k−1 is done (or,
    for the first, after `start`, when the program was ready)."""
    waited, free = 0.0, start
    for fs, fe, ready in timeline:
        waited += max(0.0, fe - max(fs, free))
        free = ready
    return waited


@dataclasses.dataclass
class _ChunkWriter:
    """Writes finished chunks: masks first, then all of a chunk's records in one append."""
    out: Path
    masks: Any                 # the tensorstore array of OUT/masks.zarr
    rows: int
    dtype: str
    names: list[str]
    labels: list
    process: int
    fault: "_Fault"
    done: int = 0              # records written in this call: explained …
    failed: int = 0            # … and failed

    def write(self, c: int, write: bool, idx: np.ndarray, err: np.ndarray, o) -> None:
        if not write:
            return
        o = {k: local_rows(v) for k, v in o.items()}
        span = chunk_rows(c, self.rows, len(self.names))
        ok = np.array([e == "" for e in err[:len(span)]])
        mask = to_mask_dtype(np.asarray(o["mask"][:len(span)], np.float32), self.dtype)
        mask[~ok] = 0
        self.masks[span.start:span.stop].write(mask).result()
        self.fault.after_chunk(self.out, c)
        lines = []
        for j, i in enumerate(span):
            assert int(idx[j]) == i, (int(idx[j]), i)   # the pipeline's order is the chunk's
            good = bool(ok[j])
            lines.append(_record_line({
                "index": i, "path": self.names[i], "label": self.labels[i],
                "target": int(o["target"][j]) if good else None,
                "score": float(o["score"][j]) if good else None,
                "status": "ok" if good else "failed", "error": None if good else str(err[j])}))
            self.done += good
            self.failed += not good
        data = b"".join(lines)
        with open(records_path(self.out, self.process), "ab") as f:
            self.fault.records(f, data)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def _when_ready(o) -> float:
    import jax
    jax.block_until_ready(o)
    return time.monotonic()


def _sha(obj) -> str:
    import hashlib
    return hashlib.sha256(json.dumps(obj).encode()).hexdigest()


def _check_run_file(out: Path, settings: dict) -> None:
    """`OUT/run.json` pins what the folder holds; a different command cannot resume it."""
    path = out / "run.json"
    settings = json.loads(json.dumps(settings))
    if path.is_file():
        old = json.loads(path.read_text())
        if old != settings:
            diff = sorted(k for k in settings.keys() | old.keys() if old.get(k) != settings.get(k))
            raise ValueError(f"{out} holds a run with other settings ({', '.join(diff)} differ); "
                             "rerun the same command to resume, or choose a new --out")
    else:
        atomic_write_json(path, settings, indent=1, durable=True)


class _StopFlag:
    """SIGTERM / SIGINT: finish the batch in flight, write it, return normally."""

    def __init__(self):
        self.set = False

    def _handler(self, signum, frame):
        if self.set and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.set = True

    def installed(self):
        import contextlib

        @contextlib.contextmanager
        def ctx():
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            old = {s: signal.signal(s, self._handler) for s in (signal.SIGTERM, signal.SIGINT)}
            try:
                yield
            finally:
                for s, h in old.items():
                    signal.signal(s, h)
        return ctx()


class _Fault:
    """Test hook ($GFI_JAX_RUN_FAULT=KIND:N): SIGKILL this process at the N-th chunk written —
    after its masks ("after_chunk"), after tearing its zarr chunk file in half ("torn_chunk"),
    or halfway through its records append ("torn_records"); or "slow:S": sleep S seconds
    between every chunk's masks and its records (a window for an outside kill)."""

    def __init__(self, spec: str):
        kind, _, n = spec.partition(":")
        self.kind, self.n, self.count = kind, float(n or 0), 0

    def after_chunk(self, out: Path, c: int) -> None:
        self.count += 1
        if self.kind == "slow":
            time.sleep(self.n)
        if self.count != self.n:
            return
        if self.kind == "torn_chunk":
            f = out / "masks.zarr" / f"{c}.0.0"
            data = f.read_bytes()
            f.write_bytes(data[:len(data) // 2])
        if self.kind in ("after_chunk", "torn_chunk"):
            os.kill(os.getpid(), signal.SIGKILL)

    def records(self, f, data: bytes) -> None:
        if self.kind == "torn_records" and self.count == self.n:
            f.write(data[:len(data) // 2 + 3])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)


# ----------------------------------------------------------------------------- command line
def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `gfi-jax run` flags."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", metavar="DIR", help="folder of images (recursive, sorted)")
    src.add_argument("--list", metavar="FILE", dest="list_file",
                     help="list file: 'PATH [LABEL]' per line, or CSV 'PATH,LABEL,...'")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output folder: masks.zarr, records-*.jsonl, run.json")
    p.add_argument("--model", default=None,
                   help=f"architecture (default {DEFAULT_MODEL}, or the one --weights holds; "
                        "see gfi-jax models)")
    p.add_argument("--weights", default=None, metavar="DIR", help="converted weights folder")
    p.add_argument("--method", default="gfi", help="gfi (default) or a gfi_jax.methods name")
    p.add_argument("--targets", default="top1", choices=("top1", "labels"),
                   help="class to explain: the top-1 prediction or the list's label")
    p.add_argument("--batch-size", type=int, default=8, help="global batch (multiple of devices)")
    p.add_argument("--mask-dtype", default="uint8", choices=tuple(MASK_DTYPES), dest="dtype")
    p.add_argument("--preset", default=None,
                   help="GFI preset: one of gfi_jax.gfi.PRESETS, e.g. reference, paper, "
                        "detached_lite0 (default: the model's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="config override, e.g. --set stage1_steps=1 (repeatable)")
    p.add_argument("--image-size", type=int, default=None, help="input side (default: model's)")
    p.add_argument("--model-dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1),
                   help="decoding processes (0: threads in the main process)")
    p.add_argument("--threads", type=int, default=2, help="decoding threads per worker")
    p.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="jax.distributed coordinator (with --num-processes, --process-id)")
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)
    p.add_argument("--distributed", action="store_true",
                   help="jax.distributed.initialize() from the cluster environment (TPU pods, SLURM)")
    p.add_argument("--no-progress", action="store_false", dest="progress")


def main(args: argparse.Namespace) -> int:
    """`gfi-jax run` with parsed `args`; 0 when every input has a record (or on SIGTERM).
    Errors the user can fix raise `cli.CliError` (one line, exit code `cli.USER_ERROR`)."""
    import jax

    from gfi_jax.cli import CliError
    from gfi_jax.gfi import parse_overrides

    try:
        overrides = parse_overrides(args.overrides, _config_fields(args.method))
    except ValueError as e:
        raise CliError(str(e)) from None
    if args.coordinator or args.distributed:
        jax.distributed.initialize(coordinator_address=args.coordinator,
                                   num_processes=args.num_processes, process_id=args.process_id)
    try:
        run(args.images, args.list_file, model=args.model, weights=args.weights,
            method=args.method, targets=args.targets, batch_size=args.batch_size, out=args.out,
            dtype=args.dtype, preset=args.preset, image_size=args.image_size,
            model_dtype=args.model_dtype, workers=args.workers, threads=args.threads,
            progress=args.progress, **overrides)
    except (ValueError, FileNotFoundError) as e:
        raise CliError(" ".join(str(e).split())) from None
    return 0


def _config_fields(method: str) -> type:
    """The dataclass whose fields `--set` may override: `gfi.Config`, or the method's config."""
    if method == "gfi":
        from gfi_jax.gfi import Config
        return Config
    from gfi_jax import methods
    return methods.get_method(method).config


if __name__ == "__main__":
    from gfi_jax import cli
    parser = argparse.ArgumentParser(prog="python -m gfi_jax.run", description=__doc__.split("\n")[0])
    add_arguments(parser)
    sys.exit(cli.run_command("run", main, parser.parse_args()))
