"""Dynamical low-rank approximation of a matrix ODE: the test problem, the integrators, the config file."""

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from lowrank.engine import report
from lowrank.engine.experiments import matrix_ode
from lowrank.engine.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "notebooks" / "configs" / "fig_j.toml"


def problem(sigma_min=1e-3, epsilon=0.0, n=20, rank=4, seed=0):
    return matrix_ode.make_problem(n, rank, sigma_min, epsilon=epsilon, rotation=1.0, seed=seed)


def test_derivative_matches_central_differences():
    p = problem(epsilon=1e-2)
    t, d = 0.4, 1e-5
    central = (p.matrix(t + d) - p.matrix(t - d)) / (2 * d)
    assert torch.allclose(p.derivative(t), central, atol=1e-8)


def test_rotating_factors_keep_the_singular_values():
    p = problem(sigma_min=1e-6)
    expected = torch.logspace(0, -6, 4, dtype=torch.float64)
    for t in (0.0, 0.7):
        sigma = torch.linalg.svdvals(p.matrix(t))
        assert torch.allclose(sigma[:4], expected, rtol=1e-9)
        assert sigma[4:].max() < 1e-14


@pytest.mark.parametrize("method", ["kls-exact", "projector-splitting-exact"])
def test_split_integrators_with_exact_substeps_reproduce_a_rank_r_solution(method):
    """The exactness property: if A(t) has rank r, Y_n = A(t_n) up to round-off, whatever h and sigma_r."""
    p = problem(sigma_min=1e-8)
    run = matrix_ode.integrate(p, method, h=0.1, end_time=1.0, outputs=5)
    assert run.error_exact.max() < 1e-12
    assert not run.diverged.any()


@pytest.mark.parametrize("method", ["kls", "kls-exact", "projector-splitting"])
def test_split_integrators_keep_orthonormal_bases(method):
    run = matrix_ode.integrate(problem(sigma_min=1e-8, epsilon=1e-10), method, h=0.01, end_time=1.0, outputs=5)
    assert run.orthonormality.max() < 1e-13


def test_kls_with_euler_substeps_converges_with_order_one():
    p = problem(sigma_min=1e-2, epsilon=1e-10)
    errors = [matrix_ode.integrate(p, "kls", h, end_time=0.4, outputs=1).error.max() for h in (0.04, 0.02, 0.01)]
    orders = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    assert all(0.9 < order < 1.3 for order in orders), (errors, orders)


def test_kls_error_does_not_depend_on_the_smallest_singular_value():
    errors = [matrix_ode.integrate(problem(sigma_min=s, epsilon=1e-10), "kls", 0.01, end_time=1.0, outputs=2).error.max()
              for s in (1e-1, 1e-4, 1e-8)]
    assert max(errors) < 1.5 * min(errors), errors
    assert max(errors) < 1e-2


def test_direct_equations_blow_up_for_a_tiny_singular_value_where_kls_does_not():
    tiny = problem(sigma_min=1e-8, epsilon=1e-10)
    direct = matrix_ode.integrate(tiny, "direct-euler", 0.01, end_time=1.0, outputs=2)
    assert direct.diverged.iloc[-1] and math.isinf(direct.error.iloc[-1])
    kls = matrix_ode.integrate(tiny, "kls", 0.01, end_time=1.0, outputs=2)
    assert not kls.diverged.any() and kls.error.max() < 1e-2
    # ... while with a moderate sigma_r the same direct Euler run is fine: it is the 1 / sigma_r that hurts.
    moderate = matrix_ode.integrate(problem(sigma_min=1e-1, epsilon=1e-10), "direct-euler", 0.01, end_time=1.0, outputs=2)
    assert not moderate.diverged.any() and moderate.error.max() < 1e-2


def test_direct_rk4_is_fourth_order_when_the_singular_values_are_large():
    p = problem(sigma_min=0.5, epsilon=0.0)
    errors = [matrix_ode.integrate(p, "direct-rk4", h, end_time=0.4, outputs=1).error.max() for h in (0.1, 0.05)]
    assert math.log2(errors[0] / errors[1]) > 3.5, errors


def test_step_that_does_not_divide_the_output_interval_is_rejected():
    with pytest.raises(ValueError, match="does not divide"):
        matrix_ode.integrate(problem(), "kls", 0.03, end_time=1.0, outputs=10)


