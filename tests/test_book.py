"""The book builds without warnings, every page and image exists, and every page reads well offline.

The book is built once per test session, into a temporary folder, with the command of `make book`
(`jb build -W -n --keep-going`), so a warning anywhere (a broken reference, a missing citation, an
unknown directive) fails the suite. The browser tests open every page once in Debian's headless
Chromium, in a 1400 px wide window, with every host name unresolvable: the math can only render if
MathJax is served from the build itself. A script injected into a copy of each page then reports
what a reader would see: the figures and their captions, and anything wider than its column.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from html import unescape as html_unescape
from html.parser import HTMLParser
from pathlib import Path
from typing import NamedTuple
from urllib.parse import unquote, urlsplit

import pytest
import yaml

from lowrank.engine import report

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"
CHROMIUM = shutil.which(os.environ.get("CHROMIUM", "chromium"))
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# Hosts that Chromium itself contacts (clock, updates, accounts) whatever page it opens.
BROWSER_OWN_HOSTS = ("google.com", "googleapis.com", "gstatic.com")
#: The mime type of a plot that a notebook glued (``myst_nb.glue``) instead of showing it in its cell.
GLUED_PNG = report.PNG_OUTPUTS[1]
MATH_PAGES = ["intro", "background", "lowrank_layers"]
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (`make test` installs Debian's chromium as root)")


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
    return [figure.output for figure in report.discover(ROOT)]


@pytest.fixture(scope="session")
def built_book(tmp_path_factory):
    """Build the book once, as `jb build book/` on a fresh clone would; returns (html folder, return code, log).

    The build uses a copy of book/ as committed, whose figures/ are the record of the last full-size
    `make report`, so nothing has to run before it.
    """
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


def _tracked_files_copy(dest: Path) -> Path:
    """Copy every file git tracks, as it is in the working tree, to dest: what a fresh clone of this tree
    holds once it is committed (no build, no virtual environment, nothing ignored or untracked)."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: no tracked files to copy")
    for name in filter(None, listed.decode("utf-8").split("\0")):
        source = ROOT / name
        if source.is_symlink() or source.is_file():  # a file deleted in the working tree is left out
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name, follow_symlinks=False)
    return dest


def test_a_fresh_clone_builds_the_book_with_mathjax_from_python_packages_alone(tmp_path):
    """`jb build -W -n book/` in a fresh clone (the tracked files alone: no npm, no fetched MathJax, no
    proxy that would let it download one) succeeds, puts MathJax into the build, and every page with math
    loads that copy, no CDN."""
    clone = _tracked_files_copy(tmp_path / "clone")
    assert (clone / "book" / "_config.yml").is_file()
    shipped = sorted(str(p.relative_to(clone)) for p in clone.rglob("tex-chtml.js"))
    assert not shipped, f"the repository itself ships a MathJax: {shipped}"
    unreachable = "http://127.0.0.1:9"  # the discard port: any download through a proxy fails at once
    env = {**os.environ, "http_proxy": unreachable, "https_proxy": unreachable,
           "HTTP_PROXY": unreachable, "HTTPS_PROXY": unreachable, "no_proxy": "", "NO_PROXY": ""}
    run = subprocess.run([_jb(), "build", "-W", "-n", "--keep-going", "book/"], cwd=clone, env=env,
                         capture_output=True, text=True, timeout=600)
    log = run.stdout + run.stderr
    assert run.returncode == 0, f"jb build -W -n book/ failed in a fresh clone:\n{log[-6000:]}"
    assert "build succeeded" in log

    html = clone / "book" / "_build" / "html"
    mathjax = html / "_static" / "mathjax" / "tex-chtml.js"
    assert mathjax.is_file(), "the build has no _static/mathjax/tex-chtml.js"
    assert (mathjax.parent / "output" / "chtml" / "fonts" / "woff-v2").is_dir(), "MathJax's fonts are missing"
    loading = []
    for page in _reader_pages(html):
        source = page.read_text(encoding="utf-8")
        assert "cdn.jsdelivr.net" not in source, f"{page.name} names the MathJax CDN"
        scripts = [s.get("src", "") for s in _parse(source).tags["script"] if s.get("src")]
        remote = [s for s in scripts if urlsplit(s).scheme or urlsplit(s).netloc]
        assert not remote, f"{page.name} loads scripts from the network: {remote}"
        local = [s for s in scripts if "mathjax" in s.lower() or "tex-" in s]
        assert all((page.parent / urlsplit(s).path).resolve() == mathjax.resolve() for s in local), local
        if local:
            loading.append(page.relative_to(html).with_suffix("").as_posix())
    assert set(MATH_PAGES) <= set(loading), f"pages with math that load no MathJax: {set(MATH_PAGES) - set(loading)}"


