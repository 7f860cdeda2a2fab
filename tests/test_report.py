"""The report runner: figure discovery, quick settings, ordering, failures, and the values it glues."""

from pathlib import Path
from types import SimpleNamespace

import nbformat
import pandas as pd
import pytest

from lowrank import config, report

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "notebooks" / "configs"

TINY_CONFIG = """
[settings]
num_epochs = 1
[[layer]]
type = "dense"
dims = [784, 10]
activation = "identity"
"""


def test_every_figure_notebook_has_a_valid_config():
    figures = report.discover(ROOT)
    assert {"fig_a", "fig_b", "fig_c", "fig_d", "fig_e", "fig_f", "fig_g"} <= {f.name for f in figures}
    for figure in figures:
        assert figure.config.exists() and figure.output.parent == ROOT / "book" / "figures"


def test_quick_settings_shrink_training_but_keep_the_models():
    full = report.figure_models(CONFIGS / "fig_a.toml")
    quick = report.figure_models(CONFIGS / "fig_a.toml", quick=True)
    assert [m.name for m in quick] == [m.name for m in full]
    for small, big in zip(quick, full):
        assert small.layers == big.layers
        assert small.settings.subset == report.QUICK["subset"] and small.settings.num_epochs == report.QUICK["num_epochs"]
        assert small.settings.dtype == "float64" and big.settings.dtype == "float32"
        assert small.cache_key() != big.cache_key()


def test_a_quick_warm_start_keeps_its_dense_epochs_and_trains_quick_epochs_after_them():
    warm = next(m for m in config.load(CONFIGS / "fig_h.toml").models if m.settings.warm_start_epochs)
    quick = report.quick_settings(warm)
    assert quick.settings.warm_start_epochs == warm.settings.warm_start_epochs
    assert quick.settings.num_epochs == min(warm.settings.num_epochs,
                                            warm.settings.warm_start_epochs + report.QUICK["num_epochs"])


def test_a_figure_that_uses_others_gets_each_model_once():
    models = report.figure_models(CONFIGS / "fig_d.toml")
    keys = [m.cache_key() for m in models]
    assert len(keys) == len(set(keys))
    used = {m.cache_key() for name in ("fig_a", "fig_b", "fig_c") for m in config.load(CONFIGS / f"{name}.toml").models}
    assert set(keys) == used


def test_figures_run_after_the_figures_they_use():
    waves = report.schedule(report.discover(ROOT))
    position = {figure.name: i for i, wave in enumerate(waves) for figure in wave}
    assert position["fig_d"] > max(position["fig_a"], position["fig_b"], position["fig_c"])
    assert position["fig_a"] == 0


def test_the_step_benchmark_runs_last_and_alone():
    waves = report.schedule(report.discover(ROOT))
    assert [figure.name for figure in waves[-1]] == ["fig_n"]
    assert all(figure.name != "fig_n" for wave in waves[:-1] for figure in wave)


def test_within_a_wave_the_figures_with_the_most_training_start_first():
    first = report.schedule(report.discover(ROOT))[0]
    work = [report.estimated_work(figure) for figure in first]
    assert work == sorted(work, reverse=True) and first[0].name == "fig_f"  # 12 deep models, the longest
    assert report.estimated_work(next(f for f in first if f.name == "fig_j")) == 0.0  # a matrix ODE, no network


def test_glued_values_print_as_the_book_shows_them():
    assert repr(report.Seconds(12.345)) == "12.3 s"
    assert repr(report.Text("dense and vanilla r=20")) == "dense and vanilla r=20"
    assert report.slug("dynamical tau=0.1") == "dynamical_tau_0_1"


def test_glue_results_gives_each_models_numbers_and_its_hidden_layers_ranks(monkeypatch):
    import myst_nb

    from lowrank.training import TrainingResult

    model = config.loads(
        """
        [[layer]]
        type = "dynamical"
        dims = [784, 64]
        rank = 32
        r_max = 48
        [[layer]]
        type = "lowrank"
        dims = [64, 64]
        rank = 8
        [[layer]]
        type = "dense"
        dims = [64, 10]
        activation = "identity"
        """,
        "dlrt net.toml",
    ).models[0]
    history = pd.DataFrame({
        "epoch": [0, 1], "parameters": [1000, 900], "compression": [0.5, 0.55], "train_seconds_cum": [0.0, 3.25],
        "rank_0": [32, 20], "rank_1": [8, 8], "rank_2": [10, 10],
    })
    result = TrainingResult(model, history, test_loss=0.1, test_accuracy=0.98765, model=None, path=Path("."))
    glued = {}
    monkeypatch.setattr(myst_nb, "glue", lambda key, value, display=True: glued.__setitem__(key, value))
    report.glue_results("fig_z", [result])
    key = f"fig_z_{report.slug(model.name)}"
    assert glued[f"{key}_test_accuracy"] == 98.77
    assert (glued[f"{key}_parameters"], glued[f"{key}_compression"]) == (900, 55.0)
    assert repr(glued[f"{key}_seconds"]) == "3.2 s"
    assert glued[f"{key}_ranks"] == [20, 8]
    assert glued[f"{key}_initial_ranks"] == [32, 8]
    assert glued[f"{key}_max_ranks"] == [48, 8]


def test_kernels_talk_over_unix_sockets_in_a_private_folder_removed_afterwards():
    with report.kernel_sockets() as kernel_config:
        settings = kernel_config.KernelManager
        folder = Path(settings.ip).parent
        assert settings.transport == "ipc" and folder.is_dir()
        assert folder.stat().st_mode & 0o077 == 0  # private: no access for group or others
    assert not folder.exists()


