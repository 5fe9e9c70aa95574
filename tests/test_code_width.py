"""Every line of a chapter's code cells fits in the rendered cell: at most 88 columns.

The book's HTML theme clips code lines that are longer (no wrapping), so a reader would not see their end.
Cell options (``:tags:``, ``:mystnb:`` captions) count too: they are source lines of the cell."""
import re
from pathlib import Path

import pytest

BOOK = Path(__file__).resolve().parents[1] / "book"
MAX_COLUMNS = 88
FENCE_OPEN = re.compile(r"^(`{3,}|~{3,})\{code-cell\}")


def long_code_lines(text: str, limit: int = MAX_COLUMNS) -> list[tuple[int, int]]:
    """(line number, length) of every line inside a {code-cell} fence longer than ``limit``."""
    found, fence = [], None
    for number, line in enumerate(text.splitlines(), 1):
        if fence is None:
            m = FENCE_OPEN.match(line)
            fence = m.group(1) if m else None
        elif line.strip() == fence:
            fence = None
        elif len(line) > limit:
            found.append((number, len(line)))
    return found


def test_long_code_lines_are_found():
    text = "text " * 40 + "\n```{code-cell} ipython3\nx = 1\n" + "y" * 89 + "\n```\n" + "z" * 100 + "\n"
    assert long_code_lines(text) == [(4, 89)]


@pytest.mark.parametrize("chapter", sorted(p.name for p in BOOK.glob("*.md")))
def test_code_lines_fit_the_rendered_cell(chapter):
    found = long_code_lines((BOOK / chapter).read_text(encoding="utf-8"))
    assert not found, (f"{chapter}: code-cell lines longer than {MAX_COLUMNS} columns (clipped on the "
                       f"page): " + ", ".join(f"line {n} ({length})" for n, length in found))
