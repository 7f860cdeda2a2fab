"""The package's architecture, read from its imports: a library, and an experiment engine built on it.

``lowrank/*.py`` is the library (layers, the DLRT optimiser, networks, regularisers, metrics, linear
algebra); ``lowrank/engine/`` the experiment engine, whose modules each import only the library and the
engine modules above them in :data:`ENGINE_ORDER` (``lowrank/engine/__init__.py`` explains the order).
"""

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lowrank"
LIBRARY = sorted(p for p in PACKAGE.glob("*.py") if p.name != "__main__.py")
ENGINE_ORDER = ("config", "determinism", "distributed", "store", "data", "training", "summary", "plots",
                "experiments", "report", "cli")
ENGINE = sorted((PACKAGE / "engine").rglob("*.py"))
#: Private PyTorch API, used only behind lowrank.torch_compat (which has a fallback for each).
PRIVATE_TORCH = re.compile(r"torch\._[a-z]|_foreach_|_fused_")


def imported_modules(path: Path) -> set[str]:
    """Every ``lowrank...`` module ``path`` imports, at the top or inside a function."""
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            modules |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
    return {m for m in modules if m.split(".")[0] == "lowrank"}


def engine_part(module: str) -> str:
    """``lowrank.engine.experiments.adapters`` -> ``"experiments"``; ``lowrank.engine.report`` -> ``"report"``."""
    return module.split(".")[2]


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: p.name)
def test_the_library_never_imports_the_engine(path):
    engine = sorted(m for m in imported_modules(path) if m.startswith("lowrank.engine"))
    assert not engine, f"{path.name} imports {engine}: the library must work without the experiment engine"


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: p.name)
def test_the_library_writes_no_files(path):
    text = path.read_text(encoding="utf-8")
    for call in ("open(", "write_text(", "write_bytes(", "torch.save(", "to_csv(", "mkdir("):
        assert call not in text, f"{path.name} calls {call}: files are the engine's job (lowrank.engine.store)"


@pytest.mark.parametrize("path", [p for p in LIBRARY + ENGINE if p.name != "torch_compat.py"],
                         ids=lambda p: str(p.relative_to(PACKAGE)))
def test_private_torch_api_is_used_only_behind_torch_compat(path):
    text = path.read_text(encoding="utf-8")
    used = sorted(set(PRIVATE_TORCH.findall(text)))
    assert not used, f"{path.relative_to(ROOT)} uses {used}: call lowrank.torch_compat instead"


@pytest.mark.parametrize("path", [p for p in ENGINE if p.name != "__init__.py"], ids=lambda p: str(p.relative_to(PACKAGE)))
def test_each_engine_module_imports_only_the_library_and_the_engine_above_it(path):
    relative = path.relative_to(PACKAGE / "engine")
    part = relative.parts[0] if len(relative.parts) > 1 else path.stem
    rank = ENGINE_ORDER.index(part)
    below = sorted({engine_part(m) for m in imported_modules(path)
                    if m.startswith("lowrank.engine.") and ENGINE_ORDER.index(engine_part(m)) > rank})
    assert not below, f"{relative} ({part}) imports {below}, which come after it in {ENGINE_ORDER}"


def test_every_engine_module_has_its_place_in_the_order():
    parts = {p.relative_to(PACKAGE / "engine").parts[0].removesuffix(".py") for p in ENGINE} - {"__init__"}
    assert parts == set(ENGINE_ORDER)


def test_importing_the_library_loads_neither_the_engine_nor_the_report_tools():
    code = ("import sys, lowrank\n"
            "from lowrank import choices, layers, linalg, metrics, network, optim, regularizers, torch_compat\n"
            "model = lowrank.NeuralNetwork([lowrank.DynamicalLowRank(4, 3, 2)], ['identity'])\n"
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('lowrank.engine') or m.split('.')[0] in "
            "('tomllib', 'nbformat', 'papermill', 'matplotlib', 'myst_nb'))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert loaded == []


def test_setuptools_installs_every_subpackage():
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]["packages"]
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in PACKAGE.rglob("__init__.py")}
    assert set(packages) == found


def test_every_submodule_is_an_attribute_of_lowrank_and_importing_lowrank_loads_no_torch():
    import lowrank

    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "__main__"}
    packages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert set(lowrank.SUBMODULES) == modules | packages
    code = ("import sys, lowrank\n"
            "light = 'torch' not in sys.modules\n"
            "same = all(getattr(lowrank, name) is sys.modules['lowrank.' + name] for name in lowrank.SUBMODULES)\n"
            "print(light, same, 'optim' in dir(lowrank) and 'summary' in dir(lowrank))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["True", "True", "True"]


def _exports() -> list[str]:
    import lowrank

    return [name for name in lowrank.__all__ if name != "__version__"]


@pytest.mark.parametrize("name", _exports())
def test_each_export_s_docstring_stands_alone_in_help(name):
    import lowrank

    doc = getattr(lowrank, name).__doc__ or ""
    assert len(doc) > 100 and "module docstring" not in doc
