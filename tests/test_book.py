"""The book builds without warnings, every page and image exists, and its math renders offline.

The book is built once per test session, into a temporary folder, with the command of `make book`
(`jb build -W -n --keep-going`), so a warning anywhere (a broken reference, a missing citation, an
unknown directive) fails the suite. The browser test opens pages in Debian's headless Chromium with
every host name unresolvable: the math can only render if MathJax is served from the build itself.
"""

import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"
MATHJAX = BOOK / "_mathjax" / "mathjax" / "tex-chtml.js"
CHROMIUM = shutil.which(os.environ.get("CHROMIUM", "chromium"))
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# Hosts that Chromium itself contacts (clock, updates, accounts) whatever page it opens.
BROWSER_OWN_HOSTS = ("google.com", "googleapis.com", "gstatic.com")
MATH_PAGES = ["intro", "background", "lowrank_layers"]


def _jb() -> str:
    """The jb next to this Python (the project's virtual environment), else the one on PATH."""
    local = Path(sys.executable).with_name("jb")
    if local.exists():
        return str(local)
    found = shutil.which("jb")
    if found is None:
        pytest.fail("jb (jupyter-book 1.x) is not installed: run `make setup`")
    return found


def _toc_files(toc: dict) -> list[str]:
    """Every `file:` of a jb-book _toc.yml: the root, then each part's chapters and their sections."""
    files = [toc["root"]]

    def walk(entries):
        for entry in entries or []:
            if "file" in entry:
                files.append(entry["file"])
            walk(entry.get("sections"))

    for part in toc.get("parts", [{"chapters": toc.get("chapters")}]):
        walk(part.get("chapters"))
    return files


class _Tags(HTMLParser):
    """Collects the attributes of some tags, and the visible text outside <script> and <style>."""

    def __init__(self, tags=("img", "script", "link")):
        super().__init__(convert_charrefs=True)
        self.tags = {t: [] for t in tags}
        self.counts = {}
        self.text = []
        self._hidden = 0

    def handle_starttag(self, tag, attrs):
        self.counts[tag] = self.counts.get(tag, 0) + 1
        if tag in self.tags:
            self.tags[tag].append(dict(attrs))
        if tag in ("script", "style"):
            self._hidden += 1

    def handle_endtag(self, tag):
        if tag in ("script", "style"):
            self._hidden = max(0, self._hidden - 1)

    def handle_data(self, data):
        if not self._hidden:
            self.text.append(data)


def _parse(html: str) -> _Tags:
    parser = _Tags()
    parser.feed(html)
    return parser


def _figure_notebooks() -> list[Path]:
    """The executed figure notebooks of the committed record (book/figures/, from the last `make report`)."""
    return [BOOK / "figures" / notebook.name for notebook in sorted((ROOT / "notebooks").glob("fig_*.ipynb"))]


@pytest.fixture(scope="session")
def built_book(tmp_path_factory):
    """Build the book once, as `jb build book/` on a fresh clone would; returns (html folder, return code, log).

    The build uses a copy of book/ as committed, whose figures/ are the record of the last full-size
    `make report`, so nothing has to run before it.
    """
    if not MATHJAX.is_file():
        pytest.fail(f"{MATHJAX.relative_to(ROOT)} is missing: run `make mathjax` (needs npm) first")
    missing = [str(n.relative_to(ROOT)) for n in _figure_notebooks() if not n.is_file()]
    if missing:
        pytest.fail(f"the record is incomplete, {missing} missing: run `make report` and commit book/figures/")
    source = tmp_path_factory.mktemp("source") / "book"
    shutil.copytree(BOOK, source, ignore=shutil.ignore_patterns("_build"))
    (source.parent / "lowrank").symlink_to(ROOT / "lowrank")  # the chapters literalinclude ../lowrank/*.py
    out = tmp_path_factory.mktemp("book")
    cmd = [_jb(), "build", "-W", "-n", "--keep-going", "--path-output", str(out), str(source)]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    log = run.stdout + run.stderr
    return out / "_build" / "html", run.returncode, log


