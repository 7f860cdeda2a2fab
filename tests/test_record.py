"""The committed record of the report (book/figures/*.ipynb, the last full-size `make report`) is current.

Each executed figure notebook stores the cache keys of the models it was computed from
(`lowrank.engine.report.stamp_record`); a changed configuration or library version changes the keys that
`lowrank.engine.report.figure_keys` computes now, and these tests fail until `make report` regenerates the record.
"""

import json
from pathlib import Path

import nbformat
import pytest

from lowrank import __version__
from lowrank.engine import report

ROOT = Path(__file__).resolve().parents[1]
FIGURES = report.discover(ROOT)


def record(figure) -> dict:
    assert figure.output.is_file(), f"{figure.output.relative_to(ROOT)} is missing: run `make report` and commit it"
    notebook = nbformat.read(figure.output, as_version=4)
    assert report.RECORD_METADATA in notebook.metadata, f"{figure.output.name} has no record metadata: not made by `make report`"
    return notebook.metadata[report.RECORD_METADATA]["record"]


@pytest.mark.parametrize("figure", FIGURES, ids=lambda f: f.name)
def test_the_record_was_made_from_the_current_configs_and_library(figure):
    stored = record(figure)["keys"]
    current = report.figure_keys(figure)
    changed = sorted(k for k in stored.keys() | current.keys() if stored.get(k) != current.get(k))
    assert not changed, (f"the record {figure.output.name} is stale for {changed} (a config or lowrank's version "
                         "changed): run `make report` and commit book/figures/")


@pytest.mark.parametrize("figure", FIGURES, ids=lambda f: f.name)
def test_the_record_states_when_and_on_what_it_ran(figure):
    stored = record(figure)
    assert stored["wall_seconds"] > 0 and stored["executed"].endswith("UTC") 
    assert (stored["trained_epochs"] is None) == (report.figure_kind(figure.config) != "network")
    machine = stored["machine"]
    assert {"cpu", "cores", "torch_threads", "cpu_kernels", "torch", "numpy", "blas", "lowrank"} <= machine.keys()
    assert machine["lowrank"] == __version__
    cells = nbformat.read(figure.output, as_version=4).cells
    shown = [c.source for c in cells if "record" in c.metadata.get("tags", [])]
    assert len(shown) == 1 and machine["cpu"] in shown[0] and machine["torch"] in shown[0]


def test_a_changed_config_makes_the_record_stale(tmp_path):
    figure = next(f for f in FIGURES if f.name == "fig_a")
    text = figure.config.read_text(encoding="utf-8")
    assert "\nlearning_rate = 0.001\n" in text
    config = tmp_path / "fig_a.toml"
    config.write_text(text.replace("\nlearning_rate = 0.001\n", "\nlearning_rate = 0.002\n", 1), encoding="utf-8")
    changed = report.Figure(figure.name, figure.notebook, config, figure.output)
    assert report.figure_keys(changed).keys() == report.figure_keys(figure).keys()
    assert report.figure_keys(changed) != report.figure_keys(figure)


def test_stamp_record_replaces_the_previous_record(tmp_path):
    figure = next(f for f in FIGURES if f.name == "fig_j")
    path = tmp_path / "fig_j.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# fig j")]), path)
    for seconds in (12.0, 34.0):
        report.stamp_record(path, figure, seconds, trained_epochs=0)
    notebook = nbformat.read(path, as_version=4)
    assert [c.metadata.get("tags", []) for c in notebook.cells] == [[], ["record"]]
    assert notebook.metadata["lowrank"]["record"]["wall_seconds"] == 34.0
    assert notebook.metadata["lowrank"]["record"]["keys"] == report.figure_keys(figure)
    assert "every model read from the results cache" in notebook.cells[-1].source


def test_trained_epochs_counts_the_epochs_a_figure_reported(tmp_path):
    progress = tmp_path / "fig.jsonl"
    lines = [{"started": "fig.ipynb"}, {"model": "a", "epoch": 0, "epochs": 2}, {"model": "a", "epoch": 1, "epochs": 2},
             {"model": "a", "epoch": 2, "epochs": 2}]
    progress.write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"model": "b", "ep')  # a partial line
    assert report.trained_epochs(progress) == 2


def test_a_comment_in_an_experiment_config_leaves_the_record_current(tmp_path):
    figure = next(f for f in FIGURES if f.name == "fig_j")
    config = tmp_path / "fig_j.toml"
    config.write_text("# a new comment\n" + figure.config.read_text(encoding="utf-8"), encoding="utf-8")
    commented = report.Figure(figure.name, figure.notebook, config, figure.output)
    assert report.figure_keys(commented) == report.figure_keys(figure)
    config.write_text(figure.config.read_text(encoding="utf-8").replace("seed = 0", "seed = 1"), encoding="utf-8")
    assert report.figure_keys(commented) != report.figure_keys(figure)


#: What pandas prints in place of the rows it leaves out of a long DataFrame (``display.max_rows``).
ELISION_MARKERS = ("<td>...</td>", "rows × ")


@pytest.mark.parametrize("path", [p for f in FIGURES for p in (f.output, f.notebook)],
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_no_table_of_a_notebook_leaves_out_rows(path):
    """Neither the record (what the book renders) nor the stored quick outputs (what nbval compares)."""
    notebook = nbformat.read(path, as_version=4)
    for index, cell in enumerate(notebook.cells):
        for output in cell.get("outputs", []):
            for mime, text in output.get("data", {}).items():
                if mime.endswith(("text/html", "text/plain")) and isinstance(text, str):
                    elided = [marker for marker in ELISION_MARKERS if marker in text]
                    assert not elided, (f"{path}, cell {index} ({mime}): a table shows {elided[0]!r} "
                                        "instead of every row; glue it as lowrank.engine.summary.FullTable")


def test_a_full_table_shows_every_row_where_pandas_would_elide_them():
    import pandas as pd

    from lowrank.engine.summary import FullTable

    table = pd.DataFrame({"accuracy": range(100)})
    assert any(marker in table._repr_html_() for marker in ELISION_MARKERS)  # what pandas does to a long table
    full = FullTable(table)
    assert not any(marker in full._repr_html_() or marker in repr(full) for marker in ELISION_MARKERS)
    assert full._repr_html_().count("<td>") == 100 and len(repr(full).splitlines()) == 101  # a header and 100 rows


def test_the_report_s_default_cycle_length_is_the_one_figure_m_chose():
    """Figure (m) decides the report's default ``basis_interval`` from its data (the longest cycle up to which every
    length is as accurate as k = 1); the default of ``[settings]`` must be that choice."""
    from lowrank.engine.config import Settings

    notebook = nbformat.read(ROOT / "book" / "figures" / "fig_m.ipynb", as_version=4)
    chosen = [output["data"]["application/papermill.record/text/plain"] for cell in notebook.cells for output in cell.get("outputs", [])
              if output.get("metadata", {}).get("scrapbook", {}).get("name") == "fig_m_largest_k"]
    assert len(chosen) == 1, "fig_m.ipynb glues no fig_m_largest_k: run `make report`"
    assert int(chosen[0]) == Settings().basis_interval, (
        f"figure (m) chose k = {chosen[0]}, but Settings.basis_interval defaults to {Settings().basis_interval}")
