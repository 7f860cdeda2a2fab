"""The report runner: figure discovery, quick settings, ordering, failures, and the values it glues."""

from pathlib import Path

import nbformat
import pytest

from lowrank.engine import config, report

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
        assert small.settings.subset == config.QUICK["subset"] and small.settings.num_epochs == config.QUICK["num_epochs"]
        assert small.settings.dtype == "float64" and big.settings.dtype == "float32"
        assert small.cache_key() != big.cache_key()


def test_a_quick_warm_start_keeps_its_dense_epochs_and_trains_quick_epochs_after_them():
    warm = next(m for m in config.load(CONFIGS / "fig_h.toml").models if m.settings.warm_start_epochs)
    quick = config.quick_settings(warm)
    assert quick.settings.warm_start_epochs == warm.settings.warm_start_epochs
    assert quick.settings.num_epochs == min(warm.settings.num_epochs,
                                            warm.settings.warm_start_epochs + config.QUICK["num_epochs"])


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
    assert work == sorted(work, reverse=True) and first[0].name == "fig_o"  # LeNet5: 20 epochs of convolutions
    assert report.estimated_work(next(f for f in first if f.name == "fig_j")) == 0.0  # a matrix ODE, no network


def test_a_convolution_costs_its_matrix_once_per_kernel_position():
    lenet = {m.name: m for m in config.load(ROOT / "notebooks" / "configs" / "fig_o.toml").models}["dense"]
    conv1, conv2 = lenet.layers[:2]  # 1 -> 20 channels, 5 x 5 on 28 x 28; 20 -> 50, 5 x 5 on 12 x 12
    assert conv1.positions((1, 28, 28)) == 24 * 24 and conv2.positions((20, 12, 12)) == 8 * 8
    dense_per_sample = 576 * 25 * 20 + 64 * 500 * 50 + sum(a * b for a, b in (l.dims for l in lenet.layers[2:]))
    assert report.model_work(lenet) == lenet.settings.total_epochs * 50_000 * dense_per_sample


def test_the_training_phase_trains_each_shared_model_once_the_longest_first():
    figures = report.discover(ROOT)
    queue = report.training_queue(figures, quick=False)
    keys = [model.cache_key() for _, model in queue]
    assert len(keys) == len(set(keys))
    assert set(keys) == {m.cache_key() for f in figures if report.figure_kind(f.config) == "network"
                         for m in report.figure_models(f.config)}
    work = [report.model_work(model) for _, model in queue]
    assert work == sorted(work, reverse=True)
    owners = {model.cache_key(): figure.name for figure, model in queue}
    shared = {m.name: m for m in report.figure_models(ROOT / "notebooks" / "configs" / "fig_b.toml")}["vanilla r=20 seed=0"]
    assert owners[shared.cache_key()] == "fig_a"  # figures (b) and (d) read it from the cache


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


def test_the_readme_figure_is_the_first_plot_even_when_glued(tmp_path):
    import base64

    png = b"\x89PNG\r\n\x1a\nfirst"
    notebook = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell('glue("fig_a_curves", fig, display=False)')
    cell.outputs = [nbformat.v4.new_output("display_data", data={
        report.PNG_OUTPUTS[1]: base64.b64encode(png).decode(), "application/papermill.record/text/plain": "<Figure>"})]
    notebook.cells = [nbformat.v4.new_code_cell("1"), cell]
    nbformat.write(notebook, tmp_path / "fig_a.ipynb")
    report.save_first_image(tmp_path / "fig_a.ipynb", tmp_path / "images" / "fig_a.png")
    assert (tmp_path / "images" / "fig_a.png").read_bytes() == png


def test_the_models_are_trained_before_any_notebook_runs(tmp_path):
    notebooks = tmp_path / "notebooks"
    (notebooks / "configs").mkdir(parents=True)
    (notebooks / "configs" / "fig_z.toml").write_text(TINY_CONFIG)
    check = ("from lowrank.engine import config as cfg, training\n"
             "(model,) = cfg.load(config).models\n"
             "assert training.load_result(cfg.quick_settings(model), results_dir) is not None, 'not trained yet'")
    notebook = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell('config = "configs/fig_z.toml"\nquick = True\nresults_dir = None',
                                  metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell(check),
    ])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, notebooks / "fig_z.ipynb")
    report.run(root=tmp_path, quick=True, build=False, results_dir=tmp_path / "results")
    assert (tmp_path / "book" / "figures" / "fig_z.ipynb").exists()


def test_a_record_keys_every_model_even_when_two_figures_name_theirs_alike():
    conclusion = next(f for f in report.discover(ROOT) if f.name == "conclusion")
    models = report.figure_models(conclusion.config)
    assert len({m.name for m in models}) < len(models)  # "dense seed=0" of (a), (f) and (g) are three networks
    assert sorted(report.figure_keys(conclusion).values()) == sorted(m.cache_key() for m in models)
