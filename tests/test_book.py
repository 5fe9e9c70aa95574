"""The book builds without a warning, and every chapter looks right in a real browser.

1. ``jupyter-book build <repo> --path-output <tmp> -W --keep-going`` runs once per session
   (it executes every chapter) and must succeed with zero warnings.
2. Every page listed in ``_toc.yml`` offers its executed notebook for download.
3. Headless Chromium opens every page (file:// URL) and, after MathJax has typeset it, the
   page must have no broken image, no math left as raw TeX, no MathJax error, no Python
   traceback or error output, no failed load of a local file and no uncaught JavaScript error.
   Playwright drives the system's Chromium, so the checks are JavaScript evaluated in the loaded
   page (e.g. ``img.naturalWidth``) plus the page's failed-request and uncaught-error events. Each
   page is screenshotted, full page, to ``<tmp>/_build/screenshots/<page>.png`` (a failure names the
   file). Without a browser these tests skip, with the reason in the skip and in a warning.
   ``test_check_flags_broken_page`` proves that the checker fails a page that is broken.
4. Repository and launch buttons appear only with a repository URL (book/_ext/repository_links.py):
   the session build has none and must link to no repository; a tiny second build with
   BOOK_REPOSITORY_URL set must link to that repository, on Binder too.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml
from sphinx.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
BUILD_TIMEOUT_S = 1200  # executes every chapter; CI's whole budget is 20 minutes
PAGE_TIMEOUT_S = 60


# ----------------------------------------------------------------------------- the pages


def toc_pages(toc_path: Path = REPO / "_toc.yml") -> list[str]:
    """Docnames in _toc.yml (root first), e.g. ["book/intro", "book/api"]."""
    toc = yaml.safe_load(toc_path.read_text())
    pages = [toc["root"]]

    def walk(node):
        if isinstance(node, dict):
            if "file" in node:
                pages.append(str(node["file"]).removesuffix(".md").removesuffix(".ipynb"))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk({k: v for k, v in toc.items() if k != "root"})
    return pages


def is_notebook_page(docname: str) -> bool:
    from myst_nb.core.read import is_myst_markdown_notebook

    source = REPO / f"{docname}.md"
    return source.is_file() and is_myst_markdown_notebook(source.read_text(encoding="utf-8"))


PAGES = toc_pages()
NOTEBOOK_PAGES = [p for p in PAGES if is_notebook_page(p)]


# ----------------------------------------------------------------------------- the build

# Sphinx prints "<file>:<line>: WARNING: ..." / "ERROR: ..."; a kernel's "[IPKernelApp] WARNING |"
# log line on stderr is not a Sphinx warning.
SPHINX_WARNING = re.compile(r"(^|: )(WARNING|ERROR|CRITICAL|SEVERE):", re.MULTILINE)
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def sphinx_warnings(log: str) -> list[str]:
    log = ANSI.sub("", log)
    return [line for line in log.splitlines() if SPHINX_WARNING.search(line)]


HINTS = {
    "docstring of switch_core": "autodoc parses docstrings as reStructuredText: leave a blank line before "
                                "and after a list or an indented block, or end the line before an aligned "
                                "table with '::' to show it as a literal block",
    "could not find bibtex key": "add the entry to book/references.bib, and end the page with a "
                                 "{bibliography} directive with ':filter: docname in docnames'",
    "Executing notebook failed": "run the chapter alone: python -m pytest --nbval-lax --nbval-current-env book/<name>.md",
    "isn't included in any toctree": "list the page in _toc.yml, or exclude it in _config.yml",
}


def hints(found: list[str]) -> str:
    tips = {tip for line in found for key, tip in HINTS.items() if key in line}
    return "".join(f"\nhint: {tip}" for tip in sorted(tips))


@dataclass
class BookBuild:
    html: Path  # <tmp>/_build/html
    returncode: int
    seconds: float
    log: str = field(repr=False)


def build_book(source: Path, out: Path, repository_url: str = "") -> BookBuild:
    """``jupyter-book build <source> --path-output <out> -W --keep-going`` with BOOK_REPOSITORY_URL set
    to ``repository_url`` (empty: no repository or launch buttons, whatever git's origin is)."""
    cmd = [sys.executable, "-c", "from jupyter_book.cli.main import main; main()",
           "build", str(source), "--path-output", str(out), "-W", "--keep-going"]
    env = {**os.environ, "BOOK_REPOSITORY_URL": repository_url}
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=source, env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        returncode, log = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        partial = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        returncode, log = -1, partial + f"\nERROR: the book build did not finish within {BUILD_TIMEOUT_S} s"
    return BookBuild(out / "_build" / "html", returncode, time.monotonic() - start, log)


@pytest.fixture(scope="session")
def built_book(tmp_path_factory) -> BookBuild:
    """Build the book once, from the working tree into a temporary folder (the repo's _build is untouched)."""
    build = build_book(REPO, tmp_path_factory.mktemp("book_build"))
    print(f"book build: {build.seconds:.0f} s, exit {build.returncode}")
    return build


@pytest.mark.timeout(BUILD_TIMEOUT_S + 60)
def test_book_builds_without_warnings(built_book):
    found = sphinx_warnings(built_book.log)
    tail = "\n".join(ANSI.sub("", built_book.log).splitlines()[-40:])
    assert built_book.returncode == 0 and not found and "build succeeded" in ANSI.sub("", built_book.log), (
        f"jupyter-book build -W --keep-going exited {built_book.returncode} with {len(found)} warning(s):\n"
        + "\n".join(found[:30]) + hints(found) + f"\n--- last lines of the build log ---\n{tail}"
    )
    assert (built_book.html / "index.html").is_file()


def api_modules(api_page: Path = REPO / "book" / "api.md") -> list[str]:
    return re.findall(r"^\.\. automodule:: (\S+)", api_page.read_text(), re.MULTILINE)


def test_api_docstrings_render(tmp_path):
    """Fast feedback for module authors: autodoc + napoleon on the API page's modules, warnings as errors.

    The book build catches the same warnings, but only after executing every chapter."""
    sphinx_config = yaml.safe_load((REPO / "_config.yml").read_text())["sphinx"]["config"]
    settings = {k: v for k, v in sphinx_config.items() if k.startswith(("autodoc_", "napoleon_"))}
    (tmp_path / "conf.py").write_text(
        'extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon"]\n'
        + "".join(f"{k} = {v!r}\n" for k, v in settings.items()))
    modules = api_modules()
    (tmp_path / "index.rst").write_text("API\n===\n\n" + "".join(
        f".. automodule:: {m}\n   :members:\n\n" for m in modules))
    proc = subprocess.run([sys.executable, "-m", "sphinx", "-b", "dummy", "-W", "--keep-going", "-q",
                           str(tmp_path), str(tmp_path / "_out")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    returncode, found = proc.returncode, sphinx_warnings(proc.stdout + proc.stderr)
    assert returncode == 0 and not found, (
        f"docstrings of {', '.join(modules)} do not render cleanly in the API reference:\n"
        + "\n".join(found or [proc.stderr[-2000:]]) + hints(found))


def test_no_notebook_written_into_source_tree():
    stray = sorted(str(p.relative_to(REPO)) for p in (REPO / "book").rglob("*.ipynb"))
    assert not stray, f"generated notebooks belong under _build, not in book/: {stray}"


@pytest.mark.timeout(BUILD_TIMEOUT_S + 60)
@pytest.mark.parametrize("page", NOTEBOOK_PAGES)
def test_page_offers_executed_notebook(built_book, page):
    page_html = built_book.html / f"{page}.html"
    assert page_html.is_file(), f"{page}: not built (build exit {built_book.returncode})"
    link = re.search(r'<a href="([^"]+\.ipynb)"[^>]*\n?[^>]*btn-download-notebook-button', page_html.read_text())
    assert link, f"{page}: no .ipynb entry in the page's download menu"
    notebook = (page_html.parent / link.group(1)).resolve()
    assert notebook.is_file(), f"{page}: download link {link.group(1)} points to a missing file"
    cells = [c for c in json.loads(notebook.read_text())["cells"] if c["cell_type"] == "code"]
    skipped = {"skip-execution", "nbval-skip"}
    unexecuted = [i for i, c in enumerate(cells)
                  if c.get("execution_count") is None and not skipped & set(c["metadata"].get("tags", []))]
    assert cells and not unexecuted, f"{page}: downloadable notebook has unexecuted code cells {unexecuted}"


# ----------------------------------------------------------------------------- the browser

# Playwright drives the system's Chromium (executable_path): no browser is downloaded. The last four
# flags keep it from calling home (refused connections here would show up as failed loads).
BROWSER_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-extensions", "--mute-audio",
                 "--hide-scrollbars", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
VIEWPORT = {"width": 1280, "height": 900}

# Known upstream noise, not a problem of this book: sphinx-thebe's inline config
# ("const THEBE_JS_URL = ...") is emitted twice by Jupyter Book 1.0.4, and the second copy
# throws. Thebe is not used here.
IGNORED_JS_ERRORS = [re.compile(r"Identifier 'THEBE_JS_URL' has already been declared")]
# A request the page itself cancelled (e.g. a superseded font load), not a missing file.
CANCELLED = "net::ERR_ABORTED"


def find_browser() -> str | None:
    for candidate in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None


# Evaluated in the page after its load event. Returns plain JSON for page_problems().
INSPECT_PAGE_JS = r"""
async () => {
  const sleep = ms => new Promise(r => setTimeout(r, ms));
  const images = Array.from(document.images);
  await Promise.all(images.map(img => {
    if (img.loading === 'lazy') img.loading = 'eager';
    if (img.complete) return null;
    return Promise.race([new Promise(r => { img.onload = r; img.onerror = r; }), sleep(15000)]);
  }));
  const mj = window.MathJax;
  let mathjax = 'absent';
  if (mj && mj.startup && mj.startup.promise) {
    mathjax = await Promise.race([mj.startup.promise.then(() => 'typeset', e => 'failed: ' + e),
                                  sleep(30000).then(() => 'timed out')]);
  }
  const clip = s => s.replace(/\s+/g, ' ').trim().slice(0, 120);
  const text = document.body.cloneNode(true);
  text.querySelectorAll('script, style, pre, code, textarea, mjx-container, .highlight')
      .forEach(e => e.remove());
  return {
    images: images.map(img => ({src: img.currentSrc || img.src, complete: img.complete,
                                naturalWidth: img.naturalWidth})),
    mathjax: mathjax,
    mathElements: document.querySelectorAll('.math').length,
    mjxContainers: document.querySelectorAll('mjx-container').length,
    untypesetMath: Array.from(document.querySelectorAll('.math'))
        .filter(e => !e.querySelector('mjx-container')).map(e => clip(e.textContent)),
    mathErrors: Array.from(document.querySelectorAll('mjx-merror'))
        .map(e => clip(e.getAttribute('data-mjx-error') || e.textContent)),
    text: text.textContent,
    bodyText: document.body.innerText,
    errorOutputs: Array.from(document.querySelectorAll(
        '.output.traceback, .output.error, .cell_output .traceback, .output_error'))
        .map(e => clip(e.textContent)),
  };
}
"""

RAW_TEX = re.compile(r"\\\(|\\\)|\\\[|\\\]|\$\$|\\begin\{|\$[^$\s][^$\n]*\\[A-Za-z]+[^$\n]*\$")


def page_problems(page: str, report: dict) -> list[str]:
    """Turn what the browser saw on one page into messages; empty means the page is fine."""
    problems = []
    for img in report.get("images", []):
        src = img["src"]
        why = []
        if not img["complete"] or img["naturalWidth"] == 0:
            why.append("browser could not display it")
        if src.startswith("file://"):
            path = Path(src.removeprefix("file://").split("?")[0].split("#")[0])
            if not path.is_file():
                why.append("file is missing")
            elif path.stat().st_size == 0:
                why.append("file is empty")
        if why:
            problems.append(f"{page}: broken image {src} ({', '.join(why)})")
    if report.get("mathElements") and not report.get("mjxContainers"):
        problems.append(f"{page}: the page has {report['mathElements']} math element(s) but MathJax "
                        f"typeset none (MathJax: {report.get('mathjax')})")
    for snippet in report.get("untypesetMath", [])[:5]:
        problems.append(f"{page}: math left untypeset: {snippet!r}")
    for snippet in report.get("mathErrors", [])[:5]:
        problems.append(f"{page}: MathJax error: {snippet!r}")
    text = report.get("text", "")
    raw = list(RAW_TEX.finditer(text))
    if raw:
        first = raw[0]
        context = " ".join(text[max(0, first.start() - 40): first.end() + 60].split())
        problems.append(f"{page}: raw TeX in the page text ({len(raw)} delimiter(s)), first at: {context!r}")
    body = report.get("bodyText", "")
    if "Traceback (most recent call last)" in body:
        at = body.index("Traceback (most recent call last)")
        problems.append(f"{page}: Python traceback on the page: {' '.join(body[at:at + 200].split())!r}")
    for snippet in report.get("errorOutputs", [])[:5]:
        problems.append(f"{page}: error output cell: {snippet!r}")
    for url, error in report.get("failedLoads", []):
        problems.append(f"{page}: failed to load {url} ({error})")
    for error in report.get("jsErrors", []):
        problems.append(f"{page}: uncaught JavaScript error: {error}")
    return problems


def inspect_page(browser, html_file: Path, screenshot: Path) -> dict:
    """Load one page in a fresh browser context, wait for images and MathJax, report what it shows,
    and save a full-page screenshot of it to ``screenshot`` (what a reader would have seen)."""
    from playwright.sync_api import Error as PlaywrightError

    url = html_file.resolve().as_uri()
    context = browser.new_context(viewport=VIEWPORT)
    try:
        page = context.new_page()
        failed, js_errors = [], []

        def on_request_failed(request):
            if request.failure != CANCELLED:
                failed.append((request.url, request.failure))

        def on_page_error(error):
            message = f"{error.name}: {error.message}".splitlines()[0]
            if not any(pattern.search(message) for pattern in IGNORED_JS_ERRORS):
                js_errors.append(message)

        page.on("requestfailed", on_request_failed)
        page.on("pageerror", on_page_error)
        try:
            page.goto(url, wait_until="load", timeout=PAGE_TIMEOUT_S * 1000)
        except PlaywrightError as e:
            return {"failedLoads": [(url, str(e.message).splitlines()[0])]}
        report = page.evaluate(INSPECT_PAGE_JS)
        save_screenshot(page, screenshot)
        report["failedLoads"], report["jsErrors"] = failed, js_errors
        return report
    finally:
        context.close()


SCREENSHOT_TILE_PX = 8000  # CSS pixels per capture when the one full-page capture fails


def save_screenshot(page, screenshot: Path) -> list[Path]:
    """Save what a reader of ``page`` would see, top to bottom, as PNG files; return them.

    One full-page capture to ``screenshot`` first. Chromium sometimes refuses a tall one ("Unable to
    capture screenshot": it happened once in CI on a 14,000 px page while the chapters executed beside
    it), so it is tried a second time, and then the page is captured in tiles of SCREENSHOT_TILE_PX,
    ``<name>.png``, ``<name>-2.png``, ... An error in a tile is raised: then there is nothing to show.
    """
    from playwright.sync_api import Error as PlaywrightError

    screenshot.parent.mkdir(parents=True, exist_ok=True)
    timeout = PAGE_TIMEOUT_S * 1000
    for attempt in range(2):
        try:
            page.screenshot(path=screenshot, full_page=True, timeout=timeout)
            return [screenshot]
        except PlaywrightError as e:
            if "Unable to capture screenshot" not in str(e):
                raise
            page.wait_for_timeout(1000)
    width, height = page.evaluate(
        "[document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
    tiles = []
    for i, top in enumerate(range(0, height, SCREENSHOT_TILE_PX)):
        tile = screenshot if i == 0 else screenshot.with_name(f"{screenshot.stem}-{i + 1}.png")
        clip = {"x": 0, "y": top, "width": width, "height": min(SCREENSHOT_TILE_PX, height - top)}
        page.screenshot(path=tile, full_page=True, clip=clip, timeout=timeout)
        tiles.append(tile)
    return tiles


@pytest.fixture(scope="module")
def browser():
    executable = find_browser()
    if executable is None:
        reason = ("no headless browser, so the rendered pages were NOT checked: install the Debian "
                  "package 'chromium' (apt-get install -y chromium) or set CHROMIUM=/path/to/chrome")
        warnings.warn(reason)
        pytest.skip(reason)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as e:
        pytest.fail(f"playwright is not installed ({e}): it is pinned in requirements.txt; "
                    "run the tests with `bash .ci/test`, which installs it", pytrace=False)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable, args=BROWSER_FLAGS,
                                              timeout=PAGE_TIMEOUT_S * 1000)
        yield chromium
        chromium.close()


def screenshot_path(html_root: Path, page: str) -> Path:
    """<build>/_build/screenshots/<page>.png, beside the HTML it shows."""
    return html_root.parent / "screenshots" / f"{page}.png"


@pytest.mark.timeout(BUILD_TIMEOUT_S + 60 + PAGE_TIMEOUT_S)
@pytest.mark.parametrize("page", PAGES)
def test_page_renders_in_browser(built_book, browser, page):
    html_file = built_book.html / f"{page}.html"
    assert html_file.is_file(), f"{page}: not built (build exit {built_book.returncode})"
    screenshot = screenshot_path(built_book.html, page)
    problems = page_problems(page, inspect_page(browser, html_file, screenshot))
    assert not problems, (f"{len(problems)} problem(s) in the rendered page (screenshot: {screenshot}):\n"
                          + "\n".join(problems))
    assert screenshot.read_bytes()[:8] == PNG_SIGNATURE, f"{page}: no screenshot at {screenshot}"


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# 1x1 PNG
PIXEL_PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==")

BROKEN_PAGE = r"""<!DOCTYPE html><html><head><meta charset="utf-8">
<link rel="stylesheet" href="missing.css"></head><body>
<p>A figure whose file is missing: <img src="missing.png" alt="missing"></p>
<p>A figure whose file is empty: <img src="empty.png" alt="empty"></p>
<p>Math that no one typeset: $$x^2 + y^2$$</p>
<div class="math notranslate nohighlight">\[ y = p_i(x) E_i(x) \]</div>
<div class="cell_output docutils container"><div class="output traceback highlight-ipythontb notranslate">
<pre>Traceback (most recent call last)
  Cell In[3], line 1
ZeroDivisionError: division by zero</pre></div></div>
<script>const THEBE_JS_URL = 1;</script><script>const THEBE_JS_URL = 2;</script>
<script>throw new TypeError("broken on purpose");</script>
</body></html>
"""


def test_check_flags_broken_page(browser, tmp_path):
    """The checker is not vacuous: a page with each kind of breakage fails, naming the problem."""
    (tmp_path / "empty.png").write_bytes(b"")
    page = tmp_path / "broken.html"
    page.write_text(BROKEN_PAGE)
    screenshot = tmp_path / "screenshots" / "broken.png"
    problems = page_problems("broken", inspect_page(browser, page, screenshot))
    text = "\n".join(problems)
    assert all(p.startswith("broken: ") for p in problems), text
    assert re.search(r"broken image \S*missing\.png \(browser could not display it, file is missing\)", text), text
    assert re.search(r"broken image \S*empty\.png \(browser could not display it, file is empty\)", text), text
    assert "raw TeX in the page text (4 delimiter(s))" in text and "$$x^2 + y^2$$" in text, text
    assert "math left untypeset: '\\\\[ y = p_i(x) E_i(x) \\\\]'" in text, text
    assert "but MathJax typeset none" in text, text
    assert "Python traceback on the page" in text and "error output cell" in text, text
    assert re.search(r"failed to load \S*missing\.css \(net::ERR_FILE_NOT_FOUND\)", text), text
    assert "uncaught JavaScript error: TypeError: broken on purpose" in text, text
    assert "THEBE_JS_URL" not in text, text  # the known upstream noise is ignored, and only that
    assert screenshot.read_bytes()[:8] == PNG_SIGNATURE


class _RefusingPage:
    """A Playwright page whose full-page capture fails as Chromium's did in CI; clipped ones work."""

    def __init__(self, height, refusals):
        self.height, self.refusals, self.calls = height, refusals, []

    def screenshot(self, path, full_page, timeout, clip=None):
        from playwright.sync_api import Error as PlaywrightError

        self.calls.append(clip)
        if clip is None and self.refusals:
            self.refusals -= 1
            raise PlaywrightError("Page.screenshot: Protocol error (Page.captureScreenshot): "
                                  "Unable to capture screenshot")
        Path(path).write_bytes(PNG_SIGNATURE)

    def wait_for_timeout(self, ms):
        pass

    def evaluate(self, expression):
        return [1280, self.height]


def test_screenshot_retries_then_tiles(tmp_path):
    """A refused full-page capture is tried again, then taken in tiles that cover the whole page."""
    pytest.importorskip("playwright")
    once = _RefusingPage(height=20_000, refusals=1)
    assert save_screenshot(once, tmp_path / "a.png") == [tmp_path / "a.png"] and once.calls == [None, None]

    always = _RefusingPage(height=20_000, refusals=99)
    tiles = save_screenshot(always, tmp_path / "b.png")
    assert [t.name for t in tiles] == ["b.png", "b-2.png", "b-3.png"]
    assert all(t.read_bytes() == PNG_SIGNATURE for t in tiles)
    clips = always.calls[2:]
    assert [(c["y"], c["height"]) for c in clips] == [(0, 8000), (8000, 8000), (16000, 4000)]


def test_check_flags_missing_page(browser, tmp_path):
    problems = page_problems("gone", inspect_page(browser, tmp_path / "gone.html", tmp_path / "gone.png"))
    assert len(problems) == 1 and re.match(r"gone: failed to load file://\S*gone\.html \(.*ERR_FILE_NOT_FOUND",
                                           problems[0]), problems


def test_check_passes_clean_page(browser, tmp_path):
    (tmp_path / "pixel.png").write_bytes(PIXEL_PNG)
    page = tmp_path / "clean.html"
    page.write_text('<!DOCTYPE html><html><body><p>Costs $5, not $10.</p>'
                    '<img src="pixel.png" alt="pixel"><pre>print("\\(not math\\)")</pre></body></html>')
    assert page_problems("clean", inspect_page(browser, page, tmp_path / "clean.png")) == []


# ----------------------------------------------------------------------------- repository links


def load_repository_links():
    """book/_ext/repository_links.py, the Sphinx extension that decides the repository URL."""
    spec = importlib.util.spec_from_file_location("repository_links", REPO / "book" / "_ext" / "repository_links.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[dict[str, str]] = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self.links.append({k: v or "" for k, v in attrs})


def page_links(html_file: Path) -> list[dict[str, str]]:
    """Every <a> of a built page, as its attributes (href, class, title, ...)."""
    parser = _Links()
    parser.feed(html_file.read_text(encoding="utf-8"))
    return parser.links


REPOSITORY_BUTTON = "btn-source-repository-button"
LAUNCH_HOSTS = ("https://colab.research.google.com", "https://mybinder.org")


@pytest.mark.timeout(BUILD_TIMEOUT_S + 60)
def test_no_repository_links_without_repository_url(built_book):
    """The session build has BOOK_REPOSITORY_URL empty: no page links to a repository or a launch service."""
    found = []
    for page in PAGES:
        html_file = built_book.html / f"{page}.html"
        assert html_file.is_file(), f"{page}: not built (build exit {built_book.returncode})"
        for link in page_links(html_file):
            if (REPOSITORY_BUTTON in link.get("class", "") or link.get("href", "").startswith(LAUNCH_HOSTS)
                    or "github.com" in link.get("href", "")):
                found.append(f"{page}: {link.get('href')} ({link.get('class', '')})")
        assert "launch-buttons" not in html_file.read_text(encoding="utf-8"), f"{page}: has a launch menu"
    assert not found, "links to a repository that the build was not given:\n" + "\n".join(found)


TINY_NOTEBOOK = """---
jupytext:
  text_representation: {extension: .md, format_name: myst}
kernelspec: {display_name: Python 3, language: python, name: python3}
---

# A notebook page

```{code-cell} ipython3
print(1 + 1)
```
"""


def test_repository_and_launch_links_with_repository_url(tmp_path):
    """With BOOK_REPOSITORY_URL set (an ssh URL here), a tiny book with this book's _config.yml and
    extensions gets the repository button, and its notebook page a Binder link into that
    repository; a plain Markdown page gets the repository button only."""
    book = tmp_path / "src"
    (book / "book").mkdir(parents=True)
    shutil.copy(REPO / "_config.yml", book)
    shutil.copytree(REPO / "book" / "_ext", book / "book" / "_ext")
    shutil.copy(REPO / "book" / "references.bib", book / "book")
    (book / "_toc.yml").write_text("format: jb-book\nroot: book/page\nchapters:\n  - file: book/plain\n")
    (book / "book" / "page.md").write_text(TINY_NOTEBOOK)
    (book / "book" / "plain.md").write_text("# A plain page\n\nNo code here.\n")
    build = build_book(book, tmp_path / "out", repository_url="git@github.com:example-owner/example-book.git")
    assert build.returncode == 0 and not sphinx_warnings(build.log), build.log[-3000:]

    repo = "https://github.com/example-owner/example-book"
    for page in ("book/page", "book/plain"):
        buttons = [link["href"] for link in page_links(build.html / f"{page}.html")
                   if REPOSITORY_BUTTON in link.get("class", "")]
        assert buttons == [repo], f"{page}: repository button(s) {buttons}"
    launch = sorted(link["href"] for link in page_links(build.html / "book/page.html")
                    if link.get("href", "").startswith(LAUNCH_HOSTS))
    assert launch == [  # no Colab: it cannot open a MyST .md page
        "https://mybinder.org/v2/gh/example-owner/example-book/main?urlpath=tree/book/page.md",
    ], launch
    assert not [link for link in page_links(build.html / "book/plain.html")
                if link.get("href", "").startswith(LAUNCH_HOSTS)], "a plain page has nothing to launch"


@pytest.mark.parametrize("url", [
    "https://github.com/example-owner/example-book",
    "https://github.com/example-owner/example-book.git",
    "https://github.com/example-owner/example-book/",
    "http://github.com/example-owner/example-book.git",
    "https://someone:ghp_secret@github.com/example-owner/example-book.git",  # the token is dropped
    "git@github.com:example-owner/example-book.git",
    "github.com:example-owner/example-book",
    "ssh://git@github.com/example-owner/example-book.git",
    "ssh://git@github.com:22/example-owner/example-book",
    "  git://github.com/example-owner/example-book.git\n",
])
def test_github_url_is_normalised_to_https(url):
    assert load_repository_links().github_https_url(url) == "https://github.com/example-owner/example-book"


@pytest.mark.parametrize("url", [
    "", "/work/main", "../main", "file:///work/main", "https://gitlab.com/example-owner/example-book",
    "https://github.com.evil.example/example-owner/example-book", "https://github.com/example-owner",
    "https://github.com/example-owner/example-book/tree/main", "git@example.com:example-owner/example-book.git",
])
def test_non_github_url_gives_no_repository(url):
    assert load_repository_links().github_https_url(url) is None


def test_repository_url_setting_and_git_origin(tmp_path):
    links = load_repository_links()
    assert links.repository_url(tmp_path, {}) is None  # not a git checkout
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    assert links.repository_url(tmp_path, {}) is None  # no origin: the case of this checkout
    subprocess.run(["git", "-C", str(tmp_path), "remote", "add", "origin", "/some/local/clone"], check=True)
    assert links.repository_url(tmp_path, {}) is None  # CI clones from a local path
    subprocess.run(["git", "-C", str(tmp_path), "remote", "set-url", "origin",
                    "https://someone:ghp_secret@github.com/example-owner/example-book.git"], check=True)
    assert links.repository_url(tmp_path, {}) == "https://github.com/example-owner/example-book"
    # The environment variable wins over git, and empty means no repository.
    env = {"BOOK_REPOSITORY_URL": "git@github.com:other-owner/other-book.git"}
    assert links.repository_url(tmp_path, env) == "https://github.com/other-owner/other-book"
    assert links.repository_url(tmp_path, {"BOOK_REPOSITORY_URL": " "}) is None
    with pytest.raises(ConfigError, match=r"BOOK_REPOSITORY_URL='https://gitlab.com/a/b' is not a GitHub"):
        links.repository_url(tmp_path, {"BOOK_REPOSITORY_URL": "https://gitlab.com/a/b"})


def test_toc_pages_are_found():
    assert PAGES[0] == "book/intro"
    assert all((REPO / f"{p}.md").is_file() for p in PAGES), PAGES


def test_binder_installs_the_pins_and_the_package():
    """The Binder button launches an environment with the book's pins (CPU torch), jupytext and switch_core."""
    reqs = (REPO / "binder" / "requirements.txt").read_text().splitlines()
    assert "-r ../requirements.txt" in reqs and "torch==2.13.0+cpu" in reqs
    assert "jupytext==" in (REPO / "requirements.txt").read_text()
    post = REPO / "binder" / "postBuild"
    assert os.access(post, os.X_OK) and "pip install --no-deps -e ." in post.read_text()
