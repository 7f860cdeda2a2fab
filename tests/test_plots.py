"""Figures and tables of the notebooks (lowrank.engine.plots): seeds as bands, one colour per model, page width."""

import matplotlib
import numpy as np
import pandas as pd
import pytest

matplotlib.use("Agg")

from lowrank.engine import plots  # noqa: E402

@pytest.fixture
def seeded(make_result):
    """dense and a dynamical network, three seeds each: dense 95-96 % after training, dynamical 97-98 %."""
    result = make_result
    dense = [result("dense", s, [0.1, 0.95 + 0.002 * s, 0.96 + 0.001 * s], [64, 64, 64], 5.0 + s) for s in range(3)]
    dynamical = [result("dynamical tau=0.1", s, [0.1, 0.97, 0.98 - 0.002 * s], [16, 12 + s, 10 + s], 20.0)
                 for s in range(3)]
    return dense + dynamical


def _line_colours(ax) -> dict[str, str]:
    return {line.get_label(): matplotlib.colors.to_hex(line.get_color()) for line in ax.get_lines()}


def test_figures_are_drawn_at_the_page_width(seeded):
    for figure in (plots.training_curves(seeded), plots.rank_curves(seeded), plots.pareto(seeded),
                   plots.seed_bars(seeded), plots.sweep(seeded, [1, 2], "x")):
        assert figure.get_figwidth() == plots.PAGE_WIDTH and figure.dpi == plots.DPI


def test_a_seeded_model_is_one_mean_curve_with_its_range_shaded(seeded):
    figure = plots.training_curves(seeded)
    accuracy = figure.axes[2]  # training accuracy (%)
    assert len(accuracy.get_lines()) == 2  # one per model, not per seed
    mean = accuracy.get_lines()[1].get_ydata()
    np.testing.assert_allclose(mean, [10.0, 97.0, 97.8])
    (band,) = [c for c in accuracy.collections if c.get_paths()][1:2]  # the dynamical model's band
    lows_highs = band.get_paths()[0].vertices[:, 1]
    assert lows_highs.min() == pytest.approx(10.0) and lows_highs.max() == pytest.approx(98.0)


def test_accuracy_axes_zoom_to_the_trained_epochs(seeded):
    low, high = plots.accuracy_limits(plots.seed_groups(seeded), "val_accuracy")
    assert 94.5 < low < 95.2 and 98.0 < high <= 100.0  # dense's mean after epoch 1 is 95.2 %; epoch 0 (10 %) lies below
    figure = plots.training_curves(seeded)
    assert figure.axes[3].get_ylim() == pytest.approx(plots.accuracy_limits(
        plots.seed_groups(seeded), "val_accuracy"))


def test_a_model_keeps_its_colour_when_a_figure_leaves_the_others_out(seeded):
    curves = _line_colours(plots.training_curves(seeded).axes[0])
    ranks = _line_colours(plots.rank_curves(seeded).axes[0])
    assert list(ranks) == ["dynamical tau=0.1"]  # the dense model has no rank to show
    dynamical_label = next(name for name in curves if name.startswith("dynamical"))
    assert ranks["dynamical tau=0.1"] == curves[dynamical_label] != curves[next(iter(curves))]


def test_tables_show_one_row_per_model_with_its_seed_spread(seeded):
    table = plots.summary_table(seeded)
    assert list(table.index) == ["dense", "dynamical tau=0.1"]
    assert table.loc["dynamical tau=0.1", "± (half-range)"] == 0.2 and table.loc["dense", "seeds"] == 3
    assert table.loc["dynamical tau=0.1", "hidden ranks"] == "[10-12]"
    single = plots.summary_table([seeded[0], seeded[3]])
    assert "± (half-range)" not in single and single.loc["dense", "hidden ranks"] == "[64]"


def test_the_pareto_front_rises_with_the_cost_and_names_the_models_tied_with_it_within_the_spread():
    table = pd.DataFrame({"test accuracy (%)": [97.0, 96.9, 97.4, 96.0], "± (half-range)": [0.2, 0.2, 0.1, 0.1],
                          "parameters": [100, 200, 300, 400]}, index=["small", "middle", "large", "huge"])
    front = plots.pareto_front(table, "parameters")
    assert list(front.index) == ["small", "large"]  # middle costs more than small and is less accurate
    assert front["test accuracy (%)"].is_monotonic_increasing and front["parameters"].is_monotonic_increasing
    assert list(plots.front_ties(table, "parameters")) == ["middle"]  # within the spread of small; huge is beaten
    table.loc["middle", "test accuracy (%)"] = 96.5
    assert list(plots.front_ties(table, "parameters")) == []


def test_a_model_as_accurate_as_a_cheaper_one_is_off_the_front():
    table = pd.DataFrame({"test accuracy (%)": [97.0, 97.0], "parameters": [100, 200]}, index=["cheap", "dear"])
    assert list(plots.pareto_front(table, "parameters").index) == ["cheap"]


def test_rank_and_training_curves_mark_where_fine_tuning_starts(seeded):
    assert plots.fine_tuning_start(seeded) is None
    for result in seeded:
        result.history["phase"] = ["train", "train", "fine-tune"]  # epochs 0-1 adaptive, epoch 2 fine-tuned
    assert plots.fine_tuning_start(seeded) == 1
    for figure in (plots.rank_curves(seeded), plots.training_curves(seeded)):
        panels = [ax for ax in figure.axes if ax.get_xlabel() == "epoch"]
        assert panels and all([1, 1] in [list(line.get_xdata()) for line in ax.get_lines()] for ax in panels)


def test_a_figure_of_more_than_ten_models_still_gives_each_its_own_colour(make_result):
    many = [make_result(f"dynamical tau=0.{i}", 0, [0.1, 0.9], [16, 12]) for i in range(1, 15)]
    assert len(set(plots.colours(many).values())) == 14


def test_figures_stay_out_of_pyplot_so_a_notebook_shows_them_only_where_it_glues_them(seeded):
    import matplotlib.pyplot as plt

    plt.close("all")
    plots.training_curves(seeded), plots.pareto(seeded), plots.rank_curves(seeded)
    assert plt.get_fignums() == []