def test_book_builds_without_warnings(built_book):
    html, returncode, log = built_book
    assert returncode == 0, f"jb build -W -n failed:\n{log[-6000:]}"
    assert "build succeeded" in log
    assert (html / "index.html").is_file()


def test_every_toc_entry_has_a_page_and_every_image_exists(built_book):
    html, returncode, log = built_book
    assert returncode == 0, "the book did not build; see test_book_builds_without_warnings"
    toc = yaml.safe_load((BOOK / "_toc.yml").read_text(encoding="utf-8"))
    assert toc["format"] == "jb-book"
    for entry in _toc_files(toc):
        page = html / Path(entry).with_suffix(".html")
        assert page.is_file(), f"_toc.yml lists {entry!r} but {page.name} was not built"

    pages = [p for p in html.rglob("*.html") if "_static" not in p.parts]
    missing, external = [], []
    for page in pages:
        tags = _parse(page.read_text(encoding="utf-8"))
        for img in tags.tags["img"]:
            src = img.get("src", "")
            parts = urlsplit(src)
            if parts.scheme == "data":
                continue
            if parts.scheme or parts.netloc:
                external.append(f"{page.name}: {src}")
            elif not (page.parent / unquote(parts.path)).is_file():
                missing.append(f"{page.name}: {src}")
    assert not missing, "images referenced but not in the build:\n" + "\n".join(missing)
    assert not external, "images loaded from the network (the book is read offline):\n" + "\n".join(external)


@pytest.mark.parametrize("name", MATH_PAGES)
def test_pages_load_mathjax_from_the_build(built_book, name):
    """Each page with math loads exactly one MathJax, from _static/mathjax/ in the build, no CDN."""
    html, returncode, log = built_book
    assert returncode == 0, "the book did not build; see test_book_builds_without_warnings"
    page = html / f"{name}.html"
    tags = _parse(page.read_text(encoding="utf-8"))
    sources = [s.get("src", "") for s in tags.tags["script"] if s.get("src")]
    mathjax = [s for s in sources if "mathjax" in s.lower() or "tex-" in s]
    assert len(mathjax) == 1, f"{name}.html: expected one MathJax script, found {mathjax}"
    assert urlsplit(mathjax[0]).path == "_static/mathjax/tex-chtml.js", mathjax[0]
    assert (html / "_static" / "mathjax" / "tex-chtml.js").is_file()
    assert (html / "_static" / "mathjax" / "output" / "chtml" / "fonts" / "woff-v2").is_dir()
    remote = [s for s in sources if urlsplit(s).scheme in ("http", "https") or s.startswith("//")]
    remote += [link.get("href", "") for link in tags.tags["link"]
               if link.get("rel") in ("stylesheet", "preload") and urlsplit(link.get("href", "")).netloc]
    assert not remote, f"{name}.html loads from the network: {remote}"


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (`make test` installs Debian's chromium as root)")
@pytest.mark.parametrize("name", ["intro", "lowrank_layers"])
def test_math_is_rendered_by_mathjax_offline(built_book, name, tmp_path):
    html, returncode, log = built_book
    assert returncode == 0, "the book did not build; see test_book_builds_without_warnings"
    page = html / f"{name}.html"
    expected = page.read_text(encoding="utf-8").count('class="math notranslate nohighlight"')
    assert expected > 0, f"{name}.html has no math to render"

    netlog = tmp_path / "netlog.json"
    cmd = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
           "--host-resolver-rules=MAP * ~NOTFOUND",  # nothing outside the build can load
           f"--log-net-log={netlog}", "--virtual-time-budget=10000", "--dump-dom", page.as_uri()]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, f"chromium failed ({run.returncode}):\n{run.stderr[-3000:]}"
    dom = run.stdout
    rendered = _parse(dom)

    assert rendered.counts.get("mjx-container", 0) == expected, (
        f"{name}.html: {rendered.counts.get('mjx-container', 0)} of {expected} formulas typeset by MathJax")
    assert rendered.counts.get("mjx-merror", 0) == 0, f"{name}.html: MathJax reports TeX errors"
    undefined = re.findall(r'<mtext mathcolor="red">(\\[^<]*)</mtext>', dom)
    assert not undefined, f"{name}.html: undefined TeX macros {sorted(set(undefined))}"
    text = "".join(rendered.text)
    for raw in ("$$", "\\(", "\\[", "\\begin{"):
        assert raw not in text, f"{name}.html: raw TeX {raw!r} left in the visible text"

    urls = re.findall(r'"url":"([^"]+)"', netlog.read_text(encoding="utf-8", errors="replace"))
    hosts = {urlsplit(u).hostname for u in urls if urlsplit(u).scheme in ("http", "https", "ws", "wss")}
    foreign = sorted(h for h in hosts if h and not h.endswith(BROWSER_OWN_HOSTS))
    assert not foreign, f"{name}.html requested resources from {foreign}"