def test_a_failing_figure_names_its_executed_notebook_and_stops(tmp_path):
    notebooks = tmp_path / "notebooks"
    (notebooks / "configs").mkdir(parents=True)
    (notebooks / "configs" / "fig_z.toml").write_text(TINY_CONFIG)
    notebook = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell('config = "configs/fig_z.toml"\nquick = True', metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell('raise RuntimeError("figure z cannot be drawn")'),
    ])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, notebooks / "fig_z.ipynb")

    with pytest.raises(report.FigureFailed) as failure:
        report.run(root=tmp_path, build=False, results_dir=tmp_path / "results")
    executed = tmp_path / "book" / "figures" / "fig_z.ipynb"
    assert str(executed) in str(failure.value) and "figure z cannot be drawn" in str(failure.value)
    assert executed.exists()


def test_an_invalid_config_stops_before_any_notebook_runs(tmp_path):
    notebooks = tmp_path / "notebooks"
    (notebooks / "configs").mkdir(parents=True)
    (notebooks / "configs" / "fig_z.toml").write_text(TINY_CONFIG.replace("num_epochs = 1", "num_epochs = 0"))
    nbformat.write(nbformat.v4.new_notebook(), notebooks / "fig_z.ipynb")
    with pytest.raises(config.ConfigError, match="fig_z.toml: settings.num_epochs = 0"):
        report.run(root=tmp_path, build=False, results_dir=tmp_path / "results")
    assert not (tmp_path / "book" / "figures" / "fig_z.ipynb").exists()


def test_trend_and_compare_count_a_change_only_beyond_the_sum_of_the_seed_spreads():
    assert report.trend((97.0, 0.1), (96.5, 0.2)) == "falls"
    assert report.trend((97.0, 0.3), (96.5, 0.3)) == "does not change beyond the seed spread"
    assert report.trend((96.5, 0.1), (97.0, 0.1)) == "rises"
    assert report.compare((97.5, 0.1), (97.0, 0.1)) == "above"
    assert report.compare((96.5, 0.1), (97.0, 0.1)) == "below"
    assert report.compare((97.1, 0.1), (97.0, 0.1)) == "within the seed spread of"


def test_ranks_differ_when_some_layer_s_seed_ranges_do_not_overlap():
    first = {"ranks": [[40, 50], [42, 51]]}
    assert report.ranks_differ(first, {"ranks": [[41, 53], [40, 52]]})  # second layer: 50-51 against 52-53
    assert not report.ranks_differ(first, {"ranks": [[42, 51], [44, 49]]})  # both layers overlap
    assert not report.ranks_differ(first, first)


def test_ranks_at_least_needs_every_layer_s_lowest_seed_at_or_above_the_other_s_highest():
    k1 = {"ranks": [[47, 52], [46, 47]]}
    assert report.ranks_at_least({"ranks": [[61, 72], [52, 70]]}, k1)
    assert not report.ranks_at_least({"ranks": [[61, 72], [46, 70]]}, k1)  # layer 0: 46 < 47
    assert report.ranks_at_least(k1, k1) is False and report.ranks_at_least({"ranks": [[47, 52]]}, {"ranks": [[47, 52]]})


def test_epochs_at_max_rank_counts_the_epochs_a_dynamical_layer_ends_clamped_at_r_max():
    model = config.loads("""
[[layer]]
type = "dynamical"
dims = [784, 64]
rank = 16
r_max = 32
[[layer]]
type = "dense"
dims = [64, 10]
activation = "identity"
""").models[0]
    history = pd.DataFrame({"epoch": [0, 1, 2, 3], "rank_0": [16, 32, 32, 30], "rank_1": [10, 10, 10, 10]})
    assert report.epochs_at_max_rank(SimpleNamespace(config=model, history=history)) == 2
    history["rank_0"] = [32, 31, 20, 12]  # the untrained network (epoch 0) does not count
    assert report.epochs_at_max_rank(SimpleNamespace(config=model, history=history)) == 0


def test_basis_intervals_are_judged_against_k_1_and_against_dense():
    def stats(accuracy, spread, ranks, seconds):
        return {"test_accuracy": accuracy, "spread": spread, "ranks": ranks, "seconds": seconds}

    models = {1: "k=1", 2: "k=2", 5: "k=5", 10: "k=10"}
    table = report.basis_interval_table({
        "dense": stats(98.0, 0.05, [[512, 512], [512, 512]], 20.0),
        "k=1": stats(97.9, 0.05, [[47, 50], [48, 50]], 50.0),
        "k=2": stats(97.85, 0.05, [[47, 51], [48, 50]], 30.0),  # within the spread of k=1 (0.05 <= 0.05 + 0.05)
        "k=5": stats(97.75, 0.05, [[47, 50], [49, 50]], 19.0),  # 0.15 below k=1: below; 0.25 below dense
        "k=10": stats(97.85, 0.02, [[30, 31], [30, 32]], 15.0),  # ranks differ from k=1's
    }, models, "dense")
    assert list(table.index) == [1, 2, 5, 10]
    assert list(table["vs k=1"]) == ["within the seed spread of", "within the seed spread of", "below",
                                     "within the seed spread of"]
    assert list(table["ranks vs k=1"]) == ["do not differ", "do not differ", "do not differ", "differ"]
    assert list(table["time / dense"]) == [2.5, 1.5, 0.95, 0.75]
    assert list(table["as fast as dense"]) == ["missed", "missed", "met", "met"]
    assert table.loc[1, "ranks"] == "[47, 50] and [48, 50]" and table.loc[1, "train s"] == "50.0 s"
    assert report.largest_equivalent_interval(table) == 2
    table.loc[2, "vs k=1"] = "below"
    assert report.largest_equivalent_interval(table) == 1
