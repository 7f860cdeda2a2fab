"""The project's files agree with each other: conda and pip install the same packages; the book has one config."""

import tomllib
from pathlib import Path

import yaml

import lowrank

ROOT = Path(__file__).resolve().parents[1]


def pyproject_requirements() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras = project["optional-dependencies"]
    return {*project["dependencies"], *extras["report"], *extras["test"]}


def environment_requirements() -> set[str]:
    environment = yaml.safe_load((ROOT / "environment.yml").read_text(encoding="utf-8"))
    (pip,) = [entry["pip"] for entry in environment["dependencies"] if isinstance(entry, dict)]
    return {requirement for requirement in pip if not requirement.startswith("-e")}


def test_environment_yml_installs_the_pyproject_requirements():
    assert environment_requirements() == pyproject_requirements()


def test_environment_yml_installs_the_project_itself():
    environment = yaml.safe_load((ROOT / "environment.yml").read_text(encoding="utf-8"))
    (pip,) = [entry["pip"] for entry in environment["dependencies"] if isinstance(entry, dict)]
    assert "-e ." in pip
    assert "python>=3.11" in environment["dependencies"]


def test_report_extra_has_the_packages_the_user_asked_for():
    names = {requirement.split(">")[0].split("=")[0].split("<")[0] for requirement in pyproject_requirements()}
    assert {"torch", "torchvision", "jupyter-book", "papermill", "matplotlib", "pandas", "nbval"} <= names


def test_top_level_config_is_the_books_config():
    top = ROOT / "_config.yml"
    assert top.is_symlink()
    assert top.resolve() == (ROOT / "book" / "_config.yml").resolve()


def test_the_citation_file_parses_and_names_this_version():
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text(encoding="utf-8"))
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert citation["cff-version"] == "1.2.0" and citation["type"] == "software"
    assert str(citation["version"]) == project["version"] == lowrank.__version__
    assert citation["license"] == project["license"]
    assert citation["authors"] and citation["title"].startswith("lowrank")


def test_the_how_to_cite_page_gives_the_citation_file_s_entry():
    import re

    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text(encoding="utf-8"))
    page = (ROOT / "book" / "citing.md").read_text(encoding="utf-8")
    (entry,) = re.findall(r"```bibtex\n(@software\{.*?)```", page, flags=re.S)
    assert re.search(r"version\s*=\s*\{" + re.escape(str(citation["version"])) + r"\}", entry)
    assert citation["license"] in entry and citation["authors"][0]["name"] in entry
    title = " ".join(entry.split("title", 1)[1].split("=", 1)[1].split("},\n", 1)[0].split())
    assert re.sub(r"[{}]", "", title).strip(" {") == citation["title"]


def test_the_book_s_mathjax_comes_from_a_pinned_python_package_not_npm():
    """MathJax is put into the book's build by the Sphinx extension sphinx-mathjax-offline (a wheel on PyPI):
    the report extra installs it, constraints.txt pins it, the book's config loads it and names no other
    MathJax and no static folder that a fresh clone lacks, and the Makefile fetches nothing with npm."""
    import re

    config = yaml.safe_load((ROOT / "book" / "_config.yml").read_text(encoding="utf-8"))["sphinx"]
    assert "sphinx-mathjax-offline" in config.get("extra_extensions", [])
    assert "mathjax_path" not in config["config"], "the extension sets mathjax_path itself"
    for folder in config["config"].get("html_static_path", []):
        assert (ROOT / "book" / folder).is_dir(), f"html_static_path names {folder!r}, which the repository lacks"
    report = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]["report"]
    assert any(re.match(r"sphinx-mathjax-offline\b", requirement) for requirement in report)
    constraints = (ROOT / "constraints.txt").read_text(encoding="utf-8")
    assert re.search(r"^sphinx-mathjax-offline==\d+(\.\d+)+$", constraints, flags=re.M)
    assert "npm" not in (ROOT / "Makefile").read_text(encoding="utf-8")
