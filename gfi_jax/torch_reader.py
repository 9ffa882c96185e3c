"""Read PyTorch checkpoints (zip and legacy formats) into numpy without importing torch.

Unpickling admits only the few globals a state_dict needs, each mapped to a numpy stand-in
here, so a malicious checkpoint cannot run code while being read.
"""

from __future__ import annotations

import collections
import os
import pickle
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import IO, Any

import ml_dtypes
import numpy as np

__all__ = ["CheckpointError", "read_checkpoint", "load_state_dict"]

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_REDO = "re-download or re-save the file"
_BIG_ENDIAN = "big-endian checkpoint is not supported; re-save it on a little-endian machine"

# torch dtype name -> numpy dtype. Native byte order: only little-endian files (and hosts) are
# supported. numpy lacks bfloat16/float8; ml_dtypes (a jax dependency) provides them.
_DTYPES: dict[str, np.dtype] = {n: np.dtype(getattr(ml_dtypes, n, n)) for n in (
    "float64 float32 float16 bfloat16 complex64 complex128 int64 int32 int16 int8 uint8 "
    "uint16 uint32 uint64 bool float8_e4m3fn float8_e5m2 float8_e4m3fnuz float8_e5m2fnuz").split()}
# Typed storage classes as pickled by torch.save (`torch.FloatStorage`, ...).
_STORAGES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "ComplexFloatStorage": "complex64", "ComplexDoubleStorage": "complex128",
    "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8",
    "ByteStorage": "uint8", "BoolStorage": "bool",
}


class CheckpointError(ValueError):
    """The file is not a checkpoint this reader can (or will) load; the message says why."""


class _Problem(Exception): ...  # message without the path; read_checkpoint adds it


@dataclass(frozen=True, slots=True)
class _Dtype:  # stands for torch.float32 & co and torch.FloatStorage & co
    name: str  # frozen + slots (unlike np.dtype, which has __setstate__): pickle BUILD can't mutate it
    dtype: np.dtype


@dataclass(frozen=True, slots=True)
class _Storage:
    key: str
    data: np.ndarray | None  # flat array; None during the legacy format's dry pass


def _tensor(storage: Any, offset: Any, size: Any, stride: Any, *_: Any, dtype: np.dtype | None = None):
    """torch._utils._rebuild_tensor(_v2): (storage, offset, size, stride[, requires_grad, hooks, meta])."""
    if not (isinstance(storage, _Storage) and all(type(v) is int for v in (offset, *size, *stride))
            and len(size) == len(stride)):
        raise _Problem("malformed tensor record in the pickle; " + _REDO)
    if storage.data is None:
        return None
    flat = storage.data
    if dtype is not None:  # _rebuild_tensor_v3: untyped (byte) storage reinterpreted as dtype
        if flat.nbytes % dtype.itemsize:
            raise _Problem(f"storage {storage.key} is not a whole number of {dtype} elements; " + _REDO)
        flat = flat.view(dtype)
    if 0 in size:
        return np.zeros(size, flat.dtype)
    end = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1
    # Bounds check first: as_strided would otherwise read arbitrary memory.
    if offset < 0 or min(stride, default=0) < 0 or end > flat.size:
        raise _Problem(f"tensor reaches element {end} of storage {storage.key} with only "
                       f"{flat.size} elements; " + _REDO)
    # as_strided goes through __array_interface__, which loses ml_dtypes (float8 -> '<f1'):
    # stride over opaque void elements, copy to C order, then reinterpret.
    raw = flat[offset:].view(f"V{flat.itemsize}")
    view = np.lib.stride_tricks.as_strided(raw, size, [s * flat.itemsize for s in stride], writeable=False)
    return np.array(view, order="C").view(flat.dtype)


def _rebuild_v3(storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None):
    if not isinstance(dtype, _Dtype):
        raise _Problem("malformed tensor record in the pickle; " + _REDO)
    return _tensor(storage, offset, size, stride, dtype=dtype.dtype)


