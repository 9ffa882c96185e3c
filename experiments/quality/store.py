"""Per-item scores of the offline benchmark, one small jsonl file per (model, method).

A row: {"method", "config" (hash of everything that determines the map and its scores),
"code" (the method's code version), "task" ("grid" or "image"), "item" (a stable id),
"split", "scores" {metric: value}, "seconds" (this item's share of its batch)}. Runs add up:
an item already stored under the same config and code is not computed again, and a changed
config or code makes the method's old rows invisible (they stay in the file, so switching
back finds them). Every write replaces the whole file through a temporary name, so a run
killed at any point leaves either the old file or the new one: nothing is lost or doubled.
Each read-modify-write holds an exclusive lock on the model's folder, so two fills sharing
a model (say RISE grids and MP images at once) cannot overwrite each other's new rows.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Iterable

import numpy as np

from gfi_jax.files import atomic_write_text


def config_hash(obj) -> str:
    """A short, stable hash of a JSON-able description (keys sorted)."""
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


class Store:
    """The rows of one model's methods under `root/<model>/`."""

    def __init__(self, root: str | Path, model: str):
        self.folder = Path(root) / model

    def path(self, method: str) -> Path:
        return self.folder / f"{slug(method)}.jsonl"

    def rows(self, method: str, config: str | None = None, code: str | None = None,
             task: str | None = None) -> list[dict]:
        """The stored rows of `method`, optionally only those of one config, code and task."""
        p = self.path(method)
        if not p.is_file():
            return []
        rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
        return [r for r in rows if (config is None or r["config"] == config)
                and (code is None or r["code"] == code) and (task is None or r["task"] == task)]

    def scores(self, method: str, config: str, code: str, task: str) -> dict[str, dict]:
        """item id -> row, for the rows that count under (config, code)."""
        return {r["item"]: r for r in self.rows(method, config, code, task)}

    def add(self, method: str, rows: Iterable[dict]) -> int:
        """Adds the rows whose (config, code, task, item) is not stored yet; returns how many."""
        with self._locked():
            return self._add(method, list(rows))

    def _add(self, method: str, rows: list[dict]) -> int:
        old = self.rows(method)
        seen = {_key(r) for r in old}
        new = []
        for r in rows:
            if _key(r) not in seen:
                seen.add(_key(r))
                new.append(r)
        if new:
            _write_lines(self.path(method), [json.dumps(r, sort_keys=True) for r in old + new])
        return len(new)


    def probe(self, key: str) -> np.ndarray | None:
        """The probe maps stored under `key` (method, options, code version), or None."""
        p = self.folder / "probes.json"
        probes = json.loads(p.read_text()) if p.is_file() else {}
        return np.asarray(probes[key]) if key in probes else None

    def set_probe(self, key: str, maps: np.ndarray) -> None:
        p = self.folder / "probes.json"
        with self._locked():
            probes = json.loads(p.read_text()) if p.is_file() else {}
            probes[key] = np.round(np.asarray(maps, np.float64), 8).tolist()
            _write_lines(p, [json.dumps(probes, sort_keys=True)])

    @contextlib.contextmanager
    def _locked(self):
        """An exclusive advisory lock on this model's folder itself (no lock file to commit or
        leave behind; released when the descriptor closes, also when the process dies)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def _key(row: dict) -> tuple:
    return row["config"], row["code"], row["task"], row["item"]


def _write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "\n".join(lines) + "\n", durable=True)