def _reader_pages(html: Path) -> list[Path]:
    """The pages a reader opens: every built .html but _static/, search, genindex and redirect stubs
    (Jupyter Book's index.html only forwards to the root page)."""
    pages = [p for p in sorted(html.rglob("*.html")) if "_static" not in p.parts
             and p.name not in ("search.html", "genindex.html")]
    return [p for p in pages if 'http-equiv="Refresh"' not in p.read_text(encoding="utf-8")[:500]]


# Injected at the end of a copy of each page: once the page has loaded and MathJax has typeset it
# (its fonts too), it measures the article and appends its JSON report as <pre id="layout-report">.
# `scrolling`: elements with a horizontal scrollbar (overflow-x auto or scroll, content wider than
# the box); `sticking`: the outermost elements that stick out of the article, outside any scroller;
# `images`: each image from the build's _images/ in the article, with its <figure>'s caption.
_LAYOUT_PROBE = """
const images = new URL(document.currentScript.dataset.images, location.href).href;
(async () => {
  const report = {};
  try {
    if (document.readyState !== "complete") await new Promise(done => addEventListener("load", done));
    if (window.MathJax && MathJax.startup) await MathJax.startup.promise;
    await document.fonts.ready;
    const article = document.querySelector("article.bd-article");
    const style = getComputedStyle(article), right = article.getBoundingClientRect().right;
    const overflow = e => getComputedStyle(e).overflowX;
    const inScroller = e => {
      for (let a = e.parentElement; a && a !== article; a = a.parentElement) if (overflow(a) !== "visible") return true;
      return false;
    };
    const describe = e => ({
      tag: e.tagName.toLowerCase(), class: e.getAttribute("class") || "", near: e.closest("[id]")?.id || "",
      text: e.textContent.replace(/\\s+/g, " ").trim().slice(0, 80), scrollWidth: e.scrollWidth,
      clientWidth: e.clientWidth, right: Math.round(e.getBoundingClientRect().right)});
    const all = [...article.querySelectorAll("*")];
    const sticking = new Set(all.filter(e => e.getBoundingClientRect().right > right + 1 && !inScroller(e)));
    Object.assign(report, {
      innerWidth, scrollWidth: document.documentElement.scrollWidth, right: Math.round(right),
      column: Math.round(article.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight)),
      scrolling: all.filter(e => ["auto", "scroll"].includes(overflow(e)) && e.scrollWidth > e.clientWidth + 1)
                    .map(describe),
      sticking: [...sticking].filter(e => !sticking.has(e.parentElement)).map(describe),
      images: [...article.querySelectorAll("img")].filter(img => img.src.startsWith(images)).map(img => {
        const caption = img.closest("figure")?.querySelector("figcaption");
        return {src: img.getAttribute("src"), figure: Boolean(img.closest("figure")),
                caption: caption ? caption.textContent.trim() : null,
                number: caption?.querySelector(".caption-number")?.textContent.trim() ?? null};
      })});
  } catch (error) {
    report.error = String(error);
  }
  const pre = Object.assign(document.createElement("pre"), {id: "layout-report", hidden: true});
  pre.textContent = JSON.stringify(report);
  document.body.append(pre);
})();
"""
WINDOW = (1400, 1000)  # px: a laptop's browser window, in which no page may need a horizontal scrollbar


class _Rendered(NamedTuple):
    dom: str  # the DOM once MathJax has typeset, the probe's report taken out
    hosts: set[str]  # every host the page asked for, but Chromium's own
    layout: dict | None  # the probe's report, None if it never wrote one


