"""`python -m weights_conversion` in a subprocess where `import torch` fails and pickle raises:
how the tests show that the torch-free readers need neither."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

_SCRIPT = """
import pickle, sys
sys.modules["torch"] = None  # `import torch` now raises ImportError
def boom(*a, **k):
    raise AssertionError("pickle used")
class Boom:
    def __init__(self, *a, **k):
        boom()
import gfi_jax.torch_reader as tr
pickle.load = pickle.loads = boom
if {block_unpickler}:   # a .pth file needs the reader's own restricted unpickler
    pickle.Unpickler = tr._Unpickler = Boom
{setup}
from weights_conversion.__main__ import main
arch, rest = sys.argv[1], sys.argv[2:]
for src, out in zip(rest[::2], rest[1::2]):
    assert main(["--arch", arch, "--source", src, "--out", out]) == 0, src
assert sys.modules["torch"] is None, "torch was imported"
"""


def start_conversion(arch: str, pairs: list[tuple[Path, Path]], repo: Path, *,
                     setup: str = "", block_unpickler: bool = True) -> subprocess.Popen:
    """Starts converting each (checkpoint, out folder) of `arch` without torch or pickle;
    `setup`: code run first (e.g. registering a test-only record). The caller waits on the
    process (`communicate`), so the conversion overlaps its other tests."""
    script = _SCRIPT.format(block_unpickler=block_unpickler, setup=setup)
    args = [str(p) for pair in pairs for p in pair]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(repo)}
    return subprocess.Popen([sys.executable, "-c", script, arch, *args], cwd=repo, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    """Waits for a `start_conversion` process and returns its stdout; AssertionError (with
    its stderr's end) unless it succeeded, and the process killed if it ran out of time."""
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    assert proc.returncode == 0 and "Traceback" not in stderr, stderr[-2000:]
    return stdout
