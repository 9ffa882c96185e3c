"""Suite-wide setup."""
from __future__ import annotations

import pytest

from gfi_jax.weights import enable_compilation_cache


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """One persistent compilation cache for the whole run, in a temporary folder: a program
    that several test files compile (same model, shapes and config) compiles once, and
    nothing is written to or read from the user's cache (`~/.cache/gfi_jax/xla`)."""
    enable_compilation_cache(tmp_path_factory.mktemp("xla-cache"))
    yield