def _render(html: Path, page: Path, work: Path) -> _Rendered:
    """Open a probed copy of the page (next to it, so its relative URLs resolve) with no host name
    resolvable, and dump the DOM once MathJax has typeset it."""
    source = page.read_text(encoding="utf-8")
    end = source.rindex("</body>")
    images = Path(os.path.relpath(html / "_images", page.parent)).as_posix() + "/"
    probe = page.with_name(f"{page.stem}.layout-probe.html")
    probe.write_text(f'{source[:end]}<script data-images="{images}">{_LAYOUT_PROBE}</script>\n{source[end:]}',
                     encoding="utf-8")
    netlog = work / "netlog.json"
    cmd = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={work / 'profile'}",
           "--host-resolver-rules=MAP * ~NOTFOUND",  # nothing outside the build can load
           f"--log-net-log={netlog}", f"--window-size={WINDOW[0]},{WINDOW[1]}",
           "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()]
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    finally:
        probe.unlink()
    if run.returncode != 0:
        pytest.fail(f"chromium failed on {page.name} ({run.returncode}):\n{run.stderr[-3000:]}")
    dom, layout = run.stdout, None
    report = re.search(r'<pre id="layout-report"[^>]*>(.*?)</pre>', dom, flags=re.S)
    if report:
        dom, layout = dom[:report.start()] + dom[report.end():], json.loads(html_unescape(report.group(1)))
    urls = re.findall(r'"url":"([^"]+)"', netlog.read_text(encoding="utf-8", errors="replace"))
    hosts = {urlsplit(u).hostname for u in urls if urlsplit(u).scheme in ("http", "https", "ws", "wss")}
    return _Rendered(dom, {h for h in hosts if h and not h.endswith(BROWSER_OWN_HOSTS)}, layout)


@pytest.fixture(scope="session")
def rendered_pages(built_book, tmp_path_factory):
    """Every reader's page as headless Chromium shows it in a 1400 px window, by path in the build."""
    html, returncode, log = built_book
    assert returncode == 0, "the book did not build; see test_book_builds_without_warnings"
    pages = _reader_pages(html)
    with ThreadPoolExecutor(max_workers=2) as pool:  # two browsers at a time, each mostly on one core
        rendered = pool.map(lambda p: _render(html, p, tmp_path_factory.mktemp("chromium")), pages)
        return {page.relative_to(html).as_posix(): r for page, r in zip(pages, rendered)}


def _layout_failures(rendered_pages: dict[str, _Rendered], check) -> list[str]:
    """`page: problem` for each problem that check(report) finds in a page's layout report."""
    failures = []
    for name, page in rendered_pages.items():
        if page.layout is None:
            problems = ["the layout probe wrote no report (the page did not finish loading)"]
        elif "error" in page.layout:
            problems = [f"the layout probe failed: {page.layout['error']}"]
        else:
            problems = check(page.layout)
        failures += [f"{name}: {problem}" for problem in problems]
    return failures


def _element(e: dict) -> str:
    """An element of a layout report as a developer finds it: tag, classes, nearest id, start of its text."""
    classes = "".join(f".{c}" for c in e["class"].split())
    return f"<{e['tag']}{classes}> near #{e['near']} {e['text']!r}"


