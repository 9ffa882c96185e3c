"""Read `.safetensors` checkpoints (the format timm and the Hugging Face Hub publish) into numpy.

A safetensors file is an 8-byte little-endian header length, a JSON header naming each
tensor's dtype, shape and byte range, then the raw little-endian bytes. Reading it runs no
code: no torch, no pickle. Every byte range is checked against the header before any data is
touched, so a corrupt file gives a one-line CheckpointError, never a wrong array.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from gfi_jax.torch_reader import CheckpointError

__all__ = ["CheckpointError", "is_safetensors", "read_safetensors", "load_state_dict"]

_REDO = "re-download or re-save the file"
_MAX_HEADER = 100_000_000  # the reference implementation's limit: a bigger header is corrupt
# The format's dtype names -> numpy dtypes, explicitly little-endian where numpy allows it
# (ml_dtypes types are native-order only: like torch_reader, little-endian hosts only).
_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"), "U8": np.dtype("u1"), "I8": np.dtype("i1"),
    "U16": np.dtype("<u2"), "I16": np.dtype("<i2"), "U32": np.dtype("<u4"), "I32": np.dtype("<i4"),
    "U64": np.dtype("<u8"), "I64": np.dtype("<i8"),
    "F16": np.dtype("<f2"), "F32": np.dtype("<f4"), "F64": np.dtype("<f8"), "C64": np.dtype("<c8"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
    "F8_E4M3FNUZ": np.dtype(ml_dtypes.float8_e4m3fnuz), "F8_E5M2FNUZ": np.dtype(ml_dtypes.float8_e5m2fnuz),
}
# Sub-byte floats are packed several to a byte; numpy holds one per byte, and a weight file
# for an image classifier has no business storing them, so they are refused by name.
_PACKED = {"F4", "F6_E2M3", "F6_E3M2"}


class _Problem(Exception): ...  # message without the path; read_safetensors adds it


@dataclass(frozen=True)
class _Entry:
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def is_safetensors(path: str | os.PathLike) -> bool:
    """True for a `.safetensors` name, or for content that starts like one (a header length,
    then '{'), so a renamed file still dispatches here and a broken one gets this reader's
    message. A torch zip starts with b'PK', a legacy torch file with a pickle opcode."""
    if os.fspath(path).lower().endswith(".safetensors"):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= _MAX_HEADER


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    # json.loads keeps the last of two equal keys; two tensors of one name are a corrupt header.
    out = {}
    for k, v in pairs:
        if k in out:
            raise _Problem(f"header names {k[:60]!r} twice; " + _REDO)
        out[k] = v
    return out


def _read_header(f, file_size: int) -> tuple[dict, int]:
    """-> (the parsed JSON header, the byte where the data starts)."""
    if file_size < 8:
        raise _Problem(f"truncated safetensors file ({file_size} bytes, shorter than the 8-byte "
                       "header length); " + _REDO)
    n = int.from_bytes(f.read(8), "little")
    if n > _MAX_HEADER:
        raise _Problem(f"header length {n} exceeds the format's {_MAX_HEADER}-byte limit (corrupt, "
                       "or not a safetensors file); " + _REDO)
    if 8 + n > file_size:
        raise _Problem(f"header length {n} runs past the end of the {file_size}-byte file "
                       "(truncated, or not a safetensors file); " + _REDO)
    raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _Problem(f"header is not valid JSON ({type(e).__name__} at byte "
                       f"{getattr(e, 'pos', getattr(e, 'start', '?'))}); " + _REDO) from None
    if not isinstance(header, dict):
        raise _Problem(f"header is a JSON {type(header).__name__}, not an object; " + _REDO)
    return header, 8 + n


def _naturals(v: object) -> bool:
    return isinstance(v, list) and all(type(x) is int and x >= 0 for x in v)


def _entry(name: str, info: object) -> _Entry:
    """One header record, its fields type-checked and its byte count matched to shape×itemsize."""
    if not (isinstance(info, dict) and {"dtype", "shape", "data_offsets"} <= info.keys()):
        raise _Problem(f"tensor {name[:60]!r} lacks dtype, shape or data_offsets; " + _REDO)
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype in _PACKED:
        raise _Problem(f"tensor {name[:60]!r} has packed sub-byte dtype {dtype}, which this reader "
                       "does not unpack; re-save the weights as F32, F16 or BF16")
    if dtype not in _DTYPES:
        raise _Problem(f"tensor {name[:60]!r} has unknown dtype {str(dtype)[:20]!r} (known: "
                       f"{', '.join(_DTYPES)}); re-save the weights as F32, F16 or BF16")
    if not _naturals(shape) or not _naturals(offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
        raise _Problem(f"tensor {name[:60]!r} has a malformed shape {str(shape)[:40]} or "
                       f"data_offsets {str(offsets)[:40]}; " + _REDO)
    want = int(np.prod(shape, dtype=object)) * _DTYPES[dtype].itemsize
    if offsets[1] - offsets[0] != want:
        raise _Problem(f"tensor {name[:60]!r} spans {offsets[1] - offsets[0]} bytes but {dtype} "
                       f"{tuple(shape)} needs {want}; " + _REDO)
    return _Entry(name, _DTYPES[dtype], tuple(shape), offsets[0], offsets[1])


def _check_layout(entries: list[_Entry], data_size: int) -> None:
    """The byte ranges must tile the data exactly, as the format requires: an overlap means two
    tensors alias each other, a gap or an end past the file means a corrupt or cut file."""
    pos, prev = 0, None
    for e in sorted(entries, key=lambda e: (e.begin, e.end)):
        if e.begin < pos:
            raise _Problem(f"tensors {prev[:60]!r} and {e.name[:60]!r} overlap (bytes {e.begin}-"
                           f"{pos}); " + _REDO)
        if e.begin > pos:
            raise _Problem(f"bytes {pos}-{e.begin} before tensor {e.name[:60]!r} belong to no "
                           "tensor; " + _REDO)
        pos, prev = e.end, e.name
    if pos > data_size:
        raise _Problem(f"truncated safetensors file (tensor data ends at byte {pos} of the data "
                       f"section, which has only {data_size}); " + _REDO)
    if pos < data_size:
        raise _Problem(f"{data_size - pos} bytes after the last tensor belong to no tensor; " + _REDO)


def _metadata(header: dict) -> dict[str, str]:
    meta = header.pop("__metadata__", None) or {}
    if not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise _Problem("__metadata__ is not a map of strings to strings; " + _REDO)
    return meta


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """-> (tensors in header order, the header's `__metadata__`), read without torch or pickle.

    Tensors are C-contiguous numpy arrays (own copies) of the file's dtype (bfloat16 and the
    float8s via ml_dtypes). Any inconsistency in the file raises a one-line CheckpointError.
    """
    name = os.fspath(path)
    try:
        with open(name, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            header, start = _read_header(f, size)
            meta = _metadata(header)
            entries = [_entry(k, v) for k, v in header.items()]
            _check_layout(entries, size - start)
        # memmap, so only the tensors' pages are read, once each, into their own arrays
        # (mmap refuses an empty range: a file of empty tensors has no data section).
        data = (np.memmap(name, np.uint8, mode="r", offset=start, shape=(size - start,))
                if size > start else np.zeros(0, np.uint8))
        tensors = {e.name: np.array(data[e.begin:e.end]).view(e.dtype).reshape(e.shape)
                   for e in entries}
        del data
        return tensors, meta
    except _Problem as e:
        raise CheckpointError(" ".join(f"{name}: {e}".split())) from None


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """read_safetensors' tensors, a 'module.' prefix (DataParallel) stripped when every key has
    it, as torch_reader.load_state_dict does for .pth files."""
    sd, _ = read_safetensors(path)
    strip = bool(sd) and all(k.startswith("module.") for k in sd)
    return {(k[len("module."):] if strip else k): v for k, v in sd.items()}
