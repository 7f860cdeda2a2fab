"""The conclusion's verdicts (lowrank.engine.experiments.claims): each claim decided against the seed spreads."""

import pytest

from lowrank.engine import summary
from lowrank.engine.experiments import claims


@pytest.fixture
def figures(make_result):
    """Figures (a), (g) and (f) with three seeds of each model: ``accuracy`` (%, mean; the seeds at -0.1, 0, +0.1)
    and ``seconds`` (mean; the seeds at -1, 0, +1) per figure and model."""

    def build(accuracy: dict[str, dict[str, float]], seconds: dict[str, float]) -> dict[str, list]:
        return {figure: [make_result(name, seed, [0.1, (mean + 0.1 * (seed - 1)) / 100], [16, 12],
                                     seconds.get(name, 10.0) + seed - 1)
                         for name, mean in models.items() for seed in range(3)]
                for figure, models in accuracy.items()}

    return build


STUDY = {"dense": 98.0, "vanilla r=20": 96.5, "dynamical tau=0.1": 98.5}
REFERENCE = {"dense": 98.0, "dynamical tau=0.05": 98.1}


def test_a_claim_holds_only_where_every_comparison_supports_it():
    assert claims.verdict([True, True]) == "holds"
    assert claims.verdict([True, False]) == "holds in part"
    assert claims.verdict([False, False]) == "does not hold"


def test_the_accuracy_claims_read_each_comparison_against_the_seed_spread(figures):
    comparable, superior = claims.accuracy_claims(figures({"fig_a": STUDY, "fig_g": STUDY, "fig_f": REFERENCE}, {}))
    assert comparable.verdict == "holds in part"  # vanilla is 1.5 points below dense, DLRT is not below
    assert "MNIST: vanilla r=20 96.50 ± 0.10 % below dense 98.00 ± 0.10 %" in comparable.evidence
    assert superior.verdict == "holds in part"  # above dense and vanilla in (a) and (g), within the spread in (f)
    assert superior.evidence.endswith("figure (f): dynamical tau=0.05 98.10 ± 0.10 % within the seed spread of "
                                      "dense 98.00 ± 0.10 %")
    level = {"dense": 98.0, "vanilla r=20": 98.1, "dynamical tau=0.1": 97.9}
    comparable, superior = claims.accuracy_claims(figures({"fig_a": level, "fig_g": level, "fig_f": REFERENCE}, {}))
    assert comparable.verdict == "holds" and superior.verdict == "does not hold"


def test_the_timing_claims_need_the_times_to_differ_beyond_their_spreads(figures):
    runs = figures({"fig_a": STUDY, "fig_g": STUDY}, {"vanilla r=20": 5.0, "dense": 20.0, "dynamical tau=0.1": 40.0})
    fastest, slower = claims.timing_claims(runs)
    assert fastest.verdict == "holds" and slower.verdict == "holds"
    assert "MNIST: dynamical tau=0.1 40.0 ± 1.0 s slower than dense 20.0 ± 1.0 s" in slower.evidence
    close = figures({"fig_a": STUDY, "fig_g": STUDY}, {"vanilla r=20": 19.0, "dense": 20.0, "dynamical tau=0.1": 20.5})
    fastest, slower = claims.timing_claims(close)  # 19 + 1 is below neither 20 - 1 nor 20.5 - 1; 20.5 - 1 is not above 20 + 1
    assert fastest.verdict == "does not hold" and slower.verdict == "does not hold"


def test_claim_values_glue_each_verdict_and_its_evidence(figures):
    values = claims.claim_values(claims.accuracy_claims(figures({"fig_a": STUDY, "fig_g": STUDY, "fig_f": REFERENCE}, {})),
                                 "conclusion")
    assert set(values) == {"conclusion_comparable_verdict", "conclusion_comparable_evidence",
                           "conclusion_dlrt_more_accurate_verdict", "conclusion_dlrt_more_accurate_evidence"}
    assert all(isinstance(value, summary.Text) for value in values.values())


def test_the_results_table_lists_every_model_of_every_figure_once(make_result):
    seeded = [make_result("dense", seed, [0.1, 0.97 + 0.001 * seed], [64, 64]) for seed in range(3)]
    single = [make_result("dynamical tau=0.1", 0, [0.1, 0.98], [16, 12])]
    table = claims.results_table({"fig_a": seeded, "fig_o": single})
    assert list(table.index) == [("a", "dense"), ("o", "dynamical tau=0.1")]
    assert list(table.columns) == list(claims.RESULT_COLUMNS.values())
    assert table.loc[("a", "dense"), "seeds"] == 3 and table.loc[("o", "dynamical tau=0.1"), "±"] == 0.0
    assert table.loc[("o", "dynamical tau=0.1"), "hidden ranks"] == "[12]"


def test_training_costs_count_a_model_that_two_figures_show_once(make_result):
    shared = make_result("dense", 0, [0.1, 0.9, 0.95], [64, 64, 64], seconds=30.0)
    own = make_result("dynamical tau=0.1", 0, [0.1, 0.9, 0.97], [16, 12, 12], seconds=50.0)
    costs = claims.training_costs({"fig_a": [shared], "fig_d": [shared, own]})
    assert costs.loc["a", "trainings"] == 1 and costs.loc["d", "trainings"] == 1
    assert costs.loc["d", "epochs"] == 2 and costs.loc["d", "training time"] == "50.0 s"
    assert costs.loc["all", "trainings"] == 2 and costs.loc["all", "training time"] == "80.0 s"


def test_repeated_trainings_of_one_configuration_measure_the_timing_noise(make_result):
    first = make_result("dense", 0, [0.1, 0.9], [64, 64], seconds=30.0)
    again = make_result("dense again", 0, [0.1, 0.9], [64, 64], seconds=20.0)  # the same network, another name
    other = make_result("vanilla", 0, [0.1, 0.9], [20, 20], seconds=10.0)  # another configuration
    table = claims.repeated_trainings({"fig_a": [first, other], "fig_m": [again], "fig_l": [first]})
    assert list(table.index) == ["(a) dense seed=0; (m) dense again seed=0"]  # fig_l's copy is the same training
    assert table.iloc[0]["training times"] == "30.0 s, 20.0 s" and table.iloc[0][claims.TIME_NOISE] == 20.0
    assert repr(claims.timing_noise(table)) == "±20 %"
    assert repr(claims.timing_noise(claims.repeated_trainings({"fig_a": [first]}))).startswith("unknown")
