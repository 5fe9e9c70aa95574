"""The book builds without a warning, and every chapter looks right in a real browser.

1. ``jupyter-book build <repo> --path-output <tmp> -W --keep-going`` runs once per session
   (it executes every chapter) and must succeed with zero warnings.
2. Every page listed in ``_toc.yml`` offers its executed notebook for download.
3. Headless Chromium opens every page (file:// URL) and, after MathJax has typeset it, the
   page must have no broken image, no math left as raw TeX, no MathJax error, no Python
   traceback or error output, no failed load of a local file and no uncaught JavaScript error.
   The browser is driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``),
   so the checks are JavaScript evaluated in the loaded page, e.g. ``img.naturalWidth``.
   Without a browser these tests skip, with the reason in the skip and in a warning.
   ``test_check_flags_broken_page`` proves that the checker fails a page that is broken.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

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


@pytest.fixture(scope="session")
def built_book(tmp_path_factory) -> BookBuild:
    """Build the book once, from the working tree into a temporary folder (the repo's _build is untouched)."""
    out = tmp_path_factory.mktemp("book_build")
    cmd = [sys.executable, "-c", "from jupyter_book.cli.main import main; main()",
           "build", str(REPO), "--path-output", str(out), "-W", "--keep-going"]
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        returncode, log = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        partial = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        returncode, log = -1, partial + f"\nERROR: the book build did not finish within {BUILD_TIMEOUT_S} s"
    build = BookBuild(out / "_build" / "html", returncode, time.monotonic() - start, log)
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

BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-extensions", "--mute-audio", "--hide-scrollbars"]

# Known upstream noise, not a problem of this book: sphinx-thebe's inline config
# ("const THEBE_JS_URL = ...") is emitted twice by Jupyter Book 1.0.4, and the second copy
# throws. Thebe is not used here.
IGNORED_JS_ERRORS = [re.compile(r"Identifier 'THEBE_JS_URL' has already been declared")]


def find_browser() -> str | None:
    for candidate in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None


class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (fds 3 and 4 in the child)."""

    def __init__(self, executable: str):
        self.profile = tempfile.mkdtemp(prefix="chromium-profile-")
        to_child, self._out = os.pipe()
        self._in, from_child = os.pipe()

        def wire_pipes():  # runs in the child between fork and exec
            a = fcntl.fcntl(to_child, fcntl.F_DUPFD, 10)
            b = fcntl.fcntl(from_child, fcntl.F_DUPFD, 10)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [executable, *BROWSER_FLAGS, f"--user-data-dir={self.profile}", "--remote-debugging-pipe",
             "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            close_fds=False, preexec_fn=wire_pipes)
        os.close(to_child)
        os.close(from_child)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []
        self.call("Browser.getVersion")

    def _receive(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no answer from the browser")
            if select.select([self._in], [], [], left)[0]:
                chunk = os.read(self._in, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"browser exited (code {self.proc.poll()})")
                self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = PAGE_TIMEOUT_S) -> dict:
        self._next_id += 1
        request = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            request["sessionId"] = session
        os.write(self._out, json.dumps(request).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            message = self._receive(deadline)
            if message.get("id") == self._next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]
            self.events.append(message)

    def wait_for(self, event: str, session: str, timeout: float = PAGE_TIMEOUT_S) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for i, message in enumerate(self.events):
                if message.get("method") == event and message.get("sessionId") == session:
                    return self.events.pop(i)
            self.events.append(self._receive(deadline))

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._in)
        os.close(self._out)
        shutil.rmtree(self.profile, ignore_errors=True)


# Evaluated in the page after its load event. Returns plain JSON for page_problems().
INSPECT_PAGE_JS = r"""
(async () => {
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
})()
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


def inspect_page(browser: Chromium, html_file: Path) -> dict:
    """Load one page in a fresh tab, wait for images and MathJax, and report what it shows."""
    target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    try:
        for domain in ("Page", "Runtime", "Network"):
            browser.call(f"{domain}.enable", session=session)
        nav = browser.call("Page.navigate", {"url": html_file.resolve().as_uri()}, session=session)
        if nav.get("errorText"):
            return {"failedLoads": [(html_file.as_uri(), nav["errorText"])]}
        browser.wait_for("Page.loadEventFired", session)
        result = browser.call("Runtime.evaluate", {"expression": INSPECT_PAGE_JS, "awaitPromise": True,
                                                   "returnByValue": True}, session=session)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page inspection script failed: {result['exceptionDetails']}")
        report = result["result"]["value"]
        urls, failed, js_errors = {}, [], []
        for event in [e for e in browser.events if e.get("sessionId") == session]:
            params = event.get("params", {})
            if event.get("method") == "Network.requestWillBeSent":
                urls[params["requestId"]] = params["request"]["url"]
            elif event.get("method") == "Network.loadingFailed" and not params.get("canceled"):
                failed.append((urls.get(params["requestId"], "?"), params.get("errorText")))
            elif event.get("method") == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                text = details.get("exception", {}).get("description") or details.get("text", "")
                if not any(p.search(text) for p in IGNORED_JS_ERRORS):
                    js_errors.append(text.splitlines()[0] if text else "?")
        report["failedLoads"], report["jsErrors"] = failed, js_errors
        return report
    finally:
        browser.events = [e for e in browser.events if e.get("sessionId") != session]
        browser.call("Target.closeTarget", {"targetId": target})


@pytest.fixture(scope="module")
def browser():
    executable = find_browser()
    if executable is None:
        reason = ("no headless browser, so the rendered pages were NOT checked: install the Debian "
                  "package 'chromium' (apt-get install -y chromium) or set CHROMIUM=/path/to/chrome")
        warnings.warn(reason)
        pytest.skip(reason)
    chromium = Chromium(executable)
    yield chromium
    chromium.close()


@pytest.mark.timeout(BUILD_TIMEOUT_S + 60 + PAGE_TIMEOUT_S)
@pytest.mark.parametrize("page", PAGES)
def test_page_renders_in_browser(built_book, browser, page):
    html_file = built_book.html / f"{page}.html"
    assert html_file.is_file(), f"{page}: not built (build exit {built_book.returncode})"
    problems = page_problems(page, inspect_page(browser, html_file))
    assert not problems, f"{len(problems)} problem(s) in the rendered page:\n" + "\n".join(problems)


# 1x1 PNG
PIXEL_PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==")

BROKEN_PAGE = r"""<!DOCTYPE html><html><head><meta charset="utf-8"></head><body>
<p>A figure whose file is missing: <img src="missing.png" alt="missing"></p>
<p>A figure whose file is empty: <img src="empty.png" alt="empty"></p>
<p>Math that no one typeset: $$x^2 + y^2$$</p>
<div class="math notranslate nohighlight">\[ y = p_i(x) E_i(x) \]</div>
<div class="cell_output docutils container"><div class="output traceback highlight-ipythontb notranslate">
<pre>Traceback (most recent call last)
  Cell In[3], line 1
ZeroDivisionError: division by zero</pre></div></div>
</body></html>
"""


def test_check_flags_broken_page(browser, tmp_path):
    """The checker is not vacuous: a page with each kind of breakage fails, naming the problem."""
    (tmp_path / "empty.png").write_bytes(b"")
    page = tmp_path / "broken.html"
    page.write_text(BROKEN_PAGE)
    problems = page_problems("broken", inspect_page(browser, page))
    text = "\n".join(problems)
    assert all(p.startswith("broken: ") for p in problems), text
    assert re.search(r"broken image \S*missing\.png \(browser could not display it, file is missing\)", text), text
    assert re.search(r"broken image \S*empty\.png \(browser could not display it, file is empty\)", text), text
    assert "raw TeX in the page text (4 delimiter(s))" in text and "$$x^2 + y^2$$" in text, text
    assert "math left untypeset: '\\\\[ y = p_i(x) E_i(x) \\\\]'" in text, text
    assert "but MathJax typeset none" in text, text
    assert "Python traceback on the page" in text and "error output cell" in text, text


def test_check_passes_clean_page(browser, tmp_path):
    (tmp_path / "pixel.png").write_bytes(PIXEL_PNG)
    page = tmp_path / "clean.html"
    page.write_text('<!DOCTYPE html><html><body><p>Costs $5, not $10.</p>'
                    '<img src="pixel.png" alt="pixel"><pre>print("\\(not math\\)")</pre></body></html>')
    assert page_problems("clean", inspect_page(browser, page)) == []


def test_toc_pages_are_found():
    assert PAGES[0] == "book/intro"
    assert all((REPO / f"{p}.md").is_file() for p in PAGES), PAGES