def _glued_values(notebook: Path) -> dict[str, str]:
    """The text of every value a notebook glued (myst-nb's scrapbook outputs), by key."""
    import nbformat

    values = {}
    for cell in nbformat.read(notebook, as_version=4).cells:
        for output in cell.get("outputs", []):
            name = output.get("metadata", {}).get("scrapbook", {}).get("name")
            if name:
                values[name] = output["data"]["application/papermill.record/text/plain"]
    return values


@pytest.mark.parametrize("notebook", _figure_notebooks(), ids=lambda p: p.stem)
def test_figure_pages_show_every_plot_and_glued_number(built_book, notebook):
    """Each figure page has one image per plot the notebook drew and shows every number its text glues."""
    import nbformat

    html, returncode, log = built_book
    assert returncode == 0, "the book did not build; see test_book_builds_without_warnings"
    cells = nbformat.read(notebook, as_version=4).cells
    plots = sum("image/png" in o.get("data", {}) for c in cells for o in c.get("outputs", []))
    page = (html / "figures" / notebook.with_suffix(".html").name).read_text(encoding="utf-8")
    tags = _parse(page)
    images = [img for img in tags.tags["img"] if "_images" in img.get("src", "")]
    assert plots > 0 and len(images) == plots, f"{notebook.name}: {plots} plots, {len(images)} images in the page"

    values = _glued_values(notebook)
    referenced = {key for c in cells if c.cell_type == "markdown"
                  for key in re.findall(r"\{glue:text\}`([^`:]+)`", c.source)}
    assert referenced, f"{notebook.name} glues no number into its text"
    assert referenced <= values.keys(), f"{notebook.name}: text uses unglued keys {sorted(referenced - values.keys())}"
    text = " ".join("".join(tags.text).split())
    missing = [key for key in referenced if values[key] not in text]
    assert not missing, f"{notebook.name}: glued values not in the page: {[(k, values[k]) for k in missing]}"


def test_the_implementation_chapter_s_example_trains_with_the_library_alone():
    text = (ROOT / "book" / "implementation.md").read_text(encoding="utf-8")
    (example,) = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    check = ("\nimport sys\nprint(model.ranks()[0], sorted(m for m in sys.modules if m.startswith('lowrank.engine')))")
    run = subprocess.run([sys.executable, "-c", "import torch; torch.manual_seed(0)\n" + example + check],
                         capture_output=True, text=True, check=True)
    rank, engine = run.stdout.split(" ", 1)
    assert int(rank) != 32 and 1 <= int(rank) <= 256  # the step adapted the rank
    assert engine.strip() == "[]"  # the library trained without the experiment engine


def test_the_implementation_chapter_s_convolutional_config_is_valid():
    from lowrank.engine import config

    text = (ROOT / "book" / "implementation.md").read_text(encoding="utf-8")
    configs = re.findall(r"```toml\n(.*?)```", text, flags=re.S)
    lenet = next(c for c in configs if "kernel_size" in c)
    (model,) = config.loads(lenet, "implementation.md").models
    assert [layer.matrix_dims for layer in model.layers] == [(25, 20), (500, 50), (800, 500), (500, 10)]
