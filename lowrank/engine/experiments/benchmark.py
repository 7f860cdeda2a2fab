"""What one training step costs: time, peak memory, FLOPs and parameters of dense, vanilla low-rank and DLRT
networks, each against a plain PyTorch dense network stepped in the same rounds.

Usage (from the repository root)::

    python -m lowrank benchmark              # widths 512/2048, ranks 20/50/100, batch 232, 1 thread (make benchmark)
    python -m lowrank benchmark --full       # widths 500-2048, ranks 10-100, batch 232/256, 1 and 2 threads
    python -m lowrank benchmark --widths 1024 --ranks 20 50 --threads 1 2 --reps 40 --out /tmp/bench
    python -m lowrank benchmark --device cuda

The book's chapter "What a training step costs" is a short run, described by a TOML file of kind
``"step-benchmark"`` (``notebooks/configs/fig_n.toml``, read by :func:`load_experiment`).

Networks: ``784-w-w-10`` MLPs with ReLU; the two hidden layers are of the variant's type and the output
layer is :class:`~lowrank.layers.Dense` (as in the report's configs). Variants:

``torch-dense``                 the reference: ``torch.nn.Sequential`` of ``torch.nn.Linear`` layers and ReLU, trained
                                by a plain ``torch.optim.Adam``; every ratio is to this model.
``dense``                       Dense hidden layers.
``vanilla``                     :class:`~lowrank.layers.LowRank` hidden layers (``U S V^T``, rank ``r``).
``dlrt-fixed/<integrator>``     :class:`~lowrank.layers.DynamicalLowRank` with ``adaptive=False``.
``dlrt-adaptive/<integrator>``  rank-adaptive ``DynamicalLowRank`` with ``r_min = r_max = r``: every step still
                                augments the bases to ``2r`` columns, takes the S-step on the ``2r x 2r``
                                coefficients and truncates by SVD, but the truncation always returns rank ``r``,
                                so the timed work does not drift with the rank (random data would make the rank
                                of a ``tau`` criterion meaningless). In training, a ``tau`` that keeps the rank
                                near ``r`` costs the same per step.
``dlrt-adaptive/<integrator>/every-<k>``  the same with ``basis_interval = k``: cycles of augmented local
                                iterations (augment on the first step, S-steps on the augmented bases, truncate
                                after the ``k``-th; :class:`~lowrank.optim.DLRT`).

Every model gets its optimisers from :func:`lowrank.optim.build_optimizer`, as in training: ``torch.optim.Adam``
(learning rate ``1e-3``) for the ordinary parameters (all of them for dense and vanilla; the biases and the
output layer of DLRT networks) and DLRT with Adam updates for the dynamical layers.
``<integrator>`` is ``kls`` (a second forward/backward pass for the S-step) or ``single-pass``.

A *step* is ``optimizer.step(closure)`` on one synthetic batch of MNIST's shape (``x ~ U[0, 1)^{B x 784}``,
random labels), where the closure zeroes the gradients, runs the forward pass and the cross-entropy loss
and calls ``backward()``: forward, backward and the whole update (for DLRT the K-, L-, S-steps, the
truncation and, with ``kls``, the second pass). No data loading is timed. An ``every-<k>`` model is stepped
a whole cycle at a time (``k`` steps, from the augmentation to the truncation) and every figure of it is per
step, the cycle's over ``k``: its amortised cost.

Protocol, for each group of ``(threads, batch, width)``: ``torch.set_num_threads(threads)``; every model of the
group is built (dense once, then the low-rank variants for each rank); ``warmup`` rounds, then ``reps`` timed
rounds in which every model takes one step, the order rotated by one model every round (interleaved: ABC,
BCA, CAB, ...), so that slow phases of a shared machine hit every model alike. On ``cuda`` the device is
synchronised before and after each timed step. Reported: the median step time (and the 25th/75th
percentiles), and every figure as a ratio to the ``torch-dense`` model of the same group, measured in the
same rounds.

- ``flop_limit``: FLOPs of one forward and backward pass of the model (no optimiser step) over those of
  ``torch-dense``: the step-time ratio a variant would reach if its update cost nothing and its products ran
  at dense's throughput.
- ``epoch_s``: an estimate, ``50,000 / batch`` steps of the median step time (MNIST's training split); data
  loading and evaluation are not included.
- ``peak_mb``: the bytes of the tensors alive when a step starts (parameters, gradients, optimizer state and
  the DLRT gradient sinks, counted once per storage) plus the largest growth of allocated bytes during one
  step: on ``cpu`` from ``torch.profiler``'s memory events (every allocation and free of the CPU allocator, in
  time order), on ``cuda`` from ``torch.cuda.max_memory_allocated``. The input batch is not counted.
- ``gflop``: FLOPs of one step, counted op by op with the formulas of ``torch.utils.flop_counter`` (matrix
  products, two FLOPs per multiply-add), plus estimates for the factorisations it does not count: reduced QR of an
  ``m x n`` matrix ``4 m n^2 - 4 n^3 / 3`` (Householder ``geqrf`` + ``orgqr``) and SVD of an ``n x n`` matrix
  ``21 n^3`` (Golub & Van Loan, all factors). Element-wise work is not counted.
- ``params``: the model's parameters (scalars, at the current ranks).
- top operations: for each group, one step of the rank-adaptive single-pass variant of every rank profiled
  by ``torch.profiler``; the operators with the largest share of its self time (CPU time; on ``cuda`` the
  device time of the kernels). A ``record_function`` range such as ``Optimizer.step#DLRT.step`` counts the
  Python time spent inside it.

The command line writes ``<out>/step.csv`` and ``<out>/step.md`` (default ``results/benchmark/`` under
``$LOWRANK_RESULTS`` or ``./results``, ignored by git) and prints the markdown table, followed by the targets
that the run covers (:data:`TARGETS`, ``met`` / ``MISSED``) and the top operations.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import io
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import pandas as pd
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, shape_wrapper

from lowrank.engine import determinism, summary
from lowrank.engine.store import atomic_write
from lowrank.engine.config import (SPLIT_SIZES, ConfigError, Settings, count, experiment_tables, option, read_toml,
                                   table_values)
from lowrank.layers import Dense, DynamicalLowRank, LowRank
from lowrank.network import NeuralNetwork
from lowrank.optim import build_optimizer

TRAIN_SAMPLES = SPLIT_SIZES["train"]
IN_FEATURES, CLASSES = 784, 10
LEARNING_RATE = 1e-3
REFERENCE = "torch-dense"
VARIANTS = (
    REFERENCE,
    "dense",
    "vanilla",
    "dlrt-fixed/kls",
    "dlrt-fixed/single-pass",
    "dlrt-adaptive/kls",
    "dlrt-adaptive/single-pass",
    "dlrt-adaptive/single-pass/every-10",
)
VARIANT_PATTERN = re.compile(r"torch-dense|dense|vanilla|dlrt-fixed/(kls|single-pass)|"
                             r"dlrt-adaptive/(kls|single-pass)(/every-[1-9][0-9]*)?")
ALLOWED_VARIANTS = f"{', '.join(VARIANTS)} or dlrt-adaptive/<kls|single-pass>/every-<k>"
DEVICES = ("cpu", "cuda")
PROFILED = "dlrt-adaptive/single-pass"
TOP_OPERATIONS = 6
#: The report's DLRT schedule: cycles of the default length (``basis_interval`` of ``[settings]``, chosen by figure m).
DEFAULT_CYCLE = f"dlrt-adaptive/kls/every-{Settings().basis_interval}"
# The speed targets of that schedule, amortised over its cycles: (width, rank, variant, largest step time as a
# fraction of torch-dense), batch 232, one thread.
TARGETS = (
    (512, 20, DEFAULT_CYCLE, 0.25),
    (2048, 50, DEFAULT_CYCLE, 0.15),
    (512, 100, DEFAULT_CYCLE, 0.6),
)
KIND = "step-benchmark"


@dataclass(frozen=True)
class BenchmarkExperiment:
    """One run of the benchmark: the groups ``threads x batch x widths``, the models of a group and the protocol.

    Read from a TOML file of kind ``"step-benchmark"`` by :func:`load_experiment` (``[grid]``: ``widths``,
    ``ranks``, ``batch``, ``threads``, ``variants``; ``[protocol]``: ``reps``, ``warmup``, ``memory``, ``device``;
    ``[quick]`` may replace any of them for the quick run) or from the command line (:func:`parse_args`).
    ``variants`` are timed besides ``torch-dense``, which always runs; a rank larger than a width is skipped
    in that width's group. ``memory``: also measure peak memory and FLOPs of a step.
    """

    widths: tuple[int, ...] = option((512, 2048), "layer widths n (the network is n -> n -> 10)", min=1, table="grid")
    ranks: tuple[int, ...] = option((20, 50, 100), "ranks r of the low-rank variants", min=1, table="grid")
    batch: tuple[int, ...] = option((232,), "batch sizes", min=1, table="grid")
    threads: tuple[int, ...] = option((1,), "torch threads", min=1, table="grid")
    variants: tuple[str, ...] = option(VARIANTS[1:], "what is timed besides torch-dense",
                                       pattern=(VARIANT_PATTERN.pattern, ALLOWED_VARIANTS), table="grid")
    reps: int = option(25, "timed rounds", min=1, table="protocol")
    warmup: int = option(5, "untimed rounds first", min=0, table="protocol")
    memory: bool = option(True, "also measure peak memory and FLOPs of a step", table="protocol")
    device: str = option("cpu", "where to time", choices=DEVICES, table="protocol")
    figure: dict = field(default_factory=dict, compare=False)

    def groups(self) -> list[tuple[int, int, int]]:
        """``(threads, batch, width)`` of every group, in the order they run."""
        return [(t, b, w) for t in self.threads for b in self.batch for w in self.widths]


#: The grid of ``--full`` (the other fields keep :class:`BenchmarkExperiment`'s defaults).
FULL = dict(widths=(500, 512, 1024, 2048), ranks=(10, 20, 50, 100), batch=(232, 256), threads=(1, 2))


def basis_interval(variant: str) -> int:
    """``k`` of a ``.../every-<k>`` variant, else 1."""
    last = variant.rsplit("/", 1)[-1]
    return int(last.removeprefix("every-")) if last.startswith("every-") else 1


def resolve_device(name: str) -> torch.device:
    """``torch.device(name)`` for ``"cpu"`` or ``"cuda"``; a ValueError that says why when CUDA is not available
    (:func:`lowrank.engine.determinism.resolve_device`)."""
    if name not in DEVICES:
        raise ValueError(f"device {name!r} is not one of {DEVICES}")
    return determinism.resolve_device(name)


def synchronize(device: torch.device) -> None:
    """Wait for the kernels queued on ``device`` (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(variant: str, width: int, rank: int) -> nn.Module:
    """The ``784-width-width-10`` network of ``variant`` (module docstring), seeded for reproducibility."""
    torch.manual_seed(0)
    dims = [(IN_FEATURES, width), (width, width)]
    if variant == REFERENCE:
        return nn.Sequential(nn.Linear(IN_FEATURES, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                             nn.Linear(width, CLASSES))
    if variant == "dense":
        hidden = [Dense(n_in, n_out) for n_in, n_out in dims]
    elif variant == "vanilla":
        hidden = [LowRank(n_in, n_out, rank) for n_in, n_out in dims]
    elif variant.startswith("dlrt-fixed/"):
        hidden = [DynamicalLowRank(n_in, n_out, rank, adaptive=False) for n_in, n_out in dims]
    elif variant.startswith("dlrt-adaptive/"):
        hidden = [DynamicalLowRank(n_in, n_out, rank, r_min=rank, r_max=rank) for n_in, n_out in dims]
    else:
        raise ValueError(f"variant {variant!r} is not one of {VARIANTS}")
    return NeuralNetwork([*hidden, Dense(width, CLASSES)], ["relu", "relu", "identity"])


def build_optimizer_for(variant: str, model: nn.Module):
    """The optimisers the training code builds (:func:`lowrank.optim.build_optimizer`): ``torch.optim.Adam``
    for every ordinary parameter (all of dense and vanilla, the biases and output layer of DLRT networks)
    and DLRT with Adam updates for the dynamical layers."""
    if variant == REFERENCE:
        return torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    integrator = variant.split("/")[1] if variant.startswith("dlrt") else "kls"
    optimizers = build_optimizer(model, Settings(learning_rate=LEARNING_RATE, optimizer="adam", integrator=integrator))
    if optimizers.dlrt is not None:
        optimizers.dlrt.basis_interval = basis_interval(variant)
    return optimizers


@dataclass
class Case:
    """One model of a group, its optimiser, and the step times measured so far.

    ``step`` takes ``steps`` optimiser steps (a whole cycle of an ``every-<k>`` variant), ``pass_`` one forward
    and backward pass; ``seconds`` are per optimiser step.
    """

    variant: str
    width: int
    rank: int | None
    model: nn.Module
    step: Callable[[], None]
    pass_: Callable[[], Tensor]
    optimizer: object
    steps: int
    device: torch.device
    seconds: list[float] = field(default_factory=list)


def make_case(variant: str, width: int, rank: int | None, x: Tensor, y: Tensor) -> Case:
    """The model of ``variant`` on ``x``'s device with its optimisers and its closure on the batch ``(x, y)``."""
    model = build_model(variant, width, rank or 1).to(x.device)
    optimizer = build_optimizer_for(variant, model)
    steps = basis_interval(variant)

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    def step() -> None:
        for _ in range(steps):
            optimizer.step(closure)

    return Case(variant, width, rank, model, step, closure, optimizer, steps, x.device)


def time_interleaved(cases: list[Case], warmup: int, reps: int) -> None:
    """``warmup`` untimed and ``reps`` timed rounds; each round steps every case once, order rotated by one."""
    for round_ in range(warmup + reps):
        shift = round_ % len(cases)
        for case in cases[shift:] + cases[:shift]:
            synchronize(case.device)
            start = time.perf_counter()
            case.step()
            synchronize(case.device)
            elapsed = time.perf_counter() - start
            if round_ >= warmup:
                case.seconds.append(elapsed / case.steps)


def _tensors(obj) -> list[Tensor]:
    """Every tensor inside nested dicts, lists and tuples."""
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for value in obj.values() for t in _tensors(value)]
    if isinstance(obj, (list, tuple)):
        return [t for value in obj for t in _tensors(value)]
    return []


def live_bytes(case: Case) -> int:
    """Bytes of the parameters, gradients, optimiser state and DLRT sinks, once per storage."""
    tensors = [t for p in case.model.parameters() for t in (p, p.grad) if t is not None]
    optimizers = getattr(case.optimizer, "members", [case.optimizer])
    tensors += [t for opt in optimizers for t in _tensors(list(opt.state.values()))]
    for layer in case.model.modules():
        if isinstance(layer, DynamicalLowRank):
            tensors += _tensors(list(vars(layer.sink).values()))
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


#: What torch's profiler writes to the process's stderr by itself: kineto's line at every start and stop and
#: its failed look for a GPU, and the CPU allocator's note on blocks allocated before profiling began
#: (expected: :func:`step_peak_bytes` profiles one step to measure the next).
PROFILER_CHATTER = re.compile(r"SyncActivityProfilerHandler\.cpp|DeviceProperties\.cpp:\d+\] gpuGetDeviceCount|"
                              r"CPUAllocator\.cpp:\d+\] Memory block of unknown size")


@contextmanager
def quiet_profiler() -> Iterator[None]:
    """Run the block with file descriptor 2 captured, then write every captured line but :data:`PROFILER_CHATTER`
    to ``sys.stderr`` (the C++ side writes to the descriptor, past Python's ``sys.stderr``)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            lines = capture.read().decode(errors="replace").splitlines(keepends=True)
            sys.stderr.write("".join(line for line in lines if not PROFILER_CHATTER.search(line)))


def step_peak_bytes(case: Case) -> int:
    """Largest growth of allocated bytes during one step (one cycle of an ``every-<k>`` variant).

    On the CPU, from the profiler's memory events in time order: two steps are profiled and the second is
    measured, so that every buffer freed during it (the previous step's gradients, replaced factors) was
    allocated under the profiler and its free is seen. On CUDA, from the allocator's peak statistics.
    """
    if case.device.type == "cuda":
        case.step()
        synchronize(case.device)
        torch.cuda.reset_peak_memory_stats(case.device)
        before = torch.cuda.memory_allocated(case.device)
        case.step()
        synchronize(case.device)
        return torch.cuda.max_memory_allocated(case.device) - before
    with quiet_profiler(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        case.step()
        with record_function("measured step"):
            case.step()
    events = prof.profiler.kineto_results.events()  # the raw events: one per allocation and per free
    span = next(event for event in events if event.name() == "measured step")
    changes = sorted((event.start_ns(), event.nbytes()) for event in events
                     if event.name() == "[memory]" and span.start_ns() <= event.start_ns() <= span.end_ns())
    current = peak = 0
    for _, change in changes:
        current += change
        peak = max(peak, current)
    return peak


def _qr_flop(a_shape, *args, out_shape=None, **kwargs) -> int:
    m, n = a_shape[-2:]
    k = min(m, n)
    return math.prod(a_shape[:-2]) * int(4 * m * n * k - 4 * k**3 / 3)


def _svd_flop(a_shape, *args, out_shape=None, **kwargs) -> int:
    return math.prod(a_shape[:-2]) * 21 * min(a_shape[-2:]) ** 3


class FlopCounter(TorchDispatchMode):
    """Sum of the FLOPs of every op with a formula in ``torch.utils.flop_counter`` (or QR / SVD above).

    ``FlopCounterMode`` itself also tracks modules with hooks that keep the autograd graph alive, which
    breaks the rank changes of DLRT's second pass; this mode only counts.
    """

    formulas = {**flop_registry, **{op: shape_wrapper(f) for op, f in
                                    ((torch.ops.aten.linalg_qr, _qr_flop), (torch.ops.aten._linalg_svd, _svd_flop))}}

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = self.formulas.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def step_flops(case: Case) -> float:
    """FLOPs of one step (module docstring): of a whole cycle over its steps for an ``every-<k>`` variant."""
    with FlopCounter() as counter:
        case.step()
    return counter.total / case.steps


def pass_flops(case: Case) -> int:
    """FLOPs of one forward and backward pass, without the optimiser step (the ``flop_limit`` numerator)."""
    with FlopCounter() as counter:
        case.pass_()
    return counter.total


def top_operations(case: Case, count: int = TOP_OPERATIONS) -> list[tuple[str, float, int]]:
    """``(operator, share of the step's self time, calls)`` of the ``count`` largest in one profiled step:
    self CPU time, or on CUDA the self device time of the kernels."""
    cuda = case.device.type == "cuda"
    case.step()
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with quiet_profiler(), profile(activities=activities) as prof:
        case.step()
        synchronize(case.device)

    def self_time(average) -> float:
        return average.self_device_time_total if cuda else average.self_cpu_time_total

    averages = [a for a in prof.key_averages() if self_time(a) > 0]
    total = sum(self_time(a) for a in averages)
    ranked = sorted(averages, key=self_time, reverse=True)[:count]
    return [(a.key, self_time(a) / total, a.count) for a in ranked]


def run_group(experiment: BenchmarkExperiment, threads: int, batch: int, width: int) -> list[dict]:
    """Time, and with ``experiment.memory`` measure, every model of one ``(threads, batch, width)`` group; one
    row per model, ``torch-dense`` first."""
    device = resolve_device(experiment.device)
    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(batch, IN_FEATURES, generator=generator).to(device)
    y = torch.randint(0, CLASSES, (batch,), generator=generator).to(device)
    variants = experiment.variants
    cases = [make_case(v, width, None, x, y) for v in (REFERENCE, "dense") if v == REFERENCE or v in variants]
    cases += [make_case(v, width, r, x, y) for r in experiment.ranks if r <= width for v in variants
              if v not in (REFERENCE, "dense")]
    time_interleaved(cases, experiment.warmup, experiment.reps)
    rows = []
    for case in cases:
        seconds = sorted(case.seconds)
        row = dict(
            threads=threads, batch=batch, width=width, rank=case.rank or "", variant=case.variant,
            step_ms=1e3 * statistics.median(seconds),
            step_p25_ms=1e3 * seconds[len(seconds) // 4], step_p75_ms=1e3 * seconds[(3 * len(seconds)) // 4],
            epoch_s=TRAIN_SAMPLES / batch * statistics.median(seconds),
            params=sum(p.numel() for p in case.model.parameters()),
            hidden_ranks=" ".join(str(r) for r in case.model.ranks()[:-1]) if hasattr(case.model, "ranks") else "",
            pass_gflop=pass_flops(case) / 1e9,
        )
        if experiment.memory:
            row["peak_mb"] = (live_bytes(case) + step_peak_bytes(case)) / 2**20
            row["gflop"] = step_flops(case) / 1e9
        if case.variant == PROFILED:
            row["top_operations"] = top_operations(case)
        rows.append(row)
    reference = rows[0]
    for row in rows:
        for key, ratio in (("step_ms", "step_x"), ("peak_mb", "peak_x"), ("gflop", "gflop_x"), ("params", "params_x"),
                           ("pass_gflop", "flop_limit")):
            if key in row:
                row[ratio] = row[key] / reference[key]
    return rows


def run(experiment: BenchmarkExperiment, log: TextIO | None = None) -> list[dict]:
    """Every group of ``experiment`` (:func:`run_group`), one row per model; a line per group to ``log``."""
    rows = []
    for threads, batch, width in experiment.groups():
        start = time.perf_counter()
        rows += run_group(experiment, threads, batch, width)
        if log is not None:
            print(f"# threads {threads}, batch {batch}, width {width}: {time.perf_counter() - start:.0f} s", file=log)
    return rows


# ---------------------------------------------------------------------------------------------
# Tables, targets and the machine

COLUMNS = ["threads", "batch", "width", "rank", "variant", "step_ms", "step_p25_ms", "step_p75_ms", "step_x",
           "flop_limit", "epoch_s", "peak_mb", "peak_x", "gflop", "gflop_x", "params", "params_x", "hidden_ranks"]
#: key -> (column title, format) of the printed table and of :func:`table`.
TABLE = {
    "width": ("width", "{}"), "rank": ("rank", "{}"), "batch": ("batch", "{}"), "threads": ("threads", "{}"),
    "variant": ("variant", "{}"), "step_ms": ("step ms", "{:.2f}"), "step_x": ("step x torch dense", "{:.3f}"),
    "flop_limit": ("FLOP limit", "{:.3f}"), "epoch_s": ("epoch s", "{:.2f}"), "peak_mb": ("peak MB", "{:.1f}"),
    "peak_x": ("peak x torch dense", "{:.2f}"), "gflop": ("GFLOP/step", "{:.3f}"),
    "gflop_x": ("GFLOP x torch dense", "{:.3f}"), "params": ("params", "{:,}"),
    "params_x": ("params x torch dense", "{:.3f}"),
}


def _cells(rows: list[dict], keys) -> tuple[list[str], list[list[str]]]:
    """Titles and formatted cells of the columns ``keys`` that some row has."""
    keys = [key for key in keys if any(key in row for row in rows)]
    cells = [[TABLE[key][1].format(row[key]) if key in row else "" for key in keys] for row in rows]
    return [TABLE[key][0] for key in keys], cells


def table(rows: list[dict], keys=tuple(TABLE)) -> pd.DataFrame:
    """The columns ``keys`` of the rows, formatted as the printed table writes them."""
    titles, cells = _cells(rows, keys)
    return pd.DataFrame(cells, columns=titles)


def markdown(rows: list[dict]) -> str:
    titles, cells = _cells(rows, TABLE)
    lines = ["| " + " | ".join(titles) + " |",
             "|" + "|".join("---" if title == "variant" else "---:" for title in titles) + "|"]
    return "\n".join(lines + ["| " + " | ".join(line) + " |" for line in cells])


def operations_text(row: dict) -> str:
    """The top operations of a profiled row: ``"name 31 % (12 calls), ..."``."""
    return ", ".join(f"{name} {100 * share:.0f} % ({calls} call{'s' * (calls != 1)})"
                     for name, share, calls in row["top_operations"])


def operation_lines(rows: list[dict]) -> list[str]:
    """The top operations of every profiled step, one line per model."""
    return [f"- {row['width']} / {row['rank']}, {row['variant']}: {operations_text(row)}"
            for row in rows if "top_operations" in row]


def target_results(rows: list[dict]) -> list[dict]:
    """The :data:`TARGETS` that this run measured (batch 232, one thread): ``width``, ``rank``, ``variant``,
    ``limit``, the measured ``ratio`` to torch dense and whether it was ``met``."""
    return [dict(width=width, rank=rank, variant=variant, limit=limit, ratio=row["step_x"], met=row["step_x"] <= limit)
            for width, rank, variant, limit in TARGETS for row in rows
            if (row["width"], row["rank"], row["batch"], row["threads"], row["variant"]) == (width, rank, 232, 1, variant)]


def target_lines(rows: list[dict]) -> list[str]:
    """The targets that this run measured: ``met``/``MISSED`` with the measured ratio."""
    return [f"- 784-{t['width']}-{t['width']}-10, rank {t['rank']}, batch 232, 1 thread, {t['variant']}: "
            f"{t['ratio']:.3f} x torch dense (target <= {t['limit']}): {'met' if t['met'] else 'MISSED'}"
            for t in target_results(rows)]


def target_table(rows: list[dict]) -> pd.DataFrame:
    """The targets that this run measured (:func:`target_results`), one row each, formatted."""
    return pd.DataFrame([{"width": t["width"], "rank": t["rank"], "variant": t["variant"], "target": f"<= {t['limit']}",
                          "step x torch dense": f"{t['ratio']:.3f}", "verdict": "met" if t["met"] else "missed"}
                         for t in target_results(rows)],
                        columns=["width", "rank", "variant", "target", "step x torch dense", "verdict"])


def operations_table(rows: list[dict]) -> pd.DataFrame:
    """The top operations of every profiled step: width, rank, operation, share of the step's self time, calls."""
    return pd.DataFrame([{"width": row["width"], "rank": row["rank"], "operation": name, "share": f"{100 * share:.0f} %",
                          "calls": calls} for row in rows if "top_operations" in row
                         for name, share, calls in row["top_operations"]])


def machine(experiment: BenchmarkExperiment) -> str:
    """The processor (and GPU), torch's version and the torch threads of ``experiment``, in words."""
    m = determinism.machine()
    gpu = (f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}) with "
           if experiment.device == "cuda" else "")
    threads = " and ".join(str(t) for t in experiment.threads)
    return (f"{gpu}{m['cpu']} ({m['cores']} cores), torch {m['torch']}, "
            f"{threads} torch thread{'' if experiment.threads == (1,) else 's'}")


# ---------------------------------------------------------------------------------------------
# The book's figure: a TOML file of kind "step-benchmark"

def parse_experiment(data: dict, path: str | Path | None = None, quick: bool = False) -> BenchmarkExperiment:
    """Validate a dict shaped like the TOML file; ``quick`` applies the ``[quick]`` overrides. Both runs, full
    and quick, are checked whichever is asked for."""
    file = "<config>" if path is None else str(path)
    figure = experiment_tables(data, KIND, file, BenchmarkExperiment)
    runs = {run_: BenchmarkExperiment(**table_values(BenchmarkExperiment, data, file, quick=run_ == "quick "),
                                      figure=dict(figure)) for run_ in ("", "quick ")}
    for run_, experiment in runs.items():
        if max(experiment.ranks) > max(experiment.widths):
            raise ConfigError(f"{file}: the {run_}run has rank {max(experiment.ranks)}, larger than every width "
                              f"{list(experiment.widths)}; allowed: ranks up to the largest width")
    return runs["quick " if quick else ""]


def load_experiment(path: str | Path, quick: bool = False) -> BenchmarkExperiment:
    """Read and validate a TOML file of kind ``"step-benchmark"`` (``notebooks/configs/fig_n.toml``).

    Errors (:class:`lowrank.engine.config.ConfigError`) name the file, the key and the allowed values.
    """
    return parse_experiment(read_toml(path), path, quick)


def _key(row: dict) -> str:
    """``"dlrt_adaptive_single_pass_512_20"``, ``"dense_512"``: a row as part of a glue key."""
    return summary.slug(f"{row['variant']} {row['width']} {row['rank']}")


def glue_costs(prefix: str, rows: list[dict], experiment: BenchmarkExperiment) -> None:
    """Glue what does not depend on the machine: the grid and protocol (``{prefix}_widths``, ``_ranks``,
    ``_batch``, ``_threads``, ``_reps``, ``_warmup``) and per row ``{prefix}_{_key(row)}_flop_limit`` (3 decimals)
    and ``..._params``."""
    from myst_nb import glue

    for key in ("widths", "ranks", "batch", "threads"):
        summary.glue_names(f"{prefix}_{key}", [str(value) for value in getattr(experiment, key)])
    glue(f"{prefix}_reps", experiment.reps, display=False)
    glue(f"{prefix}_warmup", experiment.warmup, display=False)
    for row in rows:
        glue(f"{prefix}_{_key(row)}_flop_limit", round(row["flop_limit"], 3), display=False)
        glue(f"{prefix}_{_key(row)}_params", row["params"], display=False)


def glue_measurements(prefix: str, rows: list[dict], experiment: BenchmarkExperiment) -> None:
    """Glue what was measured on this machine. Per row: ``{prefix}_{_key(row)}_ratio`` (step time over torch
    dense, 3 decimals), ``..._step_ms`` and, for DLRT with a full step every step and ``memory``,
    ``..._update_flops`` (FLOPs of the update over those of the forward and backward pass, 2 decimals; an
    ``every-<k>`` step is left out: its S-steps run a cheaper backward pass than the pass of ``flop_limit``). Per profiled row ``{prefix}_top_{width}_{rank}``
    (:func:`operations_text`); per measured target ``{prefix}_target_{width}_{rank}_limit`` and ``..._verdict``
    (``met`` / ``missed``). And ``{prefix}_targets_met`` (``"2 of 3"``), ``{prefix}_above_limit`` (how many
    low-rank models had a step-time ratio above their FLOP limit, ``"11 of 12"``) and ``{prefix}_machine``
    (:func:`machine`)."""
    from myst_nb import glue

    for row in rows:
        glue(f"{prefix}_{_key(row)}_ratio", round(row["step_x"], 3), display=False)
        glue(f"{prefix}_{_key(row)}_step_ms", summary.Text(f"{row['step_ms']:.2f} ms"), display=False)
        if "gflop" in row and row["variant"].startswith("dlrt") and basis_interval(row["variant"]) == 1:
            glue(f"{prefix}_{_key(row)}_update_flops", round(row["gflop"] / row["pass_gflop"] - 1, 2), display=False)
        if "top_operations" in row:
            glue(f"{prefix}_top_{row['width']}_{row['rank']}", summary.Text(operations_text(row)), display=False)
    targets = target_results(rows)
    for target in targets:
        key = f"{prefix}_target_{target['width']}_{target['rank']}"
        glue(f"{key}_limit", target["limit"], display=False)
        glue(f"{key}_verdict", summary.Text("met" if target["met"] else "missed"), display=False)
    glue(f"{prefix}_targets_met", summary.Text(f"{sum(t['met'] for t in targets)} of {len(targets)}"), display=False)
    low_rank = [row for row in rows if row["rank"] != ""]
    above = sum(row["step_x"] > row["flop_limit"] for row in low_rank)
    glue(f"{prefix}_above_limit", summary.Text(f"{above} of {len(low_rank)}"), display=False)
    glue(f"{prefix}_machine", summary.Text(machine(experiment)), display=False)


# ---------------------------------------------------------------------------------------------
# Command line

def parse_args(argv: Sequence[str] = ()) -> tuple[BenchmarkExperiment, Path]:
    """The experiment and the output folder of a command line (``python -m lowrank benchmark --help``)."""
    from lowrank.engine.config import default_results_dir

    default = BenchmarkExperiment()
    parser = argparse.ArgumentParser(prog="python -m lowrank benchmark", description=__doc__.split("\n\n")[0],
                                     epilog="See the docstring of lowrank.engine.experiments.benchmark for what is measured and how.")
    parser.add_argument("--full", action="store_true",
                        help="the whole grid: " + ", ".join(f"{key} {' '.join(map(str, values))}"
                                                            for key, values in FULL.items())
                             + " (options given explicitly still win)")
    for key, what in (("widths", "hidden widths"), ("ranks", "ranks of the low-rank models"),
                      ("batch", "batch sizes"), ("threads", "torch threads")):
        parser.add_argument(f"--{key}", type=count, nargs="+", help=f"{what} (default {list(getattr(default, key))})")
    parser.add_argument("--variants", nargs="+", default=list(default.variants),
                        help=f"models to time besides {REFERENCE} (always run: it is the reference); any of "
                             f"{ALLOWED_VARIANTS} (default: all listed)")
    parser.add_argument("--reps", type=count, default=default.reps, help=f"timed rounds (default {default.reps})")
    parser.add_argument("--warmup", type=int, default=default.warmup,
                        help=f"untimed rounds first (default {default.warmup})")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory and FLOP measurements")
    parser.add_argument("--device", choices=DEVICES, default=default.device,
                        help="where the models run (default cpu); cuda synchronises around every timed step")
    parser.add_argument("--out", type=Path, default=default_results_dir() / "benchmark",
                        help="folder for step.csv and step.md (default $LOWRANK_RESULTS/benchmark or results/benchmark)")
    args = parser.parse_args(list(argv))
    try:
        resolve_device(args.device)
    except ValueError as error:
        parser.error(f"--device: {error}")
    grid = FULL if args.full else {}
    tables = {"figure": {"kind": KIND},
              "grid": {key: list(getattr(args, key) or grid.get(key, getattr(default, key)))
                       for key in ("widths", "ranks", "batch", "threads", "variants")},
              "protocol": {"reps": args.reps, "warmup": args.warmup, "memory": not args.no_memory, "device": args.device}}
    try:  # the checks of a TOML file (parse_experiment), with the options' names
        experiment = parse_experiment(tables, "the command line")
    except ConfigError as error:
        parser.error(str(error).removeprefix("the command line: ").replace("grid.", "--").replace("protocol.", "--"))
    return experiment, args.out


def environment(experiment: BenchmarkExperiment) -> str:
    """When and on what the run was made: the date, :func:`machine` and Python's version."""
    return (f"{datetime.datetime.now().isoformat(timespec='seconds')}, {machine(experiment)}, "
            f"Python {platform.python_version()}")


def main(argv: Sequence[str] = ()) -> list[dict]:
    """``python -m lowrank benchmark``: run, write ``step.csv`` and ``step.md``, print the table; returns the rows."""
    experiment, out = parse_args(argv)
    header = environment(experiment)
    rows = run(experiment, log=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    with atomic_write(out / "step.csv") as file:
        file.write(table.getvalue().encode())
    command = " ".join(["python -m lowrank benchmark", *argv])
    targets, operations = target_lines(rows), operation_lines(rows)
    text = "\n\n".join(
        [f"# Step benchmark\n\n`{command}` ({header}; median of {experiment.reps} interleaved steps after "
         f"{experiment.warmup} warm-up rounds; ratios to the torch dense model of the same run)", markdown(rows)]
        + (["Targets:\n\n" + "\n".join(targets)] if targets else [])
        + (["Top operations of one profiled step (share of its self time):\n\n" + "\n".join(operations)]
           if operations else [])
    )
    with atomic_write(out / "step.md") as file:
        file.write((text + "\n").encode())
    print(text)
    print(f"\nwrote {out / 'step.csv'} and {out / 'step.md'}", file=sys.stderr)
    return rows
