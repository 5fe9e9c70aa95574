"""Run the book's chapters as tests.

Each chapter is a MyST-Markdown notebook (``book/*.md`` whose front matter says
``jupytext: text_representation: format_name: myst``). nbval only collects ``.ipynb`` files, so this hook reads a chapter with
``jupytext.read`` in memory and hands the notebook to nbval's own collector; every code cell
becomes one test item, run in order in one kernel whose working directory is ``book/``. The
checks are the ``assert`` statements in the cells. Nothing is written to disk.

    python -m pytest -n 2 --dist loadfile --nbval-lax --nbval-current-env tests book

- Collected only when ``--nbval`` or ``--nbval-lax`` is given, like nbval's ``.ipynb`` files.
- Outputs are never compared: a ``.md`` chapter stores none.
- Cells tagged ``skip-execution`` (MyST-NB: not run at build time either), ``nbval-skip``, or
  starting with ``# NBVAL_SKIP`` are skipped; ``raises-exception`` cells may raise.
- A cell may run for ``--nbval-cell-timeout`` seconds. nbval's default is 2000 s; here it is
  CELL_TIMEOUT_S, the book build's per-cell limit (``execute.timeout`` in ``_config.yml``),
  unless given on the command line. pytest-timeout (``timeout`` in pyproject) still bounds
  each cell as well.
"""

import warnings
from collections import defaultdict

import jupytext
import pytest
from myst_nb.core.read import is_myst_markdown_notebook
from nbval.plugin import IPyNbCell, IPyNbFile, find_comment_markers, find_metadata_tags

CELL_TIMEOUT_S = 300  # keep equal to execute.timeout in _config.yml
NBVAL_DEFAULT_CELL_TIMEOUT_S = 2000  # nbval 0.11's default for --nbval-cell-timeout
SKIP_TAGS = {"skip-execution", "nbval-skip"}


def pytest_configure(config):
    option = config.option
    if getattr(option, "nbval_cell_timeout", None) == NBVAL_DEFAULT_CELL_TIMEOUT_S:
        option.nbval_cell_timeout = CELL_TIMEOUT_S


def is_notebook_chapter(path) -> bool:
    """True for a .md file that MyST-NB treats as a notebook (the same test the book build uses).

    That is a front matter with ``jupytext: text_representation: format_name: myst`` (or
    ``file_format: mystnb``); plain Markdown pages such as api.md are not collected."""
    return path.suffix == ".md" and is_myst_markdown_notebook(path.read_text(encoding="utf-8"))


class MystChapter(IPyNbFile):
    """nbval's notebook collector, fed by jupytext instead of nbformat.read(.ipynb)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.compare_outputs = False  # no stored outputs in a .md chapter to compare with

    def collect(self):
        # Same as nbval.plugin.IPyNbFile.collect (nbval 0.11), except for the two marked lines.
        self.nb = jupytext.read(self.path, fmt="md:myst")  # changed: jupytext, in memory
        code_cells = [cell for cell in self.nb.cells if cell.cell_type == "code"]
        for cell_num, cell in enumerate(code_cells):
            with warnings.catch_warnings(record=True) as ws:
                options = defaultdict(bool, find_metadata_tags(cell.metadata))
                comment_opts = dict(find_comment_markers(cell.source))
            for w in ws:
                warnings.warn_explicit(str(w.message), UserWarning, f"{self.path}:Cell {cell_num}", 0)
            options.update(comment_opts)
            if SKIP_TAGS & set(cell.metadata.get("tags", [])):
                options["skip"] = True  # changed: also honour MyST-NB's skip-execution
            options.setdefault("check", self.compare_outputs)
            yield IPyNbCell.from_parent(
                self, name=f"Cell {cell_num}", cell_num=cell_num, cell=cell, options=options
            )


def pytest_collect_file(file_path, parent):
    opt = parent.config.option
    if (opt.nbval or opt.nbval_lax) and is_notebook_chapter(file_path):
        return MystChapter.from_parent(parent, path=file_path)
