"""Dynamical low-rank approximation of a matrix ODE: the direct factor equations against the KLS integrator.

The problem (Koch & Lubich 2007, Section 5; Ceruti & Lubich 2022, Section 5): approximate the solution of

.. math::  \\dot Y(t) = \\dot A(t), \\qquad Y(0) = A(0),

whose exact solution is the known matrix ``A(t)`` (``n x n``), by a rank-``r`` matrix ``Y = U S V^T`` that
moves on the manifold of rank-``r`` matrices, ``\\dot Y = P(Y) \\dot A``. The test matrix is

.. math::  A(t) = Q_1(t) \\big( D + \\varepsilon e^t E \\big) Q_2(t)^T, \\qquad Q_i(t) = e^{t W_i},

with ``D = P_1 diag(d_1, ..., d_r, 0, ..., 0) P_2^T`` (random orthogonal ``P_i``; ``d_j`` log-spaced from 1
down to ``sigma_min``), ``E`` a random matrix of spectral norm 1, and ``W_i`` skew-symmetric: block
diagonal with ``2 x 2`` blocks ``omega_k [[0, -1], [1, 0]]``, so ``Q_i(t)`` rotates coordinate pairs by the
angles ``omega_k t`` and is applied to an ``n x k`` matrix in ``O(n k)`` operations. The ``r`` leading
singular values of ``A(t)`` are those of ``D`` up to ``O(epsilon)``; the smallest of them is ``sigma_min``,
and the best rank-``r`` approximation ``X(t)`` (truncated SVD) rotates and changes shape with ``t``.

Integrators (all advance ``(U, S, V)`` with a fixed step ``h``):

``"direct-euler"``, ``"direct-rk4"``
    the Koch-Lubich equations ``S' = U^T A' V``, ``U' = (I - U U^T) A' V S^{-1}``,
    ``V' = (I - V V^T) A'^T U S^{-T}`` (``A' = dA/dt``), by explicit Euler or the classical Runge-Kutta
    method. Their right-hand side grows like ``1 / sigma_r(S)``.
``"kls"``, ``"kls-exact"``
    the unconventional (basis update & Galerkin, BUG) integrator of Ceruti & Lubich 2022: K-step, L-step,
    then a Galerkin S-step in the new bases; no inverse of ``S`` anywhere.
``"projector-splitting"``, ``"projector-splitting-exact"``
    the projector-splitting (KSL) integrator of Lubich & Oseledets 2014: K-step, a backward S-step, L-step.

The substeps of these split integrators are ODEs whose right-hand side ``A'(t)`` does not depend on the
unknown. ``"kls"`` and ``"projector-splitting"`` take one explicit Euler step per substep (what DLRT does
with its gradient); the ``-exact`` variants integrate the substeps exactly, with the increment
``A(t + h) - A(t)``. With exact substeps both reproduce a matrix ``A(t)`` of rank ``r`` exactly (their
exactness property).

Errors are measured at output times against the best rank-``r`` approximation ``X(t)`` and against
``A(t)``, in the Frobenius norm; a run whose factors become non-finite or larger than
:data:`BLOW_UP`, or whose ``S`` becomes singular, is stopped and marked diverged (its later errors are ``inf``).

The experiment of the book's figure (j) is described by a TOML file read with :func:`load_experiment`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import pandas as pd
import torch
from torch import Tensor

from lowrank.engine import summary
from lowrank.engine.config import ConfigError, experiment_tables, option, read_toml, table_values
from lowrank.engine.determinism import torch_threads

METHODS = ("direct-euler", "direct-rk4", "kls", "kls-exact", "projector-splitting", "projector-splitting-exact")
SUBSTEPS = ("euler", "exact")
#: A run is stopped once a factor has an entry larger than this (or a non-finite one).
BLOW_UP = 1e8
DTYPE = torch.float64


# ---------------------------------------------------------------------------------------------
# The test problem

def _orthogonal(n: int, generator: torch.Generator) -> Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=DTYPE))
    return q * torch.sign(torch.diagonal(r))  # Haar-distributed


@dataclass(frozen=True)
class RotatingMatrix:
    """``A(t) = Q_1(t) (D + epsilon e^t E) Q_2(t)^T`` with ``Q_i(t) = exp(t W_i)`` (module docstring).

    Build with :func:`make_problem`. ``core`` is ``D``, ``perturbation`` is ``E`` (``||E||_2 = 1``), ``epsilon``
    its size, ``omega1`` / ``omega2`` the rotation frequencies of the ``n / 2`` coordinate pairs.
    """

    core: Tensor
    perturbation: Tensor
    epsilon: float
    omega1: Tensor
    omega2: Tensor
    rank: int

    @property
    def n(self) -> int:
        return self.core.shape[0]

    # Q(t) X and W X for the block-diagonal rotations, acting on the rows of X (n x k), O(n k) operations.
    @staticmethod
    def _rotate(omega: Tensor, t: float, x: Tensor) -> Tensor:
        pairs = x.reshape(-1, 2, x.shape[-1])
        c, s = torch.cos(omega * t)[:, None], torch.sin(omega * t)[:, None]
        a, b = pairs[:, 0], pairs[:, 1]
        return torch.stack([c * a - s * b, s * a + c * b], 1).reshape(x.shape)

    @staticmethod
    def _skew(omega: Tensor, x: Tensor) -> Tensor:
        pairs = x.reshape(-1, 2, x.shape[-1])
        a, b = pairs[:, 0], pairs[:, 1]
        return torch.stack([-omega[:, None] * b, omega[:, None] * a], 1).reshape(x.shape)

    def _frame(self, t: float, middle: Tensor) -> Tensor:
        """``Q_1(t) M Q_2(t)^T`` for an ``n x n`` matrix ``M``, in ``O(n^2)`` operations."""
        right = self._rotate(self.omega2, t, middle.T).T  # M Q_2^T = (Q_2 M^T)^T
        return self._rotate(self.omega1, t, right)

    def matrix(self, t: float) -> Tensor:
        """The dense ``A(t)``, ``n x n``."""
        return self._frame(t, self.core + self.epsilon * math.exp(t) * self.perturbation)

    def derivative(self, t: float) -> Tensor:
        """The dense ``A'(t) = Q_1 (W_1 C - C W_2 + C') Q_2^T`` with ``C(t) = D + epsilon e^t E``, ``n x n``.

        ``Q_i`` commutes with ``W_i``; ``C W_2 = -(W_2 C^T)^T`` since ``W_2`` is skew-symmetric.
        """
        growth = self.epsilon * math.exp(t) * self.perturbation
        c = self.core + growth
        middle = self._skew(self.omega1, c) + self._skew(self.omega2, c.T).T + growth
        return self._frame(t, middle)

    def best_approximation(self, t: float, rank: int | None = None) -> tuple[Tensor, Tensor]:
        """``(X(t), sigma(t))``: the best rank-``rank`` approximation (truncated SVD) and all singular values."""
        rank = self.rank if rank is None else rank
        a = self.matrix(t)
        u, sigma, vt = torch.linalg.svd(a)
        return (u[:, :rank] * sigma[:rank]) @ vt[:rank], sigma


def make_problem(n: int = 100, rank: int = 10, sigma_min: float = 1e-4, epsilon: float = 1e-10,
                 rotation: float = 1.0, seed: int = 0) -> RotatingMatrix:
    """The test matrix of the module docstring, float64.

    Args:
        n: size (even).
        rank: ``r``, the number of non-zero singular values of ``D``.
        sigma_min: ``d_r``; ``d_j = sigma_min^((j - 1) / (r - 1))``, log-spaced from 1 (1 when ``r = 1``).
        epsilon: size of the perturbation ``epsilon e^t E`` (0: ``A(t)`` has rank ``r`` exactly).
        rotation: the frequencies ``omega_k`` are uniform in ``[-rotation, rotation]``.
        seed: draws ``P_1, P_2, E`` and the frequencies; the same for every ``sigma_min``.
    """
    if n < 2 or n % 2:
        raise ValueError(f"n must be even and >= 2, got {n}")
    if not 1 <= rank <= n:
        raise ValueError(f"rank must be in 1..{n}, got {rank}")
    if not 0 < sigma_min <= 1:
        raise ValueError(f"sigma_min must be in (0, 1], got {sigma_min}")
    if epsilon < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    generator = torch.Generator().manual_seed(seed)
    p1, p2 = _orthogonal(n, generator), _orthogonal(n, generator)
    e = torch.randn(n, n, generator=generator, dtype=DTYPE)
    e /= torch.linalg.matrix_norm(e, 2)
    omega1 = rotation * (2 * torch.rand(n // 2, generator=generator, dtype=DTYPE) - 1)
    omega2 = rotation * (2 * torch.rand(n // 2, generator=generator, dtype=DTYPE) - 1)
    exponents = torch.arange(rank, dtype=DTYPE) / max(rank - 1, 1)
    d = sigma_min ** exponents
    core = (p1[:, :rank] * d) @ p2[:, :rank].T
    return RotatingMatrix(core, e, float(epsilon), omega1, omega2, rank)


# ---------------------------------------------------------------------------------------------
# Integrators

class Factors(NamedTuple):
    """``Y = U S V^T``: ``U`` ``(n, r)``, ``S`` ``(r, r)``, ``V`` ``(n, r)``."""

    U: Tensor
    S: Tensor
    V: Tensor

    def matrix(self) -> Tensor:
        return self.U @ self.S @ self.V.T


def initial_value(problem: RotatingMatrix, rank: int | None = None) -> Factors:
    """The truncated SVD of ``A(0)``: ``U``, ``V`` its leading singular vectors, ``S`` diagonal."""
    rank = problem.rank if rank is None else rank
    u, sigma, vt = torch.linalg.svd(problem.matrix(0.0))
    return Factors(u[:, :rank], torch.diag(sigma[:rank]), vt[:rank].T)


def factor_derivatives(derivative: Tensor, y: Factors) -> Factors:
    """The right-hand side of the Koch-Lubich equations for ``A' = derivative`` at ``(U, S, V)``.

    ``S' = U^T A' V``, ``U' = (A' V - U S') S^{-1}``, ``V' = (A'^T U - V S'^T) S^{-T}``.
    """
    av, atu = derivative @ y.V, derivative.T @ y.U
    ds = y.U.T @ av
    du = torch.linalg.solve(y.S, av - y.U @ ds, left=False)  # (...) S^{-1}
    dv = torch.linalg.solve(y.S.T, atu - y.V @ ds.T, left=False)  # (...) S^{-T}
    return Factors(du, ds, dv)


def _axpy(y: Factors, h: float, d: Factors) -> Factors:
    return Factors(*(a + h * b for a, b in zip(y, d)))


def direct_euler_step(problem: RotatingMatrix, t: float, y: Factors, h: float) -> Factors:
    """One explicit Euler step of the Koch-Lubich equations."""
    return _axpy(y, h, factor_derivatives(problem.derivative(t), y))


def direct_rk4_step(problem: RotatingMatrix, t: float, y: Factors, h: float) -> Factors:
    """One step of the classical fourth-order Runge-Kutta method on the Koch-Lubich equations."""
    middle = problem.derivative(t + h / 2)
    k1 = factor_derivatives(problem.derivative(t), y)
    k2 = factor_derivatives(middle, _axpy(y, h / 2, k1))
    k3 = factor_derivatives(middle, _axpy(y, h / 2, k2))
    k4 = factor_derivatives(problem.derivative(t + h), _axpy(y, h, k3))
    return Factors(*(a + h / 6 * (b1 + 2 * b2 + 2 * b3 + b4) for a, b1, b2, b3, b4 in zip(y, k1, k2, k3, k4)))


def increment(problem: RotatingMatrix, t: float, h: float, substeps: str = "euler") -> Tensor:
    """``int_t^{t+h} A'(s) ds``: ``h A'(t)`` (one Euler step) or ``A(t + h) - A(t)`` (exact)."""
    if substeps == "euler":
        return h * problem.derivative(t)
    if substeps == "exact":
        return problem.matrix(t + h) - problem.matrix(t)
    raise ValueError(f"substeps {substeps!r} is not one of {SUBSTEPS}")


def kls_step(y: Factors, delta: Tensor) -> Factors:
    """One step of the unconventional (BUG) integrator (Ceruti & Lubich 2022), fixed rank.

    For ``Y' = F(t)`` the substeps integrate to ``delta = int F`` (:func:`increment`): K-step
    ``U_1 = orth(U S + delta V)``, ``M = U_1^T U``; L-step ``V_1 = orth(V S^T + delta^T U)``, ``N = V_1^T V``;
    S-step (Galerkin in the new bases) ``S_1 = M S N^T + U_1^T delta V_1``.
    """
    u1 = torch.linalg.qr(y.U @ y.S + delta @ y.V).Q
    v1 = torch.linalg.qr(y.V @ y.S.T + delta.T @ y.U).Q
    s0 = (u1.T @ y.U) @ y.S @ (y.V.T @ v1)
    return Factors(u1, s0 + u1.T @ delta @ v1, v1)


def projector_splitting_step(y: Factors, delta: Tensor) -> Factors:
    """One step of the projector-splitting integrator (Lubich & Oseledets 2014), Lie-Trotter order K, S, L.

    ``(U_1, S_hat) = qr(U S + delta V)``; ``S_tilde = S_hat - U_1^T delta V`` (the S-step runs backward in
    time); ``(V_1, S_1^T) = qr(V S_tilde^T + delta^T U_1)``.
    """
    u1, s_hat = torch.linalg.qr(y.U @ y.S + delta @ y.V)
    s_tilde = s_hat - u1.T @ delta @ y.V
    v1, s1t = torch.linalg.qr(y.V @ s_tilde.T + delta.T @ u1)
    return Factors(u1, s1t.T, v1)


def step(method: str, problem: RotatingMatrix, t: float, y: Factors, h: float) -> Factors:
    """One step of ``method`` (one of :data:`METHODS`) from time ``t`` to ``t + h``.

    ``"kls"`` and ``"projector-splitting"`` take one Euler step per substep, their ``-exact`` variants the
    exact increment (:func:`increment`).
    """
    if method == "direct-euler":
        return direct_euler_step(problem, t, y, h)
    if method == "direct-rk4":
        return direct_rk4_step(problem, t, y, h)
    substeps = "exact" if method.endswith("-exact") else "euler"
    if method.startswith("kls"):
        return kls_step(y, increment(problem, t, h, substeps))
    if method.startswith("projector-splitting"):
        return projector_splitting_step(y, increment(problem, t, h, substeps))
    raise ValueError(f"method {method!r} is not one of {METHODS}")


def orthonormality_error(y: Factors) -> float:
    """``max(||U^T U - I||_2, ||V^T V - I||_2)``."""
    eye = torch.eye(y.U.shape[1], dtype=y.U.dtype)
    return max(torch.linalg.matrix_norm(y.U.T @ y.U - eye, 2).item(),
               torch.linalg.matrix_norm(y.V.T @ y.V - eye, 2).item())


def _blown_up(y: Factors) -> bool:
    return not all(f.abs().max().item() <= BLOW_UP for f in y)  # NaN compares False


def output_times(end_time: float, outputs: int) -> list[float]:
    """``outputs + 1`` equally spaced times from 0 to ``end_time``."""
    return [end_time * k / outputs for k in range(outputs + 1)]


def integrate(problem: RotatingMatrix, method: str, h: float, end_time: float = 1.0, outputs: int = 10,
              references: dict[float, tuple[Tensor, Tensor]] | None = None) -> pd.DataFrame:
    """Integrate from the truncated SVD of ``A(0)`` to ``end_time`` with steps ``h``; errors at output times.

    ``end_time / h`` and ``end_time / outputs / h`` must be whole numbers (up to rounding). ``references``
    maps output times to ``(X(t), A(t))`` (computed here when ``None``).

    Returns one row per output time: ``time``, ``error`` (``||Y - X||_F``, ``X`` the best rank-``r``
    approximation of ``A(t)``), ``error_exact`` (``||Y - A||_F``), ``orthonormality``
    (:func:`orthonormality_error`), ``diverged`` (whether the run blew up at or before this time). A
    diverged run's errors are ``inf`` from then on.
    """
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not one of {METHODS}")
    per_output = end_time / outputs / h
    if h <= 0 or abs(per_output - round(per_output)) > 1e-6 or round(per_output) < 1:
        raise ValueError(f"step {h} does not divide the output interval {end_time / outputs}")
    per_output = round(per_output)
    times = output_times(end_time, outputs)
    if references is None:
        references = reference_solutions(problem, times)
    y, t, diverged, rows = initial_value(problem), 0.0, False, []
    for k, time in enumerate(times):
        if k > 0 and not diverged:
            for j in range(per_output):
                t = times[k - 1] + j * h
                try:
                    y = step(method, problem, t, y, h)
                except torch.linalg.LinAlgError:  # S became singular: the direct equations break down
                    diverged = True
                    break
                if _blown_up(y):
                    diverged = True
                    break
        best, exact = references[time]
        if diverged:
            error = error_exact = orthonormality = math.inf
        else:
            dense = y.matrix()
            error = torch.linalg.matrix_norm(dense - best).item()
            error_exact = torch.linalg.matrix_norm(dense - exact).item()
            orthonormality = orthonormality_error(y)
        rows.append(dict(time=time, error=error, error_exact=error_exact, orthonormality=orthonormality,
                         diverged=diverged))
    return pd.DataFrame(rows)


def reference_solutions(problem: RotatingMatrix, times: list[float]) -> dict[float, tuple[Tensor, Tensor]]:
    """``{t: (X(t), A(t))}``: the best rank-``r`` approximation and the exact solution at each time."""
    return {t: (problem.best_approximation(t)[0], problem.matrix(t)) for t in times}


# ---------------------------------------------------------------------------------------------
# The experiment of figure (j)

@dataclass(frozen=True)
class OdeExperiment:
    """One TOML file of kind ``"matrix-ode"``: the problem, the integrators and the step sizes.

    Every key of the ``[problem]`` and ``[run]`` tables is a field here; ``[quick]`` may replace any of
    them for the quick (nbval) run.
    """

    n: int = option(100, "size of the n x n matrix", min=2, multiple_of=2, table="problem")
    rank: int = option(10, "rank r of the approximations", min=1, table="problem")
    sigma_min: tuple[float, ...] = option((1e-2, 1e-4, 1e-6, 1e-8), "smallest kept singular value of each problem",
                                          above=0, max=1, table="problem")
    epsilon: float = option(1e-10, "size of the perturbation outside the rank-r part", min=0, table="problem")
    rotation: float = option(1.0, "angular speed of the rotating singular vectors", min=0, table="problem")
    seed: int = option(0, "seed of the random orthogonal factors", min=0, table="problem")
    end_time: float = option(1.0, "integrate from t = 0 to end_time", above=0, table="run")
    outputs: int = option(10, "errors are reported at this many equally spaced times", min=1, table="run")
    steps: tuple[float, ...] = option((1e-1, 1e-2, 1e-3), "step sizes h", above=0, table="run")
    methods: tuple[str, ...] = option(("direct-euler", "direct-rk4", "kls", "kls-exact"), "integrators",
                                      choices=METHODS, table="run")
    figure: dict = field(default_factory=dict, compare=False)

    def runs(self) -> list[tuple[float, str, float]]:
        """``(sigma_min, method, step)`` of every run, in table order."""
        return [(s, m, h) for s in self.sigma_min for m in self.methods for h in self.steps]


KIND = "matrix-ode"


def parse_experiment(data: dict, path: str | Path | None = None, quick: bool = False) -> OdeExperiment:
    """Validate a dict shaped like the TOML file; ``quick`` applies the ``[quick]`` overrides."""
    file = "<config>" if path is None else str(path)
    figure = experiment_tables(data, KIND, file, OdeExperiment)
    experiment = OdeExperiment(**table_values(OdeExperiment, data, file, quick), figure=dict(figure))
    if experiment.rank > experiment.n:
        raise ConfigError(f"{file}: problem.rank = {experiment.rank} is larger than n = {experiment.n}; "
                          f"allowed: 1..{experiment.n}")
    for h in experiment.steps:
        per_output = experiment.end_time / experiment.outputs / h
        if abs(per_output - round(per_output)) > 1e-6 or round(per_output) < 1:
            raise ConfigError(f"{file}: run.steps has {h}, which does not divide end_time / outputs = "
                              f"{experiment.end_time / experiment.outputs}; allowed: steps that do")
    return experiment


def load_experiment(path: str | Path, quick: bool = False) -> OdeExperiment:
    """Read and validate a TOML file of kind ``"matrix-ode"`` (``notebooks/configs/fig_j.toml``).

    Errors (:class:`lowrank.engine.config.ConfigError`) name the file, the key and the allowed values.
    """
    return parse_experiment(read_toml(path), path, quick)


def run_experiment(experiment: OdeExperiment) -> pd.DataFrame:
    """Every run of ``experiment``, as one tidy table.

    Columns: ``sigma_min``, ``method``, ``step``, then those of :func:`integrate` (one row per output time).
    """
    frames = []
    with torch_threads(1):
        for sigma_min in experiment.sigma_min:
            problem = make_problem(experiment.n, experiment.rank, sigma_min, experiment.epsilon,
                                   experiment.rotation, experiment.seed)
            references = reference_solutions(problem, output_times(experiment.end_time, experiment.outputs))
            for method in experiment.methods:
                for h in experiment.steps:
                    frame = integrate(problem, method, h, experiment.end_time, experiment.outputs, references)
                    frames.append(frame.assign(sigma_min=sigma_min, method=method, step=h))
    table = pd.concat(frames, ignore_index=True)
    return table[["sigma_min", "method", "step", *frames[0].columns.drop(["sigma_min", "method", "step"])]]


def final_errors(table: pd.DataFrame, column: str = "error") -> pd.DataFrame:
    """``max_t`` of ``column`` per run: rows ``(method, step)``, columns ``sigma_min`` (``inf``: diverged)."""
    worst = table.groupby(["method", "step", "sigma_min"], sort=False)[column].max()
    return worst.unstack("sigma_min")


def stable_step(table: pd.DataFrame, method: str, sigma_min: float, tolerance: float = math.inf) -> float | None:
    """The largest step of ``method`` that did not blow up and whose error stays at most ``tolerance`` at every
    output time, or None."""
    runs = table[(table.method == method) & (table.sigma_min == sigma_min)]
    worst = runs.groupby("step")["error"].max()
    good = worst[(worst < math.inf) & (worst <= tolerance)]
    return float(good.index.max()) if len(good) else None


# ---------------------------------------------------------------------------------------------
# What figure (j) concludes

#: A run works if its error to ``X(t)`` stays at most this at every output time (:func:`stable_step`).
TOLERANCE = 0.1
#: The direct methods and their names in the text.
DIRECT = {"direct-euler": "explicit Euler", "direct-rk4": "fourth-order Runge-Kutta"}
#: The methods figure (j)'s findings compare.
COMPARED = (*DIRECT, "kls", "kls-exact", "projector-splitting")


def setting_values(experiment: OdeExperiment, prefix: str) -> dict[str, object]:
    """The problem's size, rank, perturbation, number of runs, and the lists of sigma_min and steps, to glue."""
    return {**{f"{prefix}_{key}": getattr(experiment, key) for key in ("n", "rank", "epsilon")},
            f"{prefix}_runs": len(experiment.runs()),
            f"{prefix}_sigma_mins": summary.names_text([f"{s:g}" for s in experiment.sigma_min]),
            f"{prefix}_steps": summary.names_text([f"{h:g}" for h in experiment.steps])}


