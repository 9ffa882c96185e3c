"""What the experiment scripts share: flags, image batches, the results file.

The scripts are modules of the `experiments` package, run from the repo root as
`python -m experiments.paper.runtime ...`; results go to `RESULTS` (experiments/results/).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from pathlib import Path
from typing import Iterator, Sequence

import jax
import numpy as np
from PIL import Image

import gfi_jax
from gfi_jax import io

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"


def add_model_args(ap: argparse.ArgumentParser, model: str = "vgg19") -> None:
    ap.add_argument("--model", default=model, help=f"architecture (default {model}, the paper's)")
    ap.add_argument("--weights", default=None, help="converted weights folder (default: cache)")
    ap.add_argument("--size", type=int, default=224, help="input side (the paper: 224)")
    ap.add_argument("--batch", type=int, default=8, help="images per explain call")
    ap.add_argument("--limit", type=int, default=None, help="use only the first N images")


def add_gfi_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--preset", default="paper",
                    help="GFI preset: paper (Sec. 4.1.1 as written, default) or reference")
    ap.add_argument("--stage1-steps", type=int, default=None)
    ap.add_argument("--stage2-steps", type=int, default=None)


def gfi_config(args, **overrides) -> gfi_jax.Config:
    """The preset named by --preset with the step flags and `overrides` applied."""
    for k in ("stage1_steps", "stage2_steps"):
        if getattr(args, k, None) is not None:
            overrides.setdefault(k, getattr(args, k))
    return gfi_jax.preset(args.preset, **overrides)


def load(args, model=None):
    """The injected model (tests) or `gfi_jax.load_model(--model, --weights)`."""
    return model if model is not None else gfi_jax.load_model(args.model, weights=args.weights)


def preprocessing(model, size: int) -> io.Preprocessing:
    """The paper's input: resized straight to size×size (Sec. 4.1.1), the model's mean/std."""
    return model.preprocessing.replace(policy="resize", size=size)


def batches(seq: Sequence, n: int) -> Iterator[Sequence]:
    for i in range(0, len(seq), n):
        yield seq[i:i + n]


def load_images(paths: Sequence, pre: io.Preprocessing) -> np.ndarray:
    """`(B, size, size, 3)` float32 model inputs."""
    return np.stack([pre(io.load_image(p)) for p in paths])


def resize_map(s: np.ndarray, wh: tuple[int, int]) -> np.ndarray:
    """A saliency map `(h, w)` bilinearly resized to the original image's (W, H) -> `(H, W)`."""
    return np.asarray(Image.fromarray(np.asarray(s, np.float32), "F").resize(wh, Image.BILINEAR))


def table(header: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(fmt(v) for v in r) + " |" for r in rows)]


def machine() -> str:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    dev = jax.devices()[0]
    return f"{platform.node()}, {cpu}, {os.cpu_count()} cores, jax {jax.__version__} on {dev.platform} ({dev.device_kind})"


def command(module: str, argv: Sequence[str] | None) -> str:
    """The command line that ran the script `module` ("experiments.paper.runtime"), from the
    repo root (argv None: this process's own)."""
    import shlex
    return " ".join(["python", "-m", module,
                     *map(shlex.quote, sys.argv[1:] if argv is None else argv)])


def write_results(path: str | Path | None, title: str, lines: Sequence[str],
                  cmd: str) -> Path | None:
    """Writes `# title`, the command, machine, date and `lines` to `path` atomically
    (no path: nothing written)."""
    if not path:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join([f"# {title}", "", f"- command: `{cmd}`", f"- machine: {machine()}",
                      f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
                      "", *lines, ""])
    from gfi_jax.files import atomic_write_text
    return atomic_write_text(path, text)
