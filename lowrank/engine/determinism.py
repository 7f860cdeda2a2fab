"""Threads, deterministic algorithms, the default dtype and the seeded batch order of a run.

Reproducibility: ``torch.manual_seed(seed)`` before the model is built; epoch ``e`` shuffles the training
images with the seed :func:`epoch_seed` ``(seed, e)`` (the loader's generator and torch's global generator
are both re-seeded by :func:`seed_epoch`), so a run resumed at an epoch boundary sees the same batches as an
uninterrupted one. :func:`run_settings` sets the threads and deterministic algorithms of a run and gives the
caller's settings and RNG state back afterwards.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch


class DeviceUnavailableError(ValueError):
    """A run asks for a device that this machine does not have."""


def resolve_device(name: str) -> torch.device:
    """``torch.device(name)``; ``"auto"`` is cuda where torch finds a CUDA device, else cpu. Asking for cuda where
    torch finds none raises :class:`DeviceUnavailableError`, which says what to use."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailableError(f"device cuda was asked for, but torch {torch.__version__} finds no CUDA device "
                                     f"here (torch.cuda.is_available() is False); use device cpu")
    return device


@contextmanager
def torch_threads(count: int = 1) -> Iterator[None]:
    """``torch.set_num_threads(count)`` inside the block, the caller's setting after it.

    One thread is the default: small networks run faster on it here, and results are bit-identical.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextmanager
def run_settings(threads: int, device: torch.device) -> Iterator[None]:
    """:func:`torch_threads` and deterministic algorithms for a run; the caller's settings and RNG state come
    back after it (deterministic cuBLAS on cuda)."""
    old_deterministic = torch.are_deterministic_algorithms_enabled()
    old_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with torch_threads(threads), torch.random.fork_rng(devices=list(range(torch.cuda.device_count()))):
            yield
    finally:
        torch.use_deterministic_algorithms(old_deterministic, warn_only=old_warn_only)


@contextmanager
def default_dtype(name: str) -> Iterator[None]:
    """``torch.set_default_dtype`` of ``name`` (``"float32"`` / ``"float64"``) for the block, then the old one.

    Every tensor a run creates (initialisation, factors, optimiser state, data) takes this type.
    """
    old = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, name))
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch ``epoch``'s batch order: a 63-bit integer from ``numpy.random.SeedSequence((seed, epoch))``."""
    return int(np.random.SeedSequence((seed, epoch)).generate_state(2, np.uint64)[0] >> np.uint64(1))


def loader_generators(loader) -> list[torch.Generator]:
    """Every ``torch.Generator`` of ``loader``, its samplers and their inner samplers (in a fixed order)."""
    found, owners = [], [loader]
    while owners:
        owner = owners.pop(0)
        generator = getattr(owner, "generator", None)
        if isinstance(generator, torch.Generator) and all(generator is not g for g in found):
            found.append(generator)
        owners += [inner for name in ("sampler", "batch_sampler") if (inner := getattr(owner, name, None)) is not None]
    return found


def seed_epoch(loader, seed: int, epoch: int) -> None:
    """Make epoch ``epoch``'s batch order a function of ``(seed, epoch)`` only."""
    value = epoch_seed(seed, epoch)
    torch.manual_seed(value)
    for generator in loader_generators(loader):
        generator.manual_seed(value)


def rng_state(loader) -> dict[str, Any]:
    """torch's CPU and CUDA generator states and those of ``loader`` (for a checkpoint)."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "data": [generator.get_state() for generator in loader_generators(loader)],
    }


def set_rng_state(state: dict[str, Any], loader) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    generators = loader_generators(loader)
    if len(generators) == len(state["data"]):
        for generator, value in zip(generators, state["data"]):
            generator.set_state(value)


def machine() -> dict[str, str | int]:
    """The machine and software a run is executed on: CPU, cores, torch threads, kernels and versions."""
    import platform

    import numpy
    import torch

    from lowrank import __version__

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as stream:
            cpu = next((line.split(":", 1)[1].strip() for line in stream if line.startswith("model name")), cpu)
    except OSError:
        pass
    blas = next((line.strip(" -") for line in torch.__config__.show().splitlines()
                 if "Math Kernel Library" in line or "OpenBLAS" in line), "unknown")
    return {"cpu": cpu, "cores": os.cpu_count() or 0, "torch_threads": int(os.environ.get("OMP_NUM_THREADS", 1)),
            "cpu_kernels": torch.backends.cpu.get_cpu_capability(), "python": platform.python_version(),
            "torch": torch.__version__, "numpy": numpy.__version__, "blas": blas, "lowrank": __version__}