# (module, name) -> factory of a fresh object per lookup, so a BUILD opcode applied to one
# cannot alter this module's functions for later loads.
_ALLOWED: dict[tuple[str, str], Callable[[], Any]] = {
    ("collections", "OrderedDict"): lambda: collections.OrderedDict,
    ("builtins", "set"): lambda: set,
    ("builtins", "frozenset"): lambda: frozenset,
    ("torch", "Size"): lambda: tuple,
    ("torch._utils", "_rebuild_tensor"): lambda: lambda *a: _tensor(*a),
    ("torch._utils", "_rebuild_tensor_v2"): lambda: lambda *a: _tensor(*a),
    ("torch._utils", "_rebuild_tensor_v3"): lambda: lambda *a: _rebuild_v3(*a),
    ("torch._utils", "_rebuild_parameter"): lambda: lambda data, *_: data,
    ("torch._utils", "_rebuild_parameter_with_state"): lambda: lambda data, *_: data,
    ("torch.storage", "UntypedStorage"): lambda: _Dtype("UntypedStorage", _DTYPES["uint8"]),
    **{("torch", k): (lambda k=k, v=v: _Dtype(k, _DTYPES[v])) for k, v in _STORAGES.items()},
    **{("torch", k): (lambda k=k: _Dtype(k, _DTYPES[k])) for k in _DTYPES},
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: IO[bytes], load_storage: Callable[[tuple], _Storage] | None = None):
        super().__init__(file)
        self._load_storage = load_storage

    def find_class(self, module: str, name: str) -> Any:
        if (make := _ALLOWED.get((module, name))) is None:
            raise _Problem(f"refusing to unpickle '{module}.{name}' (checkpoints may only contain tensors and "
                           "containers); if you trust this file, load it with torch and re-save its state_dict")
        return make()

    def persistent_load(self, pid: Any) -> _Storage:
        # ('storage', storage type, key, location, numel[, legacy view metadata])
        if (self._load_storage is None or not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage"
                or not isinstance(pid[1], _Dtype) or not isinstance(pid[2], str) or type(pid[4]) is not int):
            raise _Problem(f"unexpected persistent id {str(pid)[:60]!r} in the pickle; " + _REDO)
        return self._load_storage(pid)


def _flat(key: str, raw: bytes, dtype: np.dtype, numel: int) -> _Storage:
    if len(raw) < numel * dtype.itemsize:
        raise _Problem(f"truncated checkpoint (storage {key} has {len(raw)} of {numel * dtype.itemsize} "
                       "bytes); " + _REDO)
    return _Storage(key, np.frombuffer(raw, dtype, numel))


def _read_zip(f: IO[bytes]) -> Any:
    try:
        archive = zipfile.ZipFile(f)
    except zipfile.BadZipFile as e:
        raise _Problem(f"truncated or corrupt zip archive ({e}); " + _REDO) from None
    names = set(archive.namelist())
    if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
        raise _Problem("this is a TorchScript archive (torch.jit.save), not a torch.save checkpoint; "
                       "load it with torch.jit.load and torch.save its state_dict()")
    # One top folder of any name ('archive/', the file stem, ...) holds data.pkl and data/<key>.
    if not (pkls := [n for n in sorted(names) if n.endswith("data.pkl") and n.count("/") <= 1]):
        raise _Problem("zip archive without data.pkl, not a torch.save checkpoint")
    prefix = pkls[0][: -len("data.pkl")]
    if prefix + "byteorder" in names and archive.read(prefix + "byteorder").strip() != b"little":
        raise _Problem(_BIG_ENDIAN)
    cache: dict[str, _Storage] = {}

    def load(pid: tuple) -> _Storage:
        _, stype, key, _location, numel = pid[:5]
        if key not in cache:
            if f"{prefix}data/{key}" not in names:
                raise _Problem(f"storage {key} is missing from the archive; " + _REDO)
            cache[key] = _flat(key, archive.read(f"{prefix}data/{key}"), stype.dtype, numel)
        return cache[key]

    with archive.open(pkls[0]) as pkl:
        return _Unpickler(pkl, load).load()


