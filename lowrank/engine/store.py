"""The results store: run folders, cache keys, the run lock, checkpoints, and the one atomic write.

A finished run lives in ``<results_dir>/<name>-<cache key>/`` (``ModelConfig.cache_key()`` hashes the
resolved config and lowrank's version; a run of ``N > 1`` processes ends in ``-<N>proc``):

- ``history.csv``: one row per epoch (:mod:`lowrank.engine.training`);
- ``model.pt``: the final ``state_dict`` (CPU tensors; load with ``torch.load(..., weights_only=True)``);
- ``spectra.csv`` (only with ``settings.track_layers``): every layer's singular values after every epoch;
- ``result.json``: test loss and accuracy, the config, versions, device; written last, it marks the run done;
- ``lock`` (only while the run is not done): the process training the run holds an exclusive ``flock`` on
  it (:func:`run_lock`), so two processes asked for the same run train it once;
- ``checkpoint.pt`` (only while training): the state after the last finished epoch.

Every file is written by :func:`atomic_write`: a reader sees the old file or the new one, never part of one,
and an interrupted write leaves nothing behind. The results directory is ``results_dir``, else the
environment variable ``LOWRANK_RESULTS``, else ``./results``.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import pandas as pd
import torch

from lowrank.engine import distributed
from lowrank.engine.config import ModelConfig, default_results_dir

HISTORY_FILE, MODEL_FILE, RESULT_FILE, CHECKPOINT_FILE = "history.csv", "model.pt", "result.json", "checkpoint.pt"
SPECTRA_FILE, LOCK_FILE = "spectra.csv", "lock"
# read_csv gives back exactly the floats to_csv wrote: pandas >= 3 by default, older ones when asked.
_EXACT_FLOATS = {} if int(pd.__version__.split(".")[0]) >= 3 else {"float_precision": "round_trip"}


@contextmanager
def atomic_write(path: str | Path) -> Iterator[BinaryIO]:
    """Write ``path`` all at once or not at all.

    Yields a temporary file in the same folder; when the block ends without an error the file is flushed to
    disk and replaces ``path`` in one step (``os.replace``), otherwise it is deleted and ``path`` is left as
    it was (a ``KeyboardInterrupt`` included).
    """
    path = Path(path)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o644)  # mkstemp makes it private (0600); the cache may be shared
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def run_dir(config: ModelConfig, results_dir: str | Path | None = None, processes: int | None = None) -> Path:
    """The folder of ``config``'s run: ``<results_dir>/<name>-<cache key>`` (odd characters of the name -> ``_``).

    A run of ``processes > 1`` (default: those of the current :mod:`lowrank.engine.distributed` group) trains with
    ``processes * batch_size`` images a step: its folder ends in ``-<processes>proc``.
    """
    root = Path(results_dir) if results_dir is not None else default_results_dir()
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", config.name)
    processes = distributed.World.current().size if processes is None else processes
    return root / (f"{name}-{config.cache_key()}" + (f"-{processes}proc" if processes > 1 else ""))


@contextmanager
def run_lock(folder: Path, hold: bool = True):
    """Hold an exclusive lock on ``folder/lock`` (``flock``) for the block; wait while another process holds it.

    Two processes asked for the same run (two figures sharing a model under ``report --jobs 2``) train it
    once: the second waits, then reads the first one's result. A block that ends normally has written the
    result, so the lock file is removed before the lock is released (a process that comes later finds the
    result first); one that raises leaves it for the next attempt. The lock is released however the block
    ends, its holder's exit included. ``hold=False`` (the non-writing processes of a torchrun group) takes no lock.
    """
    if not hold:
        yield
        return
    path = folder / LOCK_FILE
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
            path.unlink(missing_ok=True)
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cpu_state(module_or_optimizer) -> dict:
    """A ``state_dict`` with every tensor moved to the CPU (checkpoints then load on any machine)."""
    def move(value):
        if isinstance(value, torch.Tensor):
            return value.detach().cpu()
        if isinstance(value, dict):
            return {k: move(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(move(v) for v in value)
        return value

    return move(module_or_optimizer.state_dict())


def save_checkpoint(folder: Path, checkpoint: dict[str, Any]) -> None:
    """Write ``folder/checkpoint.pt``; ``checkpoint["config"]`` is the run's ``ModelConfig.to_dict()``."""
    with atomic_write(folder / CHECKPOINT_FILE) as file:
        torch.save(checkpoint, file)


def load_checkpoint(folder: Path, config: ModelConfig) -> dict | None:
    """``folder``'s checkpoint if it exists and belongs to ``config``; a broken one is skipped with a warning."""
    path = folder / CHECKPOINT_FILE
    if not path.is_file():
        return None
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a checkpoint is a cache: never let a broken one stop training
        warnings.warn(f"ignoring the unreadable checkpoint {path} ({error}); training from the start", stacklevel=3)
        return None
    if checkpoint.get("config") != config.to_dict():
        warnings.warn(f"ignoring the checkpoint {path} of a different config; training from the start", stacklevel=3)
        return None
    return checkpoint


def remove_checkpoint(folder: Path) -> None:
    (folder / CHECKPOINT_FILE).unlink(missing_ok=True)


def save_run(folder: Path, info: dict, state: dict, history: pd.DataFrame, spectra: pd.DataFrame | None) -> None:
    """Write a finished run: ``model.pt`` (``state``), ``history.csv``, ``spectra.csv`` and, last, ``result.json``
    (``info``), which marks the run done."""
    with atomic_write(folder / MODEL_FILE) as file:
        torch.save({k: v.detach().cpu() for k, v in state.items()}, file)
    for name, table in ((HISTORY_FILE, history), (SPECTRA_FILE, spectra)):
        if table is not None:
            with atomic_write(folder / name) as file:
                file.write(table.to_csv(index=False).encode())
    with atomic_write(folder / RESULT_FILE) as file:
        file.write((json.dumps(info, indent=2) + "\n").encode())


def read_run(folder: Path) -> tuple[dict, pd.DataFrame, dict, pd.DataFrame | None] | None:
    """``(info, history, state, spectra)`` of a finished run in ``folder`` (``spectra`` ``None`` when not tracked),
    or ``None`` if the run has not finished."""
    if not all((folder / f).is_file() for f in (RESULT_FILE, HISTORY_FILE, MODEL_FILE)):
        return None
    info = json.loads((folder / RESULT_FILE).read_text())
    history = pd.read_csv(folder / HISTORY_FILE, **_EXACT_FLOATS)
    state = torch.load(folder / MODEL_FILE, map_location="cpu", weights_only=True)
    spectra = pd.read_csv(folder / SPECTRA_FILE, **_EXACT_FLOATS) if (folder / SPECTRA_FILE).is_file() else None
    return info, history, state, spectra
