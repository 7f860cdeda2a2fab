"""Time one training step of dense, vanilla low-rank and DLRT networks and compare each with dense.

Usage (from the repository root)::

    python -m benchmarks.step                      # the three targets of issue 6, about a minute
    python -m benchmarks.step --full               # widths 500-2048, ranks 10-100, batch 232/256, 1/2 threads
    python -m benchmarks.step --widths 1024 --ranks 20 50 --threads 1 2 --reps 40 --out /tmp/bench

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
                                of a ``tau`` criterion meaningless).
``dlrt-adaptive/<integrator>/every-<k>``  the same with ``basis_interval = k``: a full step every ``k``-th step and
                                S-steps on the fixed bases in between (:class:`~lowrank.optim.DLRT`).

Every model gets its optimisers from :func:`lowrank.optim.build_optimizer`, as in training: ``torch.optim.Adam``
(learning rate ``1e-3``) for the ordinary parameters (all of them for dense and vanilla; the biases and the
output layer of DLRT networks) and DLRT with Adam updates for the dynamical layers.
``<integrator>`` is ``kls`` (a second forward/backward pass for the S-step) or ``single-pass``.

A *step* is ``optimizer.step(closure)`` on one synthetic batch of MNIST's shape (``x ~ U[0, 1)^{B x 784}``,
random labels), where the closure zeroes the gradients, runs the forward pass and the cross-entropy loss
and calls ``backward()``: forward, backward and the whole update (for DLRT the K-, L-, S-steps, the
truncation and, with ``kls``, the second pass). No data loading is timed.

Protocol, for each group of ``(threads, batch, width)``: ``torch.set_num_threads(threads)``; every model of the
group is built (dense once, then the five low-rank variants for each rank); ``--warmup`` rounds, then
``--reps`` timed rounds in which every model takes one step, the order rotated by one model every round
(interleaved: ABC, BCA, CAB, ...), so that slow phases of a shared machine hit every model alike. Reported:
the median step time (and the 25th/75th percentiles), and every figure as a ratio to the ``torch-dense`` model
of the same group, measured in the same rounds.

- ``flop_limit``: FLOPs of one forward and backward pass of the model (no optimiser step) over those of
  ``torch-dense``: the step-time ratio a variant would reach if its update cost nothing and its products ran
  at dense's throughput.

- ``epoch_s``: an estimate, ``50,000 / batch`` steps of the median step time (MNIST's training split); data
  loading and evaluation are not included.
- ``peak_mb``: the bytes of the tensors alive when a step starts (parameters, gradients, optimizer state and
  the DLRT gradient sinks, counted once per storage) plus the largest growth of allocated bytes during one
  step, from ``torch.profiler``'s memory events (every allocation and free of the CPU allocator, in time
  order). The input batch is not counted.
- ``gflop``: FLOPs of one step, counted op by op with the formulas of ``torch.utils.flop_counter`` (matrix
  products, two FLOPs per multiply-add), plus estimates for the factorisations it does not count: reduced QR of an
  ``m x n`` matrix ``4 m n^2 - 4 n^3 / 3`` (Householder ``geqrf`` + ``orgqr``) and SVD of an ``n x n`` matrix
  ``21 n^3`` (Golub & Van Loan, all factors). Element-wise work is not counted.
- ``params``: the model's parameters (scalars, at the current ranks).

- ``top operations``: for each group, one step of the rank-adaptive single-pass variant of every rank profiled
  by ``torch.profiler``; the operators with the largest share of its self CPU time.

Results go to ``<out>/step.csv`` and ``<out>/step.md`` (default ``benchmarks/results/``, ignored by git); the
markdown table is also printed, followed by the targets that the run covers and the top operations.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import math
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, shape_wrapper

from lowrank.config import Settings
from lowrank.layers import Dense, DynamicalLowRank, LowRank
from lowrank.network import NeuralNetwork
from lowrank.optim import build_optimizer

TRAIN_SAMPLES = 50_000
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
PROFILED = "dlrt-adaptive/single-pass"
TOP_OPERATIONS = 6
DEFAULT = dict(widths=[512, 2048], ranks=[20, 50, 100], batch=[232], threads=[1])
FULL = dict(widths=[500, 512, 1024, 2048], ranks=[10, 20, 50, 100], batch=[232, 256], threads=[1, 2])
# Issue 13: (width, rank, variants, largest step time as a fraction of torch-dense), batch 232, one thread.
TARGETS = (
    (512, 20, ("dlrt-adaptive/single-pass",), 0.25),
    (2048, 50, ("dlrt-adaptive/single-pass",), 0.15),
    (512, 100, ("dlrt-adaptive/single-pass",), 1.5),
)


VARIANT_PATTERN = re.compile(r"torch-dense|dense|vanilla|dlrt-fixed/(kls|single-pass)|"
                             r"dlrt-adaptive/(kls|single-pass)(/every-[1-9][0-9]*)?")


def basis_interval(variant: str) -> int:
    """``k`` of a ``.../every-<k>`` variant, else 1."""
    last = variant.rsplit("/", 1)[-1]
    return int(last.removeprefix("every-")) if last.startswith("every-") else 1


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
    """One model of a group, its optimiser, and the step times measured so far."""

    variant: str
    width: int
    rank: int | None
    model: nn.Module
    step: Callable[[], Tensor]
    pass_: Callable[[], Tensor]
    optimizer: object
    seconds: list[float] = field(default_factory=list)


def make_case(variant: str, width: int, rank: int | None, x: Tensor, y: Tensor) -> Case:
    model = build_model(variant, width, rank or 1)
    optimizer = build_optimizer_for(variant, model)

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return Case(variant, width, rank, model, lambda: optimizer.step(closure), closure, optimizer)


def time_interleaved(cases: list[Case], warmup: int, reps: int) -> None:
    """``warmup`` untimed and ``reps`` timed rounds; each round steps every case once, order rotated by one."""
    for round_ in range(warmup + reps):
        shift = round_ % len(cases)
        for case in cases[shift:] + cases[:shift]:
            start = time.perf_counter()
            case.step()
            elapsed = time.perf_counter() - start
            if round_ >= warmup:
                case.seconds.append(elapsed)


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


def step_peak_bytes(case: Case) -> int:
    """Largest growth of allocated bytes during one step, from the profiler's memory events in time order.

    Two steps are profiled and the second is measured, so that every buffer freed during it (the previous
    step's gradients, replaced factors) was allocated under the profiler and its free is seen.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
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


def step_flops(case: Case) -> int:
    """FLOPs of one step: matrix products, QR and SVD (module docstring)."""
    with FlopCounter() as counter:
        case.step()
    return counter.total


def pass_flops(case: Case) -> int:
    """FLOPs of one forward and backward pass, without the optimiser step (the ``flop_limit`` numerator)."""
    with FlopCounter() as counter:
        case.pass_()
    return counter.total


def top_operations(case: Case, count: int = TOP_OPERATIONS) -> list[tuple[str, float, int]]:
    """``(operator, share of the step's self CPU time, calls)`` of the ``count`` largest in one profiled step."""
    case.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        case.step()
    averages = [a for a in prof.key_averages() if a.self_cpu_time_total > 0]
    total = sum(a.self_cpu_time_total for a in averages)
    ranked = sorted(averages, key=lambda a: a.self_cpu_time_total, reverse=True)[:count]
    return [(a.key, a.self_cpu_time_total / total, a.count) for a in ranked]


def run_group(threads: int, batch: int, width: int, ranks: list[int], variants: list[str], warmup: int, reps: int,
              measure: bool) -> list[dict]:
    """Time, and optionally profile, every model of one ``(threads, batch, width)`` group; one row per model."""
    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(batch, IN_FEATURES, generator=generator)
    y = torch.randint(0, CLASSES, (batch,), generator=generator)
    cases = [make_case(v, width, None, x, y) for v in (REFERENCE, "dense") if v == REFERENCE or v in variants]
    cases += [make_case(v, width, r, x, y) for r in ranks if r <= width for v in variants
              if v not in (REFERENCE, "dense")]
    time_interleaved(cases, warmup, reps)
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
        if measure:
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


COLUMNS = ["threads", "batch", "width", "rank", "variant", "step_ms", "step_p25_ms", "step_p75_ms", "step_x",
           "flop_limit", "epoch_s", "peak_mb", "peak_x", "gflop", "gflop_x", "params", "params_x", "hidden_ranks"]
TABLE = [("width", "width", "{}"), ("rank", "rank", "{}"), ("batch", "batch", "{}"), ("threads", "threads", "{}"),
         ("variant", "variant", "{}"), ("step ms", "step_ms", "{:.2f}"), ("x torch dense", "step_x", "{:.3f}"),
         ("FLOP limit", "flop_limit", "{:.3f}"), ("epoch s", "epoch_s", "{:.2f}"), ("peak MB", "peak_mb", "{:.1f}"),
         ("x torch dense", "peak_x", "{:.2f}"), ("GFLOP/step", "gflop", "{:.3f}"), ("x torch dense", "gflop_x", "{:.3f}"),
         ("params", "params", "{:,}"), ("x torch dense", "params_x", "{:.3f}")]


def markdown(rows: list[dict]) -> str:
    columns = [(title, key, fmt) for title, key, fmt in TABLE if any(key in row for row in rows)]
    lines = ["| " + " | ".join(title for title, _, _ in columns) + " |",
             "|" + "|".join("---" if key == "variant" else "---:" for _, key, _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt.format(row[key]) if key in row else "" for _, key, fmt in columns) + " |")
    return "\n".join(lines)


def operation_lines(rows: list[dict]) -> list[str]:
    """The top operations of every profiled step, one line per model."""
    return [f"- {row['width']} / {row['rank']}, {row['variant']}: "
            + ", ".join(f"{name} {100 * share:.0f} % ({calls} calls)" for name, share, calls in row["top_operations"])
            for row in rows if "top_operations" in row]


def target_lines(rows: list[dict]) -> list[str]:
    """The issue-13 targets that this run measured: ``met``/``MISSED`` with the measured ratio."""
    lines = []
    for width, rank, variants, limit in TARGETS:
        for row in rows:
            if (row["width"], row["rank"], row["batch"], row["threads"]) == (width, rank, 232, 1) \
                    and row["variant"] in variants:
                verdict = "met" if row["step_x"] <= limit else "MISSED"
                lines.append(f"- 784-{width}-{width}-10, rank {rank}, batch 232, 1 thread, {row['variant']}: "
                             f"{row['step_x']:.3f} x torch dense (target <= {limit}): {verdict}")
    return lines


def environment() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{datetime.datetime.now().isoformat(timespec='seconds')}, torch {torch.__version__}, "
            f"Python {platform.python_version()}, {cpu}, {torch.get_num_threads()} threads available by default")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.step", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true",
                        help=f"the whole grid: {FULL} (options given explicitly still win)")
    parser.add_argument("--widths", type=int, nargs="+", help=f"hidden widths (default {DEFAULT['widths']})")
    parser.add_argument("--ranks", type=int, nargs="+",
                        help=f"ranks of the low-rank models (default {DEFAULT['ranks']})")
    parser.add_argument("--batch", type=int, nargs="+", help=f"batch sizes (default {DEFAULT['batch']})")
    parser.add_argument("--threads", type=int, nargs="+", help=f"torch threads (default {DEFAULT['threads']})")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS[1:]),
                        help=f"models to time besides {REFERENCE} (always run: it is the reference); any of "
                             f"{', '.join(VARIANTS[1:])}, or dlrt-adaptive/<integrator>/every-<k> for another k")
    parser.add_argument("--reps", type=int, default=25, help="timed rounds (default 25)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed rounds first (default 5)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory and FLOP measurements")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                        help="folder for step.csv and step.md (default benchmarks/results)")
    args = parser.parse_args(argv)
    grid = FULL if args.full else DEFAULT
    for key in DEFAULT:
        if getattr(args, key) is None:
            setattr(args, key, grid[key])
    if args.reps < 1 or args.warmup < 0:
        parser.error("--reps must be >= 1 and --warmup >= 0")
    unknown = [variant for variant in args.variants if not VARIANT_PATTERN.fullmatch(variant)]
    if unknown:
        parser.error(f"unknown variants {unknown}; allowed: {', '.join(VARIANTS)} "
                     f"or dlrt-adaptive/<kls|single-pass>/every-<k>")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    header = environment()
    rows = []
    for threads in args.threads:
        for batch in args.batch:
            for width in args.widths:
                start = time.perf_counter()
                rows += run_group(threads, batch, width, args.ranks, args.variants, args.warmup, args.reps,
                                  not args.no_memory)
                print(f"# threads {threads}, batch {batch}, width {width}: {time.perf_counter() - start:.0f} s",
                      file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "step.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    command = "python -m benchmarks.step " + " ".join(sys.argv[1:] if argv is None else argv)
    targets, operations = target_lines(rows), operation_lines(rows)
    text = "\n\n".join(
        [f"# Step benchmark\n\n`{command.strip()}` ({header}; median of {args.reps} interleaved steps after "
         f"{args.warmup} warm-up rounds; ratios to the torch dense model of the same run)", markdown(rows)]
        + (["Targets:\n\n" + "\n".join(targets)] if targets else [])
        + (["Top operations of one profiled step (share of its self CPU time):\n\n" + "\n".join(operations)]
           if operations else [])
    )
    (args.out / "step.md").write_text(text + "\n")
    print(text)
    print(f"\nwrote {args.out / 'step.csv'} and {args.out / 'step.md'}", file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
