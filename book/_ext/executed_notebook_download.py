"""Offer every notebook page's *executed* notebook in the page's download menu.

MyST-NB executes each MyST-Markdown chapter and writes the result (code, outputs,
figures) to ``<build>/jupyter_execute/<docname>.ipynb``.  sphinx-book-theme lists an
``.ipynb`` entry in its download menu when the page context has ``ipynb_source``, but it
only sets that key (and copies the file) when a Binder/Colab/Thebe launch button is
configured, which needs a repository URL (book/_ext/repository_links.py).  A build without
one still offers the download: this hook does the same two steps for every notebook page:
copy the executed notebook to ``_build/html/_sources/<docname>.ipynb`` and set
``ipynb_source``.  Nothing is ever written into the source tree.
"""

from pathlib import Path
from shutil import copy2

from sphinx.application import Sphinx
from sphinx.util import logging

logger = logging.getLogger(__name__)


def add_executed_notebook(app: Sphinx, pagename: str, templatename: str, context: dict, doctree) -> None:
    if app.builder.format != "html" or "kernelspec" not in app.env.metadata.get(pagename, {}):
        return  # not a notebook page (e.g. the API reference)
    executed = Path(app.env.mystnb_config.output_folder, pagename + ".ipynb")
    if not executed.is_file():
        logger.warning("no executed notebook for %s at %s", pagename, executed, location=pagename)
        return
    target = Path(app.outdir, "_sources", pagename + ".ipynb")
    target.parent.mkdir(parents=True, exist_ok=True)
    copy2(executed, target)
    context["ipynb_source"] = pagename + ".ipynb"  # read by the theme's download menu


def setup(app: Sphinx) -> dict:
    # The theme builds its header buttons at priority 501; run just before it.
    app.connect("html-page-context", add_executed_notebook, priority=500)
    return {"version": "0.1", "parallel_read_safe": True, "parallel_write_safe": True}
