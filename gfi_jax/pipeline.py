"""Input for dataset runs: the list of inputs, and a Grain pipeline that decodes, resizes and
normalizes them in worker processes, one fixed-size batch per output chunk.

A bad file never stops the pipeline: its element carries a zero image and the reason, and the
run records it as failed. Padding elements (index −1) fill the last chunk to full size.
"""
from __future__ import annotations

import csv
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from gfi_jax import io

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                            ".ppm", ".pgm", ".pbm", ".pnm", ".jfif"})


def list_images(root: str | os.PathLike) -> list[str]:
    """Image files under `root` (recursive, by suffix, hidden entries skipped), as paths
    relative to `root`, sorted: row i of the output is the i-th of these."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ValueError(f"--images {root}: not a folder; pass a folder of images or use --list")
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = Path(dirpath).relative_to(root)
        found += [(rel / f).as_posix() for f in filenames
                  if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES]
    if not found:
        raise ValueError(f"--images {root}: no image files found (suffixes: "
                         f"{', '.join(sorted(IMAGE_SUFFIXES))})")
    return sorted(found)


def read_list(path: str | os.PathLike) -> tuple[list[str], list[int | None]]:
    """A list file -> (paths, labels), in the file's order.

    One input per line: `PATH` or `PATH LABEL` (whitespace), or `PATH,LABEL[,...]` (CSV, e.g.
    a `labels.csv` with a `file,class_index,...` header, which is skipped). Blank lines and
    lines starting with `#` are ignored. Relative paths are relative to the list's folder.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"--list {path}: no such file")
    paths, labels = [], []
    with open(path, newline="", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if "," in line:
                fields = next(csv.reader([line]))
                p, label = fields[0].strip(), (fields[1].strip() if len(fields) > 1 else None)
            else:
                parts = line.rsplit(None, 1)
                p, label = (parts[0], parts[1]) if len(parts) == 2 and _is_int(parts[1]) else (line, None)
            if label is not None and not _is_int(label):
                if not paths:   # a header line
                    continue
                raise ValueError(f"{path}:{lineno}: label {label!r} is not a class index; "
                                 "write 'PATH' or 'PATH LABEL' per line")
            paths.append(p)
            labels.append(None if label in (None, "") else int(label))
    if not paths:
        raise ValueError(f"--list {path}: no inputs listed")
    return paths, labels


def _is_int(s: str) -> bool:
    return s.lstrip("-").isdigit()


class Decode:
    """(index, path) -> (index, image `(S, S, 3)` float32, error): one input, never raising.

    Runs in Grain's worker processes. A file that cannot be decoded gives a zero image and a
    one-line reason; index −1 is padding.
    """

    def __init__(self, preprocessing: io.Preprocessing):
        self.preprocessing = preprocessing

    def __call__(self, item: tuple[int, str]) -> tuple[np.int64, np.ndarray, str]:
        index, path = item
        s = self.preprocessing.size
        if index < 0:
            return np.int64(index), np.zeros((s, s, 3), np.float32), "padding"
        try:
            x = self.preprocessing(io.load_image(path))
            return np.int64(index), np.asarray(x, np.float32), ""
        except (ValueError, OSError) as e:
            reason = str(e)
        except Exception as e:  # a decoder bug on a strange file must not kill the worker
            reason = f"{path}: {type(e).__name__}: {e}"
        return np.int64(index), np.zeros((s, s, 3), np.float32), " ".join(reason.split()) or "error"


def batches(items: Sequence[tuple[int, str]], batch: int, preprocessing: io.Preprocessing,
            workers: int = 0, threads: int = 2, prefetch: int = 2) -> Iterator:
    """Grain pipeline over `items` (already padded to a multiple of `batch`) yielding
    (index `(batch,)`, images `(batch, S, S, 3)`, errors `(batch,)` str) in order.

    workers > 0: decoding in that many processes (each with `threads` threads), `prefetch`
    batches buffered per process; workers = 0: threads in this process only.
    """
    import grain

    assert len(items) % batch == 0, (len(items), batch)
    ds = grain.MapDataset.source(list(items)).map(Decode(preprocessing)).batch(batch)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                              prefetch_buffer_size=max(prefetch, threads)))
    if workers > 0:
        from absl import flags
        if not flags.FLAGS.is_parsed():  # Grain's worker processes read absl flags (defaults)
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                         per_worker_buffer_size=prefetch),
                            worker_init_fn=_die_with_parent)
    return iter(ds)


def _die_with_parent(worker: int, workers: int) -> None:
    """In each worker: leave SIGINT/SIGTERM to the main process (Ctrl-C and SLURM signal the
    whole process group; the main process finishes its batch and then stops the workers), and
    exit when the main process dies, even by SIGKILL (Linux), instead of lingering as an orphan."""
    import ctypes
    import signal
    import sys

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