def error_table(table: pd.DataFrame) -> pd.DataFrame:
    """:func:`final_errors` as the book shows it: ``"1.2e-03"``, or ``"diverged"``."""
    worst = final_errors(table)
    worst.columns = [f"sigma_min = {s:g}" for s in worst.columns]
    return worst.map(lambda e: "diverged" if math.isinf(e) else f"{e:.1e}")


def largest_steps(experiment: OdeExperiment, table: pd.DataFrame, tolerance: float = TOLERANCE
                  ) -> dict[str, dict[float, float | None]]:
    """``{method: {sigma_min: the largest step at which it works, or None}}`` (:func:`stable_step`)."""
    return {m: {s: stable_step(table, m, s, tolerance) for s in experiment.sigma_min} for m in experiment.methods}


def findings(experiment: OdeExperiment, table: pd.DataFrame, prefix: str, tolerance: float = TOLERANCE
             ) -> tuple[dict[str, object], pd.DataFrame]:
    """The verdicts of figure (j) and the numbers its text quotes, in glue order, and the table of largest
    working steps (``"none"`` where no step works).

    Criteria: a direct method fails at a sigma_min where no step works; its largest working step falls with
    sigma_min if it never rises and falls somewhere; KLS's error does not depend on sigma_min if its largest
    and smallest (over sigma_min, at the smallest step) differ by less than a factor 1.5; its observed order
    is 1 if within 0.8..1.2; the direct Runge-Kutta method is the more accurate if its best error is below 1 %
    of KLS's at the same step.
    """
    missing = [m for m in COMPARED if m not in experiment.methods]
    if missing or len(experiment.steps) < 2:
        raise ValueError(f"figure (j)'s findings compare {', '.join(COMPARED)} at two steps or more; the experiment "
                         f"lacks {missing or 'a second step'}")
    works = largest_steps(experiment, table, tolerance)
    values = {}

    def text(key: str, value: str) -> None:
        values[f"{prefix}_{key}"] = summary.Text(value)

    for method, name in DIRECT.items():
        failed = [f"{s:g}" for s, h in works[method].items() if h is None]
        text(f"{method.removeprefix('direct-')}_verdict", f"the {name} method worked at none of the step sizes for "
             "σ_min = " + ", ".join(failed) if failed else f"the {name} method worked at some step size for every σ_min")
    direct_steps = [[works[m][s] or 0.0 for s in sorted(experiment.sigma_min, reverse=True)] for m in DIRECT]
    falls = all(a >= b for steps in direct_steps for a, b in zip(steps, steps[1:])) and any(
        steps[0] > steps[-1] for steps in direct_steps)
    text("direct_trend", "falls as σ_min falls" if falls else "does not fall steadily with σ_min")
    split = [m for m in experiment.methods if not m.startswith("direct")]
    split_fail = sum(works[m][s] != max(experiment.steps) for m in split for s in experiment.sigma_min)
    text("split_verdict", "every split integrator worked at every step size and every σ_min" if split_fail == 0
         else f"the split integrators did not work at the largest step in {split_fail} of "
              f"{len(split) * len(experiment.sigma_min)} cases")

    # KLS with Euler substeps: its error at the smallest step across sigma_min, and its observed order.
    kls = table[table.method == "kls"].groupby(["step", "sigma_min"])["error"].max().unstack()
    h1, h2 = sorted(experiment.steps)[:2]
    spread = float(kls.loc[h1].max() / kls.loc[h1].min())
    order = float((kls.loc[h2] / kls.loc[h1]).apply(math.log10).mean() / math.log10(h2 / h1))
    values[f"{prefix}_kls_smallest"] = float(f"{kls.loc[h1].max():.2g}")
    values[f"{prefix}_kls_h"] = h1
    values[f"{prefix}_kls_spread"] = round(spread, 2)
    text("kls_spread_verdict", "it does not depend on the smallest singular value" if spread < 1.5
         else "it does depend on the smallest singular value")
    values[f"{prefix}_kls_order"] = round(order, 2)
    text("kls_order_verdict", "the order 1 of the Euler substeps" if 0.8 < order < 1.2 else
         "not the order 1 that the Euler substeps would suggest")
    values[f"{prefix}_kls_exact_worst"] = float(f"{table[table.method == 'kls-exact'].error.max():.2g}")
    splitting = table[table.method == "projector-splitting"].error.to_numpy()
    gap = max(abs(a / b - 1) for a, b in zip(splitting, table[table.method == "kls"].error.to_numpy()) if b > 0)
    values[f"{prefix}_splitting_gap"] = round(100 * float(gap), 1)

    # Where the singular values are not small: the direct Runge-Kutta method against kls at its best step.
    top = max(experiment.sigma_min)
    rk4 = table[(table.method == "direct-rk4") & (table.sigma_min == top)].groupby("step")["error"].max()
    best_h = float(rk4.idxmin())
    values.update({f"{prefix}_top_sigma": top, f"{prefix}_rk4_best": float(f"{rk4.min():.2g}"),
                   f"{prefix}_rk4_best_h": best_h, f"{prefix}_kls_at_rk4_best_h": float(f"{kls.loc[best_h, top]:.2g}")})
    text("accuracy_verdict", "the direct Runge-Kutta method is by far the more accurate"
         if rk4.min() < 0.01 * kls.loc[best_h, top] else "the direct Runge-Kutta method is not clearly more accurate")

    # Orthonormality of U and V in runs that never diverged.
    diverged = table.groupby(["method", "step", "sigma_min"]).diverged.transform("max")
    finite = table[~diverged.astype(bool)]
    direct = finite.method.str.startswith("direct")
    values[f"{prefix}_direct_orthonormality"] = float(f"{finite[direct].orthonormality.max():.2g}")
    values[f"{prefix}_split_orthonormality"] = float(f"{finite[~direct].orthonormality.max():.1g}")
    largest = pd.DataFrame({m: works[m] for m in experiment.methods}).T
    largest.columns = [f"sigma_min = {s:g}" for s in largest.columns]
    return values, largest.map(lambda h: "none" if pd.isna(h) else f"{h:g}")