def test_run_experiment_gives_a_tidy_table():
    experiment = matrix_ode.OdeExperiment(n=10, rank=2, sigma_min=(1e-2, 1e-6), steps=(0.1, 0.05), outputs=2,
                                 methods=("direct-euler", "kls"))
    table = matrix_ode.run_experiment(experiment)
    assert list(table.columns[:3]) == ["sigma_min", "method", "step"]
    assert len(table) == 2 * 2 * 2 * 3  # sigma_min x methods x steps x output times
    worst = matrix_ode.final_errors(table)
    assert worst.shape == (4, 2)
    assert matrix_ode.stable_step(table, "kls", 1e-6, tolerance=1.0) == 0.1
    assert matrix_ode.stable_step(table, "direct-euler", 1e-6) is None  # blew up at both steps
    assert matrix_ode.stable_step(table, "direct-euler", 1e-2, tolerance=0.1) == 0.05  # h = 0.1 stays finite but is far off


def test_the_figure_config_loads_and_its_quick_run_is_smaller():
    full, quick = matrix_ode.load_experiment(CONFIG), matrix_ode.load_experiment(CONFIG, quick=True)
    assert len(quick.runs()) < len(full.runs())
    assert isinstance(report.validate(CONFIG), matrix_ode.OdeExperiment)
    assert report.figure_kind(CONFIG) == "matrix-ode"


@pytest.mark.parametrize("text, message", [
    ('[figure]\nkind = "matrix-ode"\n[run]\nmethods = ["rk45"]', r'run\.methods\[0\] = "rk45" is unknown; allowed: a non-empty list of "direct-euler"' ),
    ('[figure]\nkind = "matrix-ode"\n[problem]\nsize = 3',
     r"problem\.size is not a key of \[problem\]; allowed keys: n, rank"),
    ('[figure]\nkind = "matrix-ode"\n[run]\nsteps = [0.03]', r"run\.steps has 0\.03, which does not divide"),
    ('[figure]\nkind = "network"', r'figure\.kind = .* allowed: "matrix-ode"'),
    ('[figure]\nkind = "matrix-ode"\n[problem]\nn = 7', r"problem\.n = 7 is not a multiple of 2; allowed: an integer >= 2 and multiple of 2"),
])
def test_config_errors_name_the_file_the_key_and_the_allowed_values(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as error:
        matrix_ode.load_experiment(path)
    assert str(error.value).startswith(str(path))


def test_report_rejects_an_unknown_figure_kind(tmp_path):
    path = tmp_path / "odd.toml"
    path.write_text('[figure]\nkind = "spline"\n')
    with pytest.raises(ConfigError, match=r'figure\.kind = "spline" is unknown; allowed: "network" \| "matrix-ode"'):
        report.validate(path)


def test_the_findings_agree_with_the_largest_stable_steps():
    experiment = matrix_ode.OdeExperiment(n=10, rank=2, sigma_min=(1e-2, 1e-6), steps=(0.1, 0.05), outputs=2,
                                          methods=matrix_ode.COMPARED)
    table = matrix_ode.run_experiment(experiment)
    with pytest.raises(ValueError, match="lacks \\['projector-splitting'\\]"):
        matrix_ode.findings(replace(experiment, methods=matrix_ode.COMPARED[:-1]), table, "fig_z")
    values, largest = matrix_ode.findings(experiment, table, "fig_z")
    works = matrix_ode.largest_steps(experiment, table)
    assert list(largest.index) == list(experiment.methods)
    for method in experiment.methods:
        for s in experiment.sigma_min:
            h = works[method][s]
            assert largest.loc[method, f"sigma_min = {s:g}"] == ("none" if h is None else f"{h:g}")
    assert works["direct-euler"][1e-6] is None  # as test_run_experiment_gives_a_tidy_table
    assert values["fig_z_euler_verdict"].text.endswith("for σ_min = 1e-06")
    split_ok = all(works[m][s] == 0.1 for m in matrix_ode.COMPARED[2:] for s in experiment.sigma_min)
    assert (values["fig_z_split_verdict"].text == "every split integrator worked at every step size and every σ_min") == split_ok
    assert values["fig_z_kls_h"] == 0.05 and values["fig_z_top_sigma"] == 1e-2
    assert values["fig_z_kls_exact_worst"] < 1e-6  # exact substeps: exact for a matrix of rank r, up to epsilon
    assert matrix_ode.error_table(table).shape == (10, 2)
    assert matrix_ode.setting_values(experiment, "fig_z")["fig_z_steps"].text == "0.1 and 0.05"