@needs_chromium
def test_every_page_renders_its_math_offline(built_book, rendered_pages):
    """Every formula of every page is typeset by the MathJax of the build, without errors or network."""
    html = built_book[0]
    failures, total = [], 0
    for name, page in rendered_pages.items():
        source = (html / name).read_text(encoding="utf-8")
        expected = source.count('class="math notranslate nohighlight"')  # each formula Sphinx wrote
        total += expected
        rendered = _parse(page.dom)
        typeset = rendered.counts.get("mjx-container", 0)
        problems = []
        if typeset != expected:
            loaded = "" if "mathjax/tex-chtml.js" in source else " (the page loads no MathJax)"
            problems.append(f"{typeset} of {expected} formulas typeset by MathJax{loaded}")
        if rendered.counts.get("mjx-merror", 0):
            problems.append(f"MathJax reports {rendered.counts['mjx-merror']} TeX errors")
        undefined = re.findall(r'<mtext mathcolor="red">(\\[^<]*)</mtext>', page.dom)
        if undefined:
            problems.append(f"undefined TeX macros {sorted(set(undefined))}")
        text = " ".join("".join(rendered.text).split())
        problems += [f"raw TeX {raw!r} left in the visible text: {text[max(0, i - 50):i + 50]!r}"
                     for raw in ("$$", "\\(", "\\[", "\\begin{") if (i := text.find(raw)) >= 0]
        if page.hosts:
            problems.append(f"requested resources from {sorted(page.hosts)}")
        failures += [f"{name}: {problem}" for problem in problems]
    assert not failures, "math not rendered offline:\n" + "\n".join(failures)
    assert total > 0, "the book has no math to render"


@needs_chromium
def test_every_figure_has_a_numbered_caption(rendered_pages):
    """Every image of an article is in a <figure> whose caption Sphinx numbered (numfig: "Fig. 4.2")."""
    def check(layout):
        problems = []
        for image in layout["images"]:
            if not image["figure"]:
                problems.append(f"{image['src']} is not inside a <figure>")
            elif not image["caption"]:
                problems.append(f"{image['src']}: its <figure> has no <figcaption> text")
            elif not re.fullmatch(r"Fig\. \d+(\.\d+)*", image["number"] or ""):
                problems.append(f"{image['src']}: caption {image['caption'][:60]!r} has no Fig. number")
        return problems

    failures = _layout_failures(rendered_pages, check)
    assert not failures, "figures without a numbered caption:\n" + "\n".join(failures)
    assert any(page.layout["images"] for page in rendered_pages.values()), "the book has no figures"


@needs_chromium
def test_no_page_scrolls_sideways_in_a_1400px_window(rendered_pages):
    """In a 1400 px window no page is wider than the window, nothing in its article has a horizontal
    scrollbar (an equation, a code block, a table) and nothing sticks out of the content column."""
    def check(layout):
        column = layout["column"]
        problems = []
        if layout["scrollWidth"] > layout["innerWidth"]:
            problems.append(f"the page is {layout['scrollWidth']} px wide in a {layout['innerWidth']} px window")
        problems += [f"{_element(e)} scrolls: {e['scrollWidth']} px of content in {e['clientWidth']} px "
                     f"(content column {column} px)" for e in layout["scrolling"]]
        problems += [f"{_element(e)} sticks out of the article to x = {e['right']} px, "
                     f"past its right edge at {layout['right']} px" for e in layout["sticking"]]
        return problems

    failures = _layout_failures(rendered_pages, check)
    assert not failures, f"pages too wide for a {WINDOW[0]} px window:\n" + "\n".join(failures)


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
    """Each figure page shows every plot its notebook drew, each glued plot in a ``{glue:figure}`` (numbered and
    captioned), and every number its text glues."""
    import nbformat

    html, returncode, log = built_book
    assert returncode == 0, "the book did not build; see test_book_builds_without_warnings"
    cells = nbformat.read(notebook, as_version=4).cells
    drawn = [o for c in cells for o in c.get("outputs", []) if {"image/png", GLUED_PNG} & o.get("data", {}).keys()]
    glued = {o["metadata"]["scrapbook"]["name"] for o in drawn if GLUED_PNG in o["data"]}
    shown = {key for c in cells if c.cell_type == "markdown" for key in re.findall(r"\{glue:figure\} (\S+)", c.source)}
    assert glued == shown, f"{notebook.name}: plots glued but not shown {sorted(glued - shown)}, shown but not glued {sorted(shown - glued)}"
    page = (html / "figures" / notebook.with_suffix(".html").name).read_text(encoding="utf-8")
    tags = _parse(page)
    images = [img for img in tags.tags["img"] if "_images" in img.get("src", "")]
    assert len(images) == len(drawn), f"{notebook.name}: {len(drawn)} plots, {len(images)} images in the page"
    assert drawn or not notebook.stem.startswith("fig_"), f"{notebook.name} draws no plot"

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
