"""The nbval regression of the figure notebooks catches a changed number, ignores changed timings, and
passes on other CPU code paths.

`pytest --nbval notebooks/` (part of `make test`) re-executes every figure notebook and compares its
outputs with the stored ones, after `tests/nbval_sanitize.cfg` has replaced timings. These tests run nbval
on copies of one notebook whose stored outputs were edited: a timing edit must pass, a result edit fail.
The portability test retrains figure (a) (dense, vanilla and both DLRT integrators) from nothing under
other ATen and MKL kernels, as another CPU would pick them, and must reproduce the stored outputs.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from lowrank.engine import report

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "fig_a.ipynb"
SANITIZE = ROOT / "tests" / "nbval_sanitize.cfg"


def glued(notebook, key: str) -> dict:
    """The stored output of the value glued under ``key``."""
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if output.get("metadata", {}).get("scrapbook", {}).get("name") == key:
                return output["data"]
    raise KeyError(key)


def run_nbval(notebook, folder: Path, results: Path = ROOT / "notebooks" / "results",
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Write ``notebook`` beside a copy of the configs and run nbval on it with the results cache ``results``."""
    shutil.copytree(ROOT / "notebooks" / "configs", folder / "configs", dirs_exist_ok=True)
    path = folder / NOTEBOOK.name
    nbformat.write(notebook, path)
    env = {**os.environ, "LOWRANK_RESULTS": str(results), "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval", "--nbval-current-env",
           "--nbval-sanitize-with", str(SANITIZE), str(path)]
    return subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture
def stored():
    return nbformat.read(NOTEBOOK, as_version=4)


def test_nbval_ignores_a_changed_timing(stored, tmp_path):
    record = glued(stored, "fig_a_dense_seconds")
    (mime,) = record
    assert record[mime].endswith(" s")
    record[mime] = "12345.6 s"
    run = run_nbval(stored, tmp_path)
    assert run.returncode == 0, run.stdout[-4000:]


def test_nbval_catches_a_changed_number(stored, tmp_path):
    record = glued(stored, "fig_a_dense_test_accuracy")
    (mime,) = record
    record[mime] = f"{float(record[mime]) + 0.01:.2f}"
    run = run_nbval(stored, tmp_path)
    assert run.returncode != 0
    assert "fig_a_dense_test_accuracy" in run.stdout or record[mime] in run.stdout, run.stdout[-4000:]


# ATen picks vectorised kernels by CPU (ATEN_CPU_CAPABILITY caps them), MKL its code path (MKL_CBWR fixes
# one): each setting changes float32 training results, as another machine would.
OTHER_CODE_PATHS = [
    {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE"},
    {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2"},
]


@pytest.mark.parametrize("code_path", OTHER_CODE_PATHS, ids=lambda e: f"{e['ATEN_CPU_CAPABILITY']}-{e['MKL_CBWR']}")
def test_stored_outputs_reproduce_under_other_cpu_code_paths(stored, tmp_path, code_path):
    run = run_nbval(stored, tmp_path / "notebook", results=tmp_path / "results", env=code_path)
    assert run.returncode == 0, run.stdout[-6000:]
    assert any((tmp_path / "results").glob("*/result.json")), "nothing was trained: the test compared cached results"


#: Notebooks call the package and plot; logic (verdicts, tables, findings) lives in lowrank.engine, tested there.
MAX_CODE_LINES = 40


@pytest.mark.parametrize("path", [f.notebook for f in report.discover(ROOT)], ids=lambda p: p.stem)
def test_every_notebook_is_thin(path):
    cells = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
    lines = [line for cell in cells for line in cell.source.splitlines() if line.strip()]
    assert len(lines) <= MAX_CODE_LINES, f"{path.name} has {len(lines)} code lines; move its logic into lowrank.engine"
    assert not any(line.startswith(("def ", "class ")) for line in lines), f"{path.name} defines functions"


@pytest.mark.parametrize("path", [f.notebook for f in report.discover(ROOT)], ids=lambda p: p.stem)
def test_every_glued_plot_is_shown_in_a_figure_and_left_out_of_nbval(path):
    """A plot goes into the book as a numbered, captioned ``{glue:figure}``; the cell that glues it is tagged
    ``nbval-ignore-output``, since the glued PNG is compared byte for byte otherwise (and its timer bars move)."""
    cells = nbformat.read(path, as_version=4).cells
    shown = {key for c in cells if c.cell_type == "markdown" for key in re.findall(r"\{glue:figure\} (\S+)", c.source)}
    gluing = {key: c for c in cells if c.cell_type == "code" for key in re.findall(r'glue\("([^"]+)", plots\.', c.source)}
    assert set(gluing) == shown, f"{path.name}: glued plots {sorted(gluing)}, figures {sorted(shown)}"
    untagged = sorted(k for k, c in gluing.items() if "nbval-ignore-output" not in c.metadata.get("tags", []))
    assert not untagged, f"{path.name}: cells gluing {untagged} are compared by nbval"
    assert "fig = plots." not in " ".join(c.source for c in cells), f"{path.name} shows a plot without a caption"