def _read_legacy(f: IO[bytes]) -> Any:
    if _Unpickler(f).load() != _LEGACY_MAGIC:
        raise _Problem("pickle file without the torch magic number, not a torch checkpoint")
    if (version := _Unpickler(f).load()) != _LEGACY_PROTOCOL:
        raise _Problem(f"unsupported legacy protocol version {version!r}")
    if isinstance(sys_info := _Unpickler(f).load(), dict) and not sys_info.get("little_endian", True):
        raise _Problem(_BIG_ENDIAN)
    # The storage bytes follow the object pickle, and their element sizes are only known from it:
    # a dry pass records each storage's dtype, then a second pass builds the tensors.
    start, dtypes = f.tell(), {}

    def dry(pid: tuple) -> _Storage:
        dtypes[pid[2]] = pid[1].dtype
        return _Storage(pid[2], None)

    _Unpickler(f, dry).load()
    keys, roots, views = _Unpickler(f).load(), {}, {}
    if not isinstance(keys, list) or any(k not in dtypes for k in keys):
        raise _Problem("storage key list does not match the pickled tensors; " + _REDO)
    for key in keys:
        head = f.read(8)  # element count (int64 LE), then the raw little-endian elements
        count = int.from_bytes(head, "little", signed=True) if len(head) == 8 else -1
        if count < 0:
            raise _Problem(f"truncated checkpoint (storage {key} has no size header); " + _REDO)
        roots[key] = _flat(key, f.read(count * dtypes[key].itemsize), dtypes[key], count)

    def load(pid: tuple) -> _Storage:
        if len(pid) < 6 or pid[5] is None:
            return roots[pid[2]]
        view_key, offset, size = pid[5]  # torch < 1.0: a storage slicing the root storage
        if view_key not in views:
            views[view_key] = _Storage(view_key, roots[pid[2]].data[offset : offset + size])
        return views[view_key]

    f.seek(start)
    return _Unpickler(f, load).load()


def read_checkpoint(path: str | os.PathLike) -> object:
    """Unpickles a torch checkpoint (legacy format or zip format) without torch.

    Tensors (and Parameters) come back as C-contiguous numpy arrays (own copies) of the matching
    dtype (bfloat16/float8 via ml_dtypes); dicts, OrderedDicts, lists, tuples and plain Python
    values come back as they are. Anything else in the pickle raises CheckpointError.
    """
    name = os.fspath(path)
    try:
        with open(name, "rb") as f:
            head = f.read(512)
            f.seek(0)
            if not head:
                raise _Problem("empty file (0 bytes); " + _REDO)
            if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
                return _read_zip(f)
            if head[257:262] == b"ustar":
                raise _Problem("tar checkpoint from torch < 0.4 is not supported; "
                               "load it with an old torch and re-save it")
            if head[:1] == b"\x80":  # a pickle (protocol >= 2): the legacy torch.save format
                return _read_legacy(f)
            raise _Problem(f"not a PyTorch checkpoint (starts with {head[:8]!r})")
    except _Problem as e:
        raise CheckpointError(" ".join(f"{name}: {e}".split())) from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError,
            AttributeError, OverflowError, MemoryError, zipfile.BadZipFile) as e:
        msg = f"corrupt or truncated checkpoint ({type(e).__name__}: {str(e)[:200]}); {_REDO}"
        raise CheckpointError(" ".join(f"{name}: {msg}".split())) from None


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """read_checkpoint, then unwrap {'state_dict'|'model'|'model_state_dict': sd} and strip a
    'module.' prefix (DataParallel) when every key has it."""
    obj = read_checkpoint(path)
    if isinstance(obj, Mapping):
        obj = next((obj[w] for w in ("state_dict", "model", "model_state_dict")
                    if isinstance(obj.get(w), Mapping)), obj)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{os.fspath(path)}: not a state_dict (found a {type(obj).__name__})")
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, np.ndarray):
            raise CheckpointError(f"{os.fspath(path)}: not a state_dict (entry {str(k)[:60]!r} is a "
                                  f"{type(v).__name__}, not a tensor)")
    strip = bool(obj) and all(k.startswith("module.") for k in obj)
    return {(k[len("module."):] if strip else k): v for k, v in obj.items()}
