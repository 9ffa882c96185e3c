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
import ast
import concurrent.futures
import dataclasses
import json
import math
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

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


def parse_value(text: str) -> Any:
    """`--set` values: Python literals (1, 0.5, True, None, 'x'), else the plain string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


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


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def chunk_rows(c: int, rows: int, n: int) -> range:
    return range(c * rows, min((c + 1) * rows, n))


def done_chunks(out: Path, rows: int, n: int, processes: int, process: int) -> set[int]:
    """Chunks all of whose records exist (in any writer's file). Rewrites this process's own
    file without torn or partial-chunk lines, so that redoing a chunk cannot duplicate one."""
    done = set()
    for q in range(processes):
        path = records_path(out, q)
        recs = read_records(path)
        by_chunk: dict[int, dict[int, dict]] = {}
        for r in recs:
            by_chunk.setdefault(r["index"] // rows, {})[r["index"]] = r
        complete = {c for c, got in by_chunk.items()
                    if set(got) == set(chunk_rows(c, rows, n))}
        done |= complete
        if q == process and path.is_file():
            keep = [r for r in recs if r["index"] // rows in complete]
            data = b"".join(_record_line(r) for r in keep)
            if data != path.read_bytes():
                _write_atomic(path, data)
    return done


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
        pre = model.preprocessing
        color = pre.normalize(np.asarray(pre.mean) * 255.0).astype(np.float32)

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
        model: str = "efficientnet_lite0", weights: str | os.PathLike | None = None,
        method: str = "gfi", targets: str = "top1", batch_size: int = 8,
        out: str | os.PathLike = "gfi-out", dtype: str = "uint8", preset: str | None = None,
        image_size: int | None = None, model_dtype: str = "float32", workers: int = 0,
        threads: int = 2, prefetch: int = 2, sequential: bool | None = None,
        progress: bool = True, **config) -> Summary:
    """Explains every image of a folder (`images`, recursive) or a list file (`list_file`) into
    `out`, resuming whatever an earlier call with the same arguments left unfinished.

    batch_size: the global batch, a multiple of the device count (all processes).
    targets: "top1" or "labels" (the list's labels). dtype: "uint8", "float16" (or "float32")
    masks. preset / **config: the GFI preset and field overrides (`stage1_steps=1`), or the
    method's options for other methods. image_size: input side (default: the model's).
    workers: decoding processes (0: threads in this process). sequential: explain a device's
    images one after another (default: on CPU, which makes results bitwise device-invariant).
    Call `jax.distributed.initialize` first for several hosts. Returns this process's Summary.
    """
    import jax
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from gfi_jax import pipeline
    from gfi_jax.weights import load_model

    if dtype not in MASK_DTYPES:
        raise ValueError(f"mask dtype {dtype!r}: use one of {', '.join(MASK_DTYPES)}")
    if targets not in ("top1", "labels"):
        raise ValueError(f"targets {targets!r}: use 'top1' or 'labels' (labels from --list)")
    names, paths, labels = inputs(images, list_file)
    n = len(names)
    if targets == "labels" and any(lab is None for lab in labels):
        missing = next(nm for nm, lab in zip(names, labels) if lab is None)
        raise ValueError(f"--targets labels needs a label for every input; {missing!r} has none "
                         "(use --list with 'PATH LABEL' lines, or --targets top1)")

    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    nproc, proc = jax.process_count(), jax.process_index()
    if batch_size < 1 or batch_size % len(devices):
        raise ValueError(f"--batch-size {batch_size} must be a positive multiple of the "
                         f"{len(devices)} devices")
    rows = batch_size // nproc               # rows per chunk = this process's part of a batch
    mesh = Mesh(np.array(devices), ("data",))

    m = load_model(model, weights, dtype=model_dtype)
    pre = m.preprocessing
    if image_size is not None:
        pre = pre.replace(size=image_size, resize=max(image_size,
                                                      round(image_size * pre.resize / pre.size)))
    hw = (pre.size, pre.size)
    m.check_images(np.zeros((1, *hw, 3), np.float32))
    if targets == "labels":
        bad = [(nm, lab) for nm, lab in zip(names, labels) if not 0 <= lab < len(m.classes)]
        if bad:
            raise ValueError(f"label {bad[0][1]} of {bad[0][0]!r} is outside the model's "
                             f"{len(m.classes)} classes (0..{len(m.classes) - 1})")
    if sequential is None:
        sequential = jax.default_backend() == "cpu"
    if method == "gfi":
        from gfi_jax import gfi
        cfg = resolve_config(m, gfi.preset(preset or None, arch=m.arch.name, **config))
        preset = cfg.name                      # the run file records the resolved name
        gfi.check_layers(m, cfg, hw)
    else:
        from gfi_jax import methods
        cfg = methods.make_config(method, m, **config)
    settings = dataclasses.asdict(cfg)

    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    _check_run_file(out, {
        "format": FORMAT, "inputs": n, "names_sha256": _sha(names), "labels_sha256": _sha(labels),
        "model": m.name, "weights": str(weights) if weights else None,
        "model_dtype": model_dtype, "method": method, "targets": targets, "preset": preset,
        "config": settings, "preprocessing": dataclasses.asdict(pre), "dtype": dtype,
        "batch_size": batch_size, "processes": nproc, "sequential": sequential})
    masks = open_masks(out, n, hw, rows, dtype)

    # What is left: global batches with any chunk not done (all processes agree on this list).
    nchunks = math.ceil(n / rows)
    done = done_chunks(out, rows, n, nproc, proc)
    todo = [b for b in range(math.ceil(nchunks / nproc))
            if any(c not in done for c in range(b * nproc, min((b + 1) * nproc, nchunks)))]
    mine = [b * nproc + proc for b in todo]
    write = [c < nchunks and c not in done for c in mine]
    skipped = sum(len(chunk_rows(c, rows, n)) for c in range(proc, nchunks, nproc) if c in done)
    items = []
    for c in mine:
        real = [(i, paths[i]) for i in chunk_rows(c, rows, n)] if c < nchunks else []
        items += real + [(-1, "")] * (rows - len(real))

    tgt_all = np.array([-1 if targets == "top1" else lab for lab in labels], np.int32)
    pool = concurrent.futures.ThreadPoolExecutor(1)
    data = NamedSharding(mesh, P("data"))
    params = jax.tree.map(lambda a: jax.make_array_from_process_local_data(
        NamedSharding(mesh, P()), np.asarray(a)), m.params)
    step = make_step(m, method, cfg, mesh, sequential)
    x_spec = jax.ShapeDtypeStruct((batch_size, *hw, 3), np.float32, sharding=data)
    t_spec = jax.ShapeDtypeStruct((batch_size, 1), np.int32, sharding=data)
    # Bitwise mode: XLA's SPMD pipeline runs an extra CSE before algebraic simplification
    # when there are ≥ 2 devices, which rewrites a few divisions differently than for one
    # device (last-bit differences). Without CSE the program is the same for any count.
    opts = {"xla_disable_hlo_passes": "cse"} if sequential else {}
    t0 = time.monotonic()
    compiling = pool.submit(lambda: step.lower(params, x_spec, t_spec).compile(opts)) if todo \
        else None

    def launch(x, t):
        return compiling.result()(params, jax.make_array_from_process_local_data(data, x),
                                  jax.make_array_from_process_local_data(data, t))

    stop = _StopFlag()
    timeline = []                     # per batch: (fetch start, fetch end, done)
    counts = {"done": 0, "failed": 0}
    fault = _Fault(os.environ.get(FAULT_ENV, ""))
    it = pipeline.batches(items, rows, pre, workers=workers, threads=threads, prefetch=prefetch)
    bar = _Progress(len(todo), batch_size, enabled=progress and proc == 0)
    pending = None
    with stop.installed():
        try:
            for k in range(len(todo)):
                fs = time.monotonic()
                # copies: Grain's shared-memory buffers are freed as soon as possible
                idx, x, err = (np.array(a) for a in next(it))
                fe = time.monotonic()
                if k == 0:
                    compiling.result()
                    t_ready = bar.t0 = time.monotonic()
                c = mine[k]
                t = np.where(idx >= 0, tgt_all[np.maximum(idx, 0)], -1).astype(np.int32)[:, None]
                o = launch(x, t)
                ready = pool.submit(_when_ready, o)
                if pending is not None:
                    _finish(*pending, out=out, masks=masks, rows=rows, n=n, dtype=dtype,
                            names=names, labels=labels, counts=counts, fault=fault)
                    bar.update()
                pending = (c, write[k], idx, err, o)
                timeline.append((fs, fe, ready))
                if stop.set:
                    break
            if pending is not None:
                _finish(*pending, out=out, masks=masks, rows=rows, n=n, dtype=dtype,
                        names=names, labels=labels, counts=counts, fault=fault)
                bar.update()
        finally:
            if hasattr(it, "close"):
                it.close()
    t_end = time.monotonic()
    compile_s = (t_ready - t0) if timeline else 0.0
    start = t_ready if timeline else t_end
    waited, free = 0.0, start
    for fs, fe, ready in timeline:
        waited += max(0.0, fe - max(fs, free))
        free = ready.result()
    pool.shutdown()
    secs = max(t_end - start, 1e-9)
    s = Summary(total=n, done=counts["done"], failed=counts["failed"], skipped=skipped,
                seconds=t_end - start, images_per_s=(counts["done"] + counts["failed"]) / secs,
                device_wait=waited / secs, compile_seconds=compile_s, process=proc,
                processes=nproc, stopped=stop.set)
    bar.close()
    if progress:
        print(s.line(), file=sys.stderr, flush=True)
    return s


def _finish(c: int, write: bool, idx: np.ndarray, err: np.ndarray, o, *, out: Path, masks,
            rows: int, n: int, dtype: str, names, labels, counts, fault) -> None:
    """Writes one finished chunk: masks first, then all its records in one append."""
    if not write:
        return
    o = {k: local_rows(v) for k, v in o.items()}
    span = chunk_rows(c, rows, n)
    ok = np.array([e == "" for e in err[:len(span)]])
    mask = to_mask_dtype(np.asarray(o["mask"][:len(span)], np.float32), dtype)
    mask[~ok] = 0
    masks[span.start:span.stop].write(mask).result()
    fault.after_chunk(out, c)
    lines = []
    for j, i in enumerate(span):
        assert int(idx[j]) == i, (int(idx[j]), i)   # the pipeline's order is the chunk's order
        good = bool(ok[j])
        lines.append(_record_line({
            "index": i, "path": names[i], "label": labels[i],
            "target": int(o["target"][j]) if good else None,
            "score": float(o["score"][j]) if good else None,
            "status": "ok" if good else "failed", "error": None if good else str(err[j])}))
        counts["done" if good else "failed"] += 1
    data = b"".join(lines)
    with open(records_path(out, _proc()), "ab") as f:
        fault.records(f, data)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _proc() -> int:
    import jax
    return jax.process_index()


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
        _write_atomic(path, json.dumps(settings, indent=1).encode())


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


class _Progress:
    """A one-line progress bar on stderr: batches, images/s, ETA (a line every 10 s if not a TTY)."""

    def __init__(self, total: int, batch: int, enabled: bool):
        self.total, self.batch, self.enabled = total, batch, enabled and total > 0
        self.k, self.t0, self.last = 0, time.monotonic(), 0.0
        self.tty = sys.stderr.isatty()

    def update(self) -> None:
        self.k += 1
        if not self.enabled:
            return
        now = time.monotonic()
        if not self.tty and now - self.last < 10 and self.k < self.total:
            return
        self.last = now
        rate = self.k * self.batch / max(now - self.t0, 1e-9)
        eta = (self.total - self.k) * self.batch / max(rate, 1e-9)
        filled = int(30 * self.k / self.total)
        line = (f"[{'#' * filled}{'.' * (30 - filled)}] {self.k}/{self.total} batches "
                f"{rate:.2f} images/s ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}")
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n",
              file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled and self.tty:
            print(file=sys.stderr)


# ----------------------------------------------------------------------------- command line
def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `gfi-jax run` flags."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", metavar="DIR", help="folder of images (recursive, sorted)")
    src.add_argument("--list", metavar="FILE", dest="list_file",
                     help="list file: 'PATH [LABEL]' per line, or CSV 'PATH,LABEL,...'")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output folder: masks.zarr, records-*.jsonl, run.json")
    p.add_argument("--model", default="efficientnet_lite0", help="architecture (gfi-jax models)")
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
    """`gfi-jax run` with parsed `args`; 0 when every input has a record (or on SIGTERM)."""
    import jax

    overrides = {}
    for kv in args.overrides:
        key, eq, value = kv.partition("=")
        if not eq or not key:
            print(f"gfi-jax run: --set {kv!r}: write KEY=VALUE, e.g. --set stage2_steps=10",
                  file=sys.stderr)
            return 2
        overrides[key.strip()] = parse_value(value.strip())
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
        print(f"gfi-jax run: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m gfi_jax.run", description=__doc__.split("\n")[0])
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
